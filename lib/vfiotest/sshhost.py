"""A target reached over SSH with paramiko: pinned host keys, a timeout on every command.

One connection per host object, reused for every call (a new connection costs
about 0.4 s; a command on an open one 70-160 ms). Host keys are never learned:
an unknown or changed key is refused.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shlex
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import paramiko

from .errors import CommandTimeout, TargetError
from .host import (
    DEFAULT_TIMEOUT,
    FILE_OP_SCRIPT,
    CommandResult,
    Input,
    Transport,
    TransportHost,
    file_op_reply,
    wait_for,
)

# A Python process kept on the target for the life of the connection: file operations
# and scripts go to it as JSON lines. Starting python3 costs 0.6-4 s on a TCG runner
# whose root is on 9p; a request to the running agent costs a few milliseconds.
AGENT_SCRIPT = r"""
import base64, contextlib, io, json, os, sys
FILE_OP = %r
out = os.fdopen(os.dup(1), "w")  # the protocol; fd 1 goes to /dev/null so subprocesses cannot corrupt it
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
for line in sys.stdin:
    req = json.loads(line)
    argv = ["-c"] + req.get("args", [])
    code = FILE_OP if req["kind"] == "fileop" else req["script"]
    buf = io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(base64.b64decode(req.get("input") or "")))
    rc = 0
    old = sys.argv, sys.stdin
    sys.argv, sys.stdin = argv, stdin
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<vfiotest>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException as e:
        rc = 1
        err = "%%s: %%s" %% (type(e).__name__, e)
        out.write(json.dumps({"rc": rc, "stdout": buf.getvalue(), "stderr": err}) + "\n")
        out.flush()
        continue
    finally:
        sys.argv, sys.stdin = old
    out.write(json.dumps({"rc": rc, "stdout": buf.getvalue(), "stderr": ""}) + "\n")
    out.flush()
""" % FILE_OP_SCRIPT

_TARGET_RE = re.compile(r"^ssh://(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9.:_-]+?|\[[0-9a-fA-F:]+\])(?::(?P<port>\d{1,5}))?/?$")


def parse_ssh_target(text: str | None) -> tuple[str, str, int]:
    """`ssh://user@host[:port]` -> (user, host, port). Raises TargetError on anything else."""
    m = _TARGET_RE.match(text or "")
    if not m:
        raise TargetError(f"target {text!r} is not of the form ssh://user@host[:port]",
                          hint="write it as ssh://root@runner.example:22")
    port = int(m["port"] or 22)
    if not 0 < port < 65536:
        raise TargetError(f"target {text!r}: port {port} is out of range", hint="use a port from 1 to 65535")
    return m["user"] or "root", m["host"].strip("[]"), port


def wait_for_ssh_banner(host: str, port: int, timeout: float) -> bool:
    """User-mode networking accepts TCP before sshd listens: wait for the `SSH-` banner."""

    def banner() -> bool:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(2)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    return wait_for(banner, timeout, 0.25, f"the SSH banner on {host}:{port}", fail=False)


log = logging.getLogger(__name__)
# paramiko's transport thread logs a failed login (no banner...) with its traceback at ERROR;
# connect() reports it itself, with the attempts: where nothing is configured (the CLI, the
# campaign) this keeps Python's last-resort handler from printing those tracebacks. Handlers
# that are configured (pytest's log capture) still get the records.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
LOGIN_RETRY = 60.0   # s a login that fails before authentication is tried again (SshTransport.connect)
LOGIN_PAUSE = 5.0
LINK_PROBE_EVERY = 15.0   # s between keepalive requests that want an answer (OpenSSH's ServerAliveInterval)
LINK_SILENCE = 60.0       # s without that answer after which the link is taken for dead and closed


class LinkWatch:
    """What OpenSSH's ServerAliveInterval/ServerAliveCountMax do, for a paramiko transport: every
    `every` s a keepalive@openssh.com request that wants an answer (sshd answers it, if only with
    a refusal); no answer in `silence` s and the transport is closed, so that whatever waits on
    the link (a command, the podman API relay, a long poll) fails now with `reason`, instead of
    when TCP or the caller's own timeout gives up (podman-py's read timeout: 120 s)."""

    def __init__(self, transport: paramiko.Transport, name: str, every: float = LINK_PROBE_EVERY,
                 silence: float = LINK_SILENCE) -> None:
        self.transport, self.name, self.every, self.silence = transport, name, every, silence
        self.reason: str | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._run, name=f"ssh-link-watch {name}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every) and self.transport.is_active():
            answered = threading.Event()

            def ask(answered: threading.Event = answered) -> None:
                try:
                    self.transport.global_request("keepalive@openssh.com", wait=True)
                except Exception:  # noqa: BLE001 - a closed transport: the loop ends on is_active()
                    pass
                answered.set()

            threading.Thread(target=ask, name=f"ssh-keepalive {self.name}", daemon=True).start()
            if not answered.wait(self.silence) and self.transport.is_active() and not self._stop.is_set():
                self.reason = (f"lost the connection to {self.name}: no answer to an SSH keepalive "
                               f"in {self.silence:.0f} s")
                log.warning("ssh %s; closing the link so that what waits on it fails now", self.reason)
                self.transport.close()
                return


class _TransientLogin(Exception):
    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class SshTransport(Transport):
    """Commands on a host reached over SSH. `known_hosts` pins its key; missing or different keys are refused.
    Scripts and file operations go to one resident python3 (the agent)."""

    def __init__(self, host: str, port: int = 22, user: str = "root", key_filename: str | None = None,
                 known_hosts: str | None = None, connect_timeout: float = 15.0, name: str | None = None,
                 login_retry: float = LOGIN_RETRY) -> None:
        self.hostname, self.port, self.user = host, port, user
        self.login_retry = login_retry
        self.key_filename = key_filename
        self.known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self.connect_timeout = connect_timeout
        self.name = name or f"{user}@{host}:{port}"
        self._client = None
        self._agent: paramiko.Channel | None = None
        self._agent_buf = b""
        self._agent_lock = threading.RLock()
        self._watch: LinkWatch | None = None

    # -- connection ----------------------------------------------------------
    def connect(self) -> paramiko.SSHClient:
        """The live connection, or a new one. A login that fails before authentication (no banner
        in time, the link reset: a busy target) is tried again for `login_retry` s; a refused
        connection, a key that is not pinned or differs, and a refused login are not."""
        if self._client is not None and self._client.get_transport() and self._client.get_transport().is_active():
            return self._client
        if not os.path.exists(self.known_hosts):
            raise TargetError(f"no known_hosts file {self.known_hosts} to pin {self.name}'s host key",
                              hint=f"add the runner's key: ssh-keyscan -p {self.port} {self.hostname} >> {self.known_hosts} (after checking its fingerprint)")
        deadline = time.monotonic() + self.login_retry
        attempt = 0
        while True:
            attempt += 1
            try:
                client = self._login()
                break
            except _TransientLogin as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    took = self.login_retry + self.connect_timeout
                    raise TargetError(f"cannot log in to {self.name}: {e.cause} ({attempt} attempt(s) in about {took:.0f} s)",
                                      hint="its sshd accepts connections but does not finish a login: is the target "
                                           "overloaded? look at its console; then retry") from e.__cause__
                log.info("ssh %s: login failed before authentication (%s); again in %.3g s",
                         self.name, e.cause, min(LOGIN_PAUSE, left))
                time.sleep(min(LOGIN_PAUSE, left))
        if self._watch is not None:
            self._watch.stop()
        self._watch = LinkWatch(client.get_transport(), self.name)
        self._client = client
        return client

    def _login(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.load_host_keys(self.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(self.hostname, port=self.port, username=self.user, key_filename=self.key_filename,
                           timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout, allow_agent=self.key_filename is None,
                           look_for_keys=self.key_filename is None)
            return client
        except paramiko.BadHostKeyException as e:
            raise TargetError(f"{self.name} offered a host key that differs from the one pinned in {self.known_hosts}",
                              hint="someone may be in the middle, or the runner was rebuilt: check, then update known_hosts") from e
        except paramiko.SSHException as e:
            t = client.get_transport()
            kex_done = t is not None and getattr(t, "host_key", None) is not None
            banner = t is not None and getattr(t, "remote_version", None)
            client.close()
            if "not found in known_hosts" in str(e):
                raise TargetError(f"{self.name}'s host key is not pinned in {self.known_hosts}",
                                  hint=f"check the fingerprint, then: ssh-keyscan -p {self.port} {self.hostname} >> {self.known_hosts}") from e
            if kex_done:
                # past the key exchange: the server refused the login (paramiko words some of these oddly)
                raise TargetError(f"cannot log in to {self.name}: {e}", hint="check the user, the key and sshd on the target") from e
            if not banner:
                raise _TransientLogin(f"no SSH banner within {self.connect_timeout:g} s") from e
            raise _TransientLogin(str(e) or type(e).__name__) from e
        except (EOFError, ConnectionResetError) as e:
            client.close()
            raise _TransientLogin(f"the connection was closed during the login ({type(e).__name__})") from e
        except OSError as e:
            raise TargetError(f"cannot reach {self.name}: {e}", hint="is the runner up? `vfiotest runner status`") from e

    def close(self) -> None:
        self._drop_agent()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- commands --------------------------------------------------------------
    def exec(self, command: str, *, timeout: float, input: Input = None) -> CommandResult:
        chan = self.connect().get_transport().open_session(timeout=self.connect_timeout)
        try:
            chan.settimeout(0.2)
            chan.exec_command(command)
            if input is not None:
                chan.sendall(input if isinstance(input, bytes) else input.encode())
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                got = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    got = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    got = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise CommandTimeout(f"{command[:120]!r} did not finish in {timeout:.0f} s on {self.name}",
                                         hint="the target may be hung; look at its console or dmesg")
                if not got:
                    time.sleep(0.002)
            rc = chan.recv_exit_status()
            if rc == -1 and not chan.get_transport().is_active():
                # the transport went away under the command (LinkWatch, or the TCP connection): no exit status
                why = self._watch.reason if self._watch is not None and self._watch.reason else \
                    f"lost the connection to {self.name}"
                raise TargetError(f"{why}, while running {command[:120]!r}",
                                  hint="is the target still up? `vfiotest runner status`, or its console")
        finally:
            chan.close()
        return CommandResult(command, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), self.name)

    # -- the agent: scripts and file operations without a python3 start each ------------
    def python(self, script: str, args: Sequence[str], *, timeout: float, input: Input = None,
               what: str = "python3 script") -> CommandResult:
        return self._agent_call({"kind": "script", "script": script, "args": [str(a) for a in args]},
                                input, timeout, what)

    def file_op(self, op: str, path: str, extra: Sequence[str] = (), data: bytes | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
        res = self._agent_call({"kind": "fileop", "args": [op, path, *map(str, extra)]}, data, timeout, f"{op} {path}")
        return file_op_reply(op, path, res, self.name)

    def _agent_call(self, req: dict[str, Any], input: Input, timeout: float, what: str) -> CommandResult:
        if input is not None:
            req["input"] = base64.b64encode(input if isinstance(input, bytes) else input.encode()).decode()
        with self._agent_lock:
            chan = self._agent_channel()
            try:
                chan.sendall((json.dumps(req) + "\n").encode())
                line = self._agent_readline(chan, time.monotonic() + timeout)
            except CommandTimeout:
                self._drop_agent()
                raise CommandTimeout(f"{what} did not finish in {timeout:.0f} s on {self.name}",
                                     hint="the target may be hung (a blocked sysfs write?); look at its console or dmesg") from None
            except (OSError, EOFError, paramiko.SSHException) as e:
                self._drop_agent()
                raise TargetError(f"lost the connection to {self.name} during {what}: {e}",
                                  hint="is the runner still up? `vfiotest runner status`") from e
        reply = json.loads(line)
        return CommandResult(what, reply["rc"], reply["stdout"], reply["stderr"], self.name)

    def _agent_channel(self) -> paramiko.Channel:
        if self._agent is not None and not self._agent.closed and not self._agent.exit_status_ready():
            return self._agent
        chan = self.connect().get_transport().open_session(timeout=self.connect_timeout)
        chan.settimeout(0.5)
        chan.exec_command(shlex.join(["python3", "-u", "-c", AGENT_SCRIPT]))
        self._agent, self._agent_buf = chan, b""
        return chan

    def _agent_readline(self, chan: paramiko.Channel, deadline: float) -> str:
        while b"\n" not in self._agent_buf:
            if time.monotonic() > deadline:
                raise CommandTimeout("agent")
            try:
                data = chan.recv(1 << 20)
            except socket.timeout:
                continue
            if not data:
                err = chan.recv_stderr(65536).decode("utf-8", "replace") if chan.recv_stderr_ready() else ""
                raise EOFError(f"the agent on the target exited {err.strip()[-300:]}")
            self._agent_buf += data
        line, self._agent_buf = self._agent_buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def _drop_agent(self) -> None:
        if self._agent is not None:
            self._agent.close()
        self._agent, self._agent_buf = None, b""

    # -- locks: a remote flock(1) held by an open channel ---------------------------
    def hold_lock(self, path: str, blocking: bool = False, timeout: float = 10.0) -> _RemoteLock | None:
        """The lock is held by `flock` on the target while this channel is open;
        if this process dies, sshd closes the session and the lock goes with it."""
        d = os.path.dirname(path)
        wait = f"-w {int(timeout)}" if blocking else "-n"
        cmd = (f"mkdir -p -m 0755 {shlex.quote(d)} && umask 077 && exec flock {wait} -E 75 {shlex.quote(path)} "
               f"sh -c 'echo LOCKED; exec cat >/dev/null'")
        chan = self.connect().get_transport().open_session(timeout=self.connect_timeout)
        chan.settimeout(timeout + 5)
        chan.exec_command(cmd)
        buf = b""
        try:
            while b"\n" not in buf:
                data = chan.recv(64)
                if not data:
                    break
                buf += data
        except socket.timeout:
            pass
        if buf.startswith(b"LOCKED"):
            return _RemoteLock(chan, path)
        chan.close()
        return None


class SshHost(TransportHost):
    """A host reached over SSH (an SshTransport); the file operations are Host's."""

    transport: SshTransport

    def __init__(self, host: str, port: int = 22, user: str = "root", key_filename: str | None = None,
                 known_hosts: str | None = None, connect_timeout: float = 15.0, name: str | None = None) -> None:
        self.transport = SshTransport(host, port, user, key_filename=key_filename, known_hosts=known_hosts,
                                      connect_timeout=connect_timeout, name=name)

    @classmethod
    def from_target(cls, target: str, **kw: Any) -> SshHost:
        user, host, port = parse_ssh_target(target)
        return cls(host, port, user, **kw)

    # what testinfra and the runner read
    hostname = property(lambda self: self.transport.hostname)
    port = property(lambda self: self.transport.port)
    user = property(lambda self: self.transport.user)
    key_filename = property(lambda self: self.transport.key_filename)
    known_hosts = property(lambda self: self.transport.known_hosts)
    connect_timeout = property(lambda self: self.transport.connect_timeout)

    def connect(self) -> paramiko.SSHClient:
        """The open paramiko client (connecting if needed): for SFTP and port forwards."""
        return self.transport.connect()

    def _python(self, script: str, args: list[str], *, timeout: float, input: Input, what: str) -> CommandResult:
        return self.transport.python(script, args, timeout=timeout, input=input, what=what)


class _RemoteLock:
    def __init__(self, chan: paramiko.Channel, path: str) -> None:
        self.chan, self.path = chan, path

    @property
    def is_locked(self) -> bool:
        return not self.chan.closed

    def release(self) -> None:
        if not self.chan.closed:
            try:
                self.chan.shutdown_write()  # cat sees EOF, flock exits, the lock is gone
                self.chan.status_event.wait(10)  # bounded: a wedged target must not hang the release
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the connection is gone, and the remote flock with it
            self.chan.close()
