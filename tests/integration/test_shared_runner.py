"""Two test sessions on one runner: two `pytest suites/rebind -n 2` started 2 s apart against
the same emulated runner both pass, no IOMMU group is held by both at once, each session's
host state guard compares only what that session may touch (the other's live VF counts are
listed apart), and the runner is left as found."""

import itertools
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.mutating, pytest.mark.timeout(1500)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_rebind_sessions_share_a_runner(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"), VFIOTEST_TARGET="virtual")
    vfiotest = [sys.executable, "-m", "vfiotest"]
    up = subprocess.run(vfiotest + ["runner", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        procs, logs = [], []
        for name in ("a", "b"):
            log = tmp_path / f"leases-{name}.jsonl"
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pytest", "suites/rebind", "-n", "2", "-p", "no:cacheprovider", "-q",
                 "--junitxml", str(tmp_path / f"junit-{name}.xml")],
                cwd=ROOT, env=dict(env, VFIOTEST_LEASE_LOG=str(log)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            time.sleep(2)
        outs = [p.communicate(timeout=1200)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0, out[-4000:]
            assert "failed" not in out.splitlines()[-1], out[-2000:]
            assert "host state guard: runner left as found" in out, out[-3000:]
        for name in ("a", "b"):    # both pass: nothing failed, nothing skipped for want of a device
            suite = ET.parse(tmp_path / f"junit-{name}.xml").getroot().find("testsuite")
            assert suite is not None
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            assert counts["tests"] >= 15 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, \
                (name, counts)
        # no group, and no whole PF, held by two users at once, across both sessions
        leases = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
        assert any(rec["group"].startswith("pf-") for rec in leases), "the whole-PF users are not in the lease log"
        assert len({rec["session"] for rec in leases}) == 2, {rec["session"] for rec in leases}
        by_group: dict = {}
        for rec in leases:
            by_group.setdefault(rec["group"], []).append(rec)
        for group, held in by_group.items():
            held.sort(key=lambda rec: rec["start"])
            for x, y in itertools.pairwise(held):
                assert y["start"] >= x["end"], f"group {group} held by {x['test']} and {y['test']} at once"
    finally:
        subprocess.run(vfiotest + ["runner", "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
