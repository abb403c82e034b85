"""Binding devices (or whole IOMMU groups) to vfio-pci, and putting them back.

Standard library only: the Kata guest hook imports this module inside the guest.

Two levels:
- a journal-free core (`bind_to_vfio`, `bind_group_to_vfio`, `restore_driver`,
  `ensure_vfio_driver`) that takes a Host and an optional recorder: any object
  with `record(entry)` (called BEFORE each change) and `done(entry)` (called
  once the change is undone or did not happen);
- `DeviceManager(host, profile, journal)`: the same with the safety checks
  (profile allowlist, devices the host needs) and a journal to restore from.

Binding follows the kernel's documented way: write `vfio-pci` to
driver_override, unbind from the current driver, write the address to
drivers_probe, then verify the driver link AND that /dev/vfio/<group> is a char
device (drivers_probe succeeds even when nothing binds). Where driver_override
is missing (old kernels) it falls back to new_id (EEXIST handled; the ID is
removed again when we added it; other devices new_id grabbed are released).

Device state is read with pci.read_inventory (PciDevice objects), a few devices at a
time. This module owns the journal kinds "driver" and "new_id" (JOURNAL_KINDS, their
undo functions); vfiotest.journal registers and replays them.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import BindError, DeviceNotFound, HarnessError, NotAllowed, UnbindError
from .host import Host, wait_for
from .pci import Inventory, PciAddress, PciDevice, read_inventory

if TYPE_CHECKING:   # the guest image ships bind.py without the journal and profiles
    from .journal import Recorder
    from .profiles import Profile

VFIO_DRIVER = "vfio-pci"
SYS_PCI = "/sys/bus/pci"
SETTLE_TIMEOUT = 5.0

Entry = dict[str, Any]


# -- reading device state: the one reader is pci.read_inventory --------------------------
def read_device(host: Host, address: str, timeout: float = 30) -> PciDevice:
    """The PciDevice at `address` on `host` (one round trip); DeviceNotFound when there is none."""
    address = PciAddress(address)
    return _found(read_inventory(host, timeout, addresses=[address]), address, host)


def _found(inv: Inventory, address: PciAddress, host: Host) -> PciDevice:
    dev = inv.devices.get(address)
    if dev is None:
        raise DeviceNotFound(f"no PCI device {address} on {host.name}",
                             hint="list the devices with `vfiotest devices`", address=address)
    return dev


def _record(recorder: Recorder | None, entry: Entry) -> Entry:
    return recorder.record(entry) if recorder is not None else entry


def _done(recorder: Recorder | None, entry: Entry) -> None:
    if recorder is not None:
        recorder.done(entry)


# -- the core --------------------------------------------------------------------------
def ensure_vfio_driver(host: Host, timeout: float = 60) -> bool:
    """Load vfio-pci when /sys/bus/pci/drivers/vfio-pci is missing (True when it loaded it);
    BindError when it cannot be."""
    if host.exists(f"{SYS_PCI}/drivers/{VFIO_DRIVER}"):
        return False
    res = host.run(["modprobe", VFIO_DRIVER], timeout=timeout)
    if res.ok and host.exists(f"{SYS_PCI}/drivers/{VFIO_DRIVER}"):
        return True
    out = (res.stderr or res.stdout).strip() or "exit " + str(res.rc)
    raise BindError(
        f"the vfio-pci driver is not loaded on {host.name} and `modprobe vfio-pci` failed: {out}",
        hint="install the kernel's modules (Debian: linux-image-$(uname -r) ships vfio-pci), check "
             "`modinfo vfio-pci` on the target and that the IOMMU is on; nothing was changed",
        driver=VFIO_DRIVER, cause=out, reason="modprobe")


def _unbind(host: Host, address: str, driver: str) -> None:
    try:
        host.write_text(f"{SYS_PCI}/drivers/{driver}/unbind", address)
    except OSError as e:
        # ENODEV: it is no longer bound to that driver, which is what we wanted
        if e.errno != errno.ENODEV:
            raise


def wait_driver(host: Host, address: str, driver: str | None, timeout: float = SETTLE_TIMEOUT) -> str | None:
    """Poll the driver link of `address` until it is `driver` (None: no driver). Returns the last seen."""
    seen: list[str | None] = [None]

    def on_it() -> bool:
        link = host.readlink(f"{SYS_PCI}/devices/{address}/driver")
        seen[0] = link.rsplit("/", 1)[-1] if link else None
        return seen[0] == driver

    wait_for(on_it, timeout, 0.05, fail=False)
    return seen[0]


def bind_to_vfio(host: Host, address: str, recorder: Recorder | None = None, verify_node: bool = True,
                 settle: float = SETTLE_TIMEOUT) -> Entry | None:
    """Bind one device to vfio-pci. Returns the recorded entry, or None when it already was
    (idempotent: a device already on vfio-pci is left as it is and not recorded).
    On failure the device is put back on its original driver and BindError is raised
    (fields: address, driver, reason = the step that failed, cause, errno)."""
    return _bind_device(host, read_device(host, address), recorder, verify_node, settle)


def _bind_device(host: Host, dev: PciDevice, recorder: Recorder | None, verify_node: bool, settle: float) -> Entry | None:
    """bind_to_vfio for a device whose state was read just before."""
    address = dev.address
    if dev.driver == VFIO_DRIVER:
        if verify_node:
            _verify_node(host, address, dev.iommu_group, settle)
        return None
    ensure_vfio_driver(host)
    entry = _record(recorder, {"kind": "driver", "address": address, "driver": dev.driver,
                               "driver_override": dev.driver_override})
    step, reason = "driver_override", "driver_override"
    try:
        if dev.has_override:
            host.write_text(f"{SYS_PCI}/devices/{address}/driver_override", VFIO_DRIVER)
            if dev.driver:
                step, reason = f"unbind from {dev.driver}", "unbind"
                _unbind(host, address, dev.driver)
            step = reason = "drivers_probe"
            host.write_text(f"{SYS_PCI}/drivers_probe", address)
        else:
            step = reason = "new_id"
            _bind_with_new_id(host, dev, recorder)
        step = reason = "verify"
        got = wait_driver(host, address, VFIO_DRIVER, settle)
        if got != VFIO_DRIVER:
            raise BindError(f"{address} is on {got or 'no driver'} after the bind, not {VFIO_DRIVER}",
                            address=address, driver=got)
        if verify_node:
            _verify_node(host, address, dev.iommu_group, settle)
    except (OSError, HarnessError) as e:
        cause = e.message if isinstance(e, HarnessError) else f"{e.strerror or e} (errno {e.errno})"
        back = _rollback(host, address, entry, recorder)
        raise BindError(
            f"binding {address} ({dev.vendor_device}) to {VFIO_DRIVER} failed at {step}: {cause}; {back}",
            hint="look at `dmesg` on the target; check the IOMMU is on and the device is not in use; "
                 "`vfiotest restore` puts back anything left over",
            address=address, driver=VFIO_DRIVER, group=dev.iommu_group, reason=reason, cause=e,
            errno=e.errno if isinstance(e, OSError) else getattr(e, "errno", None)) from e
    return entry


def _rollback(host: Host, address: str, entry: Entry, recorder: Recorder | None) -> str:
    try:
        restore_driver(host, address, entry["driver"], entry["driver_override"])
    except (OSError, HarnessError) as e:
        return f"putting it back on {entry['driver'] or 'no driver'} failed too ({e}); it stays in the journal"
    _done(recorder, entry)
    return f"it was put back on {entry['driver'] or 'no driver'}"


def _bind_with_new_id(host: Host, dev: PciDevice, recorder: Recorder | None) -> None:
    """Old kernels without driver_override: new_id binds EVERY unbound device with the ID,
    so the bystanders are recorded first and released afterwards."""
    address, vd = dev.address, dev.vendor_device
    words = " ".join(vd.split(":"))
    everyone = read_inventory(host)
    bystanders = [d for a, d in sorted(everyone.devices.items())
                  if a != address and d.vendor_device == vd and not d.driver]
    by_entries = [_record(recorder, {"kind": "driver", "address": d.address, "driver": None,
                                     "driver_override": d.driver_override}) for d in bystanders]
    id_entry = _record(recorder, {"kind": "new_id", "driver": VFIO_DRIVER, "id": vd})
    if dev.driver:
        _unbind(host, address, dev.driver)
    added = True
    try:
        host.write_text(f"{SYS_PCI}/drivers/{VFIO_DRIVER}/new_id", words)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        added = False  # someone else's ID: it stays, and new_id bound nothing
        _done(recorder, id_entry)
    if wait_driver(host, address, VFIO_DRIVER, 0.5) != VFIO_DRIVER:
        host.write_text(f"{SYS_PCI}/drivers/{VFIO_DRIVER}/bind", address)
    if added:
        host.write_text(f"{SYS_PCI}/drivers/{VFIO_DRIVER}/remove_id", words)
        _done(recorder, id_entry)
    for d, by_entry in zip(bystanders, by_entries, strict=True):
        if wait_driver(host, d.address, None, 0) == VFIO_DRIVER:
            _unbind(host, d.address, VFIO_DRIVER)
        _done(recorder, by_entry)


def _verify_node(host: Host, address: PciAddress, group: str | None, settle: float) -> None:
    kind: list[str | None] = [None]

    def is_char() -> bool:
        inv = read_inventory(host, addresses=[address])
        dev = inv.devices.get(address)
        kind[0] = inv.vfio.get(dev.iommu_group) if dev is not None and dev.iommu_group else None
        return kind[0] == "char"

    if not wait_for(is_char, settle, 0.05, fail=False):
        raise BindError(f"/dev/vfio/{group} is {'not a char device' if kind[0] else 'missing'} after binding "
                        f"{address} to {VFIO_DRIVER}",
                        hint="every device of the IOMMU group must be on vfio-pci (bind the group); "
                             "check that the IOMMU is on (`vfiotest doctor`)",
                        address=address, group=group, path=f"/dev/vfio/{group}", reason="vfio-node")


def bind_group_to_vfio(host: Host, address: str, recorder: Recorder | None = None,
                       settle: float = SETTLE_TIMEOUT) -> list[PciAddress]:
    """Bind every device of the IOMMU group of `address` to vfio-pci (bridges are left alone).
    Returns the addresses of the group's endpoints. All or nothing: on failure the ones bound
    here are put back, in reverse order. The group's state is read once, up front."""
    address = PciAddress(address)
    inv = read_inventory(host, addresses=[address], groups=True)
    dev = _found(inv, address, host)
    endpoints = [a for a in inv.group_of(address) if a in inv.devices and not inv.devices[a].is_bridge]
    bound: list[tuple[PciAddress, Entry]] = []
    try:
        for a in endpoints:
            entry = _bind_device(host, inv.devices[a], recorder, verify_node=False, settle=settle)
            if entry is not None:
                bound.append((a, entry))
        _verify_node(host, address, dev.iommu_group, settle)
    except (OSError, HarnessError) as e:
        for a, entry in reversed(bound):
            _rollback(host, a, entry, recorder)
        if isinstance(e, BindError):
            raise
        raise BindError(f"binding IOMMU group {dev.iommu_group} ({', '.join(endpoints)}) failed: {e}",
                        hint="the devices bound so far were put back; `vfiotest restore` handles leftovers",
                        address=address, group=dev.iommu_group, driver=VFIO_DRIVER, cause=e,
                        errno=e.errno if isinstance(e, OSError) else getattr(e, "errno", None)) from e
    return endpoints


def restore_driver(host: Host, address: str, driver: str | None, override: str | None = None,
                   settle: float = SETTLE_TIMEOUT) -> None:
    """Put `address` back on `driver` (None: no driver) with `override` as its driver_override
    (None clears it, by writing a newline). A device that no longer exists is left alone."""
    address = PciAddress(address)
    dev = read_inventory(host, addresses=[address]).devices.get(address)
    if dev is None:
        return
    if dev.has_override and dev.driver_override != override:
        host.write_text(f"{SYS_PCI}/devices/{address}/driver_override", (override or "") + "\n")
    if dev.driver == driver:
        return
    if dev.driver:
        _unbind(host, address, dev.driver)
    if driver:
        host.write_text(f"{SYS_PCI}/drivers_probe", address)
        current = wait_driver(host, address, driver, 0.5)
        if current != driver and host.exists(f"{SYS_PCI}/drivers/{driver}"):
            # something else (a leftover new_id, say) claimed it: hand it to the recorded driver
            try:
                if current:
                    _unbind(host, address, current)
                host.write_text(f"{SYS_PCI}/drivers/{driver}/bind", address)
            except OSError:
                pass
        got = wait_driver(host, address, driver, settle)
        if got != driver:
            raise UnbindError(f"{address} should be back on {driver} but is on {got or 'no driver'}",
                              hint=f"is the {driver} module loaded? try `modprobe {driver}`, then `vfiotest restore`",
                              address=address, driver=driver, cause=f"on {got or 'no driver'}")


def undo_driver(host: Host, entry: Entry) -> None:
    """Undo a "driver" entry: the device back on its recorded driver and driver_override."""
    restore_driver(host, entry["address"], entry["driver"], entry.get("driver_override"))


def undo_new_id(host: Host, entry: Entry) -> None:
    """Undo a "new_id" entry: remove the ID from the driver's dynamic IDs (gone already is fine)."""
    words = " ".join(entry["id"].split(":"))
    try:
        host.write_text(f"{SYS_PCI}/drivers/{entry['driver']}/remove_id", words)
    except OSError as e:
        if e.errno not in (errno.ENODEV, errno.ENOENT):  # already gone
            raise


# The journal entry kinds this module owns; vfiotest.journal registers them (journal.KIND_MODULES).
JOURNAL_KINDS: list[dict[str, Any]] = [
    {"kind": "driver", "required": ("address", "driver"), "undo": undo_driver},
    {"kind": "new_id", "required": ("driver", "id"), "undo": undo_new_id,
     "key": lambda e: (e["id"], e["driver"])},
]


def restore_entry(host: Host, entry: Entry) -> None:
    """Undo one journal entry (any kind): vfiotest.journal.undo_entry."""
    from .journal import undo_entry

    undo_entry(host, entry)


def restore_entries(host: Host, recorder: Recorder, entries: list[Entry] | None = None) -> None:
    """Undo `entries` (default: all of the recorder's), newest first: vfiotest.journal.undo_entries."""
    from .journal import undo_entries

    undo_entries(host, recorder, entries)


# -- the checked, journaled API -------------------------------------------------------------
class DeviceManager:
    """Binds and restores devices on one host, within a profile, recording into a journal.

    journal: a vfiotest.journal.Journal (durable) or None (kept in memory)."""

    def __init__(self, host: Host, profile: Profile | str = "emulated", journal: Recorder | None = None) -> None:
        from .profiles import get_profile

        self.host = host
        self.profile = get_profile(profile)
        if journal is None:
            from .journal import MemoryJournal

            journal = MemoryJournal()
        self.journal: Recorder = journal

    def inventory(self) -> Inventory:
        return read_inventory(self.host)

    # -- safety --------------------------------------------------------------------
    def check_device(self, inv: Inventory, address: str) -> PciDevice:
        """The device at `address` if the profile allows it and the host does not need it."""
        dev = inv.device(address)
        why = inv.protected.get(dev.address)
        if why:
            raise NotAllowed(f"{dev.address} {why}: the host needs it, it will not be rebound",
                             hint="use a device that carries no route, SSH session or mounted filesystem",
                             address=dev.address, cause=why, reason=NotAllowed.PROTECTED)
        if not self.profile.allows(dev.vendor_device):
            raise NotAllowed(f"{dev.address} ({dev.vendor_device}) is not in the {self.profile.name} profile's allowlist",
                             hint=f"allowed IDs: {', '.join(sorted(self.profile.ids))}; pick another device or "
                                  f"another profile (--profile)",
                             address=dev.address, reason=NotAllowed.NOT_ALLOWLISTED)
        return dev

    def check_group(self, inv: Inventory, address: str) -> tuple[str | None, list[PciAddress]]:
        """(group, endpoints) of the IOMMU group of `address`, when every member may be touched."""
        dev = inv.device(address)
        members = inv.group_of(dev.address)
        for a in members:
            why = inv.protected.get(a)
            if why:
                raise NotAllowed(f"IOMMU group {dev.iommu_group} of {dev.address} also holds {a}, which {why}",
                                 hint="a group is passed through whole: pick a device in another group",
                                 address=a, group=dev.iommu_group, cause=why, reason=NotAllowed.PROTECTED)
        endpoints = [a for a in members if not inv.devices[a].is_bridge]
        for a in endpoints:
            sriov = inv.devices[a].sriov
            if sriov is not None and sriov.numvfs > 0:
                raise NotAllowed(
                    f"{a} is an SR-IOV PF with {sriov.numvfs} VFs enabled: unbinding its driver would destroy "
                    f"them, and they would not come back on unbind",
                    hint=f"set its VFs to 0 first (echo 0 > /sys/bus/pci/devices/{a}/sriov_numvfs on the target), "
                         f"or bind one of its VFs instead",
                    address=a, group=dev.iommu_group, cause=f"{sriov.numvfs} VFs", reason=NotAllowed.PF_WITH_VFS)
            if not self.profile.allows(inv.devices[a].vendor_device):
                raise NotAllowed(
                    f"IOMMU group {dev.iommu_group} of {dev.address} also holds {a} ({inv.devices[a].vendor_device}), "
                    f"which is not in the {self.profile.name} profile's allowlist",
                    hint="a group is bound whole: pick a device whose group holds only allowed devices",
                    address=a, group=dev.iommu_group, reason=NotAllowed.NOT_ALLOWLISTED)
        return dev.iommu_group, endpoints

    # -- actions --------------------------------------------------------------------------
    def check_bind(self, inv: Inventory, address: str, whole_group: bool = False) -> PciDevice:
        """Every refusal of bind_device (`whole_group`: bind_group) for `address`, nothing changed."""
        dev = self.check_device(inv, address)
        group, endpoints = self.check_group(inv, dev.address)
        if not whole_group and len(endpoints) > 1:
            raise NotAllowed(f"IOMMU group {group} of {dev.address} holds {len(endpoints)} devices "
                             f"({', '.join(endpoints)}); binding one of them alone leaves the group unusable",
                             hint="bind the whole group: `vfiotest bind --group ADDR` / DeviceManager.bind_group",
                             address=dev.address, group=group, reason=NotAllowed.GROUP)
        return dev

    def bind_device(self, address: str) -> PciAddress:
        """Bind one device to vfio-pci; its IOMMU group must hold no other endpoint."""
        dev = self.check_bind(self.inventory(), address)
        bind_to_vfio(self.host, dev.address, self.journal)
        return dev.address

    def bind_group(self, address: str) -> list[PciAddress]:
        """Bind the whole IOMMU group of `address` to vfio-pci; returns the bound addresses."""
        self.check_bind(self.inventory(), address, whole_group=True)
        return bind_group_to_vfio(self.host, PciAddress(address), self.journal)

    def _entries_for(self, addresses: Iterable[str]) -> list[Entry]:
        wanted = set(addresses)
        return [e for e in self.journal.entries() if e["kind"] == "driver" and e["address"] in wanted]

    def restore_device(self, address: str) -> None:
        """Put a device back as the journal recorded it (nothing to do if it has no entry)."""
        address = PciAddress(address)
        restore_entries(self.host, self.journal, self._entries_for([address]))

    def restore_group(self, address: str) -> None:
        inv = self.inventory()
        restore_entries(self.host, self.journal, self._entries_for(inv.group_of(address)))

    def restore_all(self) -> None:
        """Undo everything the journal holds, newest first."""
        restore_entries(self.host, self.journal)


__all__ = ["DeviceManager", "bind_to_vfio", "bind_group_to_vfio", "restore_driver",
           "restore_entry", "restore_entries", "ensure_vfio_driver", "read_device",
           "undo_driver", "undo_new_id", "wait_driver", "VFIO_DRIVER", "JOURNAL_KINDS"]
