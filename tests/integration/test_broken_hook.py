"""A broken guest hook fails the guest_hook and podman_run tests, it never skips them, and
without --strict: the guest image without the hook (`no-hook`: the VF stays on its native driver
in the guest) and a hook that exits non-zero (`hook-fails`: Kata refuses the start). On real Kata
1.12.1 (the bundle beside the checkout), in a runner of its own."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from _runner_env import runner_env

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400), pytest.mark.xdist_group("broken-hook"),
              pytest.mark.duration(310)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one test that reads the guest (guest_boot: a Kata container read over its console) and one
# that runs a container with a VF (podman_run's vf_run)
TESTS = ["suites/guest_hook/test_guest_hook.py::test_agent_ran_the_hook_as_kata_does",
         "suites/podman_run/test_podman_run.py::test_container_runs_on_the_kata_vfio_runtime"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from runner_env(tmp_path_factory.mktemp("hook") / "state")


def run_broken(env, tmp_path, what):
    junit = tmp_path / f"{what}.xml"
    e = dict(env, VFIOTEST_BREAK=what)
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", f"--junitxml={junit}", *TESTS],
                       cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=2000)
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")
             if c.get("classname") != "vfiotest.session"}      # the host state guard's own result
    verdicts = {}
    for name, c in cases.items():
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        verdicts[name] = ("skipped" if c.find("skipped") is not None else
                          "failed" if bad is not None else "passed", (bad.get("message") or "") if bad is not None else "")
    return p, verdicts


@pytest.mark.parametrize("what", ["no-hook", "hook-fails"])
def test_a_broken_hook_fails_the_tests_it_breaks(env, tmp_path, what):
    p, verdicts = run_broken(env, tmp_path, what)
    out = p.stdout
    assert p.returncode == 1, out[-5000:]              # tests failed (not 0: all skipped would be 0)
    names = [t.rsplit("::", 1)[1] for t in TESTS]
    assert set(verdicts) == set(names), (verdicts, out[-3000:])
    assert all(v[0] == "failed" for v in verdicts.values()), (verdicts, out[-5000:])
    assert "layer unavailable" not in out, out[-5000:]
    assert "host state guard: " in out and "left as found" in out, out[-3000:]   # and the runner is put back
    if what == "hook-fails":
        # the guest layer's verdict names the category, from the error's type
        msg = verdicts["test_agent_ran_the_hook_as_kata_does"][1]
        assert "guest layer failed (product failure): the Kata guest did not run" in msg and "did not start" in msg, msg
        # the hook's own reason (what it was asked for) reaches the podman_run test's verdict: a
        # run's start error carries the runtime's words (a started container's error may only
        # say that Kata's agent went away)
        msg = verdicts["test_container_runs_on_the_kata_vfio_runtime"][1]
        assert "ffff:fffe" in msg and "exit status 5" in msg, msg
        # with what the target logged about the refused container: Kata's own lines (the runner's syslog)
        assert "--- the runtime's log lines for" in out and "kata-runtime[" in out, out[-5000:]
