"""Binding devices (or whole IOMMU groups) to vfio-pci, and putting them back.

Standard library only: the Kata guest hook imports this module inside the guest.

Two levels:
- a journal-free core (`bind_to_vfio`, `bind_group_to_vfio`, `restore_driver`,
  `restore_entry`, `ensure_vfio_driver`) that takes a Host and an optional
  recorder: any object with `record(entry)` (called BEFORE each change) and
  `done(entry)` (called once the change is undone or did not happen);
- `DeviceManager(host, profile, journal)`: the same with the safety checks
  (profile allowlist, devices the host needs) and a journal to restore from.

Binding follows the kernel's documented way: write `vfio-pci` to
driver_override, unbind from the current driver, write the address to
drivers_probe, then verify the driver link AND that /dev/vfio/<group> is a char
device (drivers_probe succeeds even when nothing binds). Where driver_override
is missing (old kernels) it falls back to new_id (EEXIST handled; the ID is
removed again when we added it; other devices new_id grabbed are released).
"""

import errno
import json
import time

from .errors import BindError, DeviceNotFound, HarnessError, NotAllowed, UnbindError
from .pci import SYSFS_READERS, PciAddress, read_inventory

VFIO_DRIVER = "vfio-pci"
SYS_PCI = "/sys/bus/pci"
SETTLE_TIMEOUT = 5.0

# One round trip: the state of some devices (or all, with no address), their groups and /dev/vfio nodes.
DEVICE_STATE_SCRIPT = r"""
import json, os, sys
R = sys.argv[1]
base = R + "/sys/bus/pci/devices"
addrs = sys.argv[2:] or (sorted(os.listdir(base)) if os.path.isdir(base) else [])
""" + SYSFS_READERS + r"""
out = {}
for a in addrs:
    d = base + "/" + a
    if not os.path.isdir(d):
        out[a] = {"exists": False}
        continue
    ov = rd(d + "/driver_override")
    g = link(d + "/iommu_group")
    gd = R + "/sys/kernel/iommu_groups/" + str(g) + "/devices"
    node = R + "/dev/vfio/" + str(g)
    try:
        kind = "char" if (os.stat(node).st_mode & 0o170000) == 0o020000 else "file"
    except OSError:
        kind = None
    out[a] = {"exists": True, "driver": link(d + "/driver"), "override_attr": ov is not None,
              "override": None if ov in (None, "", "(null)") else ov,
              "vendor_device": (rd(d + "/vendor") or "")[2:] + ":" + (rd(d + "/device") or "")[2:],
              "class": rd(d + "/class") or "", "group": g,
              "members": sorted(os.listdir(gd)) if g and os.path.isdir(gd) else [a],
              "vfio_node": kind}
print(json.dumps(out))
"""


def device_states(host, addresses=None, timeout=30):
    """{address: state} for `addresses` (all devices when None), in one round trip.
    A state has exists, driver, override, override_attr, vendor_device, class, group,
    members (of the group) and vfio_node ("char", "file" or None)."""
    res = host.python(DEVICE_STATE_SCRIPT, [host.sysroot, *(addresses or [])], timeout=timeout,
                      check=True, what="read device state")
    return json.loads(res.stdout)


def device_state(host, address):
    address = PciAddress(address)
    st = device_states(host, [address])[address]
    if not st["exists"]:
        raise DeviceNotFound(f"no PCI device {address} on {host.name}",
                             hint="list the devices with `vfiotest devices`")
    return st


def is_bridge(state):
    return (state.get("class") or "").startswith("0x0604")


def __getattr__(name):
    # MemoryJournal lives in vfiotest.journal now; `from vfiotest.bind import MemoryJournal` keeps working.
    # (Not imported at load time: the Kata guest ships bind.py without journal.py.)
    if name == "MemoryJournal":
        from .journal import MemoryJournal

        return MemoryJournal
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _record(recorder, entry):
    return recorder.record(entry) if recorder is not None else entry


def _done(recorder, entry):
    if recorder is not None:
        recorder.done(entry)


# -- the core --------------------------------------------------------------------------
def ensure_vfio_driver(host, timeout=60):
    """Load vfio-pci when /sys/bus/pci/drivers/vfio-pci is missing; BindError when it cannot be."""
    if host.exists(f"{SYS_PCI}/drivers/{VFIO_DRIVER}"):
        return False
    res = host.run(["modprobe", VFIO_DRIVER], timeout=timeout)
    if res.ok and host.exists(f"{SYS_PCI}/drivers/{VFIO_DRIVER}"):
        return True
    raise BindError(
        f"the vfio-pci driver is not loaded on {host.name} and `modprobe vfio-pci` failed: "
        f"{(res.stderr or res.stdout).strip() or 'exit ' + str(res.rc)}",
        hint="install the kernel's modules (Debian: linux-image-$(uname -r) ships vfio-pci), check "
             "`modinfo vfio-pci` on the target and that the IOMMU is on; nothing was changed")


def _unbind(host, address, driver):
    try:
        host.write_text(f"{SYS_PCI}/drivers/{driver}/unbind", address)
    except OSError as e:
        # ENODEV: it is no longer bound to that driver, which is what we wanted
        if e.errno != errno.ENODEV:
            raise


def wait_driver(host, address, driver, timeout=SETTLE_TIMEOUT):
    """Poll the driver link of `address` until it is `driver` (None: no driver). Returns the last seen."""
    deadline = time.monotonic() + timeout
    while True:
        link = host.readlink(f"{SYS_PCI}/devices/{address}/driver")
        current = link.rsplit("/", 1)[-1] if link else None
        if current == driver or time.monotonic() >= deadline:
            return current
        time.sleep(0.05)


def bind_to_vfio(host, address, recorder=None, verify_node=True, settle=SETTLE_TIMEOUT):
    """Bind one device to vfio-pci. Returns the recorded entry, or None when it already was
    (idempotent: a device already on vfio-pci is left as it is and not recorded).
    On failure the device is put back on its original driver and BindError is raised."""
    address = PciAddress(address)
    st = device_state(host, address)
    if st["driver"] == VFIO_DRIVER:
        if verify_node:
            _verify_node(host, address, st["group"], settle)
        return None
    ensure_vfio_driver(host)
    entry = _record(recorder, {"kind": "driver", "address": address, "driver": st["driver"],
                               "driver_override": st["override"]})
    step = "driver_override"
    try:
        if st["override_attr"]:
            host.write_text(f"{SYS_PCI}/devices/{address}/driver_override", VFIO_DRIVER)
            if st["driver"]:
                step = f"unbind from {st['driver']}"
                _unbind(host, address, st["driver"])
            step = "drivers_probe"
            host.write_text(f"{SYS_PCI}/drivers_probe", address)
        else:
            step = "new_id"
            _bind_with_new_id(host, address, st, recorder)
        step = "verify"
        got = wait_driver(host, address, VFIO_DRIVER, settle)
        if got != VFIO_DRIVER:
            raise BindError(f"{address} is on {got or 'no driver'} after the bind, not {VFIO_DRIVER}")
        if verify_node:
            _verify_node(host, address, st["group"], settle)
    except (OSError, HarnessError) as e:
        cause = e.message if isinstance(e, HarnessError) else f"{e.strerror or e} (errno {e.errno})"
        back = _rollback(host, address, entry, recorder)
        raise BindError(
            f"binding {address} ({st['vendor_device']}) to {VFIO_DRIVER} failed at {step}: {cause}; {back}",
            hint="look at `dmesg` on the target; check the IOMMU is on and the device is not in use; "
                 "`vfiotest restore` puts back anything left over") from e
    return entry


def _rollback(host, address, entry, recorder):
    try:
        restore_driver(host, address, entry["driver"], entry["driver_override"])
    except (OSError, HarnessError) as e:
        return f"putting it back on {entry['driver'] or 'no driver'} failed too ({e}); it stays in the journal"
    _done(recorder, entry)
    return f"it was put back on {entry['driver'] or 'no driver'}"


def _bind_with_new_id(host, address, st, recorder):
    """Old kernels without driver_override: new_id binds EVERY unbound device with the ID,
    so the bystanders are recorded first and released afterwards."""
    vd = st["vendor_device"]
    words = " ".join(vd.split(":"))
    everyone = device_states(host)
    bystanders = [a for a, s in everyone.items()
                  if a != address and s.get("exists") and s["vendor_device"] == vd and not s["driver"]]
    by_entries = [_record(recorder, {"kind": "driver", "address": a, "driver": None,
                                     "driver_override": everyone[a]["override"]}) for a in bystanders]
    id_entry = _record(recorder, {"kind": "new_id", "driver": VFIO_DRIVER, "id": vd})
    if st["driver"]:
        _unbind(host, address, st["driver"])
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
    for a, e in zip(bystanders, by_entries):
        if wait_driver(host, a, None, 0) == VFIO_DRIVER:
            _unbind(host, a, VFIO_DRIVER)
        _done(recorder, e)


def _verify_node(host, address, group, settle):
    deadline = time.monotonic() + settle
    while True:
        kind = device_states(host, [address])[address].get("vfio_node")
        if kind == "char":
            return
        if time.monotonic() >= deadline:
            raise BindError(f"/dev/vfio/{group} is {'not a char device' if kind else 'missing'} after binding "
                            f"{address} to {VFIO_DRIVER}",
                            hint="every device of the IOMMU group must be on vfio-pci (bind the group); "
                                 "check that the IOMMU is on (`vfiotest doctor`)")
        time.sleep(0.05)


def bind_group_to_vfio(host, address, recorder=None, settle=SETTLE_TIMEOUT):
    """Bind every device of the IOMMU group of `address` to vfio-pci (bridges are left alone).
    Returns the addresses of the group's endpoints. All or nothing: on failure the ones bound
    here are put back, in reverse order."""
    st = device_state(host, address)
    members = st["members"]
    states = device_states(host, members)
    endpoints = [PciAddress(a) for a in members if not is_bridge(states[a])]
    bound = []
    try:
        for a in endpoints:
            entry = bind_to_vfio(host, a, recorder, verify_node=False, settle=settle)
            if entry is not None:
                bound.append((a, entry))
        _verify_node(host, address, st["group"], settle)
    except (OSError, HarnessError) as e:
        for a, entry in reversed(bound):
            _rollback(host, a, entry, recorder)
        if isinstance(e, BindError):
            raise
        raise BindError(f"binding IOMMU group {st['group']} ({', '.join(endpoints)}) failed: {e}",
                        hint="the devices bound so far were put back; `vfiotest restore` handles leftovers") from e
    return endpoints


def restore_driver(host, address, driver, override=None, settle=SETTLE_TIMEOUT):
    """Put `address` back on `driver` (None: no driver) with `override` as its driver_override
    (None clears it, by writing a newline). A device that no longer exists is left alone."""
    address = PciAddress(address)
    st = device_states(host, [address])[address]
    if not st["exists"]:
        return
    if st["override_attr"] and st["override"] != override:
        host.write_text(f"{SYS_PCI}/devices/{address}/driver_override", (override or "") + "\n")
    if st["driver"] == driver:
        return
    if st["driver"]:
        _unbind(host, address, st["driver"])
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
                              hint=f"is the {driver} module loaded? try `modprobe {driver}`, then `vfiotest restore`")


def undo_driver(host, entry):
    """Undo a "driver" entry: the device back on its recorded driver and driver_override."""
    restore_driver(host, entry["address"], entry["driver"], entry.get("driver_override"))


def undo_new_id(host, entry):
    """Undo a "new_id" entry: remove the ID from the driver's dynamic IDs (gone already is fine)."""
    words = " ".join(entry["id"].split(":"))
    try:
        host.write_text(f"{SYS_PCI}/drivers/{entry['driver']}/remove_id", words)
    except OSError as e:
        if e.errno not in (errno.ENODEV, errno.ENOENT):  # already gone
            raise


# The journal entry kinds this module owns; vfiotest.journal registers them (journal.KIND_MODULES).
JOURNAL_KINDS = [
    {"kind": "driver", "required": ("address", "driver"), "undo": undo_driver},
    {"kind": "new_id", "required": ("driver", "id"), "undo": undo_new_id,
     "key": lambda e: (e["id"], e["driver"])},
]


def restore_entry(host, entry):
    """Undo one journal entry (any kind): vfiotest.journal.undo_entry."""
    from .journal import undo_entry

    undo_entry(host, entry)


def restore_entries(host, recorder, entries=None):
    """Undo `entries` (default: all of the recorder's), newest first: vfiotest.journal.undo_entries."""
    from .journal import undo_entries

    undo_entries(host, recorder, entries)


# -- the checked, journaled API -------------------------------------------------------------
class DeviceManager:
    """Binds and restores devices on one host, within a profile, recording into a journal.

    journal: a vfiotest.journal.Journal (durable) or None (kept in memory)."""

    def __init__(self, host, profile="emulated", journal=None):
        from .profiles import get_profile

        self.host = host
        self.profile = get_profile(profile)
        if journal is None:
            from .journal import MemoryJournal

            journal = MemoryJournal()
        self.journal = journal

    def inventory(self):
        return read_inventory(self.host)

    # -- safety --------------------------------------------------------------------
    def check_device(self, inv, address):
        """The device at `address` if the profile allows it and the host does not need it."""
        dev = inv.device(address)
        why = inv.protected.get(dev.address)
        if why:
            raise NotAllowed(f"{dev.address} {why}: the host needs it, it will not be rebound",
                             hint="use a device that carries no route, SSH session or mounted filesystem")
        if not self.profile.allows(dev.vendor_device):
            raise NotAllowed(f"{dev.address} ({dev.vendor_device}) is not in the {self.profile.name} profile's allowlist",
                             hint=f"allowed IDs: {', '.join(sorted(self.profile.ids))}; pick another device or "
                                  f"another profile (--profile)")
        return dev

    def check_group(self, inv, address):
        """(group, endpoints) of the IOMMU group of `address`, when every member may be touched."""
        dev = inv.device(address)
        members = inv.group_of(dev.address)
        for a in members:
            why = inv.protected.get(a)
            if why:
                raise NotAllowed(f"IOMMU group {dev.iommu_group} of {dev.address} also holds {a}, which {why}",
                                 hint="a group is passed through whole: pick a device in another group")
        endpoints = [a for a in members if not inv.devices[a].is_bridge]
        for a in endpoints:
            if not self.profile.allows(inv.devices[a].vendor_device):
                raise NotAllowed(
                    f"IOMMU group {dev.iommu_group} of {dev.address} also holds {a} ({inv.devices[a].vendor_device}), "
                    f"which is not in the {self.profile.name} profile's allowlist",
                    hint="a group is bound whole: pick a device whose group holds only allowed devices")
        return dev.iommu_group, endpoints

    # -- actions --------------------------------------------------------------------------
    def bind_device(self, address):
        """Bind one device to vfio-pci; its IOMMU group must hold no other endpoint."""
        inv = self.inventory()
        dev = self.check_device(inv, address)
        group, endpoints = self.check_group(inv, dev.address)
        if len(endpoints) > 1:
            raise NotAllowed(f"IOMMU group {group} of {dev.address} holds {len(endpoints)} devices "
                             f"({', '.join(endpoints)}); binding one of them alone leaves the group unusable",
                             hint="bind the whole group: `vfiotest bind --group ADDR` / DeviceManager.bind_group")
        bind_to_vfio(self.host, dev.address, self.journal)
        return dev.address

    def bind_group(self, address):
        """Bind the whole IOMMU group of `address` to vfio-pci; returns the bound addresses."""
        inv = self.inventory()
        self.check_device(inv, address)
        self.check_group(inv, address)
        return bind_group_to_vfio(self.host, PciAddress(address), self.journal)

    def _entries_for(self, addresses):
        wanted = set(addresses)
        return [e for e in self.journal.entries() if e["kind"] == "driver" and e["address"] in wanted]

    def restore_device(self, address):
        """Put a device back as the journal recorded it (nothing to do if it has no entry)."""
        address = PciAddress(address)
        restore_entries(self.host, self.journal, self._entries_for([address]))

    def restore_group(self, address):
        inv = self.inventory()
        restore_entries(self.host, self.journal, self._entries_for(inv.group_of(address)))

    def restore_all(self):
        """Undo everything the journal holds, newest first."""
        restore_entries(self.host, self.journal)


__all__ = ["DeviceManager", "MemoryJournal", "bind_to_vfio", "bind_group_to_vfio", "restore_driver",
           "restore_entry", "restore_entries", "ensure_vfio_driver", "device_states", "device_state",
           "wait_driver", "VFIO_DRIVER"]
