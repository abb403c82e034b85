"""The README's main job, end to end: every suite against a freshly booted emulated runner,
JUnit XML and Allure results written, the summary printed, the runner stopped afterwards."""

import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2500)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_main_job_runs_every_suite_for_real(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_SESSION"))}
    # Its own runner state: the job must boot the runner itself and stop it at the end.
    env.update(VFIOTEST_SKIP_SETUP="1", VFIOTEST_STATE_DIR=str(tmp_path / "state"), VFIOTEST_TARGET="virtual")
    p = subprocess.run(["ci/main-job", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=2400)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "host state guard: runner left as found" in out, out[-3000:]
    junit = ET.parse(os.path.join(ROOT, "reports", "junit.xml")).getroot()
    cases = list(junit.iter("testcase"))
    ran = {c.get("classname").split(".")[1] for c in cases
           if c.find("skipped") is None and c.find("failure") is None and c.find("error") is None}
    assert {"host_prereqs", "rebind", "guest_hook", "podman_run"} <= ran, f"suites that passed tests: {ran}"
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert len(skipped) <= 1, [s.find("skipped").get("message") for s in skipped]  # kata-runtime absent
    env_file = os.path.join(ROOT, "reports", "allure-results", "environment.properties")
    props = open(env_file).read()
    assert "kata.guest=STAND-IN" in props and "kata.runtime=STAND-IN" in props, props
    assert os.listdir(os.path.join(ROOT, "reports", "allure-results")), "no Allure results"
    assert "suite             passed" in out and "rebind" in out  # the summary table
    qemu = subprocess.run(["pgrep", "-f", str(tmp_path / "state")], capture_output=True, text=True)
    assert qemu.stdout.strip() == "", f"the job left its runner running: {qemu.stdout}"
