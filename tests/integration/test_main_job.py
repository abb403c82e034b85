"""The README's main job, end to end: every suite against a freshly booted emulated runner,
on real Kata 1.12.1 (the bundle beside the checkout), 0 skipped, JUnit XML and Allure results
written (lane per test, the guest hook's log attached), the summary printed, summary.md and
the HTML report written, the runner stopped afterwards."""

import os
import subprocess
import xml.etree.ElementTree as ET

import pytest
from _runner_env import IO_TESTS, SUITES, junit_verdicts, keep_log, lane_failure

from vfiotest.report import evidence_of, render_evidence

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2500), pytest.mark.duration(920)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_main_job_runs_every_suite_for_real(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_SESSION"))}
    # Its own runner state: the job must boot the runner itself and stop it at the end.
    # and its own reports directory: the user's reports/ stays as it was
    reports = tmp_path / "reports"
    env.update(VFIOTEST_SKIP_SETUP="1", VFIOTEST_STATE_DIR=str(tmp_path / "state"), VFIOTEST_TARGET="virtual",
               VFIOTEST_REPORTS=str(reports))
    p = subprocess.run(["ci/main-job", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=2400)
    out = p.stdout + p.stderr
    kept = keep_log("main-job", out, tmp_path / "state" / "runner")
    assert p.returncode == 0, lane_failure(out, kept)
    assert "host state guard: runner left as found" in out, out[-3000:]
    junit = ET.parse(os.path.join(reports, "junit.xml")).getroot()
    cases = list(junit.iter("testcase"))
    verdicts, suites = junit_verdicts(junit)
    assert verdicts and set(verdicts.values()) == {"passed"}, verdicts     # 0 failed, 0 skipped
    assert suites == SUITES, suites
    assert IO_TESTS <= {n.split("[")[0] for n in verdicts}, sorted(verdicts)   # the VF's I/O
    # real Kata is the lane of every Kata test, and the report says so
    lanes = {c.get("name"): {p.get("value") for p in c.iter("property") if p.get("name") == "lane"} for c in cases
             if c.get("classname").split(".")[1] in ("guest_hook", "podman_run")}
    assert lanes and all(v == {"kata-1.12.1"} for v in lanes.values()), lanes
    env_file = os.path.join(reports, "allure-results", "environment.properties")
    props = open(env_file).read()
    assert "kata.version=1.12.1" in props and "lane=kata-1.12.1" in props, props
    assert "kata.bundle.sha256=" in props and "kata.runtime=Kata: kata-vfio" in props, props
    # the hook's log read from the guest's /tmp is attached to the guest_hook results
    results = os.path.join(reports, "allure-results")
    logs = [f for f in os.listdir(results) if f.endswith("-attachment.txt")
            and '"action": "bind"' in open(os.path.join(results, f)).read()]
    assert logs, "no guest hook log among the Allure attachments"
    assert os.listdir(os.path.join(reports, "allure-results")), "no Allure results"
    # evidence: every host_prereqs check attaches what it read; at least 80 % of all results carry
    # an attachment (their own, their steps' or their fixtures'), as the summary counts them
    ev = evidence_of(results)
    assert [e.test for e in ev if e.suite == "host_prereqs" and not e.attachments] == []
    assert sum(1 for e in ev if e.attachments) >= 0.8 * len(ev), render_evidence(ev)
    assert "evidence: " in out and "## Evidence" in open(os.path.join(reports, "summary.md")).read()
    assert "suite             passed" in out and "rebind" in out  # the summary table
    # the qualification summary and the single-file HTML report (vfiotest report, Allure 3)
    summary = open(os.path.join(reports, "summary.md")).read()
    assert "| podman_run | PF " in summary and "| kata-1.12.1 |" in summary, summary
    assert os.path.getsize(os.path.join(reports, "html", "index.html")) > 100_000
    qemu = subprocess.run(["pgrep", "-f", str(tmp_path / "state")], capture_output=True, text=True)
    assert qemu.stdout.strip() == "", f"the job left its runner running: {qemu.stdout}"
