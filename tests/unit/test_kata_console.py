"""KataConsole's protocol against a real shell behind a unix socket, as Kata 1.x's console.sock is.

The server spawns /bin/sh per connection, either on the socket itself ("pipe") or, like
the guest's console, on a pseudo-terminal with a controlling tty ("pty": echo of the typed
line, \\r\\n line ends, an interactive prompt, Ctrl-C delivered as SIGINT).
"""

import fcntl
import json
import os
import pty
import select
import socket
import stat
import subprocess
import termios
import threading
import time

import pytest

from vfiotest.errors import CommandTimeout, TargetError
from vfiotest.host import LocalHost
from vfiotest.kata.console import GuestReport, KataConsole, console_socket_path, parse_transcript


def _set_ctty():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ShellServer:
    def __init__(self, path, mode):
        self.path, self.mode = path, mode
        self.procs, self.threads = [], []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.stop = threading.Event()
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        while not self.stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            conn, _ = self.sock.accept()
            if self.mode == "pipe":
                fd = conn.fileno()
                self.procs.append(subprocess.Popen(["/bin/sh"], stdin=fd, stdout=fd, stderr=fd, close_fds=True))
                conn.close()
            else:
                master, slave = pty.openpty()
                p = subprocess.Popen(["/bin/sh", "-i"], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     start_new_session=True, preexec_fn=_set_ctty, env={**os.environ, "PS1": "# "})
                os.close(slave)
                self.procs.append(p)
                t = threading.Thread(target=self._relay, args=(conn, master), daemon=True)
                t.start()
                self.threads.append(t)

    def _relay(self, conn, master):
        try:
            while not self.stop.is_set():
                r, _, _ = select.select([conn, master], [], [], 0.1)
                if conn in r:
                    data = conn.recv(4096)
                    if not data:
                        break
                    os.write(master, data)
                if master in r:
                    try:
                        data = os.read(master, 4096)
                    except OSError:        # EIO: the shell is gone
                        break
                    if not data:
                        break
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            os.close(master)

    def close(self):
        self.stop.set()
        self.threads[0].join(5)                  # the accept loop, before its socket is closed
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.sock.close()


@pytest.fixture(params=["pipe", "pty"])
def console(request, tmp_path):
    path = str(tmp_path / "console.sock")
    server = ShellServer(path, request.param)
    yield KataConsole(LocalHost(), "sandbox-under-test", socket_path=path, timeout=15)
    server.close()


def test_default_socket_path_is_kata_1x_vc_vm_dir():
    c = KataConsole(LocalHost(), "abc123")
    assert c.path == console_socket_path("abc123") == "/run/vc/vm/abc123/console.sock"


def test_output_and_exit_codes(console):
    assert console.run("echo hello; echo world") == (0, "hello\nworld\n")
    assert console.run("false")[0] == 1
    assert console.run("exit 3") == (3, "")                # a subshell: the console's shell survives
    assert console.run("sh -c 'echo out; echo err >&2; exit 42'") == (42, "out\nerr\n")
    assert console.run("printf abc") == (0, "abc")           # no newline before the end marker
    assert console.run("echo $((6 * 7))") == (0, "42\n")


def test_output_with_partial_and_foreign_markers(console):
    text = ("BEGIN-\nEND-\nEND-0000000000000000 7\nBEGIN-0123456789abcdef\n"
            "END-0123456789abcdef 0\nEND-' 0\n")
    cmd = "printf '%s' " + "'" + text.replace("'", "'\\''") + "'; exit 5"
    assert console.run(cmd) == (5, text)


def test_quotes_and_special_characters_reach_the_shell_as_typed(console):
    rc, out = console.run("""x='a "b" $c'; echo "$x|\\\\|;|&"; echo done""")
    assert (rc, out) == (0, 'a "b" $c|\\|;|&\ndone\n')


def test_command_reading_stdin_does_not_eat_the_console(console):
    assert console.run("cat; echo after") == (0, "after\n")


def test_hanging_command_hits_the_deadline(console):
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        console.run("echo started; sleep 30", timeout=2)
    assert time.monotonic() - t0 < 12
    assert "did not end in 2 s" in ei.value.message and "started" in ei.value.message


def test_console_that_closes_is_a_target_error_not_a_timeout(console):
    t0 = time.monotonic()
    with pytest.raises(TargetError) as ei:
        console.run("kill -9 $$", timeout=10)
    assert not isinstance(ei.value, CommandTimeout)
    assert "closed" in ei.value.message
    assert time.monotonic() - t0 < 8


def test_missing_socket_names_the_path_and_the_next_step(tmp_path):
    c = KataConsole(LocalHost(), "gone", socket_path=str(tmp_path / "nothing.sock"), timeout=3)
    with pytest.raises(TargetError) as ei:
        c.run("true")
    assert not isinstance(ei.value, CommandTimeout)
    assert "nothing.sock" in ei.value.message and "agent.debug_console" in ei.value.hint


def test_silent_socket_is_a_timeout(tmp_path):
    path = str(tmp_path / "silent.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)                                   # accepts (backlog), never answers: like a console held by another client
    try:
        with pytest.raises(CommandTimeout) as ei:
            KataConsole(LocalHost(), "x", socket_path=path).run("true", timeout=1)
        assert "no answer" in ei.value.message
    finally:
        s.close()


def test_hook_log_parsed(console, tmp_path):
    entries = [{"action": "start", "container": "c1", "stage": "prestart"},
               {"action": "bind", "container": "c1", "device": "0000:00:01.0", "result": "bound",
                "old_driver": "igbvf", "new_driver": "vfio-pci", "group": "1", "note": "it's \"quoted\""},
               {"action": "end", "container": "c1"}]
    log = tmp_path / "vfio hook.log"                          # a space in the path: quoted for the guest shell
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert console.hook_log(str(log)) == entries
    assert console.hook_log(str(tmp_path / "absent.log")) == []
    log.write_text(json.dumps(entries[0]) + "\n[    1.234] kernel says hi\n")
    with pytest.raises(TargetError, match="line 2 .* is not JSON"):
        console.hook_log(str(log))


def _sysfs_pci_state():
    """This machine's PCI state read with Python (read-only), in pci_state()'s shape."""
    base = "/sys/bus/pci/devices"
    out = {}
    for a in sorted(os.listdir(base)):
        d = os.path.join(base, a)

        def rd(name, d=d):
            try:
                with open(os.path.join(d, name)) as f:
                    return f.read().strip() or None
            except OSError:
                return None

        def ln(name, d=d):
            try:
                return os.path.basename(os.readlink(os.path.join(d, name)))
            except OSError:
                return None

        out[a] = {"vendor": rd("vendor"), "device": rd("device"), "class": rd("class"), "driver": ln("driver"),
                  "driver_override": rd("driver_override"), "iommu_group": ln("iommu_group")}
    return out


def _dev_vfio():
    try:
        names = sorted(os.listdir("/dev/vfio"))
    except OSError:
        return {}
    return {n: "char" if stat.S_ISCHR(os.stat("/dev/vfio/" + n).st_mode) else "other" for n in names}


def test_dev_vfio_and_pci_state_match_a_python_reading(console):
    # read-only: the shell's listing over the console equals Python's reading of the same sysfs
    assert console.dev_vfio() == _dev_vfio()
    assert console.pci_state() == _sysfs_pci_state()


def test_guest_report_over_the_console(console, tmp_path):
    log = tmp_path / "hook.log"
    log.write_text(json.dumps({"action": "bind", "container": "cid", "result": "bound"}) + "\n"
                   + json.dumps({"action": "bind", "container": "other", "result": "bound"}) + "\n")
    # a hook as the agent runs it: argv [basename, stage], the state on stdin; it logs what it got
    hook = tmp_path / "prestart" / "vfio-hook"
    hook.parent.mkdir()
    hook.write_text("#!/bin/sh\n"
                    "state=$(cat)\n"
                    f"printf '{{\"action\": \"got\", \"container\": \"%s\", \"argv0\": \"%s\"}}\\n' \"$1\" \"$0\" >> '{log}'\n"
                    "case \"$state\" in *'\"id\": '*'\"pid\"'*) exit 0 ;; esac\n"
                    "echo 'vfio-hook: state on stdin is not JSON' >&2; exit 2\n")
    hook.chmod(0o755)
    rep = GuestReport.read(console, container_id="cid", annotation="8086:10ca", hook=str(hook),
                           hook_log_path=str(log))
    assert rep.main_container == "cid"
    assert [e["container"] for e in rep.log_for(container="cid", action="bind")] == ["cid"]
    assert rep.dev_vfio == _dev_vfio() and rep.pci_after == _sysfs_pci_state()
    assert [r["kind"] for r in rep.runs] == ["again", "none", "malformed"]
    again, malformed = rep.run("again")["results"][0], rep.run("malformed")["results"][0]
    assert (again["rc"], again["argv"], again["stderr"]) == (0, ["vfio-hook", "prestart"], "")
    assert malformed["rc"] == 2 and "not JSON" in malformed["stderr"]
    # run from the hook's directory with its basename, as the agent does
    assert [e["argv0"] for e in rep.log_for(action="got")] == ["./vfio-hook"] * 3
    assert [e["container"] for e in rep.log_for(action="got")] == ["prestart"] * 3


def test_parse_transcript_ignores_the_echoed_command():
    echoed = "# printf '%s-%s\\n' BEGIN n1; ( echo hi\r\n> ) </dev/null; printf '%s-%s %s\\n' END n1 \"$?\"\r\n"
    assert parse_transcript(echoed, "n1") == (None, None)
    assert parse_transcript(echoed + "BEGIN-n1\r\nhi\r\nEND-n1 0\r\n# ", "n1") == (0, "hi\n")
    assert parse_transcript(echoed + "BEGIN-n1\r\nhi\r\n", "n1") == (None, "hi\n")


def test_the_guest_report_gives_the_one_device_model():
    """The report reads as a vfiotest.pci.Inventory (group numbers the guest's own)."""
    data = {"pci_after": {"0000:00:03.0": {"vendor": "0x8086", "device": "0x10ca", "class": "0x020000",
                                           "driver": "vfio-pci", "driver_override": "vfio-pci", "iommu_group": "2"},
                          "0000:00:00.0": {"vendor": "0x8086", "device": "0x29c0", "class": "0x060000",
                                           "driver": None, "driver_override": None, "iommu_group": None}},
            "vfio_after": {"2": "char"}}
    inv = GuestReport(data).inventory()
    dev = inv.devices["0000:00:03.0"]
    assert dev.vendor_device == "8086:10ca" and dev.driver == "vfio-pci" and inv.groups == {"2": ["0000:00:03.0"]}
    assert inv.vfio == {"2": "char"} and inv.devices["0000:00:00.0"].iommu_group is None


def test_the_agents_own_log_lines_are_not_the_commands_output():
    """kata-agent logs on the console the debug shell shares: a line it writes while a command
    runs is left out of that command's output (seen in CI inside `cat /proc/1/comm`)."""
    agent = ('time="2026-12-06T21:11:05.843843933Z" level=info msg="Waiting for stopServer signal..." '
             'debug_console=true name=kata-agent pid=1 source=agent subsystem=stopserverwatcher\r\n')
    text = "BEGIN-n1\r\n" + agent + "kata-agent\r\n" + agent + "END-n1 0\r\n"
    assert parse_transcript(text, "n1") == (0, "kata-agent\n")
    # a command's own line that merely mentions the agent stays
    own = 'time="x" level=info msg=hello name=other\nkata-agent is PID 1\n'
    assert parse_transcript("BEGIN-n1\n" + own + "END-n1 0\n", "n1") == (0, own)
