"""Binding to vfio-pci and restoring, against the simulated sysfs."""

import errno

import pytest

from vfiotest import sriov
from vfiotest.bind import DeviceManager, bind_group_to_vfio, bind_to_vfio
from vfiotest.errors import AddressError, BindError, DeviceNotFound, NotAllowed
from vfiotest.journal import MemoryJournal
from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

GROUPED = ["host-bridge", "virtio-net", "virtio-blk",
           {"id": "1b36:0001", "class": "0x060400", "address": "0000:00:04.0", "group": "g"},
           {"id": "1b36:0010", "class": "0x010802", "address": "0000:00:05.0", "group": "g"},
           {"id": "1b36:0010", "class": "0x010802", "address": "0000:00:06.0", "group": "g"},
           # a group with a device outside the allowlist, and one sharing with the root disk
           {"id": "1b36:0010", "class": "0x010802", "address": "0000:00:07.0", "group": "h"},
           {"id": "8086:10d3", "class": "0x020000", "address": "0000:00:08.0", "group": "h"},
           {"id": "1b36:0010", "class": "0x010802", "address": "0000:00:09.0", "group": "r"},
           {"id": "1af4:1001", "class": "0x010000", "address": "0000:00:0a.0", "group": "r", "disk": "vdb", "mount": "/data"}]


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}], others=GROUPED)


@pytest.fixture
def dm(sim):
    return DeviceManager(sim, "emulated")


VF = "0000:10:10.0"


def test_bind_device_then_restore(sim, dm):
    first = read_inventory(sim)
    assert dm.bind_device("10:10.0") == VF
    inv = read_inventory(sim)
    d = inv.devices[VF]
    assert d.driver == "vfio-pci" and d.driver_override == "vfio-pci"
    assert inv.vfio[d.iommu_group] == "char"
    assert dm.journal.entries() == [{"kind": "driver", "address": VF, "driver": "igbvf", "driver_override": None}]
    dm.restore_device(VF)
    assert first.diff(read_inventory(sim)) == []
    assert dm.journal.entries() == []


def test_bind_is_idempotent(sim, dm):
    dm.bind_device(VF)
    before = read_inventory(sim)
    dm.bind_device(VF)
    assert before.diff(read_inventory(sim)) == []
    assert len(dm.journal.entries()) == 1


def test_already_on_vfio_is_left_and_not_recorded(sim, dm):
    sim.write_text(f"/sys/bus/pci/devices/{VF}/driver_override", "vfio-pci")
    sim.write_text("/sys/bus/pci/drivers/igbvf/unbind", VF)
    sim.write_text("/sys/bus/pci/drivers_probe", VF)
    assert dm.bind_device(VF) == VF
    assert dm.journal.entries() == []
    dm.restore_all()
    assert read_inventory(sim).devices[VF].driver == "vfio-pci"


def test_restore_to_no_driver(sim, dm):
    sim.write_text("/sys/bus/pci/drivers/igbvf/unbind", VF)
    first = read_inventory(sim)
    dm.bind_device(VF)
    dm.restore_all()
    assert first.diff(read_inventory(sim)) == []
    assert read_inventory(sim).devices[VF].driver is None


def test_restore_original_override(sim, dm):
    sim.write_text(f"/sys/bus/pci/devices/{VF}/driver_override", "igbvf")
    first = read_inventory(sim)
    dm.bind_device(VF)
    dm.restore_all()
    assert first.diff(read_inventory(sim)) == []


def test_bind_group_leaves_bridge_and_verifies_node(sim, dm):
    first = read_inventory(sim)
    bound = dm.bind_group("0000:00:06.0")
    assert bound == ["0000:00:05.0", "0000:00:06.0"]
    inv = read_inventory(sim)
    assert inv.devices["0000:00:04.0"].driver is None and inv.devices["0000:00:04.0"].driver_override is None
    assert inv.vfio[inv.devices["0000:00:05.0"].iommu_group] == "char"
    dm.restore_group("0000:00:05.0")
    assert first.diff(read_inventory(sim)) == []


def test_bind_device_refuses_partial_group(sim, dm):
    first = read_inventory(sim)
    with pytest.raises(NotAllowed, match="--group"):
        dm.bind_device("0000:00:05.0")
    assert first.diff(read_inventory(sim)) == []


@pytest.mark.parametrize("addr, exc, text", [
    ("0000:00:1g.0", AddressError, "not a PCI address"),
    ("1:2:3", AddressError, "not a PCI address"),
    ("0000:00:1f.0", DeviceNotFound, "no PCI device 0000:00:1f.0"),
    ("0000:00:08.0", NotAllowed, "allowlist"),                 # outside the profile
    ("0000:00:01.0", NotAllowed, "default route"),             # management NIC
    ("0000:00:02.0", NotAllowed, "mounted filesystem /"),      # root disk
])
def test_bad_input_is_refused_without_change(sim, dm, addr, exc, text):
    first = read_inventory(sim)
    with pytest.raises(exc, match=text) as e:
        dm.bind_device(addr)
    assert e.value.hint
    with pytest.raises(exc):
        dm.bind_group(addr)
    assert first.diff(read_inventory(sim)) == []
    assert dm.journal.entries() == []


@pytest.mark.parametrize("addr, text", [("0000:00:07.0", "8086:10d3"), ("0000:00:09.0", "mounted filesystem /data")])
def test_group_with_untouchable_member_is_refused(sim, dm, addr, text):
    first = read_inventory(sim)
    with pytest.raises(NotAllowed, match=text):
        dm.bind_group(addr)
    assert first.diff(read_inventory(sim)) == []


def test_seed_profile_refuses_emulated_ids(sim):
    with pytest.raises(NotAllowed, match="seed"):
        DeviceManager(sim, "seed").bind_device(VF)


def test_vfio_not_loadable(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "igb", "numvfs": 1}], vfio_loaded=False,
                              vfio_loadable=False)
    first = read_inventory(sim)
    with pytest.raises(BindError, match="modprobe vfio-pci") as e:
        DeviceManager(sim, "emulated").bind_device(VF)
    assert "nothing was changed" in e.value.hint
    assert first.diff(read_inventory(sim)) == []


def test_vfio_loaded_on_demand(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "igb", "numvfs": 1}], vfio_loaded=False)
    DeviceManager(sim, "emulated").bind_device(VF)
    assert read_inventory(sim).devices[VF].driver == "vfio-pci"


def test_new_id_fallback_eexist_and_bystanders(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "igb", "numvfs": 3}], driver_override=False)
    # a driverless bystander with the same ID: new_id would grab it
    sim.write_text("/sys/bus/pci/drivers/igbvf/unbind", "0000:10:10.2")
    first = read_inventory(sim)
    dm = DeviceManager(sim, "emulated")
    dm.bind_device(VF)
    inv = read_inventory(sim)
    assert inv.devices[VF].driver == "vfio-pci"
    assert inv.devices["0000:10:10.2"].driver is None  # released again
    assert sim.dynids() == []  # the ID we added was removed
    # EEXIST: someone else's ID is already there; it is kept
    sim.write_text("/sys/bus/pci/drivers/vfio-pci/new_id", "8086 10ca")
    sim.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:10:10.2")
    dm.bind_device("0000:10:10.1")
    assert read_inventory(sim).devices["0000:10:10.1"].driver == "vfio-pci"
    assert sim.dynids() == ["8086:10ca"]
    sim.write_text("/sys/bus/pci/drivers/vfio-pci/remove_id", "8086 10ca")
    dm.restore_all()
    assert first.diff(read_inventory(sim)) == []


def test_failed_bind_puts_device_back(sim, dm):
    """drivers_probe 'succeeds' but nothing binds (vfio-pci unloaded between checks): verified and rolled back."""
    first = read_inventory(sim)
    real_write = sim.write_text

    def write(path, data, timeout=30):
        if path.endswith("drivers_probe") and "vfio" in sim.read_text(f"/sys/bus/pci/devices/{VF}/driver_override"):
            sim.write_text = real_write
            sim.unload_vfio()
            try:
                return real_write(path, data)
            finally:
                sim.run(["modprobe", "vfio-pci"])
        return real_write(path, data, timeout)

    sim.write_text = write
    with pytest.raises(BindError, match=f"binding {VF}.*verify.*put back on igbvf"):
        dm.bind_device(VF)
    sim.write_text = real_write
    assert first.diff(read_inventory(sim)) == []
    assert dm.journal.entries() == []


def test_core_without_recorder_for_the_guest_hook(sim):
    assert bind_to_vfio(sim, VF) is not None
    assert bind_to_vfio(sim, VF) is None
    assert bind_group_to_vfio(sim, "0000:00:05.0", MemoryJournal()) == ["0000:00:05.0", "0000:00:06.0"]


def test_unbind_enodev_is_tolerated(sim, dm):
    with pytest.raises(OSError) as e:
        sim.write_text("/sys/bus/pci/drivers/nvme/unbind", VF)
    assert e.value.errno == errno.ENODEV
    dm.bind_device(VF)
    sim.write_text("/sys/bus/pci/drivers/vfio-pci/unbind", VF)  # someone unbound it behind our back
    dm.restore_all()
    assert read_inventory(sim).devices[VF].driver == "igbvf"


def test_bind_works_with_only_the_guest_modules(sim, tmp_path):
    """The Kata guest ships bind.py with errors, host, pci and __init__ only (kata/initrd.SHARED_MODULES):
    bind_to_vfio must import and run without the journal."""
    import os
    import shutil
    import subprocess
    import sys

    import vfiotest

    pkg = tmp_path / "guest" / "vfiotest"
    pkg.mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "host.py", "pci.py", "bind.py"):
        shutil.copy(os.path.join(os.path.dirname(vfiotest.__file__), name), pkg / name)
    (pkg / "testing").mkdir()  # the test's host
    for name in ("__init__.py", "simsysfs.py", "simnvme.py"):
        shutil.copy(os.path.join(os.path.dirname(vfiotest.__file__), "testing", name), pkg / "testing" / name)
    code = (f"import sys; sys.path.insert(0, {str(tmp_path / 'guest')!r});"
            f"from vfiotest.testing.simsysfs import SimulatedHost; import vfiotest.bind as b;"
            f"assert b.__file__.startswith({str(pkg)!r}), b.__file__;"
            f"b.bind_to_vfio(SimulatedHost.open({sim.sysroot!r}), {VF!r});"
            f"assert 'vfiotest.journal' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr
    assert read_inventory(sim).devices[VF].driver == "vfio-pci"


def test_memory_journal_is_the_journals():
    from vfiotest import journal

    assert MemoryJournal is journal.MemoryJournal


def test_read_inventory_filtered_reads_only_what_is_asked(sim):
    whole = read_inventory(sim)
    one = read_inventory(sim, addresses=["00:05.0"])
    assert list(one.devices) == ["0000:00:05.0"]
    assert one.devices["0000:00:05.0"] == whole.devices["0000:00:05.0"]
    g = whole.devices["0000:00:05.0"].iommu_group
    assert one.groups == {g: whole.groups[g]} and one.protected == whole.protected
    grp = read_inventory(sim, addresses=["0000:00:05.0"], groups=True)
    assert sorted(grp.devices) == sorted(whole.groups[g]) and grp.devices["0000:00:04.0"].is_bridge
    assert read_inventory(sim, addresses=["0000:00:1f.0"]).devices == {}
    with pytest.raises(AddressError):
        read_inventory(sim, addresses=["nope"])


def test_group_state_is_read_once_up_front(sim, monkeypatch):
    import vfiotest.bind as bind_mod

    events, real_read, real_write = [], bind_mod.read_inventory, sim.write_text

    def read(host, timeout=30, **kw):
        events.append(("read", tuple(kw.get("addresses") or ()), kw.get("groups", False)))
        return real_read(host, timeout, **kw)

    def write(path, data, timeout=30):
        events.append(("write", path))
        return real_write(path, data, timeout)

    monkeypatch.setattr(bind_mod, "read_inventory", read)
    sim.write_text = write
    assert bind_group_to_vfio(sim, "0000:00:05.0") == ["0000:00:05.0", "0000:00:06.0"]
    first_write = next(i for i, e in enumerate(events) if e[0] == "write")
    assert events[:first_write] == [("read", ("0000:00:05.0",), True)]
    assert all(e[1] for e in events if e[0] == "read"), "no whole-host read to bind a group"


def test_read_device_is_one_device_of_the_inventory(sim):
    from vfiotest.bind import read_device

    dev = read_device(sim, VF)
    whole = read_inventory(sim).devices[VF]
    assert dev == whole and dev.driver == "igbvf" and dev.has_override
    with pytest.raises(DeviceNotFound) as e:
        read_device(sim, "0000:00:1f.0")
    assert e.value.address == "0000:00:1f.0"


def test_errors_carry_fields(sim, dm):
    with pytest.raises(NotAllowed) as e:
        dm.bind_device("0000:00:05.0")
    assert e.value.reason == NotAllowed.GROUP and e.value.address == "0000:00:05.0" and e.value.group
    with pytest.raises(NotAllowed) as e:
        dm.bind_device("0000:00:08.0")
    assert e.value.reason == NotAllowed.NOT_ALLOWLISTED and e.value.address == "0000:00:08.0"
    with pytest.raises(NotAllowed) as e:
        dm.bind_device("0000:00:01.0")
    assert e.value.reason == NotAllowed.PROTECTED and "default route" in e.value.cause


def test_a_pf_with_vfs_enabled_is_refused_and_keeps_its_vfs(sim, dm):
    """Unbinding an SR-IOV PF's driver destroys its VFs, and unbind would not bring them back."""
    pf = "0000:10:00.0"
    before = read_inventory(sim)
    assert before.devices[pf].sriov.numvfs == 2
    for bind in (dm.bind_device, dm.bind_group):
        with pytest.raises(NotAllowed) as e:
            bind(pf)
        assert e.value.reason == NotAllowed.PF_WITH_VFS and e.value.address == pf
        assert "sriov_numvfs" in e.value.hint
        assert before.diff(read_inventory(sim)) == []
    # with its VFs at 0 the PF itself may be bound (and is put back)
    sriov.set_numvfs(sim, pf, 0)
    assert dm.bind_group(pf) == [pf]
    dm.restore_group(pf)
    assert read_inventory(sim).devices[pf].driver == "igb"


def test_a_group_node_that_never_appears_fails_the_bind_and_puts_it_back(sim, monkeypatch):
    """vfio-pci bound the device but /dev/vfio/<group> never shows (no IOMMU): BindError naming the
    node after the settle time, and the device back on its driver."""
    import time

    import vfiotest.bind as bind

    real = bind.read_inventory

    def without_nodes(host, *a, **kw):
        inv = real(host, *a, **kw)
        inv.vfio.clear()
        return inv

    monkeypatch.setattr(bind, "read_inventory", without_nodes)
    t0 = time.monotonic()
    with pytest.raises(BindError) as e:
        bind_to_vfio(sim, VF, settle=0.5)
    assert e.value.reason == "verify" and "/dev/vfio/" in str(e.value) and "is missing after binding" in str(e.value)
    assert "put back on igbvf" in str(e.value)
    assert 0.5 <= time.monotonic() - t0 < 10
    assert real(sim).devices[VF].driver == "igbvf"
