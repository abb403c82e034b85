"""What several integration tests share about an emulated runner of their own."""

import contextlib
import os
import subprocess
import sys

import pytest

from vfiotest.podman import RuntimeClient, ensure_image
from vfiotest.podman.client import ContainerError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runner_env(state_dir, *up_args):
    """Yields the environment of a runner booted (`vfiotest runner up UP_ARGS`) in `state_dir`;
    stops it after, whether the test passed or not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env.update(VFIOTEST_STATE_DIR=str(state_dir), VFIOTEST_TARGET="virtual")
    up = subprocess.run([sys.executable, "-m", "vfiotest", "runner", "up", *up_args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        yield env
    finally:
        # also when the test failed inside the loop (the generator is closed, not resumed)
        subprocess.run([sys.executable, "-m", "vfiotest", "runner", "down"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)


#: runner_env for a test body: `with booted_runner(state_dir) as env:` stops the runner as the
#: block ends, also when an assertion in it fails (a `for` loop over the generator would leave
#: the runner up until the failed test's traceback is freed)
booted_runner = contextlib.contextmanager(runner_env)


def no_process_refers_to(state_dir):
    """No process on this machine has the runner's state directory on its command line."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    assert state_dir.encode() not in f.read(), f"pid {name} still refers to {state_dir}"
            except OSError:
                pass


def exercise_podman(host):
    """The podman layer on `host`: an API service for runc, containers run, failed, not started,
    probed and left running; then closed: no socket, no container left."""
    img = ensure_image(host)
    client = RuntimeClient.open(host, "runc")
    sock = client.service.socket_path
    try:
        ok = client.run(img.ref, ["sh", "-c", "echo hi; ulimit -n"], annotations={"io.katacontainers.x.vfio": "0000:01:10.0"})
        assert (ok.exit_code, ok.stdout.split()) == (0, ["hi", "20000"]), str(ok)
        assert ok.oci_runtime == "runc"
        assert ok.inspect["Config"]["Annotations"]["io.katacontainers.x.vfio"] == "0000:01:10.0"
        bad = client.run(img.ref, ["sh", "-c", "exit 7"])
        assert bad.exit_code == 7
        nostart = client.run(img.ref, ["/no/such/binary"])
        assert nostart.exit_code is None and "no/such/binary" in nostart.stderr
        probe = client.run(img.ref, img.probe_command)
        assert probe.exit_code == 1 and probe.json()["step"] == "open-container"
        # a container that does not exit in time fails with what it printed, and is removed
        with pytest.raises(ContainerError, match=r"did not exit within 3 s") as stuck:
            client.run(img.ref, ["sh", "-c", "echo stuck-here; exec sleep 300"], timeout=3)
        assert "stuck-here" in str(stuck.value), str(stuck.value)
        assert client.leftovers() == [], "the container that did not exit is left behind"
        running = client.start(img.ref, ["sleep", "300"])
        assert running.status == "running"
        assert [c.id for c in client.leftovers()] == [running.id]
    finally:
        client.close()
    assert not host.exists(sock), "the service socket is left behind"
    res = host.run(["podman", "ps", "-a", "--filter", f"label=vfiotest.owner={client.owner}", "--format", "{{.ID}}"], timeout=60)
    assert res.stdout.strip() == "", f"containers left: {res.stdout}"


SUITES = {"host_prereqs", "rebind", "guest_hook", "podman_run"}
#: the VF's I/O tests (suites/podman_run/test_vf_io.py), by name without their parameters
IO_TESTS = {"test_nvme_vf_writes_blocks_in_the_container_that_the_runner_reads",
            "test_nic_vfs_echo_frames_from_the_runner_through_dpdk_in_the_container"}


def runner_dmesg(env):
    """The booted runner's (its `env`) kernel log, last 400 lines: a warning or an oops is logged
    below its console's level, so only dmesg has it. A line saying why when it cannot be read."""
    try:
        d = subprocess.run([sys.executable, "-m", "vfiotest", "runner", "ssh", "--", "dmesg | tail -n 400"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "(the runner did not answer within 120 s)"
    return d.stdout if d.returncode == 0 else f"(exit {d.returncode}: {d.stderr[-500:]})"


def keep_log(name, text, runner_state=None, kernel=""):
    """Keeps a lane's output where a failed CI run can still be read after pytest cut its assertion
    short: `$VFIOTEST_CI_REPORTS/<name>.log` (ci/test sets it: the checkout's reports/), with the
    tail of the runner's console (`runner_state`/console.log: a guest that lost its timer says so
    there), what the runner's QEMU said (qemu.stderr, qemu.log: why it exited) and `kernel`
    (runner_dmesg). Returns the path it wrote, or "" when VFIOTEST_CI_REPORTS is not set."""
    reports = os.environ.get("VFIOTEST_CI_REPORTS")
    if not reports:
        return ""
    os.makedirs(reports, exist_ok=True)
    path = os.path.join(reports, f"{name}.log")
    console = os.path.join(str(runner_state), "console.log") if runner_state else ""
    with open(path, "w") as f:
        f.write(text)
        if console and os.path.exists(console):
            with open(console, errors="replace") as c:
                f.write("\n--- the runner's console (last 200 lines) ---\n" + "".join(c.readlines()[-200:]))
        if runner_state:
            from vfiotest.runner import qemu
            said = qemu.words([os.path.join(str(runner_state), n) for n in ("qemu.stderr", "qemu.log")], 50)
            f.write("\n--- what the runner's QEMU said ---\n" + ("\n".join(said) or "(nothing)") + "\n")
        if kernel:
            f.write("\n--- the runner's kernel log (last 400 lines) ---\n" + kernel + "\n")
    return path


def lane_failure(out, kept, kernel=""):
    """A failed lane's assertion message: where its whole output is kept, the head of pytest's
    FAILURES section (the first failure's first lines: podman's error, the runtime's log, the
    target's kernel lines), the runner kernel's warning, oops and KVM/VFIO lines from `kernel`
    (runner_dmesg), and the output's tail (the summary). pytest cuts what it shows otherwise."""
    from vfiotest.podman.diagnose import kernel_lines

    parts = [f"(whole output: {kept or 'not kept'})"]
    at = out.find("= FAILURES =")
    if at >= 0:
        parts.append(out[at:at + 5000] + "\n[...]")
    if kernel:
        parts.append("--- the runner's kernel (warnings, oopses, KVM/VFIO lines; last 20)\n" + kernel_lines(kernel))
    parts.append(out[-2500:])
    return "\n".join(parts)


def junit_verdicts(root):
    """{test name: passed|failed|skipped} of a JUnit XML tree's test cases (the session's own
    `vfiotest.session` entries left out), and the suites they belong to."""
    cases = [c for c in root.iter("testcase") if c.get("classname") != "vfiotest.session"]
    verdicts = {c.get("name"): ("skipped" if c.find("skipped") is not None else
                                "failed" if c.find("failure") is not None or c.find("error") is not None
                                else "passed") for c in cases}
    return verdicts, {c.get("classname").split(".")[1] for c in cases}
