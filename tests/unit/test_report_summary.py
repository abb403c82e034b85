"""The qualification summary (reports/summary.md) from a small JUnit XML file and its environment:
pass/fail/skip by suite x device x lane, the versions, the command and the commit of the run,
the failures with their kind (environment or product)."""

import subprocess
import sys

from vfiotest.report import outcomes_from_junit, read_environment, render_markdown

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="vfiotest" tests="6">
 <testcase classname="suites.rebind.test_rebind" name="test_bind_vf" time="1.5">
  <properties><property name="lane" value="host"/></properties></testcase>
 <testcase classname="suites.rebind.test_rebind" name="test_group_restored" time="0.5">
  <properties><property name="lane" value="host"/></properties>
  <failure message="AssertionError: 0000:00:05.1 driver vfio-pci, expected igbvf">trace</failure></testcase>
 <testcase classname="suites.podman_run.test_podman_run" name="test_probe" time="9">
  <properties><property name="lane" value="kata-1.12.1"/></properties></testcase>
 <testcase classname="suites.podman_run.test_podman_run" name="test_no_ipc_lock" time="3">
  <properties><property name="lane" value="kata-1.12.1"/></properties>
  <error message="the Kata guest did not boot in 120 s">trace</error></testcase>
 <testcase classname="suites.guest_hook.test_guest_hook" name="test_hook_log" time="0">
  <properties><property name="lane" value="kata-1.12.1"/></properties>
  <skipped message="guest layer unavailable: the guest image could not be built"/></testcase>
 <testcase classname="vfiotest.session" name="host_state_guard" time="0">
  <properties><property name="lane" value="host"/></properties></testcase>
</testsuite></testsuites>
"""

ENVIRONMENT = """device.pf=0000:00:05.0=8086:10c9
device.vf_ids=8086:10ca
kata.bundle.sha256=ab12cd34
kata.version=1.12.1
profile=emulated
run.command=pytest suites --junitxml=reports/junit.xml --alluredir=reports/allure-results -k rebind
run.commit=364bc84aa1b2
target.kernel=6.1.0-28-amd64
target.podman=4.3.1
"""


def write_run(tmp_path):
    reports = tmp_path / "reports"
    (reports / "allure-results").mkdir(parents=True)
    (reports / "junit.xml").write_text(JUNIT)
    (reports / "allure-results" / "environment.properties").write_text(ENVIRONMENT)
    return reports


def test_the_table_counts_by_suite_device_and_lane(tmp_path):
    reports = write_run(tmp_path)
    env = read_environment(str(reports / "allure-results" / "environment.properties"))
    md = render_markdown(outcomes_from_junit(str(reports / "junit.xml"), env), {"": env}, "vfiotest report")
    device = "PF 0000:00:05.0=8086:10c9; VF 8086:10ca"
    assert f"| rebind | {device} | host | 1 | 1 | 0 |" in md, md
    assert f"| podman_run | {device} | kata-1.12.1 | 1 | 1 | 0 |" in md, md
    assert f"| guest_hook | {device} | kata-1.12.1 | 0 | 0 | 1 |" in md, md
    assert f"| host state guard | {device} | host | 1 | 0 | 0 |" in md, md
    assert "**3 passed, 2 failed, 1 skipped** (6 results)." in md
    # the run's versions, exact command and commit
    assert "- command: `pytest suites --junitxml=reports/junit.xml --alluredir=reports/allure-results -k rebind`" in md
    assert "- commit: `364bc84aa1b2`" in md
    assert "| kata.version | 1.12.1 |" in md and "| kata.bundle.sha256 | ab12cd34 |" in md
    assert "| target.kernel | 6.1.0-28-amd64 |" in md and "| target.podman | 4.3.1 |" in md
    # the failures, told apart
    assert "`suites.rebind.test_rebind::test_group_restored` (Product:" in md, md
    assert "`suites.podman_run.test_podman_run::test_no_ipc_lock` (Environment:" in md, md
    assert "- 1 x guest layer unavailable: the guest image could not be built" in md


def test_vfiotest_report_writes_summary_md_next_to_the_junit_file(tmp_path):
    reports = write_run(tmp_path)
    p = subprocess.run([sys.executable, "-m", "vfiotest.report", str(reports / "junit.xml"), "--no-html"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (reports / "summary.md").read_text()
    assert md.startswith("# vfiotest qualification summary")
    assert "| rebind | PF 0000:00:05.0=8086:10c9; VF 8086:10ca | host | 1 | 1 | 0 |" in md
    assert "Made by `python3 -m vfiotest.report " in md
    # the terminal table is still printed
    assert "rebind" in p.stdout and "total" in p.stdout


def test_a_missing_junit_file_names_the_next_step(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vfiotest.report", str(tmp_path / "nope.xml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 4
    assert "no JUnit file" in p.stderr and "next step: run the suites first" in p.stderr


def test_a_directory_that_is_not_a_report_is_never_replaced(tmp_path):
    reports = write_run(tmp_path)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    p = subprocess.run([sys.executable, "-m", "vfiotest.report", str(reports / "junit.xml"), "--html", str(other)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 4 and "holds no earlier report" in p.stderr, p.stderr
    assert (other / "notes.txt").read_text() == "keep me"
    out = tmp_path / "release"
    (out / "allure-results").mkdir(parents=True)
    (out / "allure-results" / "notes.txt").write_text("keep me")
    p = subprocess.run([sys.executable, "-m", "vfiotest.report", "--merge", str(reports), "-o", str(out), "--no-html"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 4 and "not Allure results (notes.txt)" in p.stderr, p.stderr
    assert (out / "allure-results" / "notes.txt").read_text() == "keep me"


def _result(d, uuid, test, suite, attachments=(), steps=()):
    import json
    (d / f"{uuid}-result.json").write_text(json.dumps({
        "uuid": uuid, "fullName": test, "status": "passed", "labels": [{"name": "suite", "value": suite}],
        "attachments": [{"name": a, "source": f"{a}-attachment.txt"} for a in attachments],
        "steps": [{"name": "a step", "attachments": [{"name": a, "source": f"{a}-attachment.json"}]} for a in steps]}))


def test_the_evidence_each_result_carries_its_own_its_steps_and_its_fixtures(tmp_path):
    """Attachments are counted where Allure shows them on a result's page: the result's own, its
    steps' (nested), and those of the fixtures it used (a container naming it as a child); a
    result with none is listed by name in summary.md, and `vfiotest report` prints the share."""
    import json

    from vfiotest.report import evidence_of, render_evidence

    reports = write_run(tmp_path)
    res = reports / "allure-results"
    _result(res, "a", "host_prereqs#test_iommu", "host_prereqs", attachments=["what was read"])
    _result(res, "b", "podman_run#test_probe", "podman_run", steps=["probe JSON"])
    _result(res, "c", "guest_hook#test_hook_log", "guest_hook")
    _result(res, "d", "rebind#test_bind_vf", "rebind")
    (res / "x-container.json").write_text(json.dumps({
        "uuid": "x", "children": ["c"], "befores": [{"name": "guest", "attachments": [{"name": "hook log"}]}],
        "afters": []}))
    ev = {e.test: e.attachments for e in evidence_of(str(res))}
    assert ev == {"host_prereqs#test_iommu": 1, "podman_run#test_probe": 1, "guest_hook#test_hook_log": 1,
                  "rebind#test_bind_vf": 0}
    md = render_evidence(evidence_of(str(res)))
    assert "3 of 4 results carry an attachment (75 %)." in md
    assert "| rebind | 1 | 0 |" in md and "| guest_hook | 1 | 1 |" in md
    assert md.count("\n- `") == 1 and "- `rebind#test_bind_vf`" in md
    p = subprocess.run([sys.executable, "-m", "vfiotest.report", str(reports / "junit.xml"), "--no-html"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "evidence: 3 of 4 results carry an attachment (75 %)" in p.stdout
    assert "## Evidence" in (reports / "summary.md").read_text()
