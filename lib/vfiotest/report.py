"""Summary table of a JUnit XML report: one row per suite, skip reasons, and the environment.

    python3 -m vfiotest.report reports/junit.xml
The environment (target, kernel, which parts were real Kata and which stood in)
comes from `environment.properties` next to the Allure results, written by the fixtures.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any


def summarize(junit_path: str) -> tuple[dict[str, collections.Counter], collections.Counter, list[str]]:
    root = ET.parse(junit_path).getroot()
    rows: dict[str, collections.Counter] = collections.OrderedDict()
    reasons: collections.Counter = collections.Counter()
    failures = []
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        parts = cls.split(".")
        suite = parts[1] if len(parts) > 1 and parts[0] in ("suites", "tests") else parts[0]
        if cls == "vfiotest.session":     # the session's own result (the pytest plugin's GUARD_NODEID)
            suite = "host state guard"
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m vfiotest.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("junit", help="JUnit XML file written by pytest --junitxml")
    ap.add_argument("--environment", default=None,
                    help="environment.properties (default: allure-results/ next to the JUnit file)")
    a = ap.parse_args(argv)
    if not os.path.exists(a.junit):
        print(f"report: no JUnit file {a.junit}; did pytest run?", file=sys.stderr)
        return 2
    envp = a.environment or os.path.join(os.path.dirname(a.junit) or ".", "allure-results", "environment.properties")
    print(render(*summarize(a.junit), read_environment(envp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
