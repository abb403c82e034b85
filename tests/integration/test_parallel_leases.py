"""`pytest -n 4` of the rebind suite on the emulated runner: no two tests hold the same IOMMU
group at once, and the session ends with the host state guard clean."""

import itertools
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2500)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rebind_suite_in_parallel_never_shares_a_group(tmp_path):
    log = tmp_path / "leases.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_SESSION"))}
    env.update(VFIOTEST_LEASE_LOG=str(log), VFIOTEST_TARGET="virtual")
    p = subprocess.run([sys.executable, "-m", "pytest", "-n", "4", "suites/rebind", "--numvfs", "4",
                        "-p", "no:cacheprovider", "-q"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "left as found" in out, out[-2000:]
    leases = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(leases) >= 6, leases  # every test of the suite that takes a VF through vf_lease
    workers = {rec["worker"] for rec in leases}
    assert len(workers) >= 2, f"only {workers} took leases: the run was not parallel"
    by_group = {}
    for rec in leases:
        by_group.setdefault(rec["group"], []).append(rec)
    for group, held in by_group.items():
        held.sort(key=lambda rec: rec["start"])
        for a, b in itertools.pairwise(held):
            assert b["start"] >= a["end"], (f"group {group} held by {a['test']} ({a['worker']}) "
                                            f"and {b['test']} ({b['worker']}) at once")
