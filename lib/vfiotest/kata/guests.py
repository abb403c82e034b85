"""The guest a VF goes into: a Kata 1.x VM started by podman on the kata-vfio runtime with a
VF whose group is bound to vfio-pci on the host, read over the Kata debug console while it
runs, then removed. The reading is a GuestReport (vfiotest.kata.console): the hook's log from
the guest's /tmp, /dev/vfio, the guest's PCI state, and the hook run again by hand ("again",
"none", "malformed").

    guest = KataGuest(host, factory, hook_path=image.hook_path)
    with vfio_vf(host, pool, manager, pfs, owner) as vf:
        report = guest.read(vf)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import HarnessError
from .console import GuestReport, KataConsole

if TYPE_CHECKING:
    from ..host import Host
    from ..vfio import VfioGroup

KATA_GUEST_TIMEOUT = 180.0          # Kata VM boot to the debug console answering

Progress = Callable[[str], None]


def _quiet(_line: str) -> None:
    pass


class KataGuest:
    """A Kata 1.x VM: a container on a kata-vfio ContainerFactory, read over its debug console."""

    def __init__(self, host: Host, factory: Any, hook_path: str, timeout: float = KATA_GUEST_TIMEOUT) -> None:
        # factory: a vfiotest.podman.factory.ContainerFactory on the kata-vfio client
        self.host, self.factory, self.hook_path, self.timeout = host, factory, hook_path, timeout

    def read(self, vf: VfioGroup, progress: Progress = _quiet) -> GuestReport:
        """Start a container holding `vf` (bound on the host), read its guest, remove it;
        `report.main_container` is the container's id (the one the agent gave the hook).
        HarnessError when the guest did not run or could not be read."""
        client = self.factory.client
        cid = None
        try:
            progress(f"starting a Kata container on {client.runtime} with {vf.address} (host group {vf.group})")
            try:
                c = self.factory.start(["sleep", "3600"], vfio=vf, ipc_lock=True)
            except HarnessError as e:
                raise HarnessError(f"the Kata guest did not run: {e}", category=e.category) from e
            cid = c.id                  # Kata 1.x under podman: the container is its own sandbox
            console = KataConsole(self.host, cid)
            console.wait_ready(timeout=self.timeout)
            # the guest's addresses differ from the host's: the hook selects by vendor:device
            report = GuestReport.read(console, container_id=cid, annotation=vf.vendor_device, hook=self.hook_path)
            progress(f"Kata guest read over {console.path} in {report.read_seconds} s: {len(report.hook_log)} "
                     f"hook log lines, /dev/vfio {sorted(report.dev_vfio)}")
        except HarnessError as e:
            if cid is None:
                raise                   # it did not run: said above, with the cause's category
            # the cause's category goes on: a console that never answers, a command that hangs there
            raise HarnessError(f"the Kata guest could not be read over its debug console: {e}",
                               category=e.category) from e
        finally:
            if cid is not None:
                client.remove(cid)
        return report


__all__ = ["KataGuest", "GuestReport", "KATA_GUEST_TIMEOUT"]
