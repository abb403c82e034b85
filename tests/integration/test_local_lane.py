"""The local lane, run as a user on a bare-metal runner runs it: inside the emulated runner, from
this checkout (the runner sees the controller's root, so the checkout and its venv are the ones
a prepared runner would have), `VFIOTEST_SKIP_SETUP=1 ci/main-job --target local`. What runs:
the host_prereqs and rebind suites whole and a Kata container holding a VF on real Kata 1.12.1,
on the runner's own kernel and devices. 0 failed, 0 skipped, and the host state guard says the
runner was left as found (docs/fleet.md)."""

import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from _runner_env import ROOT, runner_env

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400), pytest.mark.duration(270)]

KATA_TEST = "test_container_runs_on_the_kata_vfio_runtime"
SUBSET = f"host_prereqs or test_rebind or {KATA_TEST}"
REPORTS = "/tmp/vfiotest-local-reports"     # in the runner (its /tmp)


def in_runner(env, command, timeout):
    return subprocess.run([sys.executable, "-m", "vfiotest", "runner", "ssh", "--", command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_suites_with_target_local_inside_the_runner(tmp_path):
    for env in runner_env(tmp_path / "state"):
        # the Kata bundle unpacked, the guest initrd and the test image built into the controller's
        # caches, which the runner sees at the same paths (the same code builds them on a
        # bare-metal runner; under TCG dracut and mmdebstrap would take many minutes there)
        for args in (["kata", "detect", "--target", "virtual", "--profile", "emulated"],
                     ["kata", "build-initrd", "--profile", "emulated"], ["image", "build", "--target", "virtual"]):
            r = subprocess.run([sys.executable, "-m", "vfiotest", *args], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=1200)
            assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        cmd = (f"cd {shlex.quote(ROOT)} && env VFIOTEST_SKIP_SETUP=1 VFIOTEST_REPORTS={REPORTS} "
               f"ci/main-job --target local --vfio-profile emulated -p no:cacheprovider -k {shlex.quote(SUBSET)}")
        p = in_runner(env, cmd, timeout=2200)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-5000:]
        assert "host state guard: " in out and "left as found" in out, out[-3000:]
        junit = in_runner(env, f"cat {REPORTS}/junit.xml", timeout=120)
        assert junit.returncode == 0, junit.stderr
        cases = [c for c in ET.fromstring(junit.stdout).iter("testcase") if c.get("classname") != "vfiotest.session"]
        verdicts = {c.get("name"): ("skipped" if c.find("skipped") is not None else
                                    "failed" if c.find("failure") is not None or c.find("error") is not None
                                    else "passed") for c in cases}
        assert verdicts and set(verdicts.values()) == {"passed"}, verdicts
        assert {c.get("classname").split(".")[1] for c in cases} == {"host_prereqs", "rebind", "podman_run"}
        assert verdicts.get("test_pf_with_enabled_vfs_refused_and_keeps_them") == "passed", verdicts
        assert verdicts.get(KATA_TEST) == "passed", verdicts
        summary = in_runner(env, f"cat {REPORTS}/summary.md", timeout=120).stdout
        assert "local" in summary, summary[:2000]
