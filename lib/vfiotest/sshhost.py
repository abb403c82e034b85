"""A target reached over SSH with paramiko: pinned host keys, a timeout on every command.

One connection per host object, reused for every call (a new connection costs
about 0.4 s; a command on an open one 70-160 ms). Host keys are never learned:
an unknown or changed key is refused.
"""

import os
import re
import shlex
import socket
import time

import paramiko

from .errors import CommandTimeout, TargetError
from .host import DEFAULT_TIMEOUT, CommandResult, Host

_TARGET_RE = re.compile(r"^ssh://(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9.:_-]+?|\[[0-9a-fA-F:]+\])(?::(?P<port>\d{1,5}))?/?$")


def parse_ssh_target(text):
    """`ssh://user@host[:port]` -> (user, host, port). Raises TargetError on anything else."""
    m = _TARGET_RE.match(text or "")
    if not m:
        raise TargetError(f"target {text!r} is not of the form ssh://user@host[:port]",
                          hint="write it as ssh://root@runner.example:22")
    port = int(m["port"] or 22)
    if not 0 < port < 65536:
        raise TargetError(f"target {text!r}: port {port} is out of range", hint="use a port from 1 to 65535")
    return m["user"] or "root", m["host"].strip("[]"), port


def wait_for_ssh_banner(host, port, timeout):
    """User-mode networking accepts TCP before sshd listens: wait for the `SSH-` banner."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(2)
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


class SshHost(Host):
    """A host reached over SSH. `known_hosts` pins its key; missing or different keys are refused."""

    def __init__(self, host, port=22, user="root", key_filename=None, known_hosts=None,
                 connect_timeout=15.0, name=None):
        self.hostname, self.port, self.user = host, port, user
        self.key_filename = key_filename
        self.known_hosts = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        self.connect_timeout = connect_timeout
        self.name = name or f"{user}@{host}:{port}"
        self._client = None

    @classmethod
    def from_target(cls, target, **kw):
        user, host, port = parse_ssh_target(target)
        return cls(host, port, user, **kw)

    # -- connection ----------------------------------------------------------
    def connect(self):
        if self._client is not None and self._client.get_transport() and self._client.get_transport().is_active():
            return self._client
        client = paramiko.SSHClient()
        if not os.path.exists(self.known_hosts):
            raise TargetError(f"no known_hosts file {self.known_hosts} to pin {self.name}'s host key",
                              hint=f"add the runner's key: ssh-keyscan -p {self.port} {self.hostname} >> {self.known_hosts} (after checking its fingerprint)")
        client.load_host_keys(self.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(self.hostname, port=self.port, username=self.user, key_filename=self.key_filename,
                           timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout, allow_agent=self.key_filename is None,
                           look_for_keys=self.key_filename is None)
        except paramiko.BadHostKeyException as e:
            raise TargetError(f"{self.name} offered a host key that differs from the one pinned in {self.known_hosts}",
                              hint="someone may be in the middle, or the runner was rebuilt: check, then update known_hosts") from e
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise TargetError(f"{self.name}'s host key is not pinned in {self.known_hosts}",
                                  hint=f"check the fingerprint, then: ssh-keyscan -p {self.port} {self.hostname} >> {self.known_hosts}") from e
            raise TargetError(f"cannot log in to {self.name}: {e}", hint="check the user, the key and sshd on the target") from e
        except OSError as e:
            raise TargetError(f"cannot reach {self.name}: {e}", hint="is the runner up? `vfiotest runner status`") from e
        client.get_transport().set_keepalive(15)
        self._client = client
        return client

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- commands --------------------------------------------------------------
    def _exec(self, command, *, timeout, input):
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
        finally:
            chan.close()
        return CommandResult(command, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), self.name)

    # -- locks: a remote flock(1) held by an open channel ---------------------------
    def hold_lock(self, path, blocking=False, timeout=10.0):
        """The lock is held by `flock` on the target while this channel is open;
        if this process dies, sshd closes the session and the lock goes with it."""
        d = os.path.dirname(path)
        wait = f"-w {int(timeout)}" if blocking else "-n"
        cmd = (f"mkdir -p {shlex.quote(d)} && exec flock {wait} -E 75 {shlex.quote(path)} "
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


class _RemoteLock:
    def __init__(self, chan, path):
        self.chan, self.path = chan, path

    @property
    def is_locked(self):
        return not self.chan.closed

    def release(self):
        if not self.chan.closed:
            self.chan.shutdown_write()  # cat sees EOF, flock exits, the lock is gone
            self.chan.recv_exit_status()
            self.chan.close()
