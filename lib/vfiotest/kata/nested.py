"""The Kata guest's stand-in: a second-level QEMU VM inside the runner.

Kata cannot be installed on the emulated runner, so the guest side is stood
in by the image `vfiotest.kata.initrd` builds, booted by QEMU/KVM *inside* the
runner (../shared/notes/facts.md §4, "the guest side, nested"): q35 with its own vIOMMU
(`intel-iommu`, the guest side of Kata's `enable_iommu = true`), guest
`intel_iommu=on`, and the VF passed through with `-device vfio-pci,host=<VF>`
(the VF bound to vfio-pci in the runner first, as Kata requires on its host).
The agent stand-in in the image runs the prestart hooks as the agent would and
prints a report on the serial console; `NestedGuest.boot()` returns it parsed.

The controller's root is visible read-only inside the runner at the same
paths, so the kernel and initrd under /var/cache/vfiotest need no copying.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional

from ..errors import ProvisionError, TargetError
from ..pci import Inventory, PciAddress, PciDevice
from .standin_agent import REPORT_BEGIN, REPORT_END, REPORT_LINE

if TYPE_CHECKING:
    from ..host import Host

QEMU = "qemu-system-x86_64"
DEFAULT_RUNS = ("main", "again", "none", "malformed")


def parse_report(console: str) -> dict[str, Any] | None:
    """The stand-in's report from console text; None when there is none (the guest
    did not get that far). Raises ProvisionError when it is there but damaged."""
    lines = console.replace("\r", "").split("\n")
    begin = next((i for i, line in enumerate(lines) if line.startswith(REPORT_BEGIN)), None)
    if begin is None:
        return None
    _, size, digest = lines[begin].split()[:3]
    chunks = {}
    for line in lines[begin + 1:]:
        if line.startswith(REPORT_END):
            break
        if line.startswith(REPORT_LINE):
            parts = line[len(REPORT_LINE):].split()
            if len(parts) == 2 and parts[0].isdigit():
                chunks[int(parts[0])] = parts[1]
    blob = base64.b64decode("".join(chunks[k] for k in sorted(chunks)) or b"")
    if len(blob) != int(size) or hashlib.sha256(blob).hexdigest() != digest:
        raise ProvisionError("the nested guest's report on the console is damaged (size or checksum differ)",
                             hint="kernel messages may have cut into it: keep `quiet` on the guest command line")
    return json.loads(blob)


@dataclass
class GuestReport:
    """What the nested guest said: hook runs, hook log, /dev/vfio, PCI state."""

    data: dict
    console: str
    boot_seconds: float                     # QEMU start to power-off, measured in the runner
    command: List[str] = field(default_factory=list)
    #: the container id the hook logged for the guest's main run (set by the guest backend)
    main_container: Optional[str] = None

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data.get("runs", [])

    def run(self, kind: str) -> dict[str, Any]:
        return next(r for r in self.runs if r["kind"] == kind)

    @property
    def hook_log(self) -> list[dict[str, Any]]:
        """The hook's log lines from the guest's /tmp, parsed."""
        out = []
        for line in (self.data.get("hook_log") or "").splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def log_for(self, container: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.hook_log if (container is None or e.get("container") == container)
                and (action is None or e.get("action") == action)]

    @property
    def dev_vfio(self) -> dict[str, str]:
        return self.data.get("vfio_after", {})

    def inventory(self, when: str = "after") -> Inventory:
        """The guest's PCI state and /dev/vfio as the harness's one device model
        (vfiotest.pci.Inventory): "before" the hook (the stand-in's snapshot) or "after" it.
        Group numbers are the guest's own."""
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', not {when!r}")
        devices: dict[str, PciDevice] = {}
        groups: dict[str, list[str]] = {}
        for a, s in sorted((self.data.get(f"pci_{when}") or {}).items()):
            addr = PciAddress(a)
            g = s.get("iommu_group")
            devices[addr] = PciDevice(address=addr, vendor=s.get("vendor") or "", device=s.get("device") or "",
                                      pci_class=s.get("class") or "", driver=s.get("driver"),
                                      driver_override=s.get("driver_override"), iommu_group=g)
            if g:
                groups.setdefault(g, []).append(addr)
        return Inventory(devices, groups, dict(self.data.get(f"vfio_{when}") or {}), drivers=[], protected={},
                         identity={"hostname": "guest"})

    @property
    def pci_before(self) -> dict[str, dict[str, Any]]:
        return self.data.get("pci_before", {})

    @property
    def pci_after(self) -> dict[str, dict[str, Any]]:
        return self.data.get("pci_after", {})

    @property
    def hooks(self) -> list[str]:
        return self.data.get("hooks", [])

    @property
    def hook_seconds(self) -> float | None:
        """Guest uptime when the stand-in started running hooks (boot-to-hook inside the guest)."""
        return self.data.get("uptime_at_start")


class NestedGuest:
    """Boots the guest image in a second-level VM on `host` (the runner)."""

    def __init__(self, host: Host, kernel: str, initrd: str, *, memory_mb: int = 512, accel: str = "kvm",
                 timeout: float = 240.0) -> None:
        self.host, self.kernel, self.initrd = host, kernel, initrd
        self.memory_mb, self.accel, self.timeout = memory_mb, accel, timeout

    def command(self, vfs: Sequence[str] = (), annotation: str | None = None, runs: Sequence[str] = DEFAULT_RUNS,
                hook_path: str | None = None, console: str = "/dev/stdout", pidfile: str | None = None) -> list[str]:
        append = ["console=ttyS0", "quiet", "loglevel=1", "intel_iommu=on", "panic=-1",
                  "rd.shell=0", "rd.emergency=poweroff", f"vfiotest.runs={','.join(runs)}"]
        if annotation is not None:
            if any(c.isspace() for c in annotation):
                raise ValueError("annotation must not hold spaces (use commas)")
            append.append(f"vfiotest.vfio={annotation}")
        if hook_path:
            append.append(f"vfiotest.hookpath={hook_path}")
        cpu = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
        cmd = [QEMU, *cpu, "-m", str(self.memory_mb), "-smp", "1",
               "-machine", "q35,kernel-irqchip=split",
               # its own vIOMMU before the passed-through device: the guest side of enable_iommu
               "-device", "intel-iommu,intremap=on,caching-mode=on",
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-net", "none",
               "-serial", f"file:{console}", "-monitor", "none",
               "-kernel", self.kernel, "-initrd", self.initrd, "-append", " ".join(append)]
        for vf in vfs:
            cmd += ["-device", f"vfio-pci,host={vf}"]
        if pidfile:
            cmd += ["-pidfile", pidfile]
        return cmd

    def boot(self, vfs: Sequence[str] = (), annotation: str | None = None, runs: Sequence[str] = DEFAULT_RUNS,
             hook_path: str | None = None) -> GuestReport:
        """Boot, let the stand-in run the hooks, return its `GuestReport` (the VM is gone after)."""
        tag = f"vfiotest-nested-{int(time.time() * 1000)}"
        console, pidfile = f"/tmp/{tag}.console", f"/tmp/{tag}.pid"
        cmd = self.command(vfs, annotation, runs, hook_path, console=console, pidfile=pidfile)
        # `timeout -s KILL` inside the runner: QEMU never outlives the call, whatever happens to SSH.
        script = (f"rm -f {console}; t0=$(date +%s.%N); "
                  f"timeout -s KILL {int(self.timeout)} {shlex.join(cmd)} >{console}.qemu 2>&1; rc=$?; "
                  "t1=$(date +%s.%N); "
                  f"echo \"QEMU-RC $rc $t0 $t1\"; cat {console}.qemu; echo QEMU-CONSOLE; cat {console}; "
                  f"rm -f {console} {console}.qemu {pidfile}")
        res = self.host.run(["sh", "-c", script], timeout=self.timeout + 30)
        out = res.stdout
        head, _, console_text = out.partition("QEMU-CONSOLE\n")
        first = head.splitlines()[0].split() if head.strip() else []
        if len(first) != 4 or first[0] != "QEMU-RC":
            raise TargetError(f"the nested guest's QEMU gave no status on {self.host.name}: {out[-500:]} {res.stderr[-500:]}",
                              hint="run the command of `vfiotest kata nested --print` in the runner by hand")
        rc, t0, t1 = int(first[1]), float(first[2]), float(first[3])
        qemu_out = "\n".join(head.splitlines()[1:])
        report = parse_report(console_text)
        if rc != 0 or report is None:
            tail = "\n".join(console_text.replace("\r", "").splitlines()[-40:])
            why = "was killed after %d s" % self.timeout if rc in (124, 137) else f"exited {rc}"
            raise ProvisionError(
                f"the nested guest {why} without a report from the agent stand-in.\nQEMU: {qemu_out.strip()[-800:]}\n"
                f"last console lines:\n{tail}",
                hint="check that kvm loads in the runner (`modprobe kvm_amd` / kvm_intel) and that the VF is on vfio-pci there")
        if "error" in report and "runs" not in report:
            raise ProvisionError(f"the agent stand-in failed in the nested guest: {report['error']}",
                                 hint="boot the image by hand and read the console")
        return GuestReport(data=report, console=console_text, boot_seconds=round(t1 - t0, 2), command=cmd)
