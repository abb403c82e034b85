"""The reliability campaign's quick mode (ci/campaign --quick), in two parts that each boot a
runner of their own, so that `ci/test -n 2` runs them beside the other VM tests: every row must
reach its target. The tables go to $VFIOTEST_CI_REPORTS/campaign-<part>.txt when that is set
(ci/test sets it to reports/)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = {
    # about 600 s and 800 s in CI beside the other VM tests (docs/measurements.md)
    "kills": ["unkilled", "kills", "bad-inputs"],
    "faults": ["two-sessions", "runner-killed", "ssh-cut"],
}

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]


@pytest.mark.parametrize("part", [pytest.param("kills", marks=pytest.mark.duration(600)),
                                  pytest.param("faults", marks=pytest.mark.duration(800))])
def test_campaign_rows_reach_their_targets(part, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_SESSION"))}
    only = [a for row in PARTS[part] for a in ("--only", row)]
    p = subprocess.run([sys.executable, "ci/campaign.py", "--quick", *only, "--state-dir", str(tmp_path / "state")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=2300)
    table = p.stdout
    reports = os.environ.get("VFIOTEST_CI_REPORTS")
    if reports:
        os.makedirs(reports, exist_ok=True)
        with open(os.path.join(reports, f"campaign-{part}.txt"), "w") as f:
            f.write(table)
    rows = [line for line in table.splitlines()[1:] if line.rstrip().endswith((" yes", " NO"))]
    assert p.returncode == 0, table + p.stderr[-4000:]
    assert rows and all(r.rstrip().endswith(" yes") for r in rows), table
    assert f"campaign: {len(rows)}/{len(rows)} rows at target" in table, table
