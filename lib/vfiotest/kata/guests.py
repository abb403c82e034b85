"""The guest a VF goes into, behind one interface: a backend takes a VF whose group is bound
to vfio-pci on the host, runs a guest with it, reads the guest, and gives a GuestReport
(vfiotest.kata.nested): the hook's log from the guest's /tmp, /dev/vfio, the guest's PCI state,
and the hook run again by hand ("again", "none", "malformed").

- KataConsoleGuest (the real Kata lane): a kata-vfio container with the seed's recipe,
  read over the Kata 1.x debug console while it runs, then removed.
- NestedGuest (the stand-in lane): the guest image booted in a second-level VM inside the
  runner with the VF passed through; its agent stand-in runs the hooks and reports on the console.

    backend = KataConsoleGuest(host, factory, hook_path=image.hook_path)   # or NestedStandinGuest(...)
    with vfio_vf(host, pool, manager, pfs, owner, backend.vendor_device) as vf:
        report = backend.read(vf)
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from ..errors import HarnessError
from .nested import DEFAULT_RUNS, GuestReport, NestedGuest

KATA_GUEST_TIMEOUT = 180.0          # Kata VM boot to the debug console answering
STANDIN_MAIN_CONTAINER = "vfiotest-main-0"   # the agent stand-in's id for its "main" run
STANDIN_VF_ID = "8086:10ca"   # igb VF: its native driver (igbvf) binds in the guest, so the hook has work to do

Progress = Callable[[str], None]


class GuestBackend(Protocol):
    """A way to put a VF into a guest and read that guest."""

    #: "real Kata" or "stand-in"
    lane: str
    #: the vendor:device this backend needs the VF to be (None: any VF)
    vendor_device: Optional[str]

    def read(self, vf: Any, progress: Progress = ...) -> GuestReport:
        """Run the guest with `vf` (a vfiotest.vfio.VfioGroup, bound on the host), read it,
        stop it; `report.main_container` is the container id the hook logged. HarnessError
        when the guest did not run or could not be read."""
        ...


class KataConsoleGuest:
    """A real Kata 1.x VM: a container on a kata-vfio ContainerFactory, read over its debug console."""

    lane = "real Kata"
    vendor_device: Optional[str] = None       # any VF of the runner's NICs

    def __init__(self, host: Any, factory: Any, hook_path: str, timeout: float = KATA_GUEST_TIMEOUT):
        self.host, self.factory, self.hook_path, self.timeout = host, factory, hook_path, timeout

    def read(self, vf: Any, progress: Progress = lambda s: None) -> GuestReport:
        from .console import KataConsole, KataGuestReport

        client = self.factory.client
        cid = None
        try:
            progress(f"starting a Kata container on {client.runtime} with {vf.address} (host group {vf.group})")
            c = self.factory.start(["sleep", "3600"], vfio=vf, ipc_lock=True)
            cid = c.id                  # Kata 1.x under podman: the container is its own sandbox
            console = KataConsole(self.host, cid)
            console.wait_ready(timeout=self.timeout)
            # the guest's addresses differ from the host's: the hook selects by vendor:device
            report = KataGuestReport.read(console, container_id=cid, annotation=vf.vendor_device,
                                          hook=self.hook_path)
            progress(f"Kata guest read over {console.path}: {len(report.hook_log)} hook log lines, "
                     f"/dev/vfio {sorted(report.dev_vfio)}")
        except HarnessError as e:
            raise HarnessError(f"the Kata guest could not be read over its debug console: {e}") from e
        finally:
            if cid is not None:
                client.remove(cid)
        report.main_container = cid
        return report


class NestedStandinGuest:
    """The stand-in: the guest image in a nested VM inside the runner, the VF passed through."""

    lane = "stand-in"
    vendor_device: Optional[str] = STANDIN_VF_ID

    def __init__(self, host: Any, kernel: str, image: str, runs: tuple[str, ...] = DEFAULT_RUNS):
        self.host, self.kernel, self.image, self.runs = host, kernel, image, runs

    def read(self, vf: Any, progress: Progress = lambda s: None) -> GuestReport:
        progress(f"booting the nested guest with {vf.address} (host group {vf.group}) passed through")
        try:
            report = NestedGuest(self.host, self.kernel, self.image).boot(
                vfs=[vf.address], annotation=vf.vendor_device, runs=self.runs)
        except HarnessError as e:
            raise HarnessError(f"the nested guest did not run: {e}") from e
        progress(f"nested guest: {report.boot_seconds} s from QEMU start to power-off, "
                 f"hooks started at guest uptime {report.hook_seconds} s")
        report.main_container = STANDIN_MAIN_CONTAINER
        return report


__all__ = ["GuestBackend", "KataConsoleGuest", "NestedStandinGuest", "KATA_GUEST_TIMEOUT",
           "STANDIN_MAIN_CONTAINER", "STANDIN_VF_ID"]
