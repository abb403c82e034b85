"""The host state guard fails a session that leaves the target different from how it found it."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900), pytest.mark.duration(16)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_guard_fails_a_session_that_leaks_state(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_SESSION"))}
    env.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"), VFIOTEST_TARGET="virtual")  # its own runner
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/integration/leaky_suite.py", "-p", "no:cacheprovider", "-q"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    out = p.stdout + p.stderr
    assert "1 passed" in out, out[-3000:]  # the test itself passed...
    assert p.returncode != 0, out[-3000:]  # ...but the session failed
    assert "host state guard: the host differs from how the session found it" in out, out[-3000:]
    assert "0000:02:00.0: numvfs was 0, now 1" in out, out[-3000:]
    assert "0000:02:00.1: appeared" in out, out[-3000:]
