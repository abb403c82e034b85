"""kill -9 in the middle of changing a real kernel's devices, then `vfiotest restore`: the
emulated runner's PCI state is back to what it was, whatever the moment of the kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vfiotest.pci import read_inventory
from vfiotest.runner import Runner

pytestmark = [pytest.mark.vm, pytest.mark.mutating, pytest.mark.timeout(1800)]

# Creates 2 VFs on the igb PF and binds the first one's group to vfio-pci, journaled, then waits.
CHILD = r"""
import sys, time
from vfiotest.bind import DeviceManager
from vfiotest.journal import Journal
from vfiotest.runner import Runner
from vfiotest.sriov import set_numvfs
host = Runner.default().host(); host.connect()
journal = Journal.open(host)
print("connected", flush=True)
pf = Runner.default().pfs()["igb"]
vfs = set_numvfs(host, pf, 2, journal=journal)
print("vfs", flush=True)
DeviceManager(host, "emulated", journal).bind_group(vfs[0])
print("bound", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    env_dir = str(tmp_path_factory.mktemp("state"))
    old = os.environ.get("VFIOTEST_STATE_DIR")
    os.environ["VFIOTEST_STATE_DIR"] = env_dir
    r = Runner.default()
    r.up()
    yield r
    r.down()
    if old is None:
        os.environ.pop("VFIOTEST_STATE_DIR", None)
    else:
        os.environ["VFIOTEST_STATE_DIR"] = old


def _state(runner):
    host = runner.host()
    try:
        return read_inventory(host).state()
    finally:
        host.close()


def test_kill_minus_nine_at_any_moment_then_restore(runner):
    first = _state(runner)
    reached = []
    for delay in (0.0, 0.5, 1.0, 2.0, 3.5, 6.0, 30.0):
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "connected"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        rest = child.stdout.read().split()
        reached.append(rest[-1] if rest else "connected")
        # the child's remote journal lock dies with its SSH session: retry until it is an orphan
        deadline = time.monotonic() + 60
        while True:
            p = subprocess.run([sys.executable, "-m", "vfiotest", "restore", "--target", "virtual"],
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stdout + p.stderr
            now = _state(runner)
            if now == first or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert now == first, f"killed after {delay} s (reached {reached[-1]}): {json.dumps(now)[:800]}"
    # the kills must have landed in the middle of the changes, not only before or after them
    assert "connected" in reached and "bound" in reached and len(set(reached)) >= 2, reached
