"""The lease-and-bind cycle (vfiotest.vfio) on a simulated sysfs: a VF of the PFs leased, its
group bound to vfio-pci, then restored and released; before/after are the group's inventory."""

from types import SimpleNamespace

import pytest

from vfiotest import vfio
from vfiotest.bind import DeviceManager
from vfiotest.errors import DeviceNotFound
from vfiotest.lease import LeasePool
from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

PF = "0000:10:00.0"


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}])


def pfs_of(sim):
    inv = read_inventory(sim)
    return [SimpleNamespace(address=PF, vfs=[v.address for v in inv.vfs_of(PF)])]


def test_a_vf_goes_through_the_cycle_and_comes_back(sim):
    pool, dm = LeasePool(sim), DeviceManager(sim, "emulated")
    first = read_inventory(sim)
    with vfio.vfio_vf(sim, pool, dm, pfs_of(sim), owner="t::cycle") as vf:
        assert read_inventory(sim).devices[vf.address].driver == "vfio-pci"
        assert vf.group in pool.held() and vf.members == [vf.address]
        assert list(vf.before.devices) == [vf.address] and vf.before.devices[vf.address].driver == "igbvf"
    assert vf.group not in pool.held()
    assert vf.after is not None and vf.changes() == []
    assert first.diff(read_inventory(sim)) == []


def test_no_such_vf_is_a_clear_error(sim):
    with pytest.raises(DeviceNotFound, match="no VF 1234:5678"):
        with vfio.leased_vf(sim, LeasePool(sim), pfs_of(sim), vendor_device="1234:5678"):
            pass


def test_no_vf_is_leased_while_its_pf_lease_is_held(sim):
    """Whoever changes the PF's VF count holds the PF's lease; the VFs it makes anew have groups
    it does not hold, and no other test may lease them meanwhile."""
    from vfiotest.errors import LeaseBusy
    from vfiotest.sriov import pf_lease_name

    pool = LeasePool(sim)
    with LeasePool(sim).acquire(pf_lease_name(PF), test_id="t::count"):
        with pytest.raises(LeaseBusy):
            with vfio.leased_vf(sim, pool, pfs_of(sim), owner="t::vf", wait=0.5):
                pass
        assert list(pool.held()) == [pf_lease_name(PF)]
    with vfio.leased_vf(sim, pool, pfs_of(sim), owner="t::vf") as vf:
        assert pool.held()[vf.group]["devices"] == [vf.address]


def test_a_waiting_lease_follows_vfs_made_anew_in_other_groups(tmp_path):
    """A test waits for a VF while another holds the PF's VF groups and makes the VFs anew (a
    whole-PF test): the new VFs have other group numbers (the kernel gave the old ones to
    another PF's new VFs, which someone leases). The waiting test leases a new VF, instead of
    trying the old numbers until it gives up."""
    from vfiotest.lease import OthersLeases
    from vfiotest.sriov import set_numvfs

    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2},
                                                         {"preset": "nvme", "numvfs": 2}])
    inv = read_inventory(sim)
    b = next(d.address for d in inv.devices.values() if d.is_pf and d.address != PF)
    old = [v.iommu_group for v in inv.vfs_of(PF)]
    holder = LeasePool(sim)
    held = [holder.acquire(g, test_id="t::other") for g in old]

    class FirstTryMovesTheVfs(LeasePool):
        moved = False

        def try_acquire(self, group, **kw):
            if not self.moved:
                self.moved = True
                set_numvfs(sim, b, 0)
                set_numvfs(sim, PF, 0, leases=OthersLeases(holder, old))
                set_numvfs(sim, b, 2)        # b's new VFs get the numbers PF's VFs had
                set_numvfs(sim, PF, 2)
            return super().try_acquire(group, **kw)

    pool = FirstTryMovesTheVfs(sim)
    vf, lease = vfio.lease_vf(sim, pool, pfs_of(sim), owner="t::waiting", wait=5)
    try:
        now = read_inventory(sim)
        assert {v.iommu_group for v in now.vfs_of(b)} == set(old), "the model did not move the numbers"
        assert vf.group not in old and now.devices[vf.address].iommu_group == vf.group
        assert now.devices[vf.address].physfn == PF
    finally:
        lease.release()
        for h in held:
            h.release()


def test_a_lease_waits_for_vfs_another_session_is_making_anew(sim):
    """Another session's whole-PF test has the PF's VFs at 0 (it holds the PF's lease) when this
    test asks for a VF: the VFs are not "absent here" (a skip), they are coming back. The lease
    waits for them and takes one (CI at 5027a6c: the campaign's two sessions skipped
    test_pf_with_vfs_in_use_keeps_its_vfs with "no VF on the PFs")."""
    import threading

    from vfiotest.lease import LeasePool as Pool
    from vfiotest.sriov import pf_lease_name, set_numvfs

    pfs = pfs_of(sim)                       # the VFs as the session's sriov layer saw them
    other = Pool(sim).acquire(pf_lease_name(PF), test_id="other::whole_pf")
    set_numvfs(sim, PF, 0)

    def put_back():
        set_numvfs(sim, PF, 2)
        other.release()

    timer = threading.Timer(1.0, put_back)
    timer.start()
    try:
        vf, lease = vfio.lease_vf(sim, LeasePool(sim), pfs, owner="t::waits", wait=10)
        lease.release()
    finally:
        timer.join()
    assert vf.address in pfs[0].vfs and vf.pf == PF


def test_vfs_that_stay_gone_fail_the_lease_not_skip_it(sim):
    from vfiotest.errors import LeaseBusy
    from vfiotest.sriov import set_numvfs

    pfs = pfs_of(sim)
    set_numvfs(sim, PF, 0)
    with pytest.raises(LeaseBusy, match="VFs of the PFs were gone for 1 s") as e:
        vfio.lease_vf(sim, LeasePool(sim), pfs, owner="t::gone", wait=1)
    assert pfs[0].vfs[0] in str(e.value) and "vfiotest devices" in e.value.hint
