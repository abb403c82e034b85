"""Reports of a run: the summary table, the qualification summary (markdown) and the HTML report.

    vfiotest report                          reports/junit.xml + reports/allure-results ->
                                             the summary table, reports/summary.md, reports/html/index.html
    vfiotest report --merge A B ... -o OUT   several runs' results -> OUT/allure-results,
                                             OUT/summary.md, OUT/html/index.html (one release report)
    python3 -m vfiotest.report [JUNIT]       the same as `vfiotest report`

The environment (target, kernel, Kata, devices, the command and commit of the run) comes from
`environment.properties` in the Allure results, written by the pytest plugin. The HTML report
is Allure 3's single-file report (the npm package `allure`, installed by ci/setup into
.npm-tools/); it needs no Java and no web server: open index.html in a browser.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from .errors import HarnessError

# What a failure was: an environment problem (the run could not test the product), the
# product's (an assertion failed, or a layer failed on the subject) or the harness's. A layer
# that failed says its category, from the error's type (fixtures/layers.py failure_text:
# "... layer failed (product failure): ..."); those rules come first. The pytest plugin writes
# these as categories.json; the summary classes failures with them. First match wins. The
# patterns work as Java (whole message) and JavaScript regular expressions (Allure 2 and 3).
ENVIRONMENT_WORDS = ("layer unavailable", "did not boot", "unreachable", "timed out", "Timeout", "timeout")
_TAGGED = r"[\s\S]*layer failed \({} failure\)[\s\S]*"
CATEGORIES: list[dict[str, Any]] = [
    {"name": "Product: a layer failed on the subject (kernel, driver, Kata, podman, guest hook)",
     "matchedStatuses": ["failed", "broken"],
     "messageRegex": _TAGGED.format("product")},
    {"name": "Environment: what the run needs failed (target, busy devices, set-up)",
     "matchedStatuses": ["failed", "broken"],
     "messageRegex": _TAGGED.format("environment")},
    {"name": "Harness: a layer failed in the harness",
     "matchedStatuses": ["failed", "broken"],
     "messageRegex": _TAGGED.format("harness")},
    {"name": "Environment: a layer is unavailable here",
     "matchedStatuses": ["skipped", "failed", "broken"],
     "messageRegex": r"[\s\S]*layer unavailable[\s\S]*"},
    {"name": "Environment: target or guest unreachable, did not boot, or timed out",
     "matchedStatuses": ["failed", "broken"],
     "messageRegex": r"[\s\S]*(did not boot|unreachable|timed out|Timeout|timeout)[\s\S]*"},
    {"name": "Product: an assertion about the device, guest or container failed",
     "matchedStatuses": ["failed"],
     "messageRegex": r"^(?![\s\S]*(" + "|".join(ENVIRONMENT_WORDS) + r"))[\s\S]*"},
    {"name": "Harness: an unexpected error in the harness or the target",
     "matchedStatuses": ["broken"]},
]

# environment.properties keys shown as the versions of a run, in this order
VERSION_KEYS = ("target", "profile", "target.kernel", "target.cmdline", "target.podman", "podman.runtime",
                "lane", "kata.version", "kata.source", "kata.bundle.sha256", "kata.guest_kernel", "kata.qemu", "runner.qemu", "runner.accel",
                "device.pf", "device.vf_ids", "device.numvfs", "podman.image", "controller")

ALLURE_ENV = "VFIOTEST_ALLURE"
NPM_TOOLS = ".npm-tools"


class ReportError(HarnessError):
    """A report that cannot be made: no results, or no Allure 3 command-line tool."""

    exit_code = 4


# -- the summary table (terminal) ----------------------------------------------------------------

def summarize(junit_path: str) -> tuple[dict[str, collections.Counter], collections.Counter, list[str]]:
    root = ET.parse(junit_path).getroot()
    rows: dict[str, collections.Counter] = collections.OrderedDict()
    reasons: collections.Counter = collections.Counter()
    failures = []
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        suite = suite_of_classname(cls)
        row: Any = rows.setdefault(suite, collections.Counter())  # counts, and "time" in seconds
        el = case.find("failure")
        if el is None:
            el = case.find("error")
        skipped = case.find("skipped")
        if el is not None:
            row["failed"] += 1
            message = el.get("message")
            failures.append(f"{cls}::{case.get('name')}: {message.splitlines()[0][:160] if message else ''}")
        elif skipped is not None:
            row["skipped"] += 1
            reasons[(skipped.get("message") or "").strip()[:200]] += 1
        else:
            row["passed"] += 1
        row["time"] += float(case.get("time") or 0)
    return rows, reasons, failures


def suite_of_classname(cls: str) -> str:
    """suites.rebind.test_rebind -> rebind; the session's own result is "host state guard"."""
    if cls == "vfiotest.session":     # the pytest plugin's GUARD_NODEID
        return "host state guard"
    parts = cls.split(".")
    return parts[1] if len(parts) > 1 and parts[0] in ("suites", "tests") else parts[0]


def read_environment(path: str | None) -> dict[str, str]:
    env = {}
    if path and os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                env[k.strip()] = v.strip()
    return env


def render(rows: dict[str, collections.Counter], reasons: collections.Counter, failures: list[str],
           env: dict[str, str]) -> str:
    out = []
    if env:
        out.append("Environment")
        width = max(len(k) for k in env)
        out += [f"  {k:<{width}}  {v}" for k, v in sorted(env.items())]
        out.append("")
    out.append(f"{'suite':<16} {'passed':>7} {'failed':>7} {'skipped':>8} {'time s':>8}")
    total: collections.Counter = collections.Counter()
    for suite, row in rows.items():
        out.append(f"{suite:<16} {row['passed']:>7} {row['failed']:>7} {row['skipped']:>8} {row['time']:>8.1f}")
        total.update(row)
    out.append(f"{'total':<16} {total['passed']:>7} {total['failed']:>7} {total['skipped']:>8} {total['time']:>8.1f}")
    if reasons:
        out.append("\nSkipped, by reason")
        out += [f"  {n:>3} x {r}" for r, n in reasons.most_common()]
    if failures:
        out.append("\nFailed")
        out += [f"  {f}" for f in failures]
    return "\n".join(out)


# -- the qualification summary (markdown) ---------------------------------------------------------

@dataclass
class Outcome:
    """One test's result, as the qualification summary counts it."""

    run: str
    suite: str
    device: str
    lane: str
    test: str
    status: str        # passed | failed | skipped (an error or a broken test counts as failed)
    message: str = ""


def category_of(status: str, message: str) -> Optional[str]:
    """The first of CATEGORIES a result falls in (Allure's rule: status listed, message matching)."""
    import re

    allure_status = {"failed": "failed", "broken": "broken", "error": "broken", "skipped": "skipped"}.get(status)
    for cat in CATEGORIES:
        if allure_status not in cat["matchedStatuses"]:
            continue
        regex = cat.get("messageRegex")
        if regex is None or re.fullmatch(regex, message or ""):
            return cat["name"]
    return None


def device_of(env: dict[str, str]) -> str:
    """The run's devices: its PFs (address=vendor:device) and its VFs' ID, from the environment."""
    pf, vf = env.get("device.pf"), env.get("device.vf_ids")
    if not pf:
        return "no SR-IOV layer"
    return f"PF {pf}; VF {vf}" if vf else f"PF {pf}"


def outcomes_from_junit(junit_path: str, env: dict[str, str], run: str = "") -> list[Outcome]:
    """Every testcase of a JUnit XML file; the lane from its `lane` property ("host" when absent)."""
    out = []
    device = device_of(env)
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        cls = case.get("classname", "")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        el = case.find("failure")
        if el is None:
            el = case.find("error")
        skipped = case.find("skipped")
        if el is not None:
            status, message = ("failed" if el.tag == "failure" else "broken"), el.get("message") or ""
        elif skipped is not None:
            status, message = "skipped", skipped.get("message") or ""
        else:
            status, message = "passed", ""
        out.append(Outcome(run, suite_of_classname(cls), device, props.get("lane") or "host",
                           f"{cls}::{case.get('name')}", status, message))
    return out


def outcomes_from_allure(results_dir: str, run: str = "", runs: Optional[dict[str, dict[str, str]]] = None) -> list[Outcome]:
    """Every *-result.json of an Allure results directory (labels suite and lane, as the plugin sets
    them); the device from the environment of the result's run (`runs`, by its label `run`), else
    from the directory's environment.properties."""
    env = read_environment(os.path.join(results_dir, "environment.properties"))
    runs = runs or {}
    out = []
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith("-result.json"):
            continue
        with open(os.path.join(results_dir, name), encoding="utf-8") as f:
            r = json.load(f)
        labels = {lab.get("name"): lab.get("value") for lab in r.get("labels", [])}
        status = r.get("status") or "unknown"
        name = labels.get("run") or run
        device = device_of(runs.get(name, env))
        out.append(Outcome(name, labels.get("suite") or "?", device, labels.get("lane") or "host",
                           r.get("fullName") or r.get("name") or "?", status,
                           (r.get("statusDetails") or {}).get("message") or ""))
    return out


@dataclass
class Evidence:
    """One result and the attachments a reader finds on its page in the report."""

    suite: str
    test: str
    attachments: int


def _attachments_in(node: dict[str, Any]) -> int:
    return len(node.get("attachments") or []) + sum(_attachments_in(s) for s in node.get("steps") or [])


def evidence_of(results_dir: str) -> list[Evidence]:
    """Every result of an Allure results directory with its attachments: its own and its steps',
    and those of the fixtures it used (the set-up and tear-down of each *-container.json that
    names it as a child), which Allure shows on the result's page."""
    results: dict[str, dict[str, Any]] = {}
    containers: list[dict[str, Any]] = []
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(("-result.json", "-container.json")):
            with open(os.path.join(results_dir, name), encoding="utf-8") as f:
                data = json.load(f)
            if name.endswith("-result.json"):
                results[data.get("uuid") or name] = data
            else:
                containers.append(data)
    counts = {uuid: _attachments_in(r) for uuid, r in results.items()}
    for c in containers:
        n = sum(_attachments_in(fx) for fx in (c.get("befores") or []) + (c.get("afters") or []))
        for child in c.get("children") or []:
            if child in counts:
                counts[child] += n
    out = []
    for uuid, r in results.items():
        labels = {lab.get("name"): lab.get("value") for lab in r.get("labels", [])}
        out.append(Evidence(labels.get("suite") or "?", r.get("fullName") or r.get("name") or "?", counts[uuid]))
    return sorted(out, key=lambda e: (e.suite, e.test))


def evidence_line(ev: list[Evidence]) -> str:
    have = sum(1 for e in ev if e.attachments)
    return f"{have} of {len(ev)} results carry an attachment ({100 * have // max(len(ev), 1)} %)"


def render_evidence(ev: list[Evidence], limit: int = 40) -> str:
    """The summary's evidence section: per suite, how many results carry an attachment (what
    was read or compared), and the results that carry none."""
    out = ["## Evidence", "", evidence_line(ev) + ".", "", "| suite | results | with an attachment |", "|---|---|---|"]
    by: dict[str, list[Evidence]] = collections.OrderedDict()
    for e in ev:
        by.setdefault(e.suite, []).append(e)
    out += [f"| {_cell(s)} | {len(g)} | {sum(1 for e in g if e.attachments)} |" for s, g in by.items()]
    bare = [e for e in ev if not e.attachments]
    if bare:
        out += ["", "Without one:", ""] + [f"- `{e.test}`" for e in bare[:limit]]
        if len(bare) > limit:
            out.append(f"- and {len(bare) - limit} more")
    return "\n".join(out) + "\n"


def _counts(outcomes: Iterable[Outcome]) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for o in outcomes:
        c["failed" if o.status in ("failed", "broken", "error") else o.status] += 1
    return c


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(outcomes: list[Outcome], runs: dict[str, dict[str, str]], report_command: str,
                    title: str = "vfiotest qualification summary", evidence: Optional[list[Evidence]] = None) -> str:
    """The qualification summary: pass/fail/skip by suite x device x lane (x run when several),
    the versions and the exact command and commit of each run, the failures and their kind."""
    several = len(runs) > 1
    out = [f"# {title}", ""]
    total = _counts(outcomes)
    out.append(f"**{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped** "
               f"({len(outcomes)} results{f', {len(runs)} runs' if several else ''}).")
    out.append("")
    head = (["run"] if several else []) + ["suite", "device", "lane", "passed", "failed", "skipped"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    groups: dict[tuple, list[Outcome]] = collections.OrderedDict()
    for o in sorted(outcomes, key=lambda o: (o.run, o.suite == "host state guard", o.suite, o.device, o.lane)):
        groups.setdefault(((o.run,) if several else ()) + (o.suite, o.device, o.lane), []).append(o)
    for key, group in groups.items():
        c = _counts(group)
        out.append("| " + " | ".join(_cell(k) for k in key) + f" | {c['passed']} | {c['failed']} | {c['skipped']} |")
    out.append("")
    for run, env in runs.items():
        out.append(f"## {'Run ' + run if several else 'The run'}")
        out.append("")
        out.append(f"- command: `{env.get('run.command', 'unknown')}`")
        out.append(f"- commit: `{env.get('run.commit', 'unknown')}`")
        out.append("")
        shown = [k for k in VERSION_KEYS if k in env]
        if shown:
            out.append("| what | version or value |")
            out.append("|---|---|")
            out += [f"| {k} | {_cell(env[k])} |" for k in shown]
            out.append("")
    failed = [o for o in outcomes if o.status in ("failed", "broken", "error")]
    if failed:
        out.append("## Failed")
        out.append("")
        for o in failed:
            first = (o.message.strip().splitlines() or [""])[0][:200]
            kind = category_of(o.status, o.message) or "uncategorised"
            out.append(f"- {'[' + o.run + '] ' if several else ''}`{o.test}` ({kind}): {_cell(first)}")
        out.append("")
    skipped = collections.Counter((o.message.strip().splitlines() or [""])[0][:200]
                                  for o in outcomes if o.status == "skipped")
    if skipped:
        out.append("## Skipped, by reason")
        out.append("")
        out += [f"- {n} x {_cell(reason) or '(no reason given)'}" for reason, n in skipped.most_common()]
        out.append("")
    if evidence:
        out.append(render_evidence(evidence))
    out.append(f"Made by `{report_command}`.")
    return "\n".join(out) + "\n"


# -- the HTML report (Allure 3, single file) -----------------------------------------------------

def allure_cli() -> str:
    """The Allure 3 command: VFIOTEST_ALLURE, else .npm-tools/ of this checkout or of the current directory."""
    given = os.environ.get(ALLURE_ENV)
    if given:
        if not os.access(given, os.X_OK):
            raise ReportError(f"{ALLURE_ENV}={given} is not an executable file",
                              hint=f"point {ALLURE_ENV} at Allure 3's `allure` command, or unset it")
        return given
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for root in (checkout, os.getcwd()):
        path = os.path.join(root, NPM_TOOLS, "node_modules", ".bin", "allure")
        if os.access(path, os.X_OK):
            return path
    raise ReportError("Allure 3's command-line tool is not installed (looked in .npm-tools/node_modules/.bin)",
                      hint="run ci/setup (or `npm ci --prefix .npm-tools` in the checkout), "
                           f"or set {ALLURE_ENV} to an Allure 3 `allure` command")


def write_html(results_dirs: list[str], out_dir: str, *, name: str = "vfiotest", group_by: tuple[str, ...] = ("suite",),
               attachments: tuple[str, ...] = (), timeout: float = 600) -> str:
    """Allure 3's single-file report of `results_dirs` as OUT_DIR/index.html, its tree grouped by
    the labels `group_by`; `attachments` (e.g. summary.md) are the report's global attachments.
    Returns the path of index.html."""
    for d in results_dirs:
        if not os.path.isdir(d):
            raise ReportError(f"no Allure results directory {d}", hint="run pytest with --alluredir (ci/main-job does)")
    categories = CATEGORIES
    for d in results_dirs:
        path = os.path.join(d, "categories.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                categories = json.load(f)
            break
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, "index.html")):
            raise ReportError(f"{out_dir} is not empty and holds no earlier report (index.html): not replaced",
                              hint="give --html a new or empty directory")
    cli = allure_cli()
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vfiotest-allurerc-") as tmp:
        config = {"name": name, "output": out_dir, "categories": categories,
                  "globalAttachments": [os.path.abspath(a) for a in attachments if os.path.exists(a)],
                  "plugins": {"awesome": {"options": {"singleFile": True, "reportName": name,
                                                      "groupBy": list(group_by)}}}}
        rc = os.path.join(tmp, "allurerc.json")
        with open(rc, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        cmd = [cli, "generate", "--config", rc, "--output", out_dir, *[os.path.abspath(d) for d in results_dirs]]
        try:
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ReportError(f"allure generate did not finish in {timeout:.0f} s: {shlex.join(cmd)}",
                              hint="run that command by hand to see where it stops") from None
    index = os.path.join(out_dir, "index.html")
    if res.returncode != 0 or not os.path.exists(index):
        raise ReportError(f"allure generate failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}",
                          hint=f"run it by hand: {shlex.join(cmd)}")
    return index


# -- merging several runs into one release report -----------------------------------------------

def results_dir_of(path: str) -> str:
    """A run's Allure results: PATH itself, or PATH/allure-results (a run's whole reports/ directory)."""
    sub = os.path.join(path, "allure-results")
    return sub if os.path.isdir(sub) else path


def run_name_of(spec: str, taken: set[str]) -> tuple[str, str]:
    """(name, directory) of a --merge argument: NAME=DIR, or DIR named after itself, less a trailing
    reports/ or allure-results/ (runner-a/reports -> runner-a); made unique among `taken`."""
    if "=" in spec and not os.path.exists(spec):
        name, path = spec.split("=", 1)
    else:
        path = spec
        norm = os.path.normpath(os.path.abspath(spec))
        for generic in ("allure-results", "reports"):     # runner-a/reports/allure-results -> runner-a
            if os.path.basename(norm) == generic:
                norm = os.path.dirname(norm)
        name = os.path.basename(norm) or "run"
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}-{n}", n + 1
    taken.add(unique)
    return unique, path


def _is_allure_file(name: str) -> bool:
    return (name.endswith(("-result.json", "-container.json")) or "-attachment" in name
            or name in ("environment.properties", "categories.json", "executor.json"))


def merge_results(specs: list[str], out_results: str) -> dict[str, dict[str, str]]:
    """Copy several runs' Allure results into one directory. Each result gets the label `run` and
    its run as parentSuite, and a history id and test case id of its own run, so the same test of
    two runs stays two results (not one with a retry). Returns {run: its environment}."""
    if os.path.isdir(out_results):
        foreign = [f for f in os.listdir(out_results) if not _is_allure_file(f)]
        if foreign:
            raise ReportError(f"{out_results} holds files that are not Allure results ({', '.join(sorted(foreign)[:3])}): "
                              "not replaced", hint="give -o a new directory")
        shutil.rmtree(out_results)
    os.makedirs(out_results)
    runs: dict[str, dict[str, str]] = collections.OrderedDict()
    taken: set[str] = set()
    merged_env: dict[str, str] = {}
    categories_written = False
    for spec in specs:
        name, path = run_name_of(spec, taken)
        src = results_dir_of(path)
        if not os.path.isdir(src) or not any(f.endswith("-result.json") for f in os.listdir(src)):
            raise ReportError(f"{spec}: no Allure results (*-result.json) in {src}",
                              hint="give each run's reports/ or reports/allure-results directory")
        env = read_environment(os.path.join(src, "environment.properties"))
        runs[name] = env
        merged_env.update({f"{name}.{k}": v for k, v in env.items()})
        for fname in sorted(os.listdir(src)):
            full = os.path.join(src, fname)
            if fname.endswith("-result.json"):
                with open(full, encoding="utf-8") as f:
                    r = json.load(f)
                labels = [lab for lab in r.get("labels", []) if lab.get("name") not in ("run", "parentSuite")]
                r["labels"] = labels + [{"name": "run", "value": name}, {"name": "parentSuite", "value": name}]
                for key in ("historyId", "testCaseId"):
                    base = r.get(key) or r.get("fullName") or r.get("name") or ""
                    r[key] = hashlib.md5(f"{name}\0{base}".encode()).hexdigest()
                with open(os.path.join(out_results, fname), "w", encoding="utf-8") as f:
                    json.dump(r, f)
            elif fname == "categories.json":
                if not categories_written:
                    shutil.copyfile(full, os.path.join(out_results, fname))
                    categories_written = True
            elif fname in ("environment.properties", "executor.json") or fname.endswith(".lock"):
                continue
            elif os.path.isfile(full):
                shutil.copyfile(full, os.path.join(out_results, fname))
    with open(os.path.join(out_results, "environment.properties"), "w", encoding="utf-8") as f:
        f.writelines(f"{k}={v}\n" for k, v in sorted(merged_env.items()))
    return runs


# -- the command ---------------------------------------------------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("junit", nargs="?", default=None,
                    help="JUnit XML written by pytest --junitxml (default reports/junit.xml)")
    ap.add_argument("--results", default=None, metavar="DIR",
                    help="Allure results (default: allure-results/ next to the JUnit file)")
    ap.add_argument("--environment", default=None, metavar="FILE",
                    help="environment.properties (default: the one in the Allure results)")
    ap.add_argument("--summary", default=None, metavar="FILE",
                    help="where to write the markdown summary (default: summary.md next to the JUnit file, "
                         "or in the -o directory with --merge)")
    ap.add_argument("--html", default=None, metavar="DIR",
                    help="where to write the single-file HTML report DIR/index.html (default: html/ next to the "
                         "JUnit file, or in the -o directory with --merge)")
    ap.add_argument("--no-html", action="store_true", help="no HTML report (the summary table and summary.md only)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="[NAME=]DIR",
                    help="merge several runs (each a reports/ or allure-results/ directory; NAME labels its "
                         "results, default: the directory's name less a trailing reports/ or allure-results/) "
                         "into one release report in -o")
    ap.add_argument("-o", "--output", default=None, metavar="DIR",
                    help="with --merge: the release report's directory (allure-results/, summary.md, html/)")


def run(a: argparse.Namespace, argv_text: str) -> int:
    if a.merge:
        if not a.output:
            raise ReportError("--merge needs -o DIR (where the release report goes)",
                              hint="e.g. vfiotest report --merge runner-a/reports runner-b/reports -o reports/release")
        out = a.output
        merged = os.path.join(out, "allure-results")
        runs = merge_results(a.merge, merged)
        outcomes = outcomes_from_allure(merged, runs=runs)
        summary = a.summary or os.path.join(out, "summary.md")
        html_dir = a.html or os.path.join(out, "html")
        title, group_by = "vfiotest release qualification summary", ["run", "suite"]
        print(f"merged {len(runs)} runs ({', '.join(runs)}) into {merged}: {len(outcomes)} results")
    else:
        junit = a.junit or os.path.join("reports", "junit.xml")
        if not os.path.exists(junit):
            raise ReportError(f"no JUnit file {junit}", hint="run the suites first (ci/main-job, or pytest --junitxml)")
        base = os.path.dirname(junit) or "."
        merged = a.results or os.path.join(base, "allure-results")
        env = read_environment(a.environment or os.path.join(merged, "environment.properties"))
        print(render(*summarize(junit), env))
        outcomes = outcomes_from_junit(junit, env)
        runs = {"": env}
        summary = a.summary or os.path.join(base, "summary.md")
        html_dir = a.html or os.path.join(base, "html")
        title, group_by = "vfiotest qualification summary", ["suite"]
    ev = evidence_of(merged) if os.path.isdir(merged) else []
    if ev:
        print(f"evidence: {evidence_line(ev)} (summary.md lists those without)")
    os.makedirs(os.path.dirname(os.path.abspath(summary)), exist_ok=True)
    with open(summary, "w", encoding="utf-8") as f:
        f.write(render_markdown(outcomes, runs, argv_text, title=title, evidence=ev))
    print(f"summary: {summary}")
    if not a.no_html:
        index = write_html([merged], html_dir, group_by=tuple(group_by), attachments=(summary,),
                           name="vfiotest release" if a.merge else "vfiotest")
        print(f"HTML report: {index} (one file; the summary is under Global Attachments)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="summary table, summary.md and the single-file HTML report of a run "
                                             "(or of several runs merged)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=lambda a: run(a, "vfiotest report " + shlex.join(sys.argv[2:])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m vfiotest.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    a = ap.parse_args(argv)
    try:
        return run(a, "python3 -m vfiotest.report " + shlex.join(sys.argv[1:] if argv is None else argv))
    except HarnessError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
