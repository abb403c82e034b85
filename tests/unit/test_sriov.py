"""Creating VFs and putting the count back, against the simulated sysfs."""

import pytest

from vfiotest import sriov
from vfiotest.bind import DeviceManager
from vfiotest.errors import DeviceNotFound, NotAllowed, VFCreateError
from vfiotest.journal import MemoryJournal
from vfiotest.lease import LeasePool
from vfiotest.pci import read_inventory
from vfiotest.profiles import get_profile
from vfiotest.testing.simsysfs import SimulatedHost

PF = "0000:10:00.0"


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=["igb"])


def test_create_change_and_restore(sim):
    first = read_inventory(sim)
    j = MemoryJournal()
    vfs = sriov.set_numvfs(sim, PF, 3, j)
    assert vfs == ["0000:10:10.0", "0000:10:10.1", "0000:10:10.2"]
    assert sriov.set_numvfs(sim, PF, 5, j)[-1] == "0000:10:10.4"  # N -> M goes through 0
    assert j.entries() == [{"kind": "numvfs", "address": PF, "numvfs": 0, "drivers_autoprobe": True}]
    assert sriov.set_numvfs(sim, PF, 5, j) == sriov.set_numvfs(sim, PF, 5)  # idempotent
    DeviceManager(sim, "emulated", j).restore_all()
    assert first.diff(read_inventory(sim)) == []


def test_autoprobe_is_set_and_restored(sim):
    first = read_inventory(sim)
    j = MemoryJournal()
    sriov.set_numvfs(sim, PF, 2, j, autoprobe=False)
    inv = read_inventory(sim)
    assert inv.devices[PF].sriov.drivers_autoprobe is False
    assert all(v.driver is None for v in inv.vfs_of(PF))
    DeviceManager(sim, "emulated", j).restore_all()
    assert first.diff(read_inventory(sim)) == []


@pytest.mark.parametrize("n", [8, 100])
def test_more_than_totalvfs_is_refused_without_change(sim, n):
    first = read_inventory(sim)
    j = MemoryJournal()
    with pytest.raises(VFCreateError, match="at most 7 VFs") as e:
        sriov.set_numvfs(sim, PF, n, j)
    assert "7 or fewer" in e.value.hint
    assert j.entries() == [] and first.diff(read_inventory(sim)) == []


@pytest.mark.parametrize("n", [-1, "2", 1.5, True])
def test_bad_counts(sim, n):
    with pytest.raises(VFCreateError, match="not a VF count"):
        sriov.set_numvfs(sim, PF, n)


def test_not_a_pf_and_missing(sim):
    with pytest.raises(VFCreateError, match="not an SR-IOV PF"):
        sriov.set_numvfs(sim, "0000:00:01.0", 1)
    with pytest.raises(DeviceNotFound):
        sriov.set_numvfs(sim, "0000:77:00.0", 1)


def test_profile_checks(sim):
    with pytest.raises(NotAllowed, match="allowlist"):
        sriov.set_numvfs(sim, PF, 1, profile=get_profile("seed"))
    sriov.set_numvfs(sim, PF, 1, profile=get_profile("emulated"))


def test_pf_with_vfs_bound_to_vfio_is_refused(sim):
    sriov.set_numvfs(sim, PF, 2)
    DeviceManager(sim, "emulated").bind_device("0000:10:10.1")
    before = read_inventory(sim)
    for n in (0, 3):
        with pytest.raises(VFCreateError, match="0000:10:10.1 is bound to vfio-pci"):
            sriov.set_numvfs(sim, PF, n)
    assert before.diff(read_inventory(sim)) == []


def test_pf_with_leased_vf_is_refused(sim):
    sriov.set_numvfs(sim, PF, 2)
    group = read_inventory(sim).devices["0000:10:10.0"].iommu_group
    with LeasePool(sim).acquire(group, test_id="t::x"):
        with pytest.raises(VFCreateError, match=f"group {group}.*leased.*t::x"):
            sriov.set_numvfs(sim, PF, 0)
    sriov.set_numvfs(sim, PF, 0)


def test_write_timeout(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=["igb"], sriov_delay=5)
    with pytest.raises(VFCreateError, match="did not return within 1 s") as e:
        sriov.set_numvfs(sim, PF, 2, timeout=1)
    assert "dmesg" in e.value.hint


def test_pf_without_driver(sim):
    sim.write_text("/sys/bus/pci/drivers/igb/unbind", PF)
    with pytest.raises(VFCreateError, match="no driver bound"):
        sriov.set_numvfs(sim, PF, 2)



def test_errors_carry_fields(sim):
    with pytest.raises(VFCreateError) as e:
        sriov.set_numvfs(sim, PF, 99)
    assert e.value.reason == VFCreateError.TOO_MANY and e.value.address == PF
    sriov.set_numvfs(sim, PF, 2)
    DeviceManager(sim, "emulated").bind_device("0000:10:10.1")
    with pytest.raises(VFCreateError) as e:
        sriov.set_numvfs(sim, PF, 0)
    assert e.value.reason == VFCreateError.IN_USE and "0000:10:10.1" in e.value.cause


def test_numvfs_entry_is_undone_by_the_journal(sim):
    from vfiotest.journal import registered_kinds

    assert registered_kinds()["numvfs"].undo is sriov.restore_numvfs
    j = MemoryJournal()
    first = read_inventory(sim)
    sriov.set_numvfs(sim, PF, 3, journal=j)
    assert [e["kind"] for e in j.entries()] == ["numvfs"]
    j.restore_all(sim)
    assert j.entries() == [] and first.diff(read_inventory(sim)) == []


def test_a_group_number_freed_and_given_to_another_pfs_vf_is_not_that_vf(tmp_path):
    """Two tests each change one PF's VF count, holding its VFs (sriov.hold_vfs). The kernel
    gives a freed IOMMU group number to the next group it makes: A's VFs go, B's new VF gets
    one of their numbers, which A's test still holds. That lease was taken for A's VF, not for
    B's: B's test may go on (the two-sessions campaign row failed on this)."""
    from vfiotest.lease import OthersLeases

    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2},
                                                         {"preset": "nvme", "numvfs": 2}])
    a, b = (p.address for p in read_inventory(sim).devices.values() if p.is_pf)
    pool = LeasePool(sim)
    held_a = sriov.hold_vfs(sim, pool, a, test_id="t::a")
    held_b = sriov.hold_vfs(sim, pool, b, test_id="t::b")
    assert held_a and held_b and len(held_a) == len(held_b) == 3
    others_of_b = OthersLeases(pool, [lease.group for lease in held_b])
    assert sriov.hold_vfs(sim, pool, a, test_id="t::c") is None, "A's PF and VFs are held"
    sriov.set_numvfs(sim, a, 0, leases=OthersLeases(pool, [lease.group for lease in held_a]))
    sriov.set_numvfs(sim, b, 0, leases=others_of_b)
    (vf,) = sriov.set_numvfs(sim, b, 1, leases=others_of_b)
    number = read_inventory(sim).devices[vf].iommu_group
    assert number in {lease.group for lease in held_a}, "the kernel model did not reuse A's group number"
    assert sriov.set_numvfs(sim, b, 0, leases=others_of_b) == []
    # a lease that names no devices still counts by number (the conservative reading)
    (vf,) = sriov.set_numvfs(sim, b, 1, leases=others_of_b)
    for lease in held_a:
        lease.release()
    with LeasePool(sim).acquire(read_inventory(sim).devices[vf].iommu_group, test_id="t::d"):
        with pytest.raises(VFCreateError, match="leased.*t::d"):
            sriov.set_numvfs(sim, b, 0, leases=others_of_b)
    for lease in held_b:
        lease.release()


def test_hold_vfs_names_each_vf_in_its_groups_lease(sim):
    vfs = sriov.set_numvfs(sim, PF, 2)
    pool = LeasePool(sim)
    leases = sriov.hold_vfs(sim, pool, PF, test_id="t::h")
    try:
        held = pool.held()
        assert held[sriov.pf_lease_name(PF)]["test"] == "t::h"
        inv = read_inventory(sim)
        for vf in vfs:
            assert held[inv.devices[vf].iommu_group]["devices"] == [vf]
    finally:
        for lease in leases:
            lease.release()
    assert pool.held() == {}
