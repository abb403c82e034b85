"""The emulated SR-IOV runner: one QEMU VM per state directory, reached over SSH.

Lifecycle: `up()` boots (or reuses) the VM, `host()` gives an SshHost pinned to
its key, `release()` lets go (stopping it when this process was its last user
and nobody asked to keep it), `down()` stops it unconditionally.

A runner is *kept* when `runner up` started it (persistent) or while any process
that booted or used it is alive. A runner whose users are all gone (a killed
session) is *orphaned*: `is_up()` says False, and the next `up()` or `down()`
stops it. QEMU's own PID is in the pidfile QEMU writes itself; every QEMU whose
command line names that pidfile belongs to this runner.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import filelock
import paramiko

from .. import constants
from ..constants import STATE_ENV  # noqa: F401  (re-exported)
from ..errors import ProvisionError, TargetError
from ..host import wait_for
from ..pci import read_inventory
from ..sshhost import SshHost, wait_for_ssh_banner
from . import assets, bootcfg, qemu

BOOT_TIMEOUT_ENV = "VFIOTEST_RUNNER_BOOT_TIMEOUT"
DEFAULT_BOOT_TIMEOUT = 240.0
CONSOLE_TAIL = 40
#: how long a running runner may take to show its SSH banner before it counts as not answering
BANNER_WAIT = 30.0
NVME_IMAGE_BYTES = 64 << 20


def _proc_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks (tells a live process from a reused PID), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(ident: tuple[int, int | None]) -> bool:
    pid, start = ident
    return _proc_start(pid) == start


def _me() -> tuple[int, int | None]:
    return (os.getpid(), _proc_start(os.getpid()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """The runner VM that lives in `state_dir`."""

    def __init__(self, state_dir: str, *, memory_mb: int | None = None, cpus: int | None = None,
                 boot_timeout: float | None = None, qemu_path: str | None = None, wire: bool | None = None,
                 image_store: bool | None = None) -> None:
        self.state_dir = state_dir
        #: boot with the test image in a read-only podman image store (podman.image.ensure_store):
        #: its podman storage is a tmpfs, and an import at every boot took about 90 s under TCG
        self.image_store = image_store if image_store is not None else bootcfg.image_store_wanted()
        #: the igb PF's wire ends in a NIC of the runner, and its RAM stays below 4 GiB, so that its
        #: VFs pass traffic (qemu.WIRE_ENV; docs/nic-traffic.md)
        self.wire = wire if wire is not None else os.environ.get(qemu.WIRE_ENV, "1").lower() not in ("0", "false", "no", "off")
        if memory_mb is None:
            memory_mb = qemu.VF_BARS_BELOW_4G_MAX_MB if self.wire else qemu.DEFAULT_MEMORY_MB
        # One vCPU by default: with two, the guest kernel under TCG was seen losing CPU 1's timer
        # (RCU stalls, "timer wakeup didn't happen", SSH dead) when four SSH sessions started at once.
        self.memory_mb, self.cpus = memory_mb, int(cpus or os.environ.get("VFIOTEST_RUNNER_CPUS") or 1)
        self.boot_timeout = float(boot_timeout or os.environ.get(BOOT_TIMEOUT_ENV) or DEFAULT_BOOT_TIMEOUT)
        self._qemu_path = qemu_path
        #: whether the last up() booted it (False: it found one up and reused it)
        self.booted_now = False
        self.ssh_dir = os.path.join(state_dir, "ssh")
        self.pidfile = os.path.join(state_dir, "qemu.pid")
        self.state_file = os.path.join(state_dir, "state.json")
        self.console_log = os.path.join(state_dir, "console.log")
        self.known_hosts = os.path.join(state_dir, "known_hosts")
        self.users_dir = os.path.join(state_dir, "users")
        self.nvme_image = os.path.join(state_dir, "nvme0.img")
        # the runner's boot configuration, kept across reboots: its /etc/default (bootcfg)
        self.etc_default_dir = os.path.join(state_dir, "etc-default")
        self.grub_path = os.path.join(self.etc_default_dir, bootcfg.GRUB_FILE)
        self.boot_file = os.path.join(state_dir, "boot.json")
        self.supervisor_pidfile = os.path.join(state_dir, "supervisor.pid")
        self.supervisor_log = os.path.join(state_dir, "supervisor.log")
        # QEMU's own words: its standard error while it starts, then its -D log, where the daemon's
        # standard error goes (qemu.keep_stderr_args): why it exited, when it says why
        self.qemu_stderr = os.path.join(state_dir, "qemu.stderr")
        self.qemu_log = os.path.join(state_dir, "qemu.log")
        #: the runner's /etc/containers/storage.conf when it boots with the image store
        self.storage_conf = os.path.join(state_dir, "storage.conf")

    @classmethod
    def default(cls, **kw: Any) -> Runner:
        return cls(constants.state_dir("runner"), **kw)

    def __repr__(self) -> str:
        return f"<Runner {self.state_dir}>"

    # -- facts -------------------------------------------------------------------
    @property
    def qemu(self) -> str:
        return qemu.find_qemu(self._qemu_path)

    @property
    def qemu_has_igb(self) -> bool:
        """Whether this QEMU can emulate the igb PF (8.0 or later)."""
        try:
            return qemu.has_igb(self.qemu)
        except ProvisionError:
            return False

    def _lock(self, timeout: float | None = None) -> filelock.FileLock:
        os.makedirs(self.state_dir, exist_ok=True)
        return filelock.FileLock(os.path.join(self.state_dir, "runner.lock"),
                                 timeout=timeout if timeout is not None else self.boot_timeout + 900)

    def _read_state(self) -> dict[str, Any]:
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _write_state(self, st: dict[str, Any]) -> None:
        tmp = self.state_file + f".tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(st, f, indent=2, sort_keys=True)
        os.replace(tmp, self.state_file)

    def _set_state(self, **changes: Any) -> None:
        """Change some fields of state.json (nothing when the runner was stopped: no state)."""
        st = self._read_state()
        if not st:
            return
        st.update(changes)
        self._write_state(st)

    def supervisor_pid(self) -> int | None:
        """PID of the live supervisor of this runner (vfiotest.runner.supervisor), or None."""
        try:
            with open(self.supervisor_pidfile) as f:
                pid, start = map(int, f.read().split())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if _proc_start(pid) != start or not _is_running(pid) or self.state_dir.encode() not in args:
            return None
        return pid

    def _rebooting(self, st: dict) -> bool:
        """A reboot is under way: asked (`reboot()`) or seen by the supervisor, which is alive."""
        return bool(st.get("rebooting")) and self.supervisor_pid() is not None

    # -- the boot configuration --------------------------------------------------------
    def ensure_boot_config(self) -> str:
        """The runner's GRUB defaults (made on first use with bootcfg.DEFAULT_KERNEL_ARGS); returns its text."""
        os.makedirs(self.etc_default_dir, mode=0o755, exist_ok=True)
        if not os.path.exists(self.grub_path):
            tmp = self.grub_path + f".tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(bootcfg.default_grub())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.grub_path)
        with open(self.grub_path) as f:
            return f.read()

    def edit_boot_config(self, without: Iterable[str] = (), with_: Iterable[str] = ()) -> list[str]:
        """Change GRUB_CMDLINE_LINUX of the runner's GRUB defaults (bootcfg.edit); returns the
        arguments it then adds. Takes effect at the next boot (`up`) or `reboot()`."""
        text = bootcfg.edit(self.ensure_boot_config(), without=without, with_=with_)
        tmp = self.grub_path + f".tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.grub_path)
        return bootcfg.grub_args(text, self.grub_path)

    def boot_args(self) -> list[str]:
        """The kernel arguments the runner's GRUB defaults add (what the next boot gets after its own)."""
        return bootcfg.grub_args(self.ensure_boot_config(), self.grub_path)

    def qemu_pids(self) -> list[int]:
        """PIDs of the QEMU processes of this runner (normally one): found by their pidfile argument."""
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                exe = os.path.basename(os.readlink(f"/proc/{name}/exe"))
                if not exe.startswith("qemu-system"):
                    continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if self.pidfile.encode() in args:
                pids.append(int(name))
        return sorted(pids)

    def _users(self) -> list[tuple[int, int]]:
        """Live users (pid, start), pruning dead ones."""
        live: list[tuple[int, int]] = []
        try:
            names = os.listdir(self.users_dir)
        except FileNotFoundError:
            return live
        for n in names:
            try:
                pid, start = map(int, n.split("-"))
            except ValueError:
                continue
            if _alive((pid, start)):
                live.append((pid, start))
            else:
                try:
                    os.remove(os.path.join(self.users_dir, n))
                except OSError:
                    pass
        return sorted(live)

    def _add_user(self, ident: tuple[int, int | None] | None = None) -> None:
        pid, start = ident or _me()
        os.makedirs(self.users_dir, exist_ok=True)
        open(os.path.join(self.users_dir, f"{pid}-{start}"), "w").close()

    def _drop_user(self, ident: tuple[int, int | None] | None = None) -> None:
        pid, start = ident or _me()
        try:
            os.remove(os.path.join(self.users_dir, f"{pid}-{start}"))
        except FileNotFoundError:
            pass

    def _orphaned(self, st: dict[str, Any]) -> bool:
        return not st.get("persistent") and not self._users()

    def is_up(self) -> bool:
        """True when this runner's QEMU runs, is kept by someone, and answers on SSH."""
        if not self.qemu_pids():
            return False
        st = self._read_state()
        if not st.get("port") or self._orphaned(st):
            return False
        # under load (TCG guests on a busy machine) the banner can take a while: a runner that
        # others use is not to be taken for a dead one after a few seconds
        return wait_for_ssh_banner("127.0.0.1", st["port"], timeout=BANNER_WAIT)

    @property
    def port(self) -> int | None:
        return self._read_state().get("port")

    def pfs(self) -> dict[str, str]:
        """kind -> PCI address of the SR-IOV PFs in the VM, e.g. {"igb": "0000:01:00.0", "nvme": "0000:02:00.0"}."""
        return dict(self._read_state().get("pfs") or {})

    def status(self) -> dict[str, Any]:
        st = self._read_state()
        pids = self.qemu_pids()
        up = bool(pids) and bool(st.get("port"))
        info = {
            "state_dir": self.state_dir,
            "running": bool(pids),
            "pid": pids[0] if pids else None,
            "ssh_port": st.get("port") if up else None,
            "uptime_s": round(time.time() - st["started"], 1) if up and st.get("started") else None,
            "console_log": self.console_log,
            "qemu_log": self.qemu_log,
            # what QEMU said last (why a runner that is down exited, when it said why)
            "qemu_said": self.qemu_said(5),
            "pfs": st.get("pfs") if up else None,
            "igb": st.get("igb") if up else self.qemu_has_igb,
            "persistent": bool(st.get("persistent")) if up else False,
            "users": [p for p, _ in self._users()] if up else [],
            "kernel": st.get("kernel") if up else None,
            "cmdline": st.get("cmdline") if up else None,
            "boots": st.get("boots") if up else None,
            "accel": st.get("accel") if up else None,
            "accel_why": st.get("accel_why") if up else None,
            "image_store": st.get("image_store") if up else None,
            "rebooting": bool(st.get("rebooting")) if up else False,
            "supervisor": self.supervisor_pid(),
            "boot_config": self.grub_path,
            "boot_error": st.get("boot_error"),
            "ssh_ready": False,
        }
        if up:
            info["orphaned"] = self._orphaned(st)
            info["ssh_ready"] = wait_for_ssh_banner("127.0.0.1", st["port"], timeout=2)
            info["rss_bytes"] = qemu_rss(pids[0])
        return info

    # -- the SSH side -----------------------------------------------------------------
    def host(self, register: bool = True) -> SshHost:
        """An SshHost for the VM, its host key pinned in this runner's known_hosts.
        Registers this process as a user of the runner (see `release`)."""
        st = self._read_state()
        if not st.get("port") or not self.qemu_pids():
            raise TargetError(f"the runner in {self.state_dir} is not running",
                              hint="start it: `vfiotest runner up` (or let the test session boot it)")
        if register:
            self._add_user()
        return SshHost("127.0.0.1", st["port"], "root",
                       key_filename=os.path.join(self.ssh_dir, "client_ed25519_key"),
                       known_hosts=self.known_hosts, name="runner")

    def ssh_argv(self, command: Sequence[str] = ()) -> list[str]:
        """argv for the system ssh client into the VM (for `vfiotest runner ssh`)."""
        st = self._read_state()
        if not st.get("port") or not self.qemu_pids():
            raise TargetError("the runner is not running", hint="start it: `vfiotest runner up`")
        return ["ssh", "-p", str(st["port"]), "-i", os.path.join(self.ssh_dir, "client_ed25519_key"),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "root@127.0.0.1", *command]

    # -- lifecycle ---------------------------------------------------------------------
    def up(self, progress: Callable[[str], None] | None = None, persistent: bool = False,
           without: Iterable[str] = (), with_: Iterable[str] = ()) -> Runner:
        """Boot the runner, or reuse a running one that someone keeps. Returns self.

        `persistent` (the CLI's `runner up`) keeps it up until `down()`. `without`/`with_`
        change GRUB_CMDLINE_LINUX of its GRUB defaults before it boots (bootcfg.edit); they
        are refused while a runner is up (edit, then `reboot()`).
        Safe to call from several processes at once (a file lock serialises them); a runner in
        the middle of a reboot is waited for, not stopped.
        """
        say = progress or (lambda text: None)
        without, with_ = list(without), list(with_)
        deadline = time.monotonic() + self.boot_timeout
        waited = False
        while True:
            with self._lock():
                st = self._read_state()
                pids = self.qemu_pids()
                answers = bool(pids) and bool(st.get("port")) and not self._orphaned(st) \
                    and wait_for_ssh_banner("127.0.0.1", st["port"], timeout=BANNER_WAIT)
                if answers or (self._rebooting(st) and not self._orphaned(st) and time.monotonic() < deadline):
                    if without or with_:
                        raise TargetError("the runner is up: its kernel arguments change at its next boot",
                                          hint=f"edit GRUB_CMDLINE_LINUX in {self.grub_path} and run "
                                               "`vfiotest runner reboot`, or `vfiotest runner down` first")
                if answers:
                    if persistent and not st.get("persistent"):
                        st["persistent"] = True
                        self._write_state(st)
                    self._add_user()
                    say(f"runner: reusing the runner already up (pid {pids[0]}, ssh port {st['port']})")
                    self.booted_now = False
                    return self
                if not (self._rebooting(st) and not self._orphaned(st) and time.monotonic() < deadline):
                    if pids or self.supervisor_pid():
                        why = "whose users are all gone" if self._orphaned(st) else "that does not answer on SSH"
                        say(f"runner: stopping a runner {why} (QEMU pid {', '.join(map(str, pids)) or 'none'})")
                        self._stop(pids)
                    if without or with_:
                        args = self.edit_boot_config(without=without, with_=with_)
                        say(f"runner: GRUB_CMDLINE_LINUX in {self.grub_path} changed: boots with {' '.join(args)}")
                    self._boot(say, persistent)
                    self.booted_now = True
                    return self
            # rebooting: wait outside the lock (the supervisor takes it to start QEMU again)
            if not waited:
                say("runner: it is rebooting; waiting for it")
                waited = True
            if st.get("port"):
                wait_for_ssh_banner("127.0.0.1", st["port"], timeout=3)
            else:
                time.sleep(1)

    def reboot(self, progress: Callable[[str], None] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Reboot the runner from inside (`reboot` in the VM) and wait until it answers on SSH
        again, booted with its GRUB defaults as they are now. Returns {"boot_id", "cmdline", "seconds"}."""
        say = progress or (lambda text: None)
        timeout = timeout or self.boot_timeout
        with self._lock():
            st = self._read_state()
            pids = self.qemu_pids()
            if not pids or not st.get("port"):
                raise TargetError(f"the runner in {self.state_dir} is not running: nothing to reboot",
                                  hint="start it: `vfiotest runner up`")
            if self.supervisor_pid() is None:
                raise ProvisionError("the runner has no supervisor to boot it again after a reboot "
                                     "(booted by an older vfiotest?)",
                                     hint="`vfiotest runner down` then `vfiotest runner up`")
            self.boot_args()   # a GRUB file the boot would refuse is refused now, before rebooting
            st["rebooting"] = True
            self._write_state(st)
        port = st["port"]
        t0 = time.monotonic()
        h = self.host(register=False)
        try:
            old = h.read_text("/proc/sys/kernel/random/boot_id").strip()
            say(f"runner: rebooting (boot {old[:8]}), GRUB_CMDLINE_LINUX from {self.grub_path}")
            h.run(["sh", "-c", "(sleep 1; reboot) >/dev/null 2>&1 </dev/null &"], timeout=30, check=True,
                  what="asking the runner to reboot")
        finally:
            h.close()
        deadline = time.monotonic() + timeout
        wait_for(lambda: not any(_is_running(p) for p in pids) or time.monotonic() > deadline, timeout, 0.2,
                 "the runner's QEMU to exit on the guest's reboot", fail=False)
        if any(_is_running(p) for p in pids):
            raise TargetError(f"the runner did not go down within {timeout:.0f} s after `reboot`",
                              hint=f"read {self.console_log}; `vfiotest runner down` and `up`")
        while time.monotonic() < deadline:
            new = self.qemu_pids()
            if new and not set(new) & set(pids):
                break
            if self.supervisor_pid() is None and not self.qemu_pids():
                break
            time.sleep(0.2)
        if not self.qemu_pids():
            err = self._read_state().get("boot_error") or "see the supervisor log"
            raise ProvisionError(f"the runner was not booted again after its reboot: {err}; last console lines:\n  "
                                 + "\n  ".join(self.console_tail(10)),
                                 hint=f"read {self.supervisor_log}; fix {self.grub_path}, then `vfiotest runner up`")
        self._wait_ready(port, say)
        h = self.host(register=False)
        try:
            new_id = h.read_text("/proc/sys/kernel/random/boot_id").strip()
            cmdline = h.read_text("/proc/cmdline").strip()
        finally:
            h.close()
        if new_id == old:
            raise TargetError("the runner answers with the boot id it had before the reboot",
                              hint=f"read {self.console_log}")
        self._set_state(rebooting=False)
        took = time.monotonic() - t0
        say(f"runner: back in {took:.1f} s (boot {new_id[:8]})")
        return {"boot_id": new_id, "cmdline": cmdline, "seconds": round(took, 1)}

    def keep(self) -> None:
        """Keep the runner up after this process ends (as `runner up` does), until `down()`."""
        with self._lock():
            st = self._read_state()
            if not st or not self.qemu_pids():
                raise TargetError("the runner is not running: nothing to keep", hint="`vfiotest runner up`")
            st["persistent"] = True
            self._write_state(st)

    def release(self) -> None:
        """This process no longer uses the runner: stop it if nobody else does and it is not persistent."""
        with self._lock():
            self._drop_user()
            st = self._read_state()
            if st and self._orphaned(st):
                self._stop(self.qemu_pids())

    def down(self, progress: Callable[[str], None] | None = None) -> bool:
        """Stop the runner (and any QEMU of this state directory); nothing of it is left running."""
        say = progress or (lambda text: None)
        with self._lock():
            pids = self.qemu_pids()
            if pids:
                say(f"runner: stopping QEMU pid {', '.join(map(str, pids))}")
            self._stop(pids)
            return bool(pids)

    def _stop(self, pids: Iterable[int]) -> None:
        # the supervisor first, so that it does not start QEMU again
        sup = self.supervisor_pid()
        if sup is not None:
            try:
                os.kill(sup, signal.SIGTERM)
            except ProcessLookupError:
                pass
            wait_for(lambda: not _is_running(sup), 10, 0.05, "the runner's supervisor to exit", fail=False)
            if _is_running(sup):
                os.kill(sup, signal.SIGKILL)
            pids = sorted(set(pids) | set(self.qemu_pids()))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        wait_for(lambda: not any(_proc_start(p) is not None and _is_running(p) for p in pids), 10, 0.05,
                 "QEMU to exit after SIGTERM", fail=False)
        for pid in pids:
            if _proc_start(pid) is not None and _is_running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_for(lambda: not any(_is_running(p) for p in pids), 10, 0.05, "QEMU to exit after SIGKILL", fail=False)
        left = [p for p in pids if _is_running(p)]
        if left:
            raise ProvisionError(f"QEMU pid {left} of the runner did not stop after SIGKILL",
                                 hint="look at it with `ps -o pid,stat,cmd -p PID`; it may be stuck in the kernel")
        for path in (self.pidfile, self.state_file, self.supervisor_pidfile):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        for n in os.listdir(self.users_dir) if os.path.isdir(self.users_dir) else ():
            try:
                os.remove(os.path.join(self.users_dir, n))
            except OSError:
                pass

    def qemu_said(self, n: int = 20) -> list[str]:
        """The last `n` lines QEMU wrote about this runner (its start's stderr, then its log)."""
        return qemu.words((self.qemu_stderr, self.qemu_log), n)

    def console_tail(self, n: int = CONSOLE_TAIL) -> list[str]:
        try:
            with open(self.console_log, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 256 * 1024))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []
        return lines[-n:]

    def _boot(self, say: Callable[[str], None], persistent: bool) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        qemu_path = self.qemu
        keys = assets.ensure_keys(self.ssh_dir)
        kernel = assets.ensure_kernel(progress=say)
        initrd = assets.ensure_initramfs(kernel, progress=say)
        igb = qemu.has_igb(qemu_path)
        if not igb:
            v = ".".join(map(str, qemu.qemu_version(qemu_path)))
            say(f"runner: QEMU {v} has no igb device (needs 8.0 or later, bookworm-backports): "
                f"booting with the NVMe SR-IOV PF only")
        if igb and self.wire and self.memory_mb > qemu.VF_BARS_BELOW_4G_MAX_MB:
            say(f"runner: with {self.memory_mb} MiB (more than {qemu.VF_BARS_BELOW_4G_MAX_MB}) part of the RAM lies above "
                "4 GiB: the igb VFs' BARs land above 4 GiB, where QEMU 10.0 does not map them (no link, no traffic)")
        if not os.path.exists(self.nvme_image) or os.path.getsize(self.nvme_image) != NVME_IMAGE_BYTES:
            with open(self.nvme_image, "wb") as f:
                f.truncate(NVME_IMAGE_BYTES)
        accel, why = qemu.choose_accel(qemu_path, kernel.vmlinuz, cache=constants.cache_dir("runner/kvm-trial.json"))
        say(f"runner: {why}")
        warning = qemu.cpus_warning(accel, self.cpus)
        if warning:
            say(warning)
        store = self._image_store(say) if self.image_store else None
        base = bootcfg.runner_args(self.state_dir, kernel.modules, qemu.ROOT_TAG, godebug=bootcfg.runner_godebug(accel),
                                   image_store=bootcfg.IMAGE_STORE_MOUNT if store else None)
        append = bootcfg.append(base, self.ensure_boot_config(), self.grub_path)
        host_pub = assets.public_key(keys["host"])
        last_err = ""
        for path in (self.qemu_stderr, self.qemu_log):
            open(path, "w").close()               # this boot's words only
        for _attempt in range(8):
            port = free_port()
            with open(self.known_hosts, "w") as f:
                f.write(f"[127.0.0.1]:{port} {host_pub}\n")
            open(self.console_log, "w").close()
            argv = qemu.command(qemu_path, kernel=kernel.vmlinuz, initrd=initrd, append=append, port=port,
                                console_log=self.console_log, pidfile=self.pidfile, nvme_image=self.nvme_image,
                                memory_mb=self.memory_mb, cpus=self.cpus, igb=igb, etc_default=self.etc_default_dir,
                                wire=self.wire, accel=accel, log_file=self.qemu_log,
                                image_disk=store)
            say(f"runner: starting QEMU (ssh on 127.0.0.1:{port}, console {self.console_log})")
            try:
                rc, said = qemu.launch(argv, self.qemu_stderr, self.qemu_log)
            except subprocess.TimeoutExpired:
                self._stop(self.qemu_pids())
                raise ProvisionError("QEMU did not finish starting in 120 s",
                                     hint="the machine may be overloaded; retry, or look at `ps` for QEMUs") from None
            if rc == 0:
                break
            last_err = said.strip()
            if "host forwarding" in last_err or "Address already in use" in last_err:
                say(f"runner: port {port} is taken, trying another")
                continue
            raise ProvisionError(f"QEMU refused to start the runner (exit {rc}): {last_err[-600:]}",
                                 hint="run `vfiotest runner up` to see it again; the QEMU command is in "
                                      f"{self.state_dir}/qemu.argv")
        else:
            raise ProvisionError(f"no free port for the runner's SSH after 8 tries: {last_err[-300:]}",
                                 hint="free some ports on 127.0.0.1, then retry")
        with open(os.path.join(self.state_dir, "qemu.argv"), "w") as f:
            f.write(" ".join(argv) + "\n")
        pids = self.qemu_pids()
        me = _me()
        generation = uuid.uuid4().hex
        st: dict[str, Any] = {"port": port, "pid": pids[0] if pids else None, "started": time.time(), "persistent": bool(persistent),
              "igb": igb, "kernel": kernel.package, "initrd": os.path.basename(initrd), "owner": list(me),
              "generation": generation, "cmdline": append, "boots": 1, "accel": accel, "accel_why": why,
              "image_store": store}
        self._write_state(st)
        self._add_user(me)
        with open(self.boot_file, "w") as f:
            json.dump({"argv": argv, "base_args": base}, f, indent=1)
        try:
            self._start_supervisor(generation)
            self._wait_ready(port, say)
            st["pfs"] = self._read_pfs()
        except BaseException:
            self._stop(self.qemu_pids())
            raise
        self._set_state(pfs=st["pfs"])
        if not igb:
            say("runner: up with the NVMe PF only (no igb in this QEMU)")
        say(f"runner: up in {time.time() - st['started']:.1f} s, PFs {st['pfs']}")

    def _image_store(self, say: Callable[[str], None]) -> str | None:
        """The disk holding the test image's read-only store to boot with (its path), with the
        runner's storage.conf naming its mount point written to the state directory; None, said,
        when it cannot be made (the sessions then import the image, as without it)."""
        from ..podman.image import default_recipe, ensure_store

        try:
            recipe = default_recipe()
            path, made_s = ensure_store(recipe, progress=say)
            existing = next((open(p).read() for p in bootcfg.STORAGE_CONF_PATHS if os.path.exists(p)), None)
            text = bootcfg.storage_conf(bootcfg.IMAGE_STORE_MOUNT, existing)
            qemu.check_image_disk(str(path))
        except (ProvisionError, ValueError, OSError) as e:    # ValueError: a storage.conf tomlkit cannot read
            say(f"runner: booting without the read-only image store ({e}); each session imports the test image")
            return None
        with open(self.storage_conf, "w") as f:
            f.write(text)
        say(f"runner: {recipe.ref} in a read-only image store, {path} ({'made in %.1f s' % made_s if made_s else 'cached'}), "
            f"at {bootcfg.IMAGE_STORE_MOUNT} in the runner: podman there has it without an import "
            f"({bootcfg.IMAGE_STORE_ENV}=0 to import it instead)")
        return str(path)

    def _start_supervisor(self, generation: str) -> None:
        """The detached process that boots the runner again after a guest reboot (supervisor.py)."""
        with open(self.supervisor_log, "a") as logf:
            subprocess.Popen([sys.executable, "-m", "vfiotest.runner.supervisor", self.state_dir, generation],
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                             close_fds=True, cwd="/")
        wait_for(lambda: self.supervisor_pid() is not None, 30, 0.05, "the runner's supervisor to start")

    def _wait_ready(self, port: int, say: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.boot_timeout
        next_note = t0 + 10
        while True:
            if not self.qemu_pids():
                said = self.qemu_said(5)
                raise ProvisionError("the runner's QEMU exited during boot"
                                     + (": it said:\n  " + "\n  ".join(said) if said else "")
                                     + "\nlast console lines:\n  " + "\n  ".join(self.console_tail()),
                                     hint=f"read {self.console_log}; `vfiotest runner up` retries")
            if wait_for_ssh_banner("127.0.0.1", port, timeout=1):
                h = self.host(register=False)
                try:
                    h.run(["true"], timeout=30, check=True)
                    return
                except (TargetError, paramiko.SSHException, EOFError, OSError) as e:
                    # sshd may accept before it is fully up, or the machine is slow: retry until the deadline
                    if time.monotonic() > deadline:
                        raise TargetError(f"the runner's sshd answers but a command fails: {e}",
                                          hint=f"read {self.console_log}; `vfiotest runner ssh` to look") from e
                finally:
                    h.close()
            now = time.monotonic()
            if now > deadline:
                raise ProvisionError(
                    f"the runner did not answer on SSH within {self.boot_timeout:.0f} s; last console lines:\n  "
                    + "\n  ".join(self.console_tail()),
                    hint=f"read {self.console_log}; raise {BOOT_TIMEOUT_ENV} if the machine is busy")
            if now >= next_note:
                last = (self.console_tail(1) or [""])[0][:100]
                say(f"runner: waiting for SSH ({now - t0:.0f} s) console: {last}")
                next_note = now + 10

    def _read_pfs(self) -> dict[str, str]:
        """The SR-IOV PFs the VM sees, by kind (the one PCI reader, one SSH round trip)."""
        for attempt in range(3):
            h = self.host(register=False)
            try:
                inventory = read_inventory(h, timeout=90)
                break
            except (TargetError, paramiko.SSHException, EOFError, OSError):
                if attempt == 2:
                    raise
                time.sleep(1)
            finally:
                h.close()
        pfs: dict[str, str] = {}
        for kind, (vendor, device) in qemu.PF_IDS.items():
            for addr, dev in sorted(inventory.devices.items()):
                if dev.is_pf and dev.vendor_device == f"{vendor}:{device}":
                    pfs[kind] = str(addr)
                    break
        return pfs


def _is_running(pid: int) -> bool:
    """True unless `pid` is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def qemu_rss(pid: int) -> int | None:
    """Resident memory of QEMU in bytes (VmRSS), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
