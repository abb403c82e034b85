"""Host prerequisites for VFIO passthrough: gathered in one round trip, judged per profile.

`gather(host)` returns the raw facts; `check_all(facts, inventory, profile)` turns them
into `Check`s, each with a status (ok / missing / info), what was seen, and the fix.
The `host_prereqs` suite asserts them; `vfiotest doctor` prints them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:
    from .host import Host
    from .pci import Inventory
    from .profiles import Profile

OK, MISSING, INFO = "ok", "missing", "info"

FACTS_SCRIPT = r"""
import json, os, resource, shutil, subprocess, sys
R = sys.argv[1] if len(sys.argv) > 1 else ""  # sysroot of a simulated host: no tools are run there
def rd(p):
    try:
        with open(R + p) as f: return f.read().strip()
    except OSError: return None
def ver(cmd):
    if R or not shutil.which(cmd[0]): return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr).strip() else ""
    except (OSError, subprocess.SubprocessError) as e:
        return "error: %s" % e
def modstate(name):
    if os.path.isdir(R + "/sys/module/" + name): return "loaded"
    if R and os.path.isdir(R + "/sys/bus/pci/drivers/vfio-pci"): return "loaded"
    if R or not shutil.which("modinfo"): return "unknown"
    p = subprocess.run(["modinfo", "-n", name], capture_output=True, text=True, timeout=10)
    return "available" if p.returncode == 0 else "absent"
cg = "unknown"
mounts = rd("/proc/mounts") or ""
types = {l.split()[1]: l.split()[2] for l in mounts.splitlines() if len(l.split()) > 2}
if types.get("/sys/fs/cgroup") == "cgroup2": cg = "unified"
elif "/sys/fs/cgroup/unified" in types: cg = "hybrid"
elif any(m.startswith("/sys/fs/cgroup/") and t == "cgroup" for m, t in types.items()): cg = "legacy"
soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
interrupts = rd("/proc/interrupts") or ""
print(json.dumps({
  "cmdline": rd("/proc/cmdline") or "",
  "kernel": os.uname().release,
  "iommu_groups": len(os.listdir(R + "/sys/kernel/iommu_groups")) if os.path.isdir(R + "/sys/kernel/iommu_groups") else 0,
  "iommu_units": sorted(os.listdir(R + "/sys/class/iommu")) if os.path.isdir(R + "/sys/class/iommu") else [],
  "irq_remapping": "IR-" in interrupts,
  "unsafe_interrupts": rd("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"),
  "cgroup_mode": cg,
  "selinux": (None if rd("/sys/fs/selinux/enforce") is None else ("enforcing" if rd("/sys/fs/selinux/enforce") == "1" else "permissive")),
  "modules": {m: modstate(m) for m in ("vfio", "vfio_iommu_type1", "vfio_pci")},
  "memlock": [soft, hard],
  "uid": os.getuid(),
  "simulated": bool(R),
  "podman": ver(["podman", "--version"]),
  "runc": ver(["runc", "--version"]),
  "kata_runtime": ver(["kata-runtime", "--version"]),
  "os_release": dict(l.split("=", 1) for l in (rd("/etc/os-release") or "").splitlines() if "=" in l),
}))
"""


@dataclass
class Check:
    name: str
    status: str
    seen: str
    fix: str = ""
    #: kernel arguments that would fix it (for --allow-reboot)
    kernel_args: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != MISSING

    def line(self) -> str:
        fix = f"  -> {self.fix}" if self.status == MISSING and self.fix else ""
        return f"[{self.status:^7}] {self.name}: {self.seen}{fix}"


def gather(host: Host, timeout: float = 60) -> dict[str, Any]:
    """Facts about the target's kernel, modules, limits and tools (one round trip)."""
    return host.python(FACTS_SCRIPT, [host.sysroot], timeout=timeout, check=True, what="prerequisite facts").json()


def iommu_kernel_arg(facts: dict[str, Any]) -> str:
    vendor = "amd" if any(u.startswith("ivhd") for u in facts["iommu_units"]) else "intel"
    return "amd_iommu=on" if vendor == "amd" else "intel_iommu=on"


CGROUP_V1_ARG = "systemd.unified_cgroup_hierarchy=0"
UNSAFE_INTERRUPTS_ARG = "vfio_iommu_type1.allow_unsafe_interrupts=1"   # the module option, from the command line
CGROUP_V2_ARG = "systemd.unified_cgroup_hierarchy=1"


def kata_major(kata_runtime: str | None, bundle_path: str | None) -> int | None:
    """The Kata major version the session's Kata layers drive: 1 when a bundle is there (the
    harness drives 1.x bundles only) or Kata 1.x is installed (`kata-runtime --version` text);
    None otherwise (no Kata 1.x: the Kata layers are unavailable; or only a 2.x/3.x they refuse)."""
    if bundle_path:
        return 1
    m = re.search(r"(\d+)\.\d+", kata_runtime or "")
    return 1 if m and int(m.group(1)) == 1 else None


def wanted_cgroup_mode(profile: Profile, kata: int | None) -> tuple[str, str]:
    """(mode, why): Kata 1.x needs cgroup v1 (the seed's systemd.unified_cgroup_hierarchy=0)
    whatever the profile says; otherwise the profile's "v1", "v2" or "any"."""
    if kata == 1:
        return "v1", "Kata 1.x needs cgroup v1"
    return profile.cgroup_mode or "any", f"profile {profile.name}"


def required_kernel_args(facts: dict[str, Any], profile: Profile, kata: int | None = None) -> list[str]:
    """The kernel arguments this host's command line must have: the profile's (its IOMMU
    argument made the vendor's: amd_iommu=on on AMD) and the cgroup one the Kata version needs."""
    iommu = iommu_kernel_arg(facts)
    args = [iommu if a in ("intel_iommu=on", "amd_iommu=on") else a for a in profile.kernel_args]
    mode, _why = wanted_cgroup_mode(profile, kata)
    cg = {"v1": CGROUP_V1_ARG, "v2": CGROUP_V2_ARG}.get(mode)
    if cg and cg not in args:
        args = [a for a in args if not a.startswith("systemd.unified_cgroup_hierarchy=")] + [cg]
    return list(dict.fromkeys(args))


_FALSE, _TRUE = {"0", "false", "no", "off", "n"}, {"1", "true", "yes", "on", "y"}


def cmdline_has(cmdline: str | list[str], arg: str) -> bool:
    """Whether the kernel command line gives `arg`'s effect: the last argument of that name
    has its value (`intel_iommu=on` is met by `intel_iommu=on,sm_on`; booleans by any spelling)."""
    words = cmdline.split() if isinstance(cmdline, str) else list(cmdline)
    name, _, want = arg.partition("=")
    last = None
    for w in words:
        n, eq, v = w.partition("=")
        if n == name:
            last = v if eq else ""
    if last is None:
        return False
    if last == want:
        return True
    for group in (_FALSE, _TRUE):
        if want.lower() in group and last.lower() in group:
            return True
    return bool(want) and want in last.split(",")


def missing_args(cmdline: str, required: list[str]) -> list[str]:
    return [a for a in required if not cmdline_has(cmdline, a)]


def check_all(facts: dict[str, Any], inventory: Inventory, profile: Profile, kata: int | None = None) -> list[Check]:
    """Every prerequisite as a Check, in the order a user would fix them. `kata`: the Kata
    major the session drives (kata_major), which may need more of the host than the profile."""
    checks = []
    cmd = facts["cmdline"].split()
    required = required_kernel_args(facts, profile, kata)
    lacking = missing_args(facts["cmdline"], required)
    checks.append(Check(
        "kernel arguments", MISSING if lacking else OK,
        (f"/proc/cmdline lacks {' '.join(lacking)}" if lacking else f"/proc/cmdline has {' '.join(required)}")
        + f" (wanted by profile {profile.name}" + (", Kata 1.x)" if kata == 1 else ")"),
        fix=f"add {' '.join(lacking)} to the kernel command line and reboot", kernel_args=lacking))
    live = facts["iommu_groups"] > 0 and bool(facts["iommu_units"])
    arg = iommu_kernel_arg(facts)
    configured = cmdline_has(cmd, arg) or arg not in required
    if live and configured:
        how = "on"
    elif live:
        how = f"on by this kernel's default only: /proc/cmdline lacks {arg}, which the profile asks for"
    else:
        how = "off" + ("" if configured else f": /proc/cmdline lacks {arg}")
    checks.append(Check(
        "IOMMU enabled", OK if live and configured else MISSING,
        f"{how}; {facts['iommu_groups']} IOMMU groups, units {facts['iommu_units'] or 'none'}",
        fix=f"boot with {arg} (and enable VT-d/AMD-Vi in firmware)",
        kernel_args=[] if configured else [arg]))
    unsafe = facts["unsafe_interrupts"] in ("Y", "1")
    ir_ok = facts["irq_remapping"] or unsafe
    allow = getattr(profile, "allow_unsafe_interrupts", False)
    checks.append(Check(
        "interrupt remapping", OK if ir_ok else MISSING,
        "active (IR- vectors in /proc/interrupts)" if facts["irq_remapping"]
        else ("off, but vfio_iommu_type1 allow_unsafe_interrupts=1 is set" if unsafe else "off"),
        fix="enable interrupt remapping in firmware, or (less safe) "
            + (f"boot with {UNSAFE_INTERRUPTS_ARG} (profile {profile.name} allows it)" if allow else
               "echo 'options vfio_iommu_type1 allow_unsafe_interrupts=1' > /etc/modprobe.d/iommu_unsafe_interrupts.conf "
               f"(profile {profile.name} does not let the harness do it)"),
        kernel_args=[UNSAFE_INTERRUPTS_ARG] if not ir_ok and allow else []))
    # "v1" (the seed's systemd.unified_cgroup_hierarchy=0: legacy or hybrid), "v2", "any"
    want, why = wanted_cgroup_mode(profile, kata)
    seen = facts["cgroup_mode"]
    cg_ok = want in (None, "any") or (want == "v1" and seen in ("legacy", "hybrid")) or (want == "v2" and seen == "unified")
    cg_arg = CGROUP_V1_ARG if want == "v1" else CGROUP_V2_ARG
    checks.append(Check(
        "cgroup mode", OK if cg_ok else MISSING,
        f"{seen} mounted (wanted: {want or 'any'}, {why})",
        fix=f"boot with {cg_arg}", kernel_args=[] if cg_ok else [cg_arg]))
    se = facts["selinux"]
    checks.append(Check("SELinux permissive or absent", MISSING if se == "enforcing" else OK,
                        se or "absent", fix="setenforce 0 (and SELINUX=permissive in /etc/selinux/config)"))
    mods = facts["modules"]
    bad = [m for m, s in mods.items() if s == "absent"]
    checks.append(Check("VFIO modules available", MISSING if bad else OK,
                        ", ".join(f"{m} {s}" for m, s in mods.items()),
                        fix=f"install a kernel with {', '.join(bad)} (CONFIG_VFIO_PCI)"))
    soft, hard = facts["memlock"]
    unlimited = soft < 0 or soft >= 2 ** 62
    checks.append(Check(
        "memlock and CAP_IPC_LOCK", INFO,
        f"RLIMIT_MEMLOCK {'unlimited' if unlimited else f'{soft // 1024} KiB'} for uid {facts['uid']}; "
        "containers need --cap-add CAP_IPC_LOCK (or a memlock ulimit as large as their DMA mappings) to map DMA through VFIO"))
    podman_ok = bool(re.search(r"\d+\.\d+", facts["podman"] or ""))    # "error: ..." when it does not run
    checks.append(Check("podman present", OK if podman_ok else (INFO if facts.get("simulated") else MISSING),
                        facts["podman"] or ("not looked for on a simulated host" if facts.get("simulated") else "not installed"),
                        fix="apt-get install podman runc (or dnf install podman)"))
    kata_rt = facts["kata_runtime"]
    no_kata = ("not installed on the target; a Kata 1.x bundle is used (VFIOTEST_KATA_BUNDLE, else ../shared/kata "
               "beside the checkout): `vfiotest kata detect` says which" if kata == 1 else
               "not installed on the target, and no Kata 1.x bundle (VFIOTEST_KATA_BUNDLE, ../shared/kata): the Kata "
               "layers are unavailable until VFIOTEST_KATA_BUNDLE names one (../shared/kata/build.sh builds it); "
               "`vfiotest kata detect` says more")
    checks.append(Check("Kata runtime present", INFO if not kata_rt else OK, kata_rt or no_kata))
    pfs = [d for d in inventory.devices.values()
           if d.is_pf and d.vendor_device in profile.pf_ids and d.address not in inventory.protected]
    checks.append(Check("supported SR-IOV PF found", OK if pfs else MISSING,
                        ", ".join(f"{d.address} {d.vendor_device} ({d.sriov.numvfs}/{d.sriov.totalvfs} VFs, "  # type: ignore[union-attr]  # a PF has .sriov
                                  f"{d.driver or 'no driver'})" for d in pfs)
                        or f"none of {sorted(profile.pf_ids)}",
                        fix=f"use a runner with one of the profile {profile.name}'s devices, or --profile"))
    return checks


def missing_kernel_args(checks: Iterable[Check]) -> list[str]:
    """The kernel arguments the missing checks ask for, each once, in order."""
    return list(dict.fromkeys(a for c in checks if c.status == MISSING for a in c.kernel_args))
