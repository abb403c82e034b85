"""The simulated host's NVMe controllers: what `nvme` (nvme-cli 2.x) answers for an NVMe PF.

Used by vfiotest.testing.simsysfs: an NVMe PF there gets a primary controller (/dev/nvmeN, named in
the PF's sysfs `nvme/` directory) with one secondary controller per VF, modelled on QEMU's
nvme with `sriov_max_vfs=4,sriov_vq_flexible=8,sriov_vi_flexible=4` as measured in the
emulated runner (QEMU 10.0.2; ../shared/notes/facts.md section 10):

  - secondary controllers start Offline with 0 VQ and 0 VI flexible resources;
  - assigning resources (virt-mgmt -a 8) is refused while the controller is Online
    (0x4120), above VQFRSM/VIFRSM per controller (0x4121), and beyond the free pool
    (0x4123, Invalid Resource Identifier, as QEMU answers);
  - Online (-a 9) needs at least 2 VQ and 1 VI and the controller's VF enabled (0x4120);
  - Offline (-a 7) always succeeds and returns the controller's resources;
  - disabling the VFs (sriov_numvfs 0) puts every secondary controller Offline with its
    resources returned (`disable_vfs`);
  - an unknown controller identifier is refused (0x411f).

Commands: `nvme list-secondary DEV -o json`, `nvme primary-ctrl-caps DEV -o json`,
`nvme virt-mgmt DEV -c CNTLID [-r RT] -a ACT [-n NR]`. A PF built with
{"virt_mgmt": False} answers list-secondary with Invalid Field (a controller without
virtualization management). Exit status 1 with the status on stderr, as nvme-cli does.
"""

from __future__ import annotations

import json
from typing import Any

STATUS = {
    0x4002: "Invalid Field in Command: A reserved coded value or an unsupported value in a defined field",
    0x411F: "Invalid Controller Identifier: An invalid controller id was specified",
    0x4120: ("Invalid Secondary Controller State: The requested secondary controller action is invalid based on "
             "the secondary and primary controllers current states"),
    0x4121: "Invalid Number of Controller Resources: The specified number of Flexible Resources is invalid",
    0x4123: "Invalid Resource Identifier: At least one of the specified resource identifiers was invalid",
}


def new_controller(index: int, totalvfs: int, vq_flexible: int = 8, vi_flexible: int = 4,
                   virt_mgmt: bool = True) -> dict[str, Any]:
    """The state of a primary controller /dev/nvme<index> with `totalvfs` secondaries."""
    return {"dev": f"nvme{index}", "virt_mgmt": virt_mgmt, "vqfrt": vq_flexible, "vifrt": vi_flexible,
            "vqfrsm": vq_flexible // max(totalvfs, 1), "vifrsm": vi_flexible // max(totalvfs, 1),
            "sec": [{"cntlid": i + 1, "vfn": i + 1, "scs": 0, "nvq": 0, "nvi": 0} for i in range(totalvfs)]}


def disable_vfs(ctrl: dict[str, Any]) -> None:
    """VF Enable cleared: every secondary controller Offline, its resources returned."""
    for s in ctrl["sec"]:
        s.update(scs=0, nvq=0, nvi=0)


def _caps(ctrl: dict[str, Any]) -> dict[str, int]:
    return {"cntlid": 0, "portid": 0, "crt": 3,
            "vqfrt": ctrl["vqfrt"], "vqrfa": sum(s["nvq"] for s in ctrl["sec"]), "vqrfap": 0,
            "vqprt": 1, "vqfrsm": ctrl["vqfrsm"], "vqgran": 1,
            "vifrt": ctrl["vifrt"], "virfa": sum(s["nvi"] for s in ctrl["sec"]), "virfap": 0,
            "viprt": 1, "vifrsm": ctrl["vifrsm"], "vigran": 1}


def _fail(code: int) -> tuple[int, str, str]:
    return 1, "", f"NVMe status: {STATUS[code]}(0x{code:x})\n"


def _opts(args: list[str]) -> dict[str, str]:
    names = {"-c": "cntlid", "--cntlid": "cntlid", "-r": "rt", "--rt": "rt", "-a": "act", "--act": "act",
             "-n": "nr", "--nr": "nr", "-o": "output", "--output-format": "output"}
    out: dict[str, str] = {}
    it = iter(args)
    for a in it:
        if "=" in a and a.split("=", 1)[0] in names:
            k, v = a.split("=", 1)
            out[names[k]] = v
        elif a in names:
            out[names[a]] = next(it, "")
    return out


def run(ctrls: dict[str, dict[str, Any]], numvfs: dict[str, int], words: list[str]) -> tuple[int, str, str]:
    """`nvme ...` (words[0] == "nvme") against `ctrls` ({"/dev/nvmeN": state}); `numvfs`
    says how many VFs each controller's PF has enabled. Returns (rc, stdout, stderr)."""
    if len(words) < 3:
        return 1, "", "usage: nvme <command> <device> [<args>]\n"
    cmd, dev, rest = words[1], words[2], words[3:]
    ctrl = ctrls.get(dev)
    if ctrl is None:
        return 1, "", f"Failed to open {dev}: No such file or directory\n"
    o = _opts(rest)
    if cmd == "primary-ctrl-caps":
        return 0, json.dumps(_caps(ctrl), indent=2) + "\n", ""
    if cmd == "list-secondary":
        if not ctrl["virt_mgmt"]:
            return _fail(0x4002)
        doc = {"num": len(ctrl["sec"]), "secondary-controllers": [
            {"secondary-controller-identifier": s["cntlid"], "primary-controller-identifier": 0,
             "secondary-controller-state": s["scs"], "virtual-function-number": s["vfn"],
             "num-virtual-queues": s["nvq"], "num-virtual-interrupts": s["nvi"]} for s in ctrl["sec"]]}
        return 0, json.dumps(doc, indent=2) + "\n", ""
    if cmd != "virt-mgmt":
        return 1, "", f"nvme: {cmd}: not modelled by the simulated host\n"
    if not ctrl["virt_mgmt"]:
        return _fail(0x4002)
    try:
        cntlid, act = int(o.get("cntlid", "0"), 0), int(o.get("act", "0"), 0)
        rt, nr = int(o.get("rt", "0"), 0), int(o.get("nr", "0"), 0)
    except ValueError:
        return 1, "", "nvme virt-mgmt: bad number\n"
    sec = next((s for s in ctrl["sec"] if s["cntlid"] == cntlid), None)
    if sec is None:
        return _fail(0x411F)
    if rt not in (0, 1):
        return _fail(0x4123)
    if act == 8:
        if sec["scs"]:
            return _fail(0x4120)
        key, total, most = ("nvi", "vifrt", "vifrsm") if rt else ("nvq", "vqfrt", "vqfrsm")
        if nr > ctrl[most]:
            return _fail(0x4121)
        used = sum(s[key] for s in ctrl["sec"])
        if nr - sec[key] > ctrl[total] - used:
            return _fail(0x4123)
        sec[key] = nr
        return 0, f"success, Number of Controller Resources Modified (NRM):{nr:#x}\n", ""
    if act == 9:
        if not sec["nvi"] or sec["nvq"] < 2 or sec["vfn"] > numvfs.get(dev, 0):
            return _fail(0x4120)
        sec["scs"] = 1
        return 0, "success, Number of Controller Resources Modified (NRM):0\n", ""
    if act == 7:
        sec.update(scs=0, nvq=0, nvi=0)
        return 0, "success, Number of Controller Resources Modified (NRM):0\n", ""
    return _fail(0x4002)


__all__ = ["disable_vfs", "new_controller", "run"]
