"""Leases: one IOMMU group is held by one process at a time.

A lease is a lock file on the TARGET (`host.hold_lock`: flock locally, a remote
flock held by an SSH channel otherwise), so it works across xdist workers and
across concurrent sessions, and it dies with the process that holds it. Next to
the lock an owner record (pid, worker, session, test) says who holds it; `held()`
lists the groups whose lock is really held (records left by dead holders are dropped).
A lease is on a group NUMBER, and the kernel hands a freed number to the next group it
makes (VFs destroyed and made again, on any PF): a caller that names the `devices` it
leases the group for has them in the record; `still_on()` tells whether a lease still
holds the group of its number, `covers()` whether it holds a given device.
The worker and session names are the caller's to give (LeasePool(worker=, session=)):
this module reads no environment.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from . import constants
from .errors import LeaseBusy
from .host import Host

LEASE_ROOT = constants.LEASE_DIR


def who_am_i(test_id: str | None = None, worker: str | None = None, session: str | None = None,
             devices: list[str] | None = None) -> dict[str, Any]:
    """The owner record of this process: pid, controller host, and the `worker` (e.g. an
    xdist worker id), `session` and `test_id` the caller names (None when not given); with
    `devices`, the PCI addresses the group was leased for."""
    rec = {"pid": os.getpid(), "controller": socket.gethostname(),
           "worker": worker or None, "session": session or None,
           "test": test_id, "since": round(time.time(), 3)}
    if devices is not None:
        rec["devices"] = sorted(str(d) for d in devices)
    return rec


def still_on(owner: dict[str, Any], members: list[str]) -> bool:
    """Whether a lease with owner record `owner` holds the group of that number whose devices
    are now `members`: a record that names the devices the lease was taken for holds it only
    if one of them is still a member (else the number was freed and given to a new group)."""
    named = owner.get("devices")
    return named is None or any(str(m) in named for m in members)


def covers(group: str | int, owner: dict[str, Any], device: str, device_group: str | int | None) -> bool:
    """Whether a lease on `group` with owner record `owner` holds `device`, now in IOMMU group
    `device_group`: the numbers match and the lease is still on it (still_on)."""
    return device_group is not None and str(group) == str(device_group) and still_on(owner, [device])


class OthersLeases:
    """A LeasePool's held() without the leases in `mine` (names): what a holder of those sees
    as other users' leases, e.g. set_numvfs(leases=...) by a test that holds a PF's VFs."""

    def __init__(self, pool: LeasePool, mine: list[str] | set[str]) -> None:
        self.pool, self.mine = pool, {str(m) for m in mine}

    def held(self) -> dict[str, dict[str, Any]]:
        return {g: o for g, o in self.pool.held().items() if g not in self.mine}


class Lease:
    """A held IOMMU group. `release()` (or leaving the `with` block) gives it back."""

    def __init__(self, pool: LeasePool, group: str | int, owner: dict[str, Any], lock: Any) -> None:
        self.pool, self.group, self.owner, self._lock = pool, str(group), owner, lock

    @property
    def active(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        if self._lock is None:
            return
        self.pool.host.remove(self.pool.record_path(self.group))
        self._lock.release()
        self._lock = None
        self.pool.log_release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Lease group {self.group} {'held' if self.active else 'released'}>"


class LeasePool:
    """Leases of IOMMU groups (and of whole PFs, `pf-<address>`) on `host`, under `root` on the
    target. `worker` and `session` name this process in the owner records of the leases it takes
    (see who_am_i). `log`: a file on this machine that gets one JSON line per lease released
    (group, test, worker, session, pid, start, end), for checking afterwards that no two users
    held one at once."""

    def __init__(self, host: Host, root: str = LEASE_ROOT, worker: str | None = None,
                 session: str | None = None, log: str | None = None) -> None:
        self.host, self.root = host, root.rstrip("/")
        self.worker, self.session, self.log = worker, session, log

    def log_release(self, lease: Lease) -> None:
        if not self.log:
            return
        import filelock

        o = lease.owner
        record = {"group": lease.group, "test": o.get("test"), "worker": o.get("worker"),
                  "session": o.get("session"), "pid": o.get("pid"), "start": o.get("since"),
                  "end": round(time.time(), 3)}
        with filelock.FileLock(self.log + ".lock"):
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")

    def lock_path(self, group: str | int) -> str:
        return f"{self.root}/{group}.lock"

    def record_path(self, group: str | int) -> str:
        return f"{self.root}/{group}.json"

    def try_acquire(self, group: str | int, test_id: str | None = None, retry: float = 0.3,
                    devices: list[str] | None = None) -> Lease | None:
        """A Lease on `group`, or None when another process holds it (never waits longer than
        `retry` seconds, which covers someone merely probing the lock in `held()`). `devices`:
        the addresses the group is leased for, kept in the owner record (see covers())."""
        group = str(group)
        deadline = time.monotonic() + retry
        while True:
            lock = self.host.hold_lock(self.lock_path(group), blocking=False)
            if lock is not None:
                owner = who_am_i(test_id, self.worker, self.session, devices)
                self.host.write_atomic(self.record_path(group), json.dumps(owner), mode=0o644)
                return Lease(self, group, owner, lock)
            if self.owner(group) is not None or time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def acquire(self, group: str | int, test_id: str | None = None, devices: list[str] | None = None) -> Lease:
        """A Lease on `group`; LeaseBusy names the holder when another process has it."""
        lease = self.try_acquire(group, test_id, devices=devices)
        if lease is None:
            owner = self.owner(group) or {}
            raise LeaseBusy(
                f"IOMMU group {group} is leased by pid {owner.get('pid', '?')} on {owner.get('controller', '?')}"
                f"{' (worker ' + owner['worker'] + ')' if owner.get('worker') else ''}"
                f"{' for ' + owner['test'] if owner.get('test') else ''}",
                hint="wait for that test to finish, or pick another group (`vfiotest devices` shows leases)",
                group=str(group), owner=owner or None)
        return lease

    def wait_acquire(self, group: str | int, test_id: str | None = None, timeout: float = 300.0) -> Lease:
        """A Lease on `group`, waiting up to `timeout` s for its holder to let go; LeaseBusy
        (naming the holder) when it does not."""
        from .host import wait_for

        lease = wait_for(lambda: self.try_acquire(group, test_id), timeout, interval=0.5,
                         what=f"the lease on {group}", fail=False)
        return lease if lease is not None else self.acquire(group, test_id)

    def acquire_first(self, groups: list[str] | list[int], test_id: str | None = None) -> Lease | None:
        """A Lease on the first free group of `groups`, or None when all are taken."""
        for g in groups:
            lease = self.try_acquire(g, test_id, retry=0)
            if lease is not None:
                return lease
        return None

    def owner(self, group: str | int) -> dict[str, Any] | None:
        """The owner record of `group`, or None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.host.read_text(self.record_path(group)))
        except (OSError, ValueError):
            return None

    def is_held(self, group: str | int) -> bool:
        """Whether the lease on `group` is held right now, by anyone (this process too: the probe
        is a lock of its own)."""
        probe = self.host.hold_lock(self.lock_path(str(group)), blocking=False)
        if probe is None:
            return True
        probe.release()
        return False

    def held(self) -> dict[str, dict[str, Any]]:
        """{group: owner record} for every group whose lease is held right now."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.host.listdir(self.root) or []:
            if not name.endswith(".json"):
                continue
            group = name[:-5]
            probe = self.host.hold_lock(self.lock_path(group), blocking=False)
            if probe is not None:
                # the holder died: its record is stale
                self.host.remove(self.record_path(group))
                probe.release()
                continue
            out[group] = self.owner(group) or {}
        return out


__all__ = ["Lease", "LeasePool", "LEASE_ROOT", "OthersLeases", "covers", "still_on", "who_am_i"]
