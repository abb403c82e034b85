"""The host state guard's verdict is a result of its own in the JUnit XML: a session that leaves
the target changed fails there too, with the diff as the message. Runs a pytest session in a
child process against a simulated sysfs (no VM)."""

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

from vfiotest.testing.simsysfs import SimulatedHost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUITE = '''
from vfiotest.sriov import set_numvfs


def test_touches_the_target(target_host):
    if {leak}:
        set_numvfs(target_host, "0000:10:00.0", 3)   # no journal: only the guard can notice
'''


def _session(tmp_path, leak):
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}])
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_leaky.py").write_text(textwrap.dedent(SUITE.format(leak=leak)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"))
    junit = tmp_path / "junit.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(suite),
                        "--target", f"sim:{sim.sysroot}", "--vfio-profile", "emulated", f"--junitxml={junit}",
                        f"--alluredir={tmp_path / 'allure'}",
                        str(suite / "test_leaky.py")],
                       cwd=str(suite), env=env, capture_output=True, text=True, timeout=180)
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    summary = subprocess.run([sys.executable, "-m", "vfiotest.report", str(junit)], capture_output=True, text=True,
                             timeout=60, env=env).stdout
    return p, cases, summary


def test_a_leak_fails_the_guard_result_in_the_xml(tmp_path):
    p, cases, summary = _session(tmp_path, leak=True)
    assert p.returncode != 0, p.stdout + p.stderr
    assert cases["test_touches_the_target"].find("failure") is None, "the test itself passed"
    guard = cases["host_state_guard"]
    failure = guard.find("failure")
    assert failure is not None, ET.tostring(guard).decode()
    text = (failure.get("message") or "") + (failure.text or "")
    assert "numvfs was 2, now 3" in text and "the host differs from how the session found it" in text, text
    assert guard.get("classname") == "vfiotest.session"
    allure = tmp_path / "allure"
    results = [json.loads(f.read_text()) for f in allure.glob("*-result.json")]
    mine = [r for r in results if r["name"] == "host state guard"]
    assert len(mine) == 1 and mine[0]["status"] == "failed", results
    assert "numvfs was 2, now 3" in mine[0]["statusDetails"]["message"]
    attached = (allure / mine[0]["attachments"][0]["source"]).read_text()
    assert "numvfs was 2, now 3" in attached
    assert "1 failed, 1 passed" in p.stdout, p.stdout
    row = next(line for line in summary.splitlines() if line.startswith("host state guard"))
    assert row.split()[3:6] == ["0", "1", "0"], summary      # passed, failed, skipped


def test_a_clean_session_passes_the_guard_result(tmp_path):
    p, cases, _summary = _session(tmp_path, leak=False)
    assert p.returncode == 0, p.stdout + p.stderr
    guard = cases["host_state_guard"]
    assert guard.find("failure") is None and guard.find("error") is None
    assert "left as found" in p.stdout
