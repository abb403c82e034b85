"""Leases of IOMMU groups: one holder at a time, across processes; dead holders release."""

import json
import subprocess
import sys
import time

import pytest

from vfiotest.errors import LeaseBusy
from vfiotest.lease import LeasePool
from vfiotest.simsysfs import SimulatedHost


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
    code = (f"from vfiotest.simsysfs import SimulatedHost; from vfiotest.lease import LeasePool;"
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
