"""A test that hangs fails alone: under the repository's pytest.ini (the suites' and ci/test's)
pytest-timeout fails the test that passed its limit, its fixtures' teardown runs (that is where
the layers undo what they changed), the session goes on and writes its JUnit report. The thread
method, which pytest.ini had until 2026-12-07, ended the whole process instead: one stuck
container lost the report and every later test (docs: README "Safety"). Runs pytest in a child
process; no target is reached."""

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_hung_test_fails_its_teardown_runs_and_the_session_reports(tmp_path):
    undone = tmp_path / "undone"
    (tmp_path / "test_hang_probe.py").write_text(textwrap.dedent(f"""
        import time
        import pytest

        @pytest.fixture
        def layer():
            yield
            open({str(undone)!r}, "w").write("undone")

        @pytest.mark.timeout(2)
        def test_hangs(layer):
            time.sleep(60)

        def test_after():
            pass
    """))
    junit = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", ROOT,
                        "-c", os.path.join(ROOT, "pytest.ini"), str(tmp_path / "test_hang_probe.py"),
                        f"--junitxml={junit}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "Timeout (>2.0s) from pytest-timeout" in out, out
    assert undone.read_text() == "undone", "the hung test's fixture was not torn down"
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases["test_hangs"].find("failure") is not None, out
    assert cases["test_after"].find("failure") is None and cases["test_after"].find("skipped") is None, out
