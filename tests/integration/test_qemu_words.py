"""What a daemonized QEMU says after it started is kept (issue 21: the runner's QEMU exited under
two vCPUs and its words were lost to -daemonize). Real QEMU, `-machine none` (nothing boots):
started as the runner starts it, then told to stop with SIGTERM, which QEMU answers on its
standard error ("terminating on signal 15")."""

import os
import signal
import socket
import time

import pytest

from vfiotest.runner import qemu

QEMU = "qemu-system-x86_64"
HAVE_QEMU = any(os.access(os.path.join(d, QEMU), os.X_OK) for d in os.environ.get("PATH", "").split(":"))
NO_QEMU = f"{QEMU} is not installed here (ci/setup installs it)"

pytestmark = [pytest.mark.duration(3)]   # no guest boots: QEMU with -machine none


def start_and_terminate(tmp_path, keep):
    pidfile, stderr, log = tmp_path / "pid", tmp_path / "qemu.stderr", tmp_path / "qemu.log"
    argv = [QEMU, "-machine", "none", "-display", "none", "-nodefaults", "-no-user-config",
            "-daemonize", "-pidfile", str(pidfile), *(qemu.keep_stderr_args(QEMU, str(log)) if keep else [])]
    t0 = time.monotonic()
    rc, said = qemu.launch(argv, str(stderr), timeout=30)
    assert rc == 0, said
    assert time.monotonic() - t0 < 20      # the daemon holds no pipe that launch waits on
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    return qemu.words([str(stderr), str(log)])


@pytest.mark.skipif(not HAVE_QEMU, reason=NO_QEMU)
def test_a_daemonized_qemu_keeps_what_it_says_after_it_started(tmp_path):
    assert "plugin" in qemu.log_items(QEMU)
    (tmp_path / "kept").mkdir()
    (tmp_path / "lost").mkdir()
    said = start_and_terminate(tmp_path / "kept", keep=True)
    assert any("terminating on signal 15" in line for line in said), said
    # without the log file the daemon's standard error is /dev/null: the same words are lost
    lost = start_and_terminate(tmp_path / "lost", keep=False)
    assert not any("terminating" in line for line in lost), lost


@pytest.mark.skipif(not HAVE_QEMU, reason=NO_QEMU)
def test_a_taken_forwarding_port_is_said_by_launch(tmp_path):
    """The daemonized child refuses a taken port after the fork, into its -D file: launch returns
    those words, which is how the runner knows to try another port."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        stderr, log = tmp_path / "qemu.stderr", tmp_path / "qemu.log"
        log.write_text("an earlier boot's words\n")
        argv = [QEMU, "-machine", "none", "-display", "none", "-nodefaults", "-no-user-config",
                "-daemonize", "-pidfile", str(tmp_path / "pid"), *qemu.keep_stderr_args(QEMU, str(log)),
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"]
        rc, said = qemu.launch(argv, str(stderr), str(log), timeout=30)
    finally:
        busy.close()
    assert rc != 0
    assert "host forwarding" in said, said
    assert "an earlier boot" not in said


def test_words_are_the_start_then_the_log_last_lines_first_files_missing_skipped(tmp_path):
    (tmp_path / "a").write_text("refused: port\n\n")
    (tmp_path / "b").write_text("".join(f"line {i}\n" for i in range(30)))
    assert qemu.words([str(tmp_path / "a"), str(tmp_path / "nope"), str(tmp_path / "b")], n=3) == \
        ["line 27", "line 28", "line 29"]
    assert qemu.words([str(tmp_path / "a"), str(tmp_path / "b")], n=31)[0] == "refused: port"
    assert qemu.words([str(tmp_path / "nope")]) == []
