"""NVMe virtualization management: bringing an NVMe PF's VFs to a usable state.

An NVMe PF with SR-IOV has one secondary controller per VF. On controllers with
flexible resources (NVMe's Virtualization Management, QEMU's nvme with
`sriov_vq_flexible`/`sriov_vi_flexible`, and real SR-IOV SSDs) a secondary
controller starts Offline with no queue (VQ) and no interrupt (VI) resources, and
a VF in that state cannot be used by any driver (the kernel's nvme says "Device
not ready", CSTS.CFS). Bring-up, done by sriov.set_numvfs when it creates VFs:

  1. sriov_drivers_autoprobe off (sriov.py; no driver probes a VF that is not ready)
  2. per VF (VF n is the secondary controller whose VFN is n, read from
     `nvme list-secondary <primary> -o json`): journal the controller's state, then
     `nvme virt-mgmt <primary> -c <cntlid> -r 0 -a 8 -n <VQ>` and `-r 1 ... -n <VI>`
  3. sriov_numvfs written (sriov.py)
  4. per VF: `nvme virt-mgmt <primary> -c <cntlid> -a 9` (online)
  5. autoprobe back to what the caller wants, VFs probed (sriov.py)

The primary controller's character device is read from the PF's sysfs
(`/sys/bus/pci/devices/<pf>/nvme/nvmeN` -> /dev/nvmeN). The per-VF counts come from
`nvme primary-ctrl-caps -o json`: VQ at most VQFRSM and VI at most VIFRSM per
controller, what is free split evenly, rounded down to the granularity, at least
2 VQ (admin + one I/O queue) and 1 VI.

Skipped (nothing run, nothing journaled): a PF without an nvme character device
(not NVMe, or no nvme driver), a controller that does not answer list-secondary
(no virtualization management: its VFs have fixed resources), and secondary
controllers already Online.

The journal kind "nvme-secondary" {address: PF, cntlid, online, nvq, nvi} is
written before a controller is changed; its undo puts the controller Offline
(which returns its resources, NVMe's Offline action) and, when it had resources
of its own before, gives those back.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from .errors import VFCreateError
from .host import Host

SYS_DEV = "/sys/bus/pci/devices"
NVME_TIMEOUT = 60.0

#: virt-mgmt actions (NVMe base spec, Virtualization Management command, CDW10.ACT)
ACT_OFFLINE = 7
ACT_ASSIGN = 8
ACT_ONLINE = 9
#: resource types (CDW10.RT)
RT_VQ = 0
RT_VI = 1


class VirtMgmtError(VFCreateError):
    """An NVMe virtualization management step (nvme-cli on the target) failed."""

    NO_NVME_CLI = "no-nvme-cli"
    COMMAND = "virt-mgmt"
    RESOURCES = "resources"


@dataclass(frozen=True)
class Secondary:
    """One secondary controller as `nvme list-secondary` reports it."""

    cntlid: int
    vfn: int
    online: bool
    nvq: int
    nvi: int

    def as_dict(self) -> dict[str, Any]:
        return {"cntlid": self.cntlid, "vfn": self.vfn, "online": self.online, "nvq": self.nvq, "nvi": self.nvi}


@dataclass(frozen=True)
class PrimaryCaps:
    """The flexible-resource fields of `nvme primary-ctrl-caps`."""

    vqfrt: int   # flexible VQ resources, total
    vqrfap: int  # ... allocated to the primary
    vqrfa: int   # ... allocated to secondaries
    vqfrsm: int  # most per secondary
    vqgran: int
    vifrt: int
    virfap: int
    virfa: int
    vifrsm: int
    vigran: int


@dataclass(frozen=True)
class Plan:
    """What bring-up will do on one PF: give `nvq`/`nvi` to each controller in `controllers`
    (those of VFs 1..n that are Offline), then put them Online."""

    pf: str
    device: str
    controllers: tuple[Secondary, ...]
    nvq: int
    nvi: int


def primary_device(host: Host, pf: str) -> str | None:
    """/dev/nvmeN of the NVMe PF `pf` (its primary controller), from sysfs; None when the PF
    has no nvme character device (not NVMe, or not on the nvme driver)."""
    names = sorted(n for n in host.listdir(f"{SYS_DEV}/{pf}/nvme") or [] if n.startswith("nvme") and n[4:].isdigit())
    return f"/dev/{names[0]}" if names else None


def _nvme(host: Host, pf: str, args: list[str], what: str, timeout: float = NVME_TIMEOUT) -> Any:
    res = host.run(["nvme", *args], timeout=timeout)
    if res.rc == 127:
        raise VirtMgmtError(f"nvme-cli is not installed on {host.name}; the NVMe PF {pf} needs it to bring its VFs online",
                            hint="install nvme-cli on the target (Debian: apt-get install nvme-cli)",
                            address=pf, reason=VirtMgmtError.NO_NVME_CLI)
    if res.rc != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        raise VirtMgmtError(f"{what} on {pf} failed (exit {res.rc}): {tail}",
                            hint=f"run it by hand on the target to see more: {shlex.join(['nvme', *args])}; "
                                 "then `vfiotest restore`",
                            address=pf, cause=tail, reason=VirtMgmtError.COMMAND)
    return res.stdout


def _json(text: str, pf: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise VirtMgmtError(f"{what} on {pf} did not print a JSON object: {text.strip()[:200]!r}",
                            hint="nvme-cli 2.x prints JSON with `-o json`; install a newer nvme-cli on the target",
                            address=pf, reason=VirtMgmtError.COMMAND)
    return doc


def parse_secondaries(doc: dict[str, Any]) -> list[Secondary]:
    """The controllers of `nvme list-secondary -o json` (nvme-cli 2.x field names)."""
    out = []
    for e in doc.get("secondary-controllers") or []:
        out.append(Secondary(cntlid=int(e["secondary-controller-identifier"]),
                             vfn=int(e["virtual-function-number"]),
                             online=int(e["secondary-controller-state"]) & 1 == 1,
                             nvq=int(e["num-virtual-queues"]), nvi=int(e["num-virtual-interrupts"])))
    return out


def parse_caps(doc: dict[str, Any]) -> PrimaryCaps:
    """The fields of `nvme primary-ctrl-caps -o json` bring-up needs."""
    return PrimaryCaps(**{f: int(doc[f]) for f in PrimaryCaps.__dataclass_fields__})


def secondaries(host: Host, pf: str, device: str | None = None) -> list[Secondary] | None:
    """The secondary controllers of `pf`; None when it has no nvme device, nvme-cli is
    missing, or the controller does not list any (no virtualization management)."""
    device = device or primary_device(host, pf)
    if device is None:
        return None
    res = host.run(["nvme", "list-secondary", device, "-o", "json"], timeout=NVME_TIMEOUT)
    if res.rc != 0:
        return None
    try:
        return parse_secondaries(json.loads(res.stdout)) or None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def plan(host: Host, pf: str, n: int) -> Plan | None:
    """What bring-up of `n` VFs on `pf` needs, or None when it needs none (see the module doc)."""
    if n <= 0:
        return None
    device = primary_device(host, pf)
    if device is None:
        return None
    res = host.run(["nvme", "list-secondary", device, "-o", "json"], timeout=NVME_TIMEOUT)
    if res.rc == 127:
        _nvme(host, pf, ["list-secondary", device, "-o", "json"], "nvme list-secondary")  # raises: no nvme-cli
    if res.rc != 0:
        return None  # no virtualization management: the VFs come with their own resources
    ctrls = {c.vfn: c for c in parse_secondaries(_json(res.stdout, pf, "nvme list-secondary"))}
    todo = tuple(ctrls[v] for v in range(1, n + 1) if v in ctrls and not ctrls[v].online)
    if not todo:
        return None
    caps = parse_caps(_json(_nvme(host, pf, ["primary-ctrl-caps", device, "-o", "json"], "nvme primary-ctrl-caps"),
                            pf, "nvme primary-ctrl-caps"))
    mine_vq, mine_vi = sum(c.nvq for c in todo), sum(c.nvi for c in todo)
    free_vq = caps.vqfrt - caps.vqrfap - caps.vqrfa + mine_vq
    free_vi = caps.vifrt - caps.virfap - caps.virfa + mine_vi
    nvq = _share(free_vq, len(todo), caps.vqfrsm, max(caps.vqgran, 1))
    nvi = _share(free_vi, len(todo), caps.vifrsm, max(caps.vigran, 1))
    if nvq < 2 or nvi < 1:
        raise VirtMgmtError(
            f"{pf} ({device}) has too few free flexible resources for {len(todo)} more online VFs: "
            f"{free_vq} VQ and {free_vi} VI free, each VF needs at least 2 VQ and 1 VI",
            hint="create fewer VFs, or free resources (`nvme primary-ctrl-caps`, `nvme list-secondary` on the target)",
            address=pf, reason=VirtMgmtError.RESOURCES)
    return Plan(pf, device, todo, nvq, nvi)


def _share(free: int, count: int, most: int, gran: int) -> int:
    each = min(most or free, free // count)
    return each - each % gran if each >= gran else each


def journal_entry(pf: str, c: Secondary) -> dict[str, Any]:
    return {"kind": "nvme-secondary", "address": pf, "cntlid": c.cntlid, "vfn": c.vfn,
            "online": c.online, "nvq": c.nvq, "nvi": c.nvi}


def assign(host: Host, p: Plan, journal: Any = None) -> None:
    """Step 2: journal each controller, then give it its VQ and VI resources (VFs not yet
    enabled, the controller Offline)."""
    for c in p.controllers:
        if journal is not None:
            journal.record(journal_entry(p.pf, c))
        for rt, nr in ((RT_VQ, p.nvq), (RT_VI, p.nvi)):
            _nvme(host, p.pf, ["virt-mgmt", p.device, "-c", str(c.cntlid), "-r", str(rt), "-a", str(ACT_ASSIGN),
                               "-n", str(nr)], f"assigning {nr} {'VI' if rt else 'VQ'} to secondary controller {c.cntlid}")


def online(host: Host, p: Plan) -> None:
    """Step 4: each controller Online (its VF exists now)."""
    for c in p.controllers:
        _nvme(host, p.pf, ["virt-mgmt", p.device, "-c", str(c.cntlid), "-a", str(ACT_ONLINE)],
              f"putting secondary controller {c.cntlid} (VF {c.vfn}) online")


def restore_secondary(host: Host, entry: dict[str, Any]) -> None:
    """Undo of an "nvme-secondary" entry: the controller Offline (resources returned), then its
    own former resources given back when it had any. A controller that was Online before
    vfiotest touched it is never journaled (bring-up skips it)."""
    pf = str(entry["address"])
    device = primary_device(host, pf)
    if device is None:
        return  # the PF is gone or off the nvme driver: nothing holds the controller's state
    found = {c.cntlid: c for c in secondaries(host, pf, device) or []}
    cur = found.get(int(entry["cntlid"]))
    if cur is None:
        return
    want_q, want_i = int(entry.get("nvq") or 0), int(entry.get("nvi") or 0)
    if not cur.online and (cur.nvq, cur.nvi) == (want_q, want_i):
        return
    cntlid = str(cur.cntlid)
    _nvme(host, pf, ["virt-mgmt", device, "-c", cntlid, "-a", str(ACT_OFFLINE)],
          f"putting secondary controller {cntlid} offline")
    for rt, nr in ((RT_VQ, want_q), (RT_VI, want_i)):
        if nr:
            _nvme(host, pf, ["virt-mgmt", device, "-c", cntlid, "-r", str(rt), "-a", str(ACT_ASSIGN), "-n", str(nr)],
                  f"giving secondary controller {cntlid} back its {nr} {'VI' if rt else 'VQ'}")


def namespace_device(host: Host, pf: str, nsid: int) -> str | None:
    """/dev/nvmeXnN through which the target's kernel reaches namespace `nsid` of the PF's
    controller: the multipath head (nvme<subsys>n<nsid>, named from the path's
    nvme<subsys>c<ctrl>n<nsid> in sysfs) or, without multipath, the namespace itself."""
    for ctrl in host.listdir(f"{SYS_DEV}/{pf}/nvme") or []:
        for name in host.listdir(f"{SYS_DEV}/{pf}/nvme/{ctrl}") or []:
            m = re.fullmatch(r"nvme(\d+)(?:c\d+)?n(\d+)", name)
            if m and int(m.group(2)) == nsid:
                return f"/dev/nvme{m.group(1)}n{m.group(2)}"
    return None


def vf_states(host: Host, pf: str, vfs: list[str]) -> dict[str, dict[str, Any]]:
    """{VF address: its secondary controller (cntlid, online, nvq, nvi)} for an NVMe PF's
    VFs in virtfn order; {} when the PF has no virtualization management."""
    found = {c.vfn: c for c in secondaries(host, pf) or []}
    return {vf: found[i + 1].as_dict() for i, vf in enumerate(vfs) if i + 1 in found}


def describe(state: dict[str, Any]) -> str:
    """'nvme online, 2 VQ 1 VI' for `vfiotest devices`."""
    return f"nvme {'online' if state['online'] else 'offline'}, {state['nvq']} VQ {state['nvi']} VI"


# The journal entry kind this module owns; vfiotest.journal registers it (journal.KIND_MODULES).
JOURNAL_KINDS: list[dict[str, Any]] = [
    {"kind": "nvme-secondary", "required": ("address", "cntlid"), "undo": restore_secondary,
     "key": lambda e: (e.get("address"), int(e.get("cntlid", -1)))},
]

__all__ = ["Plan", "PrimaryCaps", "Secondary", "VirtMgmtError", "assign", "describe", "namespace_device", "online", "parse_caps",
           "parse_secondaries", "plan", "primary_device", "restore_secondary", "secondaries", "vf_states"]
