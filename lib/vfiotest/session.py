"""One test session on one target, and everything that outlives a single test.

A Session goes through labgrid-style states (`SessionState`), each a step that is done once
per session (by whichever process of it gets there first; xdist workers share the session
through its directory, under file locks). A state only moves forward, along TRANSITIONS; a
step asked out of order raises SessionStateError:

    NEW        nothing touched; a session that stops here (`pytest --collect-only`) leaves nothing
    REACHED    the target answers: the emulated runner booted or reused (`runner()`), the host open
    BASELINED  what a crashed session left is put back, the host's PCI inventory snapshotted
    FINISHED   `finish()`, once, by the controlling process after every worker is done:
               the layers' undo records replayed (newest first), the session journal
               replayed (VF counts), the host compared with the baseline (the state guard),
               the runner released

Undo records are what a layer changed on the target once for the whole session (the
kata-vfio registration, the containers.conf drop-in): journal entries of kinds registered
with vfiotest.journal (one registry of undos), kept in the session directory, written
before the change and undone by `finish()` after every worker is done.

The session's identity and directory come from the caller (the pytest plugin shares them
with its workers); nothing here reads pytest's or xdist's environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Optional

import filelock

from . import targets
from .errors import HarnessError, JournalError, SessionStateError
from .host import Host
from .pci import Inventory, read_inventory, read_inventory_json
from .sriov import COUNT_LOCK, COUNT_LOCK_TIMEOUT, SessionVfs, shared_counts

if TYPE_CHECKING:
    from .runner import Runner


class SessionState(Enum):
    """Where a session is. NEW, REACHED and BASELINED are read from the session directory (so
    every process of the session sees the same); FINISHED is the controlling process's, set by
    `finish()`."""

    NEW = "new"
    REACHED = "reached"
    BASELINED = "baselined"
    FINISHED = "finished"

    def __str__(self) -> str:
        return self.value


NEW, REACHED, BASELINED, FINISHED = SessionState.NEW, SessionState.REACHED, SessionState.BASELINED, SessionState.FINISHED

#: the states each state may move to. REACHED again: another process opens the host; BASELINED
#: again: `rebaseline()` after a reboot. Any state may finish; nothing follows FINISHED.
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    NEW: frozenset({REACHED, FINISHED}),
    REACHED: frozenset({REACHED, BASELINED, FINISHED}),
    BASELINED: frozenset({BASELINED, FINISHED}),
    FINISHED: frozenset(),
}

BASELINE = "baseline-inventory.json"      # the first inventory of the session and its target
BOOTED = "runner-booted-by-this-session"
REBOOTED = "kernel-args-rebooted"         # a process of the session added kernel arguments and rebooted
ALIVE = ".alive"                          # <sessions>/<id>.alive: flocked by the controlling process
RECORDS = "undo"                          # <dir>/undo/<seq>-<kind>.json

@dataclass
class Verdict:
    """What `finish()` found: the guard's diff (empty: the host was left as found) and what it did."""

    reached: bool = False
    compared: bool = False          # the host was compared with a baseline
    diff: list[str] = field(default_factory=list)
    #: differences on devices other live sessions held (at the baseline or the end): not this session's
    others: list[str] = field(default_factory=list)
    still_different: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    error: Optional[str] = None
    #: the undo records left for the next session or `vfiotest restore` (not undone: the target
    #: could not be reached, or their undo failed); the session directory stays with them
    kept: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.diff and not self.error


class Session:
    """A session on the target `spec` ("virtual", "local", "ssh://...", "sim:DIR"), its state
    shared through `directory` by every process of the session."""

    def __init__(self, session_id: str, spec: str, directory: str):
        self.id, self.spec, self.dir = session_id, spec, directory
        self._runner: Runner | None = None
        self._vf_counts: Optional[SessionVfs] = None
        self._alive_fd: Optional[int] = None
        self._finished = False

    # -- liveness ----------------------------------------------------------------------------
    @property
    def alive_path(self) -> str:
        return self.dir.rstrip("/") + ALIVE

    def hold(self) -> None:
        """The controlling process says it is alive for the life of the session (a lock next to
        the session directory, gone with the process): a session whose lock is free crashed, and
        the next session or `vfiotest restore` undoes what it recorded."""
        if self._alive_fd is not None:
            return
        os.makedirs(os.path.dirname(self.alive_path), exist_ok=True)
        fd = os.open(self.alive_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise HarnessError(f"session {self.id} is held by another live process ({self.alive_path})",
                               hint="give each pytest session its own VFIOTEST_SESSION (or leave it unset)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "target": self.spec}).encode())
        self._alive_fd = fd

    def _let_go(self, keep_records: bool = False) -> None:
        """Release the liveness lock. With `keep_records` the lock file stays (it names the
        target), so that the session reads as crashed: the next session on that target, or
        `vfiotest restore`, undoes the records it kept."""
        if self._alive_fd is None:
            return
        if not keep_records:
            try:
                os.remove(self.alive_path)
            except FileNotFoundError:
                pass
        os.close(self._alive_fd)
        self._alive_fd = None
        try:
            os.rmdir(os.path.dirname(self.alive_path))    # the sessions directory, when it is empty
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<Session {self.id} on {self.spec}: {self.state}>"

    # -- shared state ------------------------------------------------------------------------
    def path(self, name: str) -> str:
        os.makedirs(self.dir, exist_ok=True)
        return os.path.join(self.dir, name)

    def lock(self, name: str) -> filelock.FileLock:
        """A lock shared by the processes of this session (one step done once)."""
        return filelock.FileLock(self.path(name + ".lock"))

    @property
    def started(self) -> bool:
        return os.path.isdir(self.dir)

    @property
    def state(self) -> SessionState:
        if self._finished:
            return FINISHED
        if not self.started:
            return NEW
        if os.path.exists(os.path.join(self.dir, BASELINE)):
            return BASELINED
        return REACHED

    def transition(self, to: SessionState) -> None:
        """Move to `to` if TRANSITIONS allows it from the state now, else SessionStateError
        (nothing changed). Entering REACHED makes the session directory; FINISHED is kept by
        this process; BASELINED is the baseline file its step writes."""
        now = self.state
        if to not in TRANSITIONS[now]:
            raise SessionStateError(
                f"session {self.id}: cannot go from {now} to {to} (allowed from {now}: "
                f"{', '.join(sorted(str(s) for s in TRANSITIONS[now])) or 'nothing, it is over'})",
                hint="a harness bug: the session's steps were asked out of order; report it with the traceback",
                reason=f"{now} -> {to}")
        if to is REACHED:
            os.makedirs(self.dir, exist_ok=True)
        elif to is FINISHED:
            self._finished = True

    @property
    def journal_owner(self) -> str:
        """The owner of the session journal (vfiotest.journal): changes every worker shares."""
        return f"session-{self.id}"

    @property
    def journal_meta(self) -> dict[str, str]:
        """What ties the session journal to this session's liveness (journal.session_alive): it
        stays live while the controlling process runs, after the worker that wrote it ended."""
        from .journal import _local_machine_id

        return {"id": self.id, "alive": os.path.abspath(self.alive_path), "controller": _local_machine_id() or ""}

    # -- REACHED -----------------------------------------------------------------------------
    @property
    def is_virtual(self) -> bool:
        return self.spec == "virtual"

    def runner(self, progress: Callable[[str], None] = lambda s: None) -> Runner | None:
        """The emulated runner (virtual targets): used if it is up, else booted for the session."""
        if not self.is_virtual:
            return None
        if self._runner is None:
            from .runner import Runner

            r = Runner.default()
            with self.lock("runner"):
                if not r.is_up():
                    progress("booting the emulated SR-IOV runner (QEMU under TCG, about 30 s)")
                    try:
                        r.up(progress=progress)
                    except HarnessError as e:
                        raise HarnessError(f"the emulated runner did not boot: {e}") from e
                    open(self.path(BOOTED), "w").close()
            self._runner = r
        return self._runner

    def open_host(self, progress: Callable[[str], None] = lambda s: None) -> Host:
        """A connected Host for the target (the runner booted first when virtual). The one way
        the session reaches its target: `finish()` uses it too, never booting then."""
        if self.state is not BASELINED:     # a process opening the host of a baselined session stays there
            self.transition(REACHED)
        self.runner(progress)
        host, _close = targets.open_host(self.spec, boot=False)
        return host

    # -- BASELINED ---------------------------------------------------------------------------
    def baseline(self, host: Host, progress: Callable[[str], None] = lambda s: None) -> Optional[Inventory]:
        """The first process of the session puts back what a crashed session left (journals
        whose owner is gone), then snapshots the inventory; returns it (None in the others).
        JournalError (a corrupt or foreign journal) is for the user to decide."""
        from .journal import restore_orphans

        with self.lock("baseline"):
            path = self.path(BASELINE)
            if os.path.exists(path):
                return None
            try:
                for sid, n in restore_orphaned_sessions(host, os.path.dirname(self.dir), self.spec, exclude=self.id):
                    progress(f"undid what crashed session {sid} recorded ({n} entries)")
            except HarnessError as e:
                # its records stay for `vfiotest restore`; the PCI journals are replayed all the same
                progress(f"warning: could not undo everything a crashed session recorded: {e}")
            try:
                restored = restore_orphans(host)
            except JournalError:
                raise
            except HarnessError as e:
                # e.g. the devices are in use by another live session: theirs to finish first
                restored = None
                progress(f"warning: could not put back everything an earlier session left: {e}")
            if restored:
                progress(f"restored what an earlier crashed session left on {host.name}: {restored}")
            return self._write_baseline(host)

    def rebaseline(self, host: Host) -> Inventory:
        """The inventory now becomes the baseline: after a reboot this session made
        (--allow-reboot), what it leaves is compared with the new boot, not the old one.
        Nothing is restored first (that was done when the session began)."""
        self.transition(BASELINED)   # before the lock: a finished session's directory is not made again
        with self.lock("baseline"):
            return self._write_baseline(host)

    def _write_baseline(self, host: Host) -> Inventory:
        self.transition(BASELINED)   # checked before: the file written below is the state
        raw = read_inventory_json(host)
        inv = Inventory.from_json(raw)
        # what other live sessions hold right now is theirs, not this session's baseline to keep
        others = self.others_claims(host, inv)
        path = self.path(BASELINE)
        with open(path + ".new", "w") as f:
            json.dump({"target": self.spec, "inventory": raw, "others": others}, f)
        os.replace(path + ".new", path)        # a reader sees the old baseline or the new one, whole
        return inv

    def others_claims(self, host: Host, inv: Inventory) -> dict[str, list[str]]:
        """What other live processes on the target hold now (sessions sharing the runner, a
        developer's `vfiotest bind`): {"counts": PFs whose VF count a live journal records,
        "devices": devices a live journal rebinds or another session leases}."""
        from .journal import live_journals
        from .lease import LeasePool, still_on

        counts: set[str] = set()
        devices: set[str] = set()
        for _owner, entries in live_journals(host, exclude=(self.journal_owner,)).items():
            for e in entries:
                if e.get("kind") == "numvfs" and e.get("address"):
                    counts.add(e["address"])
                elif e.get("address"):
                    devices.add(e["address"])
        try:
            held = LeasePool(host).held()
        except (OSError, HarnessError):
            held = {}
        for group, owner in held.items():
            if owner.get("session") and owner.get("session") != self.id:
                members = inv.groups.get(group, [])
                if still_on(owner, members):
                    devices.update(members)
        return {"counts": sorted(counts), "devices": sorted(devices)}

    def _baseline_doc(self) -> dict:
        try:
            with open(os.path.join(self.dir, BASELINE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def baseline_inventory(self) -> Optional[Inventory]:
        doc = self._baseline_doc()
        return Inventory.from_json(doc["inventory"]) if doc else None

    # -- undo records ------------------------------------------------------------------------
    def recorded(self, kind: str) -> Optional[dict]:
        """The entry of `kind` a process of this session recorded, or None."""
        for _name, entry in self._records():
            if entry["kind"] == kind:
                return entry
        return None

    def record(self, entry: dict) -> None:
        """Keep a journal entry (vfiotest.journal: its kind registered, its fields present)
        for what is about to change, before the change (a crash right after it still leaves
        it). Undone by `finish()`, newest first."""
        from .journal import kind_of


        kind = kind_of(entry, where=f"session {self.id}")   # refuse what nobody can undo, before it is done
        missing = kind.missing(entry)
        if missing:
            raise HarnessError(f"session record of kind {entry['kind']!r} lacks {', '.join(missing)}")
        if self.state is not BASELINED:    # a record means the target was reached; none after finish()
            self.transition(REACHED)
        with self.lock("records"):       # workers record too: one sequence number each
            d = self.path(RECORDS)
            os.makedirs(d, exist_ok=True)
            # one more than the last: finish() removes each record it undid, so a count could repeat a number
            seq = max((int(n.split("-", 1)[0]) for n in os.listdir(d) if n.endswith(".json")), default=-1) + 1
            tmp = os.path.join(d, f".{seq:03d}-{entry['kind']}.json.tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                json.dump(entry, f)
            os.replace(tmp, os.path.join(d, f"{seq:03d}-{entry['kind']}.json"))

    def _records(self) -> list[tuple[str, dict]]:
        d = os.path.join(self.dir, RECORDS)
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            with open(os.path.join(d, n)) as f:
                out.append((n, json.load(f)))
        return out

    # -- what the session changes once, for all its processes -------------------------------
    def vf_counts(self, host: Host, profile: Any, leases: Any) -> SessionVfs:
        """This process's handle on the session's VF counts (vfiotest.sriov.SessionVfs): the
        first process makes them, journaled in the session journal; finish() puts them back."""
        if self._vf_counts is None:
            self._vf_counts = SessionVfs(self, host, profile, leases)
        return self._vf_counts

    def register_kata_vfio(self, host: Host, choice: Any, image: Any,
                           progress: Callable[[str], None] = lambda s: None) -> Any:
        """The kata-vfio runtime registered on the target once per session (by its first process;
        the others read it back), recorded in this session first: finish() removes the drop-in,
        the wrapper and the derived configuration. `choice` a vfiotest.kata.bundle.KataChoice,
        `image` the BuiltInitrd; returns the vfiotest.kata.runtime.RuntimeInfo."""
        from .kata import provision, runtime

        with self.lock("kata-runtime"):
            if self.recorded(runtime.REGISTRATION) is not None:   # another process of the session did it
                return runtime.RuntimeRegistration(host, kata=provision.runtime_install(choice)).info()
            return provision.register_kata_vfio(host, choice, image, recorder=self, progress=progress)

    def add_kernel_args(self, host: Host, args: list[str], progress: Callable[[str], None] = lambda s: None) -> bool:
        """Add the kernel arguments `args` to the target's boot configuration (each file recorded
        in this session first: finish() puts them back) and reboot it, once per session: True
        when this process did it, False when another process of the session already had (the
        host is reconnected either way). The baseline is taken again over the new boot."""
        from . import kernelargs

        with self.lock("kernel-args"):
            marker = self.path(REBOOTED)
            if os.path.exists(marker):
                host.close()      # another process rebooted it: reconnect on the next call
                return False
            emulated = self.is_virtual
            done = kernelargs.apply(host, args, recorder=self, emulated=emulated, progress=progress)
            progress(f"{done}; rebooting {host.name} (--allow-reboot); the session's end puts the boot "
                     "configuration back")
            if emulated:
                runner = self.runner(progress)
                if runner is None:
                    raise HarnessError(f"the target {self.spec} has no emulated runner to reboot")
                runner.reboot(progress=progress)
                host.close()     # the old connection died with the old boot: reconnect on the next call
            else:
                kernelargs.reboot_and_wait(host, progress=progress)
            with open(marker, "w") as f:
                f.write(" ".join(args) + "\n")
            # the PCI baseline was taken before the reboot: what the session leaves is compared with the new boot
            self.rebaseline(host)
            return True

    # -- FINISHED ----------------------------------------------------------------------------
    def finish(self, keep_runner: bool = False, say: Callable[[str], None] = print) -> Verdict:
        """Controlling process, once every worker is done: replay the undo records and the
        session journal, compare the host with the baseline (restoring from the journals when
        it differs), remove the session directory, release the runner. A session that never
        started (NEW) does nothing.

        An undo record is removed once it is undone. When the target cannot be reached, or an
        undo fails, the records not undone are kept (Verdict.kept), with the session directory and
        its lock file naming the target: the session then reads as crashed, and the next session
        on that target or `vfiotest restore` undoes them (restore_orphaned_sessions)."""
        self.transition(FINISHED)
        v = Verdict()
        if not self.started:
            self._let_go()
            return v
        v.reached = True
        booted = os.path.exists(os.path.join(self.dir, BOOTED))
        base = self.baseline_inventory()
        records = self._records()
        if base is not None or records:
            try:
                host = targets.open_host(self.spec, boot=False)[0]
            except HarnessError as e:
                v.error = f"cannot reach the target to undo and compare: {e}"
                say(f"host state guard: {v.error}")
                host = None
            if host is not None:
                try:
                    self._finish_on(host, base, records, v, say)
                except HarnessError as e:     # the target went away half-way: what is left is kept
                    v.error = f"finishing on the target stopped: {e}"
                    say(f"session: {v.error}")
                finally:
                    host.close()
        v.kept = [name for name, _ in self._records()]
        if v.kept:
            say(f"session: kept {len(v.kept)} undo record(s) in {os.path.join(self.dir, RECORDS)} "
                f"({', '.join(v.kept)}): not undone on {self.spec}; the next session on that target, or "
                f"`vfiotest restore --target {self.spec}`, undoes them")
            if v.error is None:
                v.error = f"{len(v.kept)} undo record(s) kept"
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._let_go(keep_records=bool(v.kept))
        if self.is_virtual:
            from .runner import Runner

            r = Runner.default()
            if booted and keep_runner:
                r.keep()
                say("the emulated runner stays up (--keep-runner); `vfiotest runner down` stops it")
            elif booted:
                say("stopping the emulated runner this session booted (--keep-runner leaves it up)")
            # stops it only when no other live process uses it and `runner up` did not keep it
            r.release()
        return v

    def _put_back_counts(self, host: Host, say: Callable[[str], None]) -> int:
        """Undo the session journal (VF counts), the count lock held. A PF whose count another
        live session also journals (it uses these VFs: fixtures/sriov.py recorded the same
        original there) is left to that session, the last one to end puts it back."""
        from .journal import Journal

        journal = Journal.open(host, owner=self.journal_owner, wait=30)
        try:
            shared = shared_counts(host, self.journal_owner)
            for e in journal.entries():
                if e.get("kind") == "numvfs" and e.get("address") in shared:
                    journal.done(e)
                    say(f"left {e['address']}'s VF count to {shared[e['address']][0]}, a live session using "
                        f"its VFs too, which puts it back when it ends")
            n = len(journal.entries())
            journal.restore_all()
        finally:
            journal.close()
        return n

    def _finish_on(self, host: Host, base: Optional[Inventory], records: list, v: Verdict,
                   say: Callable[[str], None]) -> None:
        from .journal import restore_orphans, undo_entry

        for name, entry in reversed(records):
            where = os.path.join(self.dir, RECORDS, name)
            try:
                undo_entry(host, entry, where=where)
            except HarnessError as e:
                v.error = f"could not undo {entry['kind']} ({name}): {e}"
                say(f"session: {v.error}")
                continue
            os.remove(where)
            say(f"undid the session's {entry['kind']}"
                + (f" of {entry.get('runtime') or entry.get('path')}" if entry.get('runtime') or entry.get('path') else ""))
        count_lock = host.hold_lock(COUNT_LOCK, blocking=True, timeout=COUNT_LOCK_TIMEOUT)
        if count_lock is None:
            v.error = (f"{COUNT_LOCK} on {host.name} stayed held for {COUNT_LOCK_TIMEOUT:.0f} s; "
                       f"the session's VF counts were not put back (`vfiotest restore` does it)")
            say(f"session: {v.error}")
        else:
            try:
                n = self._put_back_counts(host, say)
            except HarnessError as e:
                v.error = f"could not put back the session's VF counts: {e}"
                say(f"session: {v.error}")
                n = 0
            finally:
                count_lock.release()
            if n:
                say(f"put back the session's journaled changes ({n} entries: VF counts)")
        if base is None:
            return
        now = read_inventory(host)
        v.compared = True
        claims = self._baseline_doc().get("others") or {"counts": [], "devices": []}
        for k, extra in self.others_claims(host, now).items():
            claims[k] = sorted(set(claims.get(k, [])) | set(extra))
        v.diff, v.others = split_others(base.diff(now), base, now, claims)
        if v.others:
            say(f"host state guard: {len(v.others)} difference(s) on devices other live sessions hold "
                f"(theirs, not compared): {'; '.join(v.others)}")
        if v.diff:
            say("host state guard: the host differs from how the session found it:")
            for line in v.diff:
                say(f"  {line}")
            restored = restore_orphans(host)
            v.still_different = base.diff(read_inventory(host))
            say(f"host state guard: replayed journals {restored or '(none)'}; "
                + ("host restored" if not v.still_different
                   else f"still different: {v.still_different}; run `vfiotest restore`"))
        else:
            say(f"host state guard: {host.name} left as found ({len(now.devices)} PCI devices compared)")


def split_others(diff: list[str], base: Inventory, now: Inventory,
                 claims: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(this session's lines, other sessions' lines) of an Inventory.diff. Another session's:
    the VF count of a PF whose count it journals (and its VFs appearing, disappearing or
    changing group with it), and everything about a device it rebinds or leases (and the
    /dev/vfio node of that device's group). A driver left on a VF of such a PF by this session
    still counts as this session's."""
    counts = set(claims.get("counts", []))
    devices = set(claims.get("devices", []))
    vfs: set[str] = set()
    for pf in counts:
        for inv in (base, now):
            d = inv.devices.get(pf)
            if d is not None:
                vfs.update(d.virtfns.values())
    groups: set[str] = set()
    for inv in (base, now):
        for a in devices:
            d = inv.devices.get(a)
            if d is not None and d.iommu_group:
                groups.add(d.iommu_group)
        # a VF the other session's count made or removed: its group's /dev/vfio node is theirs too
        for a in vfs:
            d = inv.devices.get(a)
            if d is not None and d.iommu_group and (a in base.devices) != (a in now.devices):
                groups.add(d.iommu_group)
    mine: list[str] = []
    theirs: list[str] = []
    for line in diff:
        if line.startswith("/dev/vfio/"):
            group = line[len("/dev/vfio/"):].split(":", 1)[0]
            ours = group not in groups
        else:
            addr, _, rest = line.partition(": ")
            ours = not (addr in devices
                        or (addr in counts and rest.startswith(("numvfs ", "drivers_autoprobe ")))
                        or (addr in vfs and rest.startswith(("appeared", "disappeared", "iommu_group "))))
        (mine if ours else theirs).append(line)
    return mine, theirs


def _is_held(path: str) -> bool:
    from .journal import local_lock_held

    return local_lock_held(path)


def orphaned_sessions(root: str, spec: Optional[str] = None, exclude: Optional[str] = None) -> list[Session]:
    """The sessions under `root` whose controlling process is gone (their `.alive` lock is free
    or missing), on target `spec` when given (read from their lock file or baseline)."""
    out: list[Session] = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return out
    for name in names:
        d = os.path.join(root, name)
        if name.endswith(ALIVE) or name == exclude or not os.path.isdir(d):
            continue
        if _is_held(d + ALIVE):
            continue
        their_spec = None
        for f, key in ((d + ALIVE, "target"), (os.path.join(d, BASELINE), "target")):
            try:
                with open(f) as fh:
                    their_spec = json.load(fh).get(key)
                break
            except (OSError, ValueError):
                continue
        if spec is not None and their_spec not in (spec, None):
            continue
        out.append(Session(name, their_spec or spec or "", d))
    return out


def restore_orphaned_sessions(host: Host, root: str, spec: Optional[str] = None,
                              exclude: Optional[str] = None) -> list[tuple[str, int]]:
    """Undo, newest first, what each crashed session on `spec` recorded (its registrations, its
    podman drop-in), removing each record once undone, and drop a session's directory when none
    is left: [(session id, entries undone)]. Every session and record is tried; a record whose
    undo fails stays, and a HarnessError at the end names them (after the rest was done). Its
    PCI changes are in its journal on the target, which `journal.restore_orphans` replays."""
    from .journal import undo_entry

    done = []
    failed: list[str] = []
    for s in orphaned_sessions(root, spec, exclude):
        records = s._records()
        n = 0
        for name, entry in reversed(records):
            where = os.path.join(s.dir, RECORDS, name)
            try:
                undo_entry(host, entry, where=where)
            except HarnessError as e:
                failed.append(f"session {s.id} {name}: {e.message}")
                continue
            os.remove(where)
            n += 1
        if n == len(records):
            shutil.rmtree(s.dir, ignore_errors=True)
            try:
                os.remove(s.alive_path)
            except FileNotFoundError:
                pass
        done.append((s.id, n))
    if failed:
        raise HarnessError(f"could not undo {len(failed)} record(s) of crashed sessions: {'; '.join(failed)}",
                           hint="fix the cause shown, then run `vfiotest restore` again (the records are kept)")
    return done


__all__ = ["BASELINED", "FINISHED", "NEW", "REACHED", "Session", "SessionState", "TRANSITIONS", "Verdict",
           "orphaned_sessions", "restore_orphaned_sessions", "shared_counts"]
