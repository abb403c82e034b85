"""ci/fleet-job's own work after the suites: the reports copied from where ci/main-job wrote them
(VFIOTEST_REPORTS honoured) and the summary table on the job's page (GITHUB_STEP_SUMMARY).
ci/main-job is replaced here by a script that writes reports the way it does (the suites
themselves are the integration tests' business); ci/fleet-job runs as it is."""

import os
import shutil
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN_JOB = """#!/usr/bin/env bash
out=${VFIOTEST_REPORTS:-reports}
mkdir -p "$out/allure-results" "$out/html"
echo '| suite | passed |' > "$out/summary.md"
echo '<junit/>' > "$out/junit.xml"
echo '<html/>' > "$out/html/index.html"
exit 1
"""


def _tree(tmp_path):
    (tmp_path / "ci").mkdir()
    shutil.copy(os.path.join(ROOT, "ci", "fleet-job"), tmp_path / "ci" / "fleet-job")
    (tmp_path / "ci" / "main-job").write_text(MAIN_JOB)
    for f in ("fleet-job", "main-job"):
        p = tmp_path / "ci" / f
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def test_reports_from_vfiotest_reports_and_the_job_summary(tmp_path):
    tree = _tree(tmp_path)
    env = dict(os.environ, FLEET_NAME="xxv710-k6.1", VFIOTEST_REPORTS=str(tmp_path / "elsewhere"),
               GITHUB_STEP_SUMMARY=str(tmp_path / "step-summary.md"))
    p = subprocess.run([str(tree / "ci" / "fleet-job")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr                       # the suites' verdict is the job's
    out = tree / "fleet-reports" / "xxv710-k6.1"
    assert (out / "summary.md").read_text().startswith("| suite") and (out / "html" / "index.html").exists()
    assert (tmp_path / "step-summary.md").read_text().splitlines()[:2] == ["## xxv710-k6.1", "| suite | passed |"]


def test_a_bad_fleet_name_is_refused_before_anything_runs(tmp_path):
    tree = _tree(tmp_path)
    p = subprocess.run([str(tree / "ci" / "fleet-job")], env=dict(os.environ, FLEET_NAME="a b;rm"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "FLEET_NAME" in p.stderr and not (tree / "reports").exists()


def test_the_ci_files_pass_their_schemas_and_a_broken_one_does_not(tmp_path):
    """What ci/test runs on .github/workflows and .gitlab-ci.yml (check-jsonschema's vendored
    schemas) accepts ours and refuses a job without `runs-on`."""
    import glob
    import sys

    def check(schema, *files):
        return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *files],
                              capture_output=True, text=True, timeout=120)

    assert check("vendor.github-workflows", *glob.glob(os.path.join(ROOT, ".github/workflows/*.yml"))).returncode == 0
    assert check("vendor.gitlab-ci", os.path.join(ROOT, ".gitlab-ci.yml")).returncode == 0
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  test:\n    steps:\n      - run: ci/test\n")
    p = check("vendor.github-workflows", str(bad))
    assert p.returncode != 0 and "runs-on" in p.stdout + p.stderr, p.stdout
