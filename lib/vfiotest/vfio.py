"""The lease-and-bind cycle, once, for every fixture, suite and tool that hands a VF to a test.

    with leased_vf(host, pool, pfs, owner="suite::test") as vf:          # lease only
        ...
    with vfio_vf(host, pool, manager, pfs, owner="suite::test") as vf:   # lease + bind the group
        run_a_container(vf.dev_path)
    assert vf.after == vf.before      # the group's inventory before the bind and after the restore

A VF is taken from the session's PFs (anything with `.address` and `.vfs`); its IOMMU
group is leased on the target (vfiotest.lease: one holder at a time, across workers and
sessions), bound to vfio-pci through a journaled DeviceManager (vfiotest.bind), put back
and released on the way out, also when the body raises. The before/after states are
inventories of the group (vfiotest.pci, read with the address filter), compared with `Inventory.diff`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from .errors import BindError, DeviceNotFound, HarnessError, LeaseBusy
from .host import Host
from .pci import Inventory, PciAddress, PciDevice, read_inventory
from .sriov import pf_lease_name

if TYPE_CHECKING:
    from .bind import DeviceManager
    from .lease import LeasePool

LEASE_WAIT = 120.0     # seconds to wait for a free VF group while other tests hold them all
POLL = 0.5


@dataclass
class VfioGroup:
    """A VF of the target and its IOMMU group, as leased (and bound) for one user."""

    address: PciAddress
    group: str
    vendor_device: str
    pf: PciAddress
    members: list[PciAddress] = field(default_factory=list)
    original_driver: Optional[str] = None
    #: the group's devices as read when the lease was taken, and after the restore (vfio_vf)
    before: Optional[Inventory] = None
    after: Optional[Inventory] = None

    @property
    def dev_path(self) -> str:
        return f"/dev/vfio/{self.group}"

    def changes(self) -> list[str]:
        """How the group after the restore differs from before the bind ([] when as found)."""
        if self.before is None or self.after is None:
            raise HarnessError(f"{self.address}: no before/after inventory (only vfio_vf records them)")
        return self.before.diff(self.after)


def candidates(inv: Inventory, pfs: Sequence[Any], vendor_device: Optional[str] = None) -> list[tuple[PciDevice, Any]]:
    """(VF, its PF) for every VF of `pfs` that has an IOMMU group (and the vendor:device asked for)."""
    out = []
    for pf in pfs:
        for vf in pf.vfs:
            dev = inv.devices.get(vf)
            if dev and dev.iommu_group and (vendor_device is None or dev.vendor_device == vendor_device):
                out.append((dev, pf))
    return out


def lease_vf(host: Host, pool: LeasePool, pfs: Sequence[Any], owner: Optional[str] = None,
             vendor_device: Optional[str] = None, wait: float = LEASE_WAIT) -> tuple[VfioGroup, Any]:
    """(VfioGroup, Lease): the first VF of `pfs` whose group is free, waiting up to `wait` s.
    DeviceNotFound when the PFs have no such VF; LeaseBusy when every group stayed taken, or when
    VFs the PFs had stayed gone (another test changing a PF's VF count is waited for)."""
    wanted = [v for pf in pfs for v in pf.vfs]

    def read() -> tuple[list[tuple[PciDevice, Any]], list[str]]:
        """(candidates, the PFs' VFs that are not there now, or there without an IOMMU group)."""
        inv = read_inventory(host, addresses=wanted)
        gone = [v for v in wanted if v not in inv.devices or not inv.devices[v].iommu_group]
        return candidates(inv, pfs, vendor_device), gone

    cands, gone = read()
    deadline = time.monotonic() + wait
    counting: set[str] = set()
    while True:
        # VFs the PFs had that are missing are being made anew by a test changing a PF's VF count
        # (of this session or another), not "no such VF here" (a skip): the loop waits for them
        if not cands and not gone:
            raise DeviceNotFound(f"no VF{' ' + vendor_device if vendor_device else ''} on the PFs "
                                 f"({', '.join(p.address for p in pfs) or 'none'})",
                                 hint="create VFs first (the pytest plugin's sriov layer makes --numvfs of them on each PF), "
                                      "or ask for another vendor:device")
        counting.clear()
        for dev, pf in cands:
            if dev.iommu_group is None:      # candidates() keeps devices with a group only
                continue
            lease = pool.try_acquire(dev.iommu_group, test_id=owner, retry=0, devices=[dev.address])
            if lease is None:
                continue
            # the PF's lease is held while its VF count changes (sriov layer, whole-PF tests):
            # its VFs, old or new, are not to be leased meanwhile
            if pool.is_held(pf_lease_name(pf.address)):
                lease.release()
                counting.add(pf.address)
                continue
            # read the group now that it is ours: the inventory above may predate another
            # holder's restore of it, or VFs re-created meanwhile
            group = read_inventory(host, addresses=[dev.address], groups=True)
            now = group.devices.get(dev.address)
            if now is None or now.iommu_group != dev.iommu_group:
                lease.release()
                continue
            return VfioGroup(dev.address, str(dev.iommu_group), dev.vendor_device, pf.address, original_driver=now.driver,
                             members=[], before=group), lease
        if time.monotonic() > deadline:
            if not cands:
                raise LeaseBusy(f"VFs of the PFs were gone for {wait:.0f} s ({', '.join(gone[:8])}"
                                f"{' ...' if len(gone) > 8 else ''}): a PF's VF count was changed and not put back",
                                hint="`vfiotest devices` shows the PFs' VF counts and who holds them; "
                                     "`vfiotest restore` puts back what a crashed session changed")
            raise LeaseBusy(f"every VF group of the PFs was leased by others for {wait:.0f} s"
                            + (f" (the VF count of {', '.join(sorted(counting))} held too)" if counting else ""),
                            hint="`vfiotest devices` shows who holds them; run fewer workers or wait")
        time.sleep(POLL)
        # read them again: a test holding a PF meanwhile may have made its VFs anew, in new groups
        cands, gone = read()


@contextlib.contextmanager
def leased_vf(host: Host, pool: LeasePool, pfs: Sequence[Any], owner: Optional[str] = None,
              vendor_device: Optional[str] = None, wait: float = LEASE_WAIT,
              on_release: Optional[Callable[[VfioGroup, float, float], None]] = None) -> Iterator[VfioGroup]:
    """A VF leased (not bound) for the `with` block; `on_release(vf, start, end)` after it is given back."""
    vf, lease = lease_vf(host, pool, pfs, owner, vendor_device, wait)
    start = time.time()
    try:
        yield vf
    finally:
        lease.release()
        if on_release is not None:
            on_release(vf, start, time.time())


@contextlib.contextmanager
def bound(manager: DeviceManager, vf: VfioGroup, host: Host | None = None) -> Iterator[VfioGroup]:
    """`vf`'s whole IOMMU group on vfio-pci for the `with` block, put back after (also when the
    bind itself fails half-way: then BindError names the VF). With `host`, `vf.after` is the
    group's inventory once it is restored."""
    try:
        try:
            vf.members = manager.bind_group(vf.address)
        except HarnessError as e:
            raise BindError(f"binding {vf.address} (group {vf.group}) to vfio-pci failed: {e}",
                            hint=getattr(e, "hint", "") or "") from e
        yield vf
    finally:
        manager.restore_group(vf.address)
        if host is not None and vf.before is not None:
            vf.after = read_inventory(host, addresses=[vf.address], groups=True)


@contextlib.contextmanager
def vfio_vf(host: Host, pool: LeasePool, manager: DeviceManager, pfs: Sequence[Any], owner: Optional[str] = None,
            vendor_device: Optional[str] = None, wait: float = LEASE_WAIT,
            on_release: Optional[Callable[[VfioGroup, float, float], None]] = None) -> Iterator[VfioGroup]:
    """Lease a VF, bind its group to vfio-pci, and on the way out restore it, read the group
    again (`vf.after`) and release the lease."""
    with leased_vf(host, pool, pfs, owner, vendor_device, wait, on_release) as vf:
        with bound(manager, vf, host):
            yield vf


__all__ = ["LEASE_WAIT", "VfioGroup", "bound", "candidates", "lease_vf", "leased_vf", "vfio_vf"]
