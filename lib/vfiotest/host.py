"""One object over a target machine: run a command, read and write files, with timeouts.

`Host` is what the rest of the library asks of a target (a Protocol: the type in every
signature that takes a host). Two layers implement it: a `Transport` runs a command on the
target with a timeout (and carries the file operations and locks there): `LocalTransport`
here, `SshTransport` in vfiotest.sshhost; `TransportHost` is the one file-operations layer
over a transport that every host shares: `LocalHost`, `SshHost` (vfiotest.sshhost) and
`SimulatedHost` (vfiotest.testing.simsysfs). `LocalHost` is standard-library only (it runs inside the Kata
guest, in the hook). Every path handed to a Host is the path on the target
("/sys/bus/pci/..."); `sysroot` is prepended by hosts whose sysfs lives elsewhere.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Union

from .errors import CommandTimeout, TargetError

if TYPE_CHECKING:
    from typing import Self

DEFAULT_TIMEOUT = 30.0

Command = Union[str, Sequence[object]]
Input = Union[str, bytes, None]


class CommandResult:
    """What a command returned: exit code, stdout and stderr as text."""

    def __init__(self, command: str, rc: int, stdout: str, stderr: str, host: str = "?") -> None:
        self.command, self.rc, self.stdout, self.stderr, self.host = command, rc, stdout, stderr, host

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self, what: str | None = None) -> CommandResult:
        if self.rc != 0:
            tail = (self.stderr or self.stdout).strip().splitlines()[-5:]
            raise TargetError(
                f"{what or self.command!r} failed on {self.host} (exit {self.rc}): " + " | ".join(tail),
                hint="read the command's output above; run it by hand on the target to see more",
            )
        return self

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CommandResult(rc={self.rc}, command={self.command!r})"


def command_text(cmd: Command) -> str:
    """A command as shell text: lists are quoted word by word, strings pass as they are."""
    return cmd if isinstance(cmd, str) else shlex.join(str(c) for c in cmd)


# The file operations, one implementation: LocalTransport runs `file_op` in this process;
# a remote transport sends FILE_OP_SCRIPT (python3 -c, or the SSH agent), which answers one
# JSON line, errno preserved. Writes are one os.write() on an unbuffered fd, as sysfs
# attributes expect. (Standard library only; the import line is read by kata.initrd.)
FILE_OP_CODE = r"""
import json, os, sys


def file_op(op, path, extra, data):
    if op == "read":
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    if op == "write":
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return None
    if op == "atomic":
        # directories the harness makes are not writable by others, whatever the umask: a
        # journal is replayed by root, so nobody else may put one there
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = path + ".tmp.%d" % os.getpid()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, int(extra[0], 8))
        try:
            os.fchmod(fd, int(extra[0], 8))   # the mode asked for, not what a umask or a stale file left
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return None
    if op == "readlink":
        return os.readlink(path) if os.path.islink(path) else None
    if op == "exists":
        return os.path.exists(path)
    if op == "listdir":
        return sorted(os.listdir(path)) if os.path.isdir(path) else None
    if op == "remove":
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        return None
    raise SystemExit("unknown op " + op)


def file_op_main():
    op, path = sys.argv[1], sys.argv[2]
    data = sys.stdin.buffer.read() if op in ("write", "atomic") else None
    try:
        out = file_op(op, path, sys.argv[3:], data)
        print(json.dumps({"ok": True, "out": out}))
    except OSError as e:
        print(json.dumps({"ok": False, "errno": e.errno, "strerror": e.strerror}))
"""
FILE_OP_SCRIPT = FILE_OP_CODE + '\nif __name__ == "__main__":\n    file_op_main()\n'
_file_op_ns: dict[str, Any] = {"__name__": "vfiotest.host.file_op"}
exec(compile(FILE_OP_CODE, "<vfiotest.host.FILE_OP_CODE>", "exec"), _file_op_ns)  # noqa: S102  (our own code, kept as text for the target)
file_op: Callable[[str, str, Sequence[str], bytes | None], Any] = _file_op_ns["file_op"]


def file_op_reply(op: str, path: str, res: CommandResult, where: str) -> Any:
    """What FILE_OP_SCRIPT answered: its value, or the target's OSError raised here."""
    try:
        reply = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TargetError(
            f"file operation {op} {path} on {where} gave no answer (exit {res.rc}): {res.stderr.strip()[-300:]}",
            hint="check that python3 is installed on the target",
        ) from None
    if not reply["ok"]:
        raise OSError(reply["errno"], reply["strerror"], path)
    return reply["out"]


class Lock(Protocol):
    """A held lock (filelock.FileLock, sshhost's remote flock)."""

    @property
    def is_locked(self) -> bool: ...

    def release(self) -> Any: ...


# -- transports: how a command (and a file operation) reaches the target -------------
class Transport:
    """Runs commands on one target, each with a timeout. Subclasses provide `exec` and
    `hold_lock`; `python` and `file_op` default to `python3 -c` through `exec`."""

    name = "host"

    def exec(self, command: str, *, timeout: float, input: Input = None) -> CommandResult:
        raise NotImplementedError

    def python(self, script: str, args: Sequence[str], *, timeout: float, input: Input = None,
               what: str = "python3 script") -> CommandResult:
        """Run a Python script on the target (one round trip)."""
        return self.exec(command_text(["python3", "-c", script, *args]), timeout=timeout, input=input)

    def file_op(self, op: str, path: str, extra: Sequence[str] = (), data: bytes | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
        """One file operation (see FILE_OP_CODE); raises OSError with the target's errno."""
        res = self.python(FILE_OP_SCRIPT, [op, path, *map(str, extra)], timeout=timeout, input=data,
                          what=f"{op} {path}")
        return file_op_reply(op, path, res, self.name)

    def hold_lock(self, path: str, blocking: bool = False, timeout: float = 10.0) -> Lock | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class LocalTransport(Transport):
    """This machine: commands through /bin/sh, file operations in this process."""

    def __init__(self, name: str = "local") -> None:
        self.name = name

    def exec(self, command: str, *, timeout: float, input: Input = None) -> CommandResult:
        try:
            p = subprocess.run(["/bin/sh", "-c", command], input=input if input is None or isinstance(input, bytes) else input.encode(),
                               capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{command[:120]!r} did not finish in {timeout:.0f} s on {self.name}",
                                 hint="the target may be hung; look at dmesg on it") from None
        return CommandResult(command, p.returncode, p.stdout.decode("utf-8", "replace"),
                             p.stderr.decode("utf-8", "replace"), self.name)

    def file_op(self, op: str, path: str, extra: Sequence[str] = (), data: bytes | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
        """In this process; a write (a sysfs attribute can block in the kernel: an unbind whose
        driver waits for its device) runs in a thread and is given up after `timeout`."""
        if op not in ("write", "atomic"):
            return file_op(op, path, [str(e) for e in extra], data)
        import threading

        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = file_op(op, path, [str(e) for e in extra], data)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        t = threading.Thread(target=run, name=f"write {path}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise CommandTimeout(f"writing {path} on {self.name} did not finish in {timeout:.0f} s",
                                 hint="the kernel may be stuck on that device; look at dmesg, and at "
                                      "`cat /proc/*/stack` of the writer", path=path)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def hold_lock(self, path: str, blocking: bool = False, timeout: float = 10.0) -> Lock | None:
        import filelock  # not in the guest: the hook takes no locks

        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        lock = filelock.FileLock(path, mode=0o600)
        try:
            lock.acquire(timeout=timeout if blocking else 0)
        except filelock.Timeout:
            return None
        return lock


# -- hosts: the file operations, shared, over a transport -------------------------------
class Host(Protocol):
    """A target: what callers use of one (every host of this module and vfiotest.sshhost has it)."""

    #: prefix for sysfs and /dev paths ("" but on simulated hosts)
    sysroot: str
    #: True when the target is the machine this process runs on
    is_local: bool

    @property
    def name(self) -> str: ...

    def run(self, cmd: Command, *, timeout: float = DEFAULT_TIMEOUT, input: Input = None, check: bool = False,
            what: str | None = None) -> CommandResult: ...

    def python(self, script: str, args: Iterable[object] = (), *, timeout: float = DEFAULT_TIMEOUT,
               input: Input = None, check: bool = False, what: str | None = None) -> CommandResult: ...

    def read_text(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> str: ...

    def write_text(self, path: str, data: str, timeout: float = DEFAULT_TIMEOUT) -> None: ...

    def write_atomic(self, path: str, data: str, mode: int = 0o600, timeout: float = DEFAULT_TIMEOUT) -> None: ...

    def readlink(self, path: str) -> str | None: ...

    def exists(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str] | None: ...

    def remove(self, path: str) -> None: ...

    def hold_lock(self, path: str, blocking: bool = False, timeout: float = 10.0) -> Lock | None: ...

    def close(self) -> None: ...


class TransportHost:
    """One target: commands and file operations over `self.transport` (a `Host`).

    The file operations (read_text ... remove) are the same for every host: each is one
    `transport.file_op` on `sysroot + path`. Subclasses set `self.transport`; they may
    override `_exec` (every command goes through it) and `_python`."""

    sysroot = ""  # prefix for sysfs and /dev paths (simulated hosts only)
    #: True when the target is the machine this process runs on
    is_local = False
    transport: Transport

    @property
    def name(self) -> str:
        return self.transport.name

    @name.setter
    def name(self, value: str) -> None:
        self.transport.name = value

    # -- commands ---------------------------------------------------------
    def run(self, cmd: Command, *, timeout: float = DEFAULT_TIMEOUT, input: Input = None, check: bool = False,
            what: str | None = None) -> CommandResult:
        """Run `cmd` (list of words, quoted for the target's shell, or shell text)."""
        res = self._exec(command_text(cmd), timeout=timeout, input=input)
        return res.check(what) if check else res

    def python(self, script: str, args: Iterable[object] = (), *, timeout: float = DEFAULT_TIMEOUT,
               input: Input = None, check: bool = False, what: str | None = None) -> CommandResult:
        """Run a Python script on the target (one round trip)."""
        what = what or "python3 script"
        res = self._python(script, [str(a) for a in args], timeout=timeout, input=input, what=what)
        return res.check(what) if check else res

    def _exec(self, command: str, *, timeout: float, input: Input) -> CommandResult:
        return self.transport.exec(command, timeout=timeout, input=input)

    def _python(self, script: str, args: list[str], *, timeout: float, input: Input, what: str) -> CommandResult:
        """`python3 -c` through `_exec`; hosts whose transport keeps an interpreter override this."""
        return self._exec(command_text(["python3", "-c", script, *args]), timeout=timeout, input=input)

    # -- files: raise OSError with the kernel's errno, like local calls do --
    def _fileop(self, op: str, path: str, *extra: str, data: bytes | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
        return self.transport.file_op(op, self.sysroot + path, extra, data, timeout)

    def read_text(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        return self._fileop("read", path, timeout=timeout)

    def write_text(self, path: str, data: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """One write(2) of `data` to an existing file (a sysfs attribute)."""
        self._fileop("write", path, data=data.encode(), timeout=timeout)

    def write_atomic(self, path: str, data: str, mode: int = 0o600, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Replace a regular file atomically (temp file, fsync, rename)."""
        self._fileop("atomic", path, "%o" % mode, data=data.encode(), timeout=timeout)

    def readlink(self, path: str) -> str | None:
        return self._fileop("readlink", path)

    def exists(self, path: str) -> bool:
        return self._fileop("exists", path)

    def listdir(self, path: str) -> list[str] | None:
        return self._fileop("listdir", path)

    def remove(self, path: str) -> None:
        self._fileop("remove", path)

    # -- locks -------------------------------------------------------------
    def hold_lock(self, path: str, blocking: bool = False, timeout: float = 10.0) -> Lock | None:
        """Take an exclusive lock file on the target; returns a held lock
        (`.release()`), or None when `blocking` is False and someone else holds it.
        The lock dies with the process that holds it."""
        return self.transport.hold_lock(self.sysroot + path, blocking=blocking, timeout=timeout)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class LocalHost(TransportHost):
    """The machine this process runs on."""

    is_local = True

    def __init__(self, name: str = "local") -> None:
        self.transport = LocalTransport(name)


# -- waiting ---------------------------------------------------------------------------
class WaitTimeout(CommandTimeout):
    """A condition did not come true in time; the message says which."""


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition", *,
             hint: str = "", fail: bool = True) -> T:
    """Poll `predicate` every `interval` s until it returns a true value, and return that.
    It is called at least once, and once more at the deadline. When `timeout` passes:
    raise WaitTimeout naming `what` (with `hint`), or with fail=False return the last
    (false) value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            if not fail:
                return value
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}",
                              hint=hint or "the target may be slow or stuck; look at its console or dmesg")
        time.sleep(min(interval, left))


__all__ = ["FILE_OP_SCRIPT", "CommandResult", "Host", "LocalHost", "LocalTransport", "Transport", "WaitTimeout",
           "command_text", "file_op", "wait_for"]
