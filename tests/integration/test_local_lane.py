"""The local lane, run as a user on a bare-metal runner runs it: inside the emulated runner, from
this checkout (the runner sees the controller's root, so the checkout and its venv are the ones
a prepared runner would have), `VFIOTEST_SKIP_SETUP=1 ci/main-job --target local`: every suite, on
real Kata 1.12.1, on the runner's own kernel and devices. 0 failed, 0 skipped, and the host
state guard says the runner was left as found (docs/fleet.md)."""

import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from _runner_env import IO_TESTS, ROOT, SUITES, booted_runner, junit_verdicts, keep_log, lane_failure, runner_dmesg

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600), pytest.mark.duration(1100)]
REPORTS = "/tmp/vfiotest-local-reports"     # in the runner (its /tmp)


def in_runner(env, command, timeout):
    return subprocess.run([sys.executable, "-m", "vfiotest", "runner", "ssh", "--", command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_suites_with_target_local_inside_the_runner(tmp_path):
    with booted_runner(tmp_path / "state") as env:
        # the Kata bundle unpacked, the guest initrd and the test image built into the controller's
        # caches, which the runner sees at the same paths (the same code builds them on a
        # bare-metal runner; under TCG dracut and mmdebstrap would take many minutes there)
        for args in (["kata", "detect", "--target", "virtual", "--profile", "emulated"],
                     ["kata", "build-initrd", "--profile", "emulated"], ["image", "build", "--target", "virtual"]):
            r = subprocess.run([sys.executable, "-m", "vfiotest", *args], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=1200)
            assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        # inside the emulated runner (Kata VMs nested in TCG): the agent-check retry `virtual` gets
        # by default is asked for by name (README, docs/podman.md)
        cmd = (f"cd {shlex.quote(ROOT)} && env VFIOTEST_SKIP_SETUP=1 VFIOTEST_REPORTS={REPORTS} "
               "VFIOTEST_KATA_START_RETRIES=1 "
               f"ci/main-job --target local --vfio-profile emulated -p no:cacheprovider")
        p = in_runner(env, cmd, timeout=3300)
        out = p.stdout + p.stderr
        kern = runner_dmesg(env)
        kept = keep_log("local-lane", out, tmp_path / "state" / "runner", kern)
        assert p.returncode == 0, lane_failure(out, kept, kern)
        assert "host state guard: " in out and "left as found" in out, out[-3000:]
        junit = in_runner(env, f"cat {REPORTS}/junit.xml", timeout=120)
        assert junit.returncode == 0, junit.stderr
        verdicts, suites = junit_verdicts(ET.fromstring(junit.stdout))
        assert verdicts and set(verdicts.values()) == {"passed"}, verdicts
        assert suites == SUITES, suites
        assert verdicts.get("test_pf_with_enabled_vfs_refused_and_keeps_them") == "passed", verdicts
        assert IO_TESTS <= {n.split("[")[0] for n in verdicts}, sorted(verdicts)   # the VF's I/O
        summary = in_runner(env, f"cat {REPORTS}/summary.md", timeout=120).stdout
        assert "local" in summary, summary[:2000]
