"""Leases of IOMMU groups: one holder at a time, across processes; dead holders release."""

import subprocess
import sys

import pytest

from vfiotest.errors import LeaseBusy
from vfiotest.lease import LeasePool
from vfiotest.testing.simsysfs import SimulatedHost


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[])


def test_acquire_release_and_held(sim):
    pool = LeasePool(sim)
    lease = pool.acquire("5", test_id="suite::test_a")
    assert pool.held()["5"]["test"] == "suite::test_a"
    with pytest.raises(LeaseBusy, match="group 5 is leased by pid .* for suite::test_a"):
        LeasePool(sim).acquire("5")
    assert pool.acquire_first(["5", "6"]).group == "6"
    lease.release()
    assert "5" not in pool.held()
    pool.acquire("5").release()


def test_held_by_another_process_and_freed_when_it_dies(sim):
    code = (f"from vfiotest.testing.simsysfs import SimulatedHost; from vfiotest.lease import LeasePool;"
            f"import sys, time; l = LeasePool(SimulatedHost.open({sim.sysroot!r})).acquire('7', test_id='other');"
            f"print('HELD', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "HELD"
        pool = LeasePool(sim)
        assert pool.held()["7"]["pid"] == p.pid
        assert pool.try_acquire("7") is None
    finally:
        p.kill()
        p.wait()
    # the lock died with its holder; its stale record is dropped
    assert LeasePool(sim).held() == {}
    LeasePool(sim).acquire("7").release()


def test_owner_record_names_what_the_caller_gives(sim, monkeypatch):
    # the library reads no pytest/xdist variables: worker and session come from the caller
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw9")
    monkeypatch.setenv("VFIOTEST_SESSION", "from-env")
    with LeasePool(sim).acquire("3", test_id="t::a"):
        rec = LeasePool(sim).held()["3"]
        assert rec["worker"] is None and rec["session"] is None and rec["test"] == "t::a"
    pool = LeasePool(sim, worker="gw1", session="abc")
    with pool.acquire("3", test_id="t::b"):
        rec = pool.held()["3"]
        assert (rec["worker"], rec["session"], rec["test"]) == ("gw1", "abc", "t::b")
        with pytest.raises(LeaseBusy, match=r"group 3 is leased by pid .* \(worker gw1\) for t::b") as e:
            LeasePool(sim).acquire("3")
        assert e.value.group == "3" and e.value.owner["worker"] == "gw1" and e.value.owner["test"] == "t::b"


def test_who_am_i_takes_its_names():
    from vfiotest.journal import default_owner
    from vfiotest.lease import who_am_i

    me = who_am_i("t::c", worker="gw2", session="s1")
    assert (me["test"], me["worker"], me["session"]) == ("t::c", "gw2", "s1")
    assert who_am_i()["worker"] is None
    assert default_owner("gw2").endswith("-gw2") and not default_owner().endswith("-")
