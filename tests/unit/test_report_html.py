"""The single-file HTML report (`vfiotest report`, Allure 3) as a person sees it: rendered by
headless chromium from file://, no server. The results come from a small pytest run of the demo
suites (allure_session: a simulated sysfs, no VM) with steps and an attachment.

Needs chromium (apt) and Allure 3 (npm, .npm-tools), both installed by ci/setup: without them the
tests skip, except in CI (CI=true), where they fail."""

import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from allure_session import run_session

from vfiotest.errors import HarnessError
from vfiotest.report import allure_cli

CHROMIUM = ("chromium", "chromium-browser")


def chromium_or_skip():
    missing = []
    browser = next((shutil.which(c) for c in CHROMIUM if shutil.which(c)), None)
    if browser is None:
        missing.append("chromium (apt-get install chromium)")
    if shutil.which("node") is None:
        missing.append("node (apt-get install nodejs npm)")
    try:
        allure_cli()
    except HarnessError as e:
        missing.append(str(e).replace("\n", " "))
    if missing:
        text = "the HTML report test needs " + "; ".join(missing) + " - run ci/setup"
        if os.environ.get("CI") == "true":
            pytest.fail(text, pytrace=False)
        pytest.skip(text)
    return browser


def rendered_text(browser, index, fragment="", expect="Powered by Allure"):
    """The page's visible text after its scripts ran (headless chromium's DOM, scripts and styles
    removed). On a loaded machine chromium can dump the DOM before the report's scripts have
    drawn it: tried again, with more time, until `expect` is on the page (3 tries)."""
    text = ""
    for budget in (15000, 30000, 60000):
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--virtual-time-budget={budget}",
                            "--dump-dom", f"file://{index}{fragment}"], capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-2000:]
        dom = re.sub(r"<(script|style)\b.*?</\1>", " ", p.stdout, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
        if expect in text:
            break
    return text


def result_ids(html_dir):
    """{test name: the report's id of its result} from the report's own index (test-results.json)."""
    data = json.loads((html_dir / "test-results.json").read_text())
    return {r["name"]: r["id"] for r in data["byId"].values()}


def report(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "vfiotest.report", *args], cwd=str(cwd), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_the_html_report_shows_suites_results_steps_and_attachments(tmp_path):
    browser = chromium_or_skip()
    _, alluredir, junit = run_session(tmp_path)
    report(str(junit), cwd=tmp_path)
    html_dir = junit.parent / "html"
    index = html_dir / "index.html"
    assert sorted(os.listdir(html_dir)) == ["artifacts.json", "index.html", "summary.json", "test-results.json"]
    main = rendered_text(browser, index, expect="test_product_check_fails")
    # grouped by suite, with the results of each
    for text in ("demo_bind", "demo_env", "host state guard", "test_bound_group", "test_product_check_fails",
                 "Failed 1", "Passed 2", "Skipped 1"):
        assert text in main, (text, main[:3000])
    # the environment and the categories
    assert "device.pf 0000:10:00.0=8086:10c9" in main, main[:3000]
    ids = result_ids(html_dir)
    test_page = rendered_text(browser, index, "#" + ids["test_bound_group"], expect="Test body")
    assert "read the group's device node" in test_page, test_page[:3000]           # the test's step
    assert "Set up" in test_page and "vfio_group" in test_page, test_page[:3000]  # the layers (steps folded)
    assert "inventory before" in test_page and "inventory after" in test_page, test_page[:3000]
    attachments = rendered_text(browser, index, "#" + ids["test_bound_group"] + "/attachments",
                                expect="group node note")
    assert "group node note" in attachments, attachments[:3000]
    assert "inventory before" in attachments and ": changes" in attachments, attachments[:3000]
    categories = rendered_text(browser, index, "#categories", expect="Product:")
    assert "Environment: a layer is unavailable here" in categories, categories[:3000]
    assert "Product: an assertion about the device, guest or container failed" in categories, categories[:3000]
    # the qualification summary is in the report too
    assert "summary.md" in rendered_text(browser, index, "#globalAttachments", expect="summary.md")


def test_merging_two_runs_gives_one_report_with_both(tmp_path):
    browser = chromium_or_skip()
    _, first, _ = run_session(tmp_path, "runner-a")
    _, second, _ = run_session(tmp_path, "runner-b")
    out = tmp_path / "release"
    p = report("--merge", f"e810-6.1={first}", str(second.parent), "-o", str(out), cwd=tmp_path)
    assert "merged 2 runs (e810-6.1, runner-b)" in p.stdout, p.stdout
    merged = [json.loads(f.read_text()) for f in (out / "allure-results").glob("*-result.json")]
    assert len(merged) == 8                       # 4 results per run, none folded into another
    same = [r for r in merged if r["name"] == "test_bound_group"]
    assert len({r["historyId"] for r in same}) == 2
    assert sorted(lab["value"] for r in same for lab in r["labels"] if lab["name"] == "run") == ["e810-6.1", "runner-b"]
    md = (out / "summary.md").read_text()
    device = "PF 0000:10:00.0=8086:10c9; VF 8086:10ca"
    assert f"| e810-6.1 | demo_bind | {device} | host | 1 | 1 | 0 |" in md, md
    assert f"| runner-b | demo_env | {device} | host | 0 | 0 | 1 |" in md, md
    assert md.count("- command: `python -m pytest ") == 2, md
    index = out / "html" / "index.html"
    main = rendered_text(browser, index, expect="runner-b")
    for text in ("e810-6.1", "runner-b", "Total 8", "Failed 2", "Passed 4", "Skipped 2"):
        assert text in main, (text, main[:3000])
    # the report keeps both runs' results of the same test (not one with a retry)
    assert sum(1 for r in json.loads((out / "html" / "test-results.json").read_text())["byId"].values()
               if r["name"] == "test_bound_group") == 2
