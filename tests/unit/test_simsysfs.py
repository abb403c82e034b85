"""The simulated sysfs behaves like the kernel where the device layer depends on it."""

import errno
import os
import stat

import pytest

from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

D = "/sys/bus/pci/devices"
DRV = "/sys/bus/pci/drivers"


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=["igb", {"preset": "nvme", "numvfs": 2}])


def errno_of(fn, *a):
    with pytest.raises(OSError) as e:
        fn(*a)
    return e.value.errno


def driver(sim, addr):
    return read_inventory(sim).devices[addr].driver


def test_inventory_reads_the_tree_unchanged(sim):
    inv = read_inventory(sim)
    pf = inv.devices["0000:20:00.0"]
    assert pf.vendor_device == "1b36:0010" and pf.sriov.totalvfs == 4 and pf.sriov.numvfs == 2
    assert [v.address for v in inv.vfs_of("0000:20:00.0")] == ["0000:20:10.0", "0000:20:10.1"]
    assert inv.devices["0000:20:10.0"].physfn == "0000:20:00.0"
    assert inv.devices["0000:10:00.0"].driver == "igb"
    assert inv.vfio == {"vfio": "char"}
    assert "default route" in inv.protected["0000:00:01.0"]
    assert "mounted filesystem /" in inv.protected["0000:00:02.0"]
    assert inv.identity["hostname"] == "simhost"


def test_unbind_removes_driver_link_and_enodev_when_not_bound(sim):
    sim.write_text(f"{DRV}/nvme/unbind", "0000:20:10.0")
    assert driver(sim, "0000:20:10.0") is None
    assert not os.path.lexists(sim.sysroot + f"{DRV}/nvme/0000:20:10.0")
    assert errno_of(sim.write_text, f"{DRV}/nvme/unbind", "0000:20:10.0") == errno.ENODEV
    # the device's own driver/unbind is gone with the link
    assert errno_of(sim.write_text, f"{D}/0000:20:10.0/driver/unbind", "0000:20:10.0") == errno.ENOENT


def test_drivers_probe_honours_override_and_succeeds_when_nothing_binds(sim):
    a = "0000:20:10.0"
    sim.write_text(f"{D}/{a}/driver_override", "vfio-pci")
    sim.write_text(f"{DRV}/nvme/unbind", a)
    sim.write_text("/sys/bus/pci/drivers_probe", a)
    assert driver(sim, a) == "vfio-pci"
    sim.write_text(f"{DRV}/vfio-pci/unbind", a)
    sim.write_text(f"{D}/{a}/driver_override", "nosuchdriver")
    sim.write_text("/sys/bus/pci/drivers_probe", a)  # no error, no driver
    assert driver(sim, a) is None
    sim.write_text(f"{D}/{a}/driver_override", "\n")
    assert read_inventory(sim).devices[a].driver_override is None
    sim.write_text("/sys/bus/pci/drivers_probe", a)
    assert driver(sim, a) == "nvme"
    assert errno_of(sim.write_text, "/sys/bus/pci/drivers_probe", "0000:99:00.0") == errno.ENODEV


def test_new_id_binds_all_unbound_matching_and_eexist(sim):
    for a in ("0000:20:10.0", "0000:20:10.1"):
        sim.write_text(f"{DRV}/nvme/unbind", a)
    sim.write_text(f"{DRV}/vfio-pci/new_id", "1b36 0010")
    assert driver(sim, "0000:20:10.0") == driver(sim, "0000:20:10.1") == "vfio-pci"
    assert driver(sim, "0000:20:00.0") == "nvme"  # bound devices are not taken
    assert errno_of(sim.write_text, f"{DRV}/vfio-pci/new_id", "1b36 0010") == errno.EEXIST
    sim.write_text(f"{DRV}/vfio-pci/remove_id", "1b36 0010")
    assert errno_of(sim.write_text, f"{DRV}/vfio-pci/remove_id", "1b36 0010") == errno.ENODEV
    assert driver(sim, "0000:20:10.0") == "vfio-pci"  # remove_id does not unbind


def test_bind_attr(sim):
    a = "0000:20:10.0"
    assert errno_of(sim.write_text, f"{DRV}/nvme/bind", a) == errno.EBUSY
    sim.write_text(f"{DRV}/nvme/unbind", a)
    assert errno_of(sim.write_text, f"{DRV}/vfio-pci/bind", a) == errno.ENODEV  # no override, no ID
    sim.write_text(f"{DRV}/nvme/bind", a)
    assert driver(sim, a) == "nvme"


def test_sriov_numvfs_rules(sim):
    pf = "0000:10:00.0"
    sim.write_text(f"{D}/{pf}/sriov_numvfs", "3")
    inv = read_inventory(sim)
    vfs = inv.vfs_of(pf)
    assert len(vfs) == 3
    assert len({v.iommu_group for v in vfs}) == 3 and all(len(inv.groups[v.iommu_group]) == 1 for v in vfs)
    assert all(v.driver == "igbvf" and v.vendor_device == "8086:10ca" for v in vfs)
    assert errno_of(sim.write_text, f"{D}/{pf}/sriov_numvfs", "2") == errno.EBUSY
    assert errno_of(sim.write_text, f"{D}/{pf}/sriov_numvfs", "8") == errno.ERANGE
    sim.write_text(f"{D}/{pf}/sriov_numvfs", "0")
    assert read_inventory(sim).vfs_of(pf) == []
    sim.write_text(f"{D}/{pf}/sriov_drivers_autoprobe", "0")
    sim.write_text(f"{D}/{pf}/sriov_numvfs", "2")
    assert all(v.driver is None for v in read_inventory(sim).vfs_of(pf))


def test_numvfs_needs_pf_driver(sim):
    pf = "0000:10:00.0"
    sim.write_text(f"{DRV}/igb/unbind", pf)
    assert errno_of(sim.write_text, f"{D}/{pf}/sriov_numvfs", "1") == errno.ENOENT


def test_dev_vfio_node_only_while_group_fully_bound(tmp_path):
    others = ["host-bridge", {"id": "1b36:0001", "class": "0x060400", "group": "g"},
              {"id": "1b36:0010", "class": "0x010802", "group": "g"},
              {"id": "1b36:0010", "class": "0x010802", "group": "g"}]
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[], others=others)
    inv = read_inventory(sim)
    g = inv.devices["0000:00:02.0"].iommu_group
    a, b = "0000:00:02.0", "0000:00:03.0"
    node = f"{sim.sysroot}/dev/vfio/{g}"
    for addr in (a, b):
        sim.write_text(f"{D}/{addr}/driver_override", "vfio-pci")
        sim.write_text(f"{DRV}/nvme/unbind", addr)
        sim.write_text("/sys/bus/pci/drivers_probe", addr)
        if addr == a:
            assert not os.path.exists(node)  # half a group is not viable
    assert stat.S_ISCHR(os.stat(node).st_mode)  # the bridge does not count
    assert read_inventory(sim).vfio[g] == "char"
    sim.write_text(f"{DRV}/vfio-pci/unbind", b)
    assert not os.path.exists(node)


def test_modprobe_through_run(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=["igb"], vfio_loaded=False)
    assert not sim.exists(f"{DRV}/vfio-pci")
    assert sim.run(["modprobe", "vfio-pci"]).ok
    assert sim.exists(f"{DRV}/vfio-pci")
    sim2 = SimulatedHost.build(str(tmp_path / "t"), pfs=["igb"], vfio_loaded=False, vfio_loadable=False)
    res = sim2.run(["modprobe", "vfio-pci"])
    assert res.rc == 1 and "not found" in res.stderr
    assert sim.run(["rm", "-rf", "/"]).rc == 127  # nothing reaches this machine


def test_state_is_on_disk(sim):
    sim.write_text(f"{D}/0000:10:00.0/sriov_numvfs", "2")
    other = SimulatedHost.open(sim.sysroot)
    assert read_inventory(other).devices["0000:10:00.0"].sriov.numvfs == 2
    assert read_inventory(other).state() == read_inventory(sim).state()


def test_no_driver_override_attribute(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=["igb"], driver_override=False)
    assert not sim.exists(f"{D}/0000:10:00.0/driver_override")
    assert read_inventory(sim).devices["0000:10:00.0"].driver_override is None
