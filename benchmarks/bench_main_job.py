#!/usr/bin/env python3
"""Where the main job's time goes: per suite and per fixture layer. Prints numbers, asserts nothing.

Reads the Allure results of a finished run (`ci/main-job`, or any `pytest suites` run with
--alluredir): allure-pytest records every test's call and every fixture's setup and teardown with
its start and stop. Prints two tables a reader can compare run to run:

  suites   per suite: tests, the tests' own calls, the fixture setups and teardowns charged to it
           (a fixture shared by several suites is charged to the suite of the first test that
           set it up, and its teardown to the last), the sum, and the wall span
  layers   per layer (the fixtures/ module that defines the fixture: target, prereqs, sriov, vfio,
           kata, podman, container, guest; `suite` for a suite's own module fixtures such as
           podman_run's vf_run): setups, teardowns, how many times each was set up, the slowest

    .venv/bin/python benchmarks/bench_main_job.py [REPORTS_DIR]       # default: $VFIOTEST_REPORTS or reports/
    .venv/bin/python benchmarks/bench_main_job.py --run [-- ARGS...]  # run `ci/main-job ARGS` first (time it)

With --run the job writes to a directory of its own (printed) and VFIOTEST_SKIP_SETUP=1 is set
unless the environment says otherwise; the job boots the runner unless one is up.
"""

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEF = re.compile(r"^@pytest\.fixture[^\n]*\n(?:@[^\n]*\n)*def (\w+)\(", re.M)


def fixture_layers(root=ROOT):
    """{fixture name: layer}: the fixtures/ module that defines it (fixtures/kata.py -> kata);
    a suite's own fixtures (suites/<suite>/*.py) -> `suite`."""
    layers = {}
    for path in glob.glob(os.path.join(root, "fixtures", "*.py")):
        mod = os.path.basename(path)[:-3]
        layer = "plugin" if mod in ("__init__", "layers", "allure_report") else mod
        for name in _DEF.findall(open(path, encoding="utf-8").read()):
            layers[name] = layer
    for path in glob.glob(os.path.join(root, "suites", "*", "*.py")):
        for name in _DEF.findall(open(path, encoding="utf-8").read()):
            layers.setdefault(name, "suite")
    return layers


def read_results(results_dir):
    """(results, fixtures): results {uuid: (suite, test, start s, stop s)}; fixtures a list of
    (name, 'setup'|'teardown', start s, stop s, [suites of the tests it served, in time order])."""
    results = {}
    for f in glob.glob(os.path.join(results_dir, "*-result.json")):
        r = json.load(open(f, encoding="utf-8"))
        suite = next((lb["value"] for lb in r.get("labels", []) if lb["name"] == "suite"), "?")
        if "start" in r and "stop" in r:
            results[r["uuid"]] = (suite, r.get("name", "?"), r["start"] / 1000, r["stop"] / 1000)
    fixtures = []
    for f in glob.glob(os.path.join(results_dir, "*-container.json")):
        c = json.load(open(f, encoding="utf-8"))
        served = sorted((results[u] for u in c.get("children", []) if u in results), key=lambda r: r[2])
        suites = [r[0] for r in served]
        for kind, key in (("setup", "befores"), ("teardown", "afters")):
            for fx in c.get(key, []):
                if "start" in fx and "stop" in fx:
                    name = fx.get("name", "?").split("::", 1)[0]
                    fixtures.append((name, kind, fx["start"] / 1000, fx["stop"] / 1000, suites))
    return results, fixtures


def suite_table(results, fixtures):
    rows = collections.defaultdict(lambda: {"tests": 0, "calls": 0.0, "setups": 0.0, "teardowns": 0.0,
                                            "first": float("inf"), "last": 0.0})
    for suite, _test, start, stop in results.values():
        r = rows[suite]
        r["tests"] += 1
        r["calls"] += stop - start
        r["first"], r["last"] = min(r["first"], start), max(r["last"], stop)
    for _name, kind, start, stop, suites in fixtures:
        if not suites:
            continue
        r = rows[suites[0] if kind == "setup" else suites[-1]]
        r["setups" if kind == "setup" else "teardowns"] += stop - start
        r["first"], r["last"] = min(r["first"], start), max(r["last"], stop)
    out = [f"{'suite':18} {'tests':>5} {'calls s':>8} {'setups s':>9} {'teardowns s':>11} {'sum s':>7} {'span s':>7}"]
    total = 0.0
    for suite, r in sorted(rows.items(), key=lambda kv: kv[1]["first"]):
        s = r["calls"] + r["setups"] + r["teardowns"]
        total += s
        out.append(f"{suite:18} {r['tests']:5d} {r['calls']:8.1f} {r['setups']:9.1f} {r['teardowns']:11.1f} "
                   f"{s:7.1f} {r['last'] - r['first']:7.1f}")
    out.append(f"{'all':18} {sum(r['tests'] for r in rows.values()):5d} {'':8} {'':9} {'':11} {total:7.1f}")
    return "\n".join(out)


def layer_table(fixtures, layers):
    per = collections.defaultdict(lambda: {"setup": 0.0, "teardown": 0.0, "count": 0,
                                           "fixtures": collections.Counter()})
    for name, kind, start, stop, _suites in fixtures:
        r = per[layers.get(name, "other")]
        r[kind] += stop - start
        r["fixtures"][name] += stop - start
        if kind == "setup":
            r["count"] += 1
    out = [f"{'layer':10} {'setups s':>9} {'teardowns s':>11} {'set up':>6}  slowest fixtures (s, setup + teardown)"]
    for layer, r in sorted(per.items(), key=lambda kv: -(kv[1]["setup"] + kv[1]["teardown"])):
        top = ", ".join(f"{n} {t:.1f}" for n, t in r["fixtures"].most_common(4) if t >= 0.05)
        out.append(f"{layer:10} {r['setup']:9.1f} {r['teardown']:11.1f} {r['count']:6d}  {top}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                 epilog="Tables: see the module's docstring (this file).")
    ap.add_argument("reports", nargs="?", help="a reports directory (with allure-results/); default "
                    "$VFIOTEST_REPORTS or reports/")
    ap.add_argument("--run", action="store_true", help="run ci/main-job first, into a directory of its own")
    ap.add_argument("job_args", nargs="*", help="after --: arguments for ci/main-job (with --run)")
    a = ap.parse_args(argv)
    if a.run:
        reports = a.reports or tempfile.mkdtemp(prefix="bench-main-job-")
        env = dict(os.environ, VFIOTEST_REPORTS=reports)
        env.setdefault("VFIOTEST_SKIP_SETUP", "1")
        print(f"running ci/main-job {' '.join(a.job_args)} (reports in {reports})", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([os.path.join(ROOT, "ci", "main-job"), *a.job_args], cwd=ROOT, env=env).returncode
        print(f"ci/main-job: exit {rc}, {time.monotonic() - t0:.0f} s in all", flush=True)
    else:
        reports = a.reports or os.environ.get("VFIOTEST_REPORTS") or os.path.join(ROOT, "reports")
    results_dir = os.path.join(reports, "allure-results")
    if not os.path.isdir(results_dir):
        print(f"bench_main_job: no Allure results in {results_dir}: run `ci/main-job` (or pass its reports "
              "directory, or --run)", file=sys.stderr)
        return 2
    results, fixtures = read_results(results_dir)
    if not results:
        print(f"bench_main_job: {results_dir} holds no test result", file=sys.stderr)
        return 2
    first = min(min(r[2] for r in results.values()), min((f[2] for f in fixtures), default=float("inf")))
    last = max(max(r[3] for r in results.values()), max((f[3] for f in fixtures), default=0.0))
    print(f"{results_dir}: {len(results)} results, first start to last stop {last - first:.0f} s\n")
    print(suite_table(results, fixtures))
    print()
    print(layer_table(fixtures, fixture_layers()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
