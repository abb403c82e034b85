"""Live progress (fixtures/layers.py progress()): a layer's progress line shows on the terminal
once, through pytest's live logging (pytest.ini log_cli) in a plain run and on the terminal's
stderr from xdist workers, tagged with the worker; paramiko's INFO lines stay out of the live log.
Runs the demo suites of allure_session in a child process with the repository's pytest.ini."""

import os
import subprocess
import sys

import pytest
from allure_session import BIND_SUITE

from vfiotest.testing.simsysfs import SimulatedHost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINE = "0000:10:00.0 (8086:10c9): 4 VFs"      # the sriov layer's progress line on the simulated PF


def run(tmp_path, *args):
    (tmp_path / "suites" / "demo").mkdir(parents=True)
    (tmp_path / "suites" / "demo" / "test_demo.py").write_text(BIND_SUITE)
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 0}])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env["VFIOTEST_STATE_DIR"] = str(tmp_path / "state")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", os.path.join(ROOT, "pytest.ini"),
                        "--rootdir", str(tmp_path), "--target", f"sim:{sim.sysroot}", "--vfio-profile", "emulated",
                        "-k", "bound", *args, "suites"],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "2 passed" in p.stdout, p.stdout + p.stderr   # the test and the guard
    return p.stdout + p.stderr


def test_a_plain_run_shows_the_progress_once_in_the_live_log(tmp_path):
    out = run(tmp_path)
    assert "live log setup" in out, out
    lines = [line for line in out.splitlines() if LINE in line]
    assert len(lines) == 1, out
    assert f"[vfiotest] {LINE}" in lines[0]


@pytest.mark.parametrize("workers", ["2"])
def test_an_xdist_run_shows_the_progress_once_tagged_with_its_worker(tmp_path, workers):
    out = run(tmp_path, "-n", workers)
    lines = [line for line in out.splitlines() if LINE in line]
    assert len(lines) == 1, out
    assert "[vfiotest/gw" in lines[0], lines
