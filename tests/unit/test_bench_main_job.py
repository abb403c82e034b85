"""benchmarks/bench_main_job.py: its tables from Allure results as allure-pytest writes them."""

import json
import os
import subprocess
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "bench_main_job.py")


def result(d, suite, name, start, stop):
    u = str(uuid.uuid4())
    (d / f"{u}-result.json").write_text(json.dumps({"uuid": u, "name": name, "start": start * 1000, "stop": stop * 1000,
                                                    "labels": [{"name": "suite", "value": suite}]}))
    return u


def container(d, children, befores=(), afters=()):
    u = str(uuid.uuid4())
    (d / f"{u}-container.json").write_text(json.dumps({
        "uuid": u, "children": children,
        "befores": [{"name": n, "start": a * 1000, "stop": b * 1000} for n, a, b in befores],
        "afters": [{"name": n, "start": a * 1000, "stop": b * 1000} for n, a, b in afters]}))


def test_suites_and_layers_from_allure_results(tmp_path):
    d = tmp_path / "allure-results"
    d.mkdir()
    r1 = result(d, "rebind", "test_a", 100, 102)
    r2 = result(d, "podman_run", "test_b", 200, 230)
    r3 = result(d, "podman_run", "test_c", 230, 240)
    # the session's image: set up for the first podman_run test, torn down after the last
    container(d, [r2, r3], befores=[("podman_image", 140, 200)], afters=[("podman_image::0", 240, 241)])
    container(d, [r1], befores=[("vfio_group", 98, 100)])
    container(d, [r2], befores=[("vf_run", 190, 199)])          # a suite's own module fixture
    p = subprocess.run([sys.executable, BENCH, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = {line.split()[0]: line.split() for line in p.stdout.splitlines() if line.strip()}
    # suite: tests, calls, setups, teardowns, sum, span
    assert lines["rebind"][1:] == ["1", "2.0", "2.0", "0.0", "4.0", "4.0"], p.stdout
    assert lines["podman_run"][1:] == ["2", "40.0", "69.0", "1.0", "110.0", "101.0"], p.stdout
    assert lines["podman"][1:4] == ["60.0", "1.0", "1"], p.stdout       # layer: fixtures/podman.py
    assert lines["vfio"][1:4] == ["2.0", "0.0", "1"], p.stdout
    assert lines["suite"][1:4] == ["9.0", "0.0", "1"], p.stdout
    assert "3 results, first start to last stop 143 s" in p.stdout


def test_no_results_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, BENCH, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no Allure results in" in p.stderr and "ci/main-job" in p.stderr
