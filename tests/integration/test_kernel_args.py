"""Issue 13's done-when, for real, on a runner of its own (temporary state directory): the runner
started without intel_iommu=on and with cgroup v2 (where the Kata 1.x lane needs v1):

- `pytest suites/host_prereqs` fails the kernel-argument, IOMMU and cgroup checks naming the
  missing arguments and the command that adds them; a dependent of the prereqs layer is skipped
  without --strict and fails with it;
- a session killed in the middle of --allow-reboot leaves its record of the runner's
  /etc/default/grub, and `vfiotest restore` puts the file back;
- `pytest suites/host_prereqs suites/rebind --allow-reboot` adds the arguments, reboots the
  runner, passes, and leaves `/proc/cmdline` with them (the GRUB file put back at its end).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from _runner_env import runner_env

from vfiotest.runner import Runner, bootcfg

# the tests run in order on one runner: one xdist group
pytestmark = [pytest.mark.vm, pytest.mark.mutating, pytest.mark.timeout(1800), pytest.mark.xdist_group("kernel-args"),
              pytest.mark.duration(155)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = "suites/host_prereqs/test_host_prereqs.py"
DEPENDENT = "suites/rebind/test_rebind.py::test_cli_bad_address_exits_non_zero_with_next_step"   # needs prereqs_met


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from runner_env(tmp_path_factory.mktemp("kargs") / "state", "--without", "intel_iommu=on", "--cgroup", "v2")


def runner(env):
    return Runner(os.path.join(env["VFIOTEST_STATE_DIR"], "runner"))


def cmdline(env):
    h = runner(env).host(register=False)
    try:
        return h.read_text("/proc/cmdline").split()
    finally:
        h.close()


def pytest_run(env, *args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs", *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def test_1_missing_arguments_are_reported_with_the_command(env):
    cmd = cmdline(env)
    assert "intel_iommu=on" not in cmd and "systemd.unified_cgroup_hierarchy=1" in cmd, cmd
    grub = runner(env).grub_path
    res = pytest_run(env, SUITE, DEPENDENT)
    out = res.stdout
    assert res.returncode == 1, out[-3000:]
    for test in ("test_kernel_arguments_configured", "test_iommu_enabled", "test_cgroup_mode_matches_profile"):
        assert f"FAILED {SUITE}::{test}" in out, out[-4000:]
    assert "/proc/cmdline lacks intel_iommu=on systemd.unified_cgroup_hierarchy=0" in out, out[-4000:]
    assert "unified mounted (wanted: v1, Kata 1.x needs cgroup v1)" in out, out[-4000:]
    assert f"add them to GRUB_CMDLINE_LINUX in the runner's /etc/default/grub ({grub} on this machine), " \
           "then `vfiotest runner reboot`" in out, out[-4000:]
    # the dependent is skipped, naming the arguments
    assert "SKIPPED" in out and "prereqs layer unavailable" in out and "missing kernel arguments intel_iommu=on" in out, out[-4000:]
    strict = pytest_run(env, "--strict", DEPENDENT)
    # --strict: the layer fails its dependent (an error at its set-up) instead of skipping it
    assert strict.returncode == 1 and "1 error" in strict.stdout and "skipped" not in strict.stdout, strict.stdout[-3000:]
    assert "prereqs layer unavailable" in strict.stdout and "intel_iommu=on" in strict.stdout


def test_2_a_session_killed_mid_reboot_is_put_back_by_restore(env):
    r = runner(env)
    before = open(r.grub_path).read()
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", "--allow-reboot",
                          f"{SUITE}::test_kernel_arguments_configured"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        seen = []
        for line in p.stdout:   # progress: the live log (stdout) or stderr
            seen.append(line)
            if "rebooting" in line and "allow-reboot" in line:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail("the session ended before rebooting:\n" + "".join(seen))
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    edited = open(r.grub_path).read()
    assert edited != before and "intel_iommu=on" in bootcfg.linux_args(edited)
    res = subprocess.run([sys.executable, "-m", "vfiotest", "restore"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "recorded change(s) undone" in res.stdout, res.stdout
    assert open(r.grub_path).read() == before
    # whether or not the killed session's reboot happened, the runner is up again afterwards
    deadline = time.monotonic() + r.boot_timeout
    while not r.is_up() and time.monotonic() < deadline:
        time.sleep(2)
    assert r.is_up()


def test_3_allow_reboot_adds_them_reboots_and_passes(env):
    r = runner(env)
    # back to the broken boot the done-when starts from (test 2's reboot had them)
    r.reboot()
    assert "intel_iommu=on" not in cmdline(env)
    before = open(r.grub_path).read()
    boots = r.status()["boots"]
    res = pytest_run(env, "suites/host_prereqs", "suites/rebind", "--allow-reboot")
    out = res.stdout
    assert res.returncode == 0, out[-5000:]
    assert " passed" in out.splitlines()[-1] and "failed" not in out.splitlines()[-1], out[-3000:]
    assert "host state guard: runner left as found" in out, out[-3000:]
    assert r.status()["boots"] == boots + 1, "exactly one reboot"
    cmd = cmdline(env)
    assert "intel_iommu=on" in cmd and "systemd.unified_cgroup_hierarchy=0" in cmd, cmd
    assert open(r.grub_path).read() == before, "the session's end puts the boot configuration back"
