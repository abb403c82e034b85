"""One object over a target machine: run a command, read and write files, with timeouts.

`LocalHost` is standard-library only (it runs inside the Kata guest, in the hook).
`SshHost` (vfiotest.sshhost) and `SimulatedHost` (vfiotest.simsysfs) implement the
same interface. Every path handed to a Host is the path on the target
("/sys/bus/pci/..."); `sysroot` is prepended by hosts whose sysfs lives elsewhere.
"""

import json
import os
import shlex
import subprocess
import time

from .errors import CommandTimeout, TargetError

DEFAULT_TIMEOUT = 30.0


class CommandResult:
    """What a command returned: exit code, stdout and stderr as text."""

    def __init__(self, command, rc, stdout, stderr, host="?"):
        self.command, self.rc, self.stdout, self.stderr, self.host = command, rc, stdout, stderr, host

    @property
    def ok(self):
        return self.rc == 0

    def check(self, what=None):
        if self.rc != 0:
            tail = (self.stderr or self.stdout).strip().splitlines()[-5:]
            raise TargetError(
                f"{what or self.command!r} failed on {self.host} (exit {self.rc}): " + " | ".join(tail),
                hint="read the command's output above; run it by hand on the target to see more",
            )
        return self

    def json(self):
        return json.loads(self.stdout)

    def __repr__(self):
        return f"CommandResult(rc={self.rc}, command={self.command!r})"


def command_text(cmd):
    """A command as shell text: lists are quoted word by word, strings pass as they are."""
    return cmd if isinstance(cmd, str) else shlex.join(str(c) for c in cmd)


# Runs on the target for file operations: one round trip each, errno preserved.
# Writes are one os.write() on an unbuffered fd, as sysfs attributes expect.
FILE_OP_SCRIPT = r"""
import json, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        with open(path, "rb") as f:
            out = f.read().decode("utf-8", "replace")
    elif op == "write":
        data = sys.stdin.buffer.read()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        out = None
    elif op == "atomic":
        data = sys.stdin.buffer.read()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.%d" % os.getpid()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, int(sys.argv[3], 8))
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        out = None
    elif op == "readlink":
        out = os.readlink(path) if os.path.islink(path) else None
    elif op == "exists":
        out = os.path.exists(path)
    elif op == "listdir":
        out = sorted(os.listdir(path)) if os.path.isdir(path) else None
    elif op == "remove":
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        out = None
    else:
        raise SystemExit("unknown op " + op)
    print(json.dumps({"ok": True, "out": out}))
except OSError as e:
    print(json.dumps({"ok": False, "errno": e.errno, "strerror": e.strerror}))
"""


class Host:
    """The interface every target implements. Subclasses provide `_exec`."""

    name = "host"
    sysroot = ""  # prefix for sysfs and /dev paths (simulated hosts only)
    #: True when the target is the machine this process runs on
    is_local = False

    # -- commands ---------------------------------------------------------
    def run(self, cmd, *, timeout=DEFAULT_TIMEOUT, input=None, check=False, what=None):
        """Run `cmd` (list of words, quoted for the target's shell, or shell text)."""
        res = self._exec(command_text(cmd), timeout=timeout, input=input)
        return res.check(what) if check else res

    def python(self, script, args=(), *, timeout=DEFAULT_TIMEOUT, input=None, check=False, what=None):
        """Run a Python script on the target with `python3 -c` (one round trip)."""
        return self.run(["python3", "-c", script, *map(str, args)], timeout=timeout, input=input,
                        check=check, what=what or "python3 script")

    def _exec(self, command, *, timeout, input):
        raise NotImplementedError

    # -- files: raise OSError with the kernel's errno, like local calls do --
    def _fileop(self, op, path, *extra, data=None, timeout=DEFAULT_TIMEOUT):
        res = self.python(FILE_OP_SCRIPT, [op, path, *extra], input=data, timeout=timeout)
        return self._fileop_reply(op, path, res)

    def _fileop_reply(self, op, path, res):
        try:
            reply = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TargetError(
                f"file operation {op} {path} on {self.name} gave no answer (exit {res.rc}): {res.stderr.strip()[-300:]}",
                hint="check that python3 is installed on the target",
            ) from None
        if not reply["ok"]:
            raise OSError(reply["errno"], reply["strerror"], path)
        return reply["out"]

    def read_text(self, path, timeout=DEFAULT_TIMEOUT):
        return self._fileop("read", path, timeout=timeout)

    def write_text(self, path, data, timeout=DEFAULT_TIMEOUT):
        """One write(2) of `data` to an existing file (a sysfs attribute)."""
        self._fileop("write", path, data=data.encode(), timeout=timeout)

    def write_atomic(self, path, data, mode=0o600, timeout=DEFAULT_TIMEOUT):
        """Replace a regular file atomically (temp file, fsync, rename)."""
        self._fileop("atomic", path, "%o" % mode, data=data.encode(), timeout=timeout)

    def readlink(self, path):
        return self._fileop("readlink", path)

    def exists(self, path):
        return self._fileop("exists", path)

    def listdir(self, path):
        return self._fileop("listdir", path)

    def remove(self, path):
        self._fileop("remove", path)

    # -- locks -------------------------------------------------------------
    def hold_lock(self, path, blocking=False, timeout=10.0):
        """Take an exclusive lock file on the target; returns a held lock
        (`.release()`), or None when `blocking` is False and someone else holds it.
        The lock dies with the process that holds it."""
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class LocalHost(Host):
    """The machine this process runs on."""

    is_local = True

    def __init__(self, name="local"):
        self.name = name

    def _exec(self, command, *, timeout, input):
        try:
            p = subprocess.run(["/bin/sh", "-c", command], input=input if input is None or isinstance(input, bytes) else input.encode(),
                               capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{command[:120]!r} did not finish in {timeout:.0f} s on {self.name}",
                                 hint="the target may be hung; look at dmesg on it") from None
        return CommandResult(command, p.returncode, p.stdout.decode("utf-8", "replace"),
                             p.stderr.decode("utf-8", "replace"), self.name)

    def read_text(self, path, timeout=DEFAULT_TIMEOUT):
        with open(self.sysroot + path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def write_text(self, path, data, timeout=DEFAULT_TIMEOUT):
        fd = os.open(self.sysroot + path, os.O_WRONLY)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def write_atomic(self, path, data, mode=0o600, timeout=DEFAULT_TIMEOUT):
        path = self.sysroot + path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def readlink(self, path):
        p = self.sysroot + path
        return os.readlink(p) if os.path.islink(p) else None

    def exists(self, path):
        return os.path.exists(self.sysroot + path)

    def listdir(self, path):
        p = self.sysroot + path
        return sorted(os.listdir(p)) if os.path.isdir(p) else None

    def remove(self, path):
        try:
            os.remove(self.sysroot + path)
        except FileNotFoundError:
            pass

    def hold_lock(self, path, blocking=False, timeout=10.0):
        import filelock  # not in the guest: the hook takes no locks

        path = self.sysroot + path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = filelock.FileLock(path)
        try:
            lock.acquire(timeout=timeout if blocking else 0)
        except filelock.Timeout:
            return None
        return lock


def wait_for(predicate, timeout, interval=0.1, what="condition"):
    """Poll `predicate` until it returns a true value or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


__all__ = ["Host", "LocalHost", "CommandResult", "command_text", "wait_for"]
