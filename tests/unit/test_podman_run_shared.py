"""The podman_run suite's shared runs give each test its own verdict: the DMA stress that runs in
vf_run's container keeps its own output and exit status apart from the probe's, and a step of the
held-then-crashed scenario that failed fails (never skips) the tests that need what came after."""

import importlib.util
import os

import pytest

from vfiotest.podman.client import RunResult

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("podman_run_suite",
                                                  os.path.join(ROOT, "suites", "podman_run", "test_podman_run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _res(stdout, exit_code=0, stderr=""):
    return RunResult("a" * 64, "vfiotest-x-0", exit_code, stdout, stderr, "kata-vfio")


def test_an_oom_killed_stress_is_the_stress_tests_verdict_not_the_probes(suite):
    out = (f"character special file /dev/vfio/vfio\n{suite.NODES_END}\n" '{"ok": true, "step": null}\n'
           f"{suite.STRESS_BEGIN}\nKilled\n{suite.STRESS_EXIT}137\n")
    probe, stress = suite._split_stress(_res(out, exit_code=0))
    assert probe.exit_code == 0 and probe.json() == {"ok": True, "step": None}
    assert suite.STRESS_BEGIN not in probe.stdout and suite.NODES_END in probe.stdout
    assert stress.exit_code == 137
    with pytest.raises(ValueError):      # no report from the killed stress: its test says so
        stress.json()


def test_a_passing_stress_has_its_own_report(suite):
    out = (f"{suite.NODES_END}\n" '{"ok": true}\n' f"{suite.STRESS_BEGIN}\n"
           '{"ok": true, "dma_stress": {"maps": 65535}}\n' f"{suite.STRESS_EXIT}0\n")
    probe, stress = suite._split_stress(_res(out))
    assert probe.json() == {"ok": True}
    assert (stress.exit_code, stress.json()["dma_stress"]["maps"]) == (0, 65535)


def test_no_stress_view_when_the_container_did_not_start_or_the_stress_was_not_asked(suite):
    started_not = _res("", exit_code=None, stderr="the Kata agent did not answer")
    assert suite._split_stress(started_not) == (started_not, None)
    assert suite._split_stress(_res(f"{suite.NODES_END}\n" '{"ok": true}\n'))[1] is None


def test_a_failed_step_fails_the_tests_that_need_what_came_after_it(suite):
    sc = suite.Scenario()
    sc.facts["holder_has_group"] = True
    sc.failed = ("the second container", RuntimeError("podman's API did not answer"))
    assert sc.need("holder_has_group") is True
    with pytest.raises(AssertionError, match="stopped at the second container, before crash_exit: "
                                             "RuntimeError: podman's API did not answer"):
        sc.need("crash_exit")
    with pytest.raises(AssertionError, match="never got to again"):
        suite.Scenario().need("again")
