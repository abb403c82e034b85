"""The restore journal: on the TARGET host, written atomically BEFORE every change.

One journal per process (`<root>/<owner>.json`, default root
/var/lib/vfiotest/journal), each held by a lock (`<owner>.lock`, host.hold_lock)
for the life of its process. A journal whose lock is free belongs to a process
that is gone: it is an orphan, and `restore_orphans()` (what `vfiotest restore`
and the start of every session run) puts back what it records, newest first.

A journal records the host it was written on (machine-id, hostname); one from
another host, or one that does not parse, is refused with the way out.

The journal owns undo. Every entry has a kind, and each kind is registered here
(`register_kind`) with the fields it needs, the function that undoes it and what
makes two entries about the same thing. The modules that make the changes own
their kinds and declare them in a module-level `JOURNAL_KINDS` (a list of
`register_kind` keyword arguments); the journal imports the modules named in
KIND_MODULES the first time it needs a kind, so the kinds are known whenever a
journal is read or replayed, and this module imports none of them at load time.
(bind.py declares rather than calls register_kind because the Kata guest image
ships bind.py without this module, see kata/initrd.SHARED_MODULES.)

Kinds (their owners):
  {"kind": "driver", "address", "driver", "driver_override"}   original driver binding   (vfiotest.bind)
  {"kind": "new_id", "driver", "id"}                             an ID we added to new_id  (vfiotest.bind)
  {"kind": "numvfs", "address", "numvfs", "drivers_autoprobe"}   original SR-IOV state     (vfiotest.sriov)
  {"kind": "nvme-secondary", "address", "cntlid", "online", "nvq", "nvi"}  an NVMe VF's controller (vfiotest.nvme_virt)
  {"kind": "link-up", "address", "interface"}                    a netdev brought up (a NIC PF's) (vfiotest.nic_vf)
  {"kind": "vf-mac", "address", "interface", "vf", "mac"}        a VF's MAC set by its PF  (vfiotest.nic_vf)
  {"kind": "file", "path", "existed", "content", "mode"}         a file as it was          (vfiotest.undo_files)
  {"kind": "registration", "runtime", "previous", ...}            a runtime registered      (vfiotest.kata.runtime)
  {"kind": "podman-dropin", "path", "previous", "created_dir"}   podman's base settings    (vfiotest.podman.conf)
  {"kind": "podman-service", "socket", "pid_path", "log_path"}   an API service started    (vfiotest.podman.client)
  {"kind": "containers", "runtime", "label"}                     containers (and Kata VMs) (vfiotest.podman.client)
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from . import constants
from .errors import HarnessError, JournalError, UnbindError
from .host import Host

JOURNAL_ROOT = constants.JOURNAL_DIR
VERSION = 1

#: The modules that own entry kinds (each has a JOURNAL_KINDS list), imported on first use.
KIND_MODULES = ("vfiotest.bind", "vfiotest.sriov", "vfiotest.nvme_virt", "vfiotest.nic_vf", "vfiotest.undo_files", "vfiotest.kata.runtime",
                "vfiotest.podman.conf", "vfiotest.podman.client")

Entry = dict[str, Any]


class Recorder(Protocol):
    """What the device layer records into: Journal (durable) or MemoryJournal."""

    def record(self, entry: Entry) -> Entry: ...

    def done(self, entry: Entry) -> None: ...

    def entries(self) -> list[Entry]: ...


# -- the registry of entry kinds ----------------------------------------------------------------
@dataclass(frozen=True)
class EntryKind:
    """One kind of journal entry: the fields it must have, how to undo it (`undo(host, entry)`),
    and what it is about (`key(entry)`, a tuple; default: the first required field)."""

    kind: str
    required: tuple[str, ...]
    undo: Callable[[Any, Entry], None]
    key: Callable[[Entry], tuple] | None = None

    def key_of(self, entry: Entry) -> tuple:
        return (self.kind, *(self.key(entry) if self.key else (entry.get(self.required[0]),)))

    def missing(self, entry: Entry) -> list[str]:
        return [f for f in self.required if f not in entry]


_KINDS: dict[str, EntryKind] = {}
_loaded_modules: set[str] = set()


def register_kind(kind: str, required: Iterable[str], undo: Callable[[Any, Entry], None],
                  key: Callable[[Entry], tuple] | None = None) -> EntryKind:
    """Register (or replace) the entry kind `kind`: entries must have the `required` fields,
    `undo(host, entry)` puts back what one records, `key(entry)` says what it is about."""
    required = tuple(required)
    if not required and key is None:
        raise ValueError(f"entry kind {kind!r} needs required fields or a key")
    k = EntryKind(kind, required, undo, key)
    _KINDS[kind] = k
    return k


def _load_kinds() -> None:
    for name in KIND_MODULES:
        if name in _loaded_modules:
            continue
        mod = importlib.import_module(name)
        for spec in getattr(mod, "JOURNAL_KINDS", ()):
            register_kind(**spec)
        _loaded_modules.add(name)


def registered_kinds() -> dict[str, EntryKind]:
    """{kind: EntryKind} of every kind known (the owning modules are loaded first)."""
    _load_kinds()
    return dict(_KINDS)


def _unknown_kind(kind: Any, where: str) -> JournalError:
    known = ", ".join(sorted(registered_kinds()))
    return JournalError(
        f"the restore journal {where} holds an entry of unknown kind {kind!r} (known: {known}); it is refused",
        hint=f"it was written by a newer vfiotest (or by hand): run `vfiotest restore` with that version, or put "
             f"back what it lists by hand and move it aside: mv {where} {where}.unknown",
        path=where, reason=JournalError.UNKNOWN_KIND, kind=kind if isinstance(kind, str) else repr(kind))


def kind_of(entry: Entry, where: str = "(in memory)") -> EntryKind:
    """The EntryKind of `entry`; JournalError naming the kind and `where` when no module registers it."""
    kind = entry.get("kind")
    found = _KINDS.get(kind) if isinstance(kind, str) else None
    if found is None:
        _load_kinds()
        found = _KINDS.get(kind) if isinstance(kind, str) else None
    if found is None:
        raise _unknown_kind(kind, where)
    return found


def entry_key(entry: Entry) -> tuple:
    """What a journal entry is about, e.g. ("driver", address) or ("new_id", driver, id)."""
    return kind_of(entry).key_of(entry)


def undo_entry(host: Host, entry: Entry, where: str = "(in memory)") -> None:
    """Undo one journal entry with the undo of its kind."""
    kind_of(entry, where).undo(host, entry)


def _where(recorder: Any) -> str:
    return getattr(recorder, "path", None) or "(in memory)"


def undo_entries(host: Host, recorder: Recorder, entries: list[Entry] | None = None) -> None:
    """Undo `entries` (default: all of the recorder's) in reverse order; each undone one is
    marked done. An unknown kind raises JournalError before anything is undone; other errors
    are collected: UnbindError lists what could not be put back."""
    todo = recorder.entries() if entries is None else list(entries)
    where = _where(recorder)
    kinds = [kind_of(e, where) for e in todo]
    failed = []
    for entry, kind in reversed(list(zip(todo, kinds, strict=True))):
        try:
            kind.undo(host, entry)
        except (OSError, HarnessError) as e:
            failed.append(f"{entry.get('address') or entry.get('id') or entry.get('path')}: {e}")
            continue
        recorder.done(entry)
    if failed:
        raise UnbindError("could not put back: " + "; ".join(failed),
                          hint="fix the cause shown, then run `vfiotest restore` again (the journal keeps these)")


class MemoryJournal:
    """A recorder kept in memory (no crash safety). Journal is the durable one."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []

    def record(self, entry: Entry) -> Entry:
        """Keep `entry` unless one for the same thing is already kept (the first original wins).
        Returns the kept entry."""
        key = entry_key(entry)
        for e in self._entries:
            if entry_key(e) == key:
                return e
        self._entries.append(dict(entry))
        return entry

    def done(self, entry: Entry) -> None:
        key = entry_key(entry)
        self._entries = [e for e in self._entries if entry_key(e) != key]

    def entries(self) -> list[Entry]:
        return [dict(e) for e in self._entries]

    def restore_all(self, host: Host) -> None:
        undo_entries(host, self)


def default_owner(worker: str | None = None) -> str:
    """A name unique to this process: controller host, pid, and `worker` (e.g. an xdist
    worker id) when given."""
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{worker}" if worker else "")


def host_identity(host: Host) -> dict[str, str | None]:
    """{"machine_id", "hostname", "boot_id"} of the target, as its files say."""
    def rd(p: str) -> str | None:
        try:
            return host.read_text(p).strip() or None
        except OSError:
            return None
    return {"machine_id": rd("/etc/machine-id"), "hostname": rd("/proc/sys/kernel/hostname"),
            "boot_id": rd("/proc/sys/kernel/random/boot_id")}


def _same_host(a: dict, b: dict) -> bool:
    for key in ("machine_id", "hostname"):
        if a.get(key) and b.get(key) and a[key] != b[key]:
            return False
    return True


def _corrupt(path: str, why: str) -> JournalError:
    return JournalError(
        f"the restore journal {path} is corrupt ({why}); it is refused",
        hint=f"read it (`cat {path}`), put the devices it lists back by hand if needed (`vfiotest devices`, "
             f"`vfiotest unbind ADDR`), then move it aside: mv {path} {path}.corrupt",
        path=path, reason=JournalError.CORRUPT)


def parse_journal(text: str, path: str = "journal") -> dict[str, Any]:
    """The journal document in `text`, validated; JournalError when it is not a journal
    (reason CORRUPT), or holds a kind no module registers (reason UNKNOWN_KIND)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise _corrupt(path, f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise _corrupt(path, f"no version {VERSION} header")
    if not isinstance(doc.get("identity"), dict) or not isinstance(doc.get("entries"), list):
        raise _corrupt(path, "identity or entries missing")
    for entry in doc["entries"]:
        if not isinstance(entry, dict) or "kind" not in entry:
            raise _corrupt(path, f"bad entry {entry!r}")
        if kind_of(entry, path).missing(entry):
            raise _corrupt(path, f"bad entry {entry!r}")
    return doc


class Journal:
    """A durable recorder (same interface as MemoryJournal) for one process.

    Open it with `Journal.open(host)`; `close()` releases its lock and removes it when empty.
    keep=True marks a journal that sessions must not replay on their own (the CLI's manual
    binds); `vfiotest restore` replays it."""

    def __init__(self, host: Host, owner: str, root: str, lock: Any, doc: dict[str, Any], keep: bool = False) -> None:
        self.host, self.owner, self.root, self._lock = host, owner, root.rstrip("/"), lock
        self.doc = doc
        self.doc["keep"] = bool(keep or doc.get("keep"))

    @property
    def path(self) -> str:
        return f"{self.root}/{self.owner}.json"

    @classmethod
    def open(cls, host: Host, owner: str | None = None, root: str = JOURNAL_ROOT, keep: bool = False,
             wait: float = 0.0, session: dict[str, str] | None = None) -> Journal:
        """Take the journal `owner` (default: `default_owner()`, this process) on `host`, loading
        what it already holds. JournalError when another live process holds it (reason HELD),
        or it is corrupt or from another host.

        session: {"id", "alive", "controller"} of the pytest session the journal serves (its
        controlling process's liveness lock and machine-id, see `session_alive`): the journal stays
        live after the process holding its lock (an xdist worker) ends, until that session ends."""
        owner = owner or default_owner()
        root = root.rstrip("/")
        lock = host.hold_lock(f"{root}/{owner}.lock", blocking=wait > 0, timeout=wait)
        if lock is None:
            raise JournalError(f"the journal {root}/{owner}.json on {host.name} is held by another running process",
                               hint="wait for that vfiotest/pytest process to finish (journals are one per process)",
                               path=f"{root}/{owner}.json", reason=JournalError.HELD)
        try:
            ident = host_identity(host)
            doc = load_journal(host, f"{root}/{owner}.json", ident)
            if doc is None:
                doc = {"version": VERSION, "owner": owner, "pid": os.getpid(), "identity": ident,
                       "created": round(time.time(), 3), "entries": []}
            if session:
                doc["session"] = dict(session)
        except BaseException:
            lock.release()
            raise
        return cls(host, owner, root, lock, doc, keep)

    # -- the recorder interface ------------------------------------------------------------
    def record(self, entry: Entry) -> Entry:
        """Write `entry` to the target (atomically) before the change it describes.
        If the same thing is already recorded, the first (original) state is kept.
        JournalError for a kind no module registers, or an entry missing its kind's fields."""
        kind = kind_of(entry, self.path)
        if kind.missing(entry):
            raise JournalError(f"a {kind.kind} entry needs {', '.join(kind.missing(entry))}: {entry!r}",
                               hint="this is a bug in the caller of record()", path=self.path,
                               reason=JournalError.CORRUPT)
        key = kind.key_of(entry)
        for e in self.doc["entries"]:
            if entry_key(e) == key:
                return e
        self.doc["entries"].append(dict(entry))
        self._save()
        return entry

    def done(self, entry: Entry) -> None:
        key = entry_key(entry)
        before = len(self.doc["entries"])
        self.doc["entries"] = [e for e in self.doc["entries"] if entry_key(e) != key]
        if len(self.doc["entries"]) != before:
            self._save()

    def entries(self) -> list[Entry]:
        return [dict(e) for e in self.doc["entries"]]

    def _save(self) -> None:
        if self._lock is None:
            raise JournalError(f"the journal {self.path} was closed", hint="open a new one (Journal.open)",
                               path=self.path, reason=JournalError.CLOSED)
        if not self.doc["entries"] and not self.doc["keep"]:
            self.host.remove(self.path)
            return
        self.doc["updated"] = round(time.time(), 3)
        self.host.write_atomic(self.path, json.dumps(self.doc, indent=1), mode=0o600)

    # -- restore ------------------------------------------------------------------------------
    def restore_all(self) -> None:
        """Undo every entry, newest first (UnbindError lists what could not be undone)."""
        undo_entries(self.host, self)

    def release(self) -> None:
        """Release the lock and leave the file as it is (a journal another process still serves)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Release the lock; an empty journal is removed, one with entries stays (an orphan)."""
        if self._lock is None:
            return
        if not self.doc["entries"]:
            self.host.remove(self.path)
            if not self.doc.get("keep"):
                # a journal of one process (or session) leaves no lock file behind either. A kept
                # journal (the CLI's, shared by every `vfiotest bind`) keeps its lock file: a
                # waiter could otherwise hold the unlinked one while a newcomer takes a new one.
                self.host.remove(f"{self.root}/{self.owner}.lock")
        self._lock.release()
        self._lock = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Journal {self.path} {len(self.doc['entries'])} entries>"


def load_journal(host: Host, path: str, identity: dict[str, str | None] | None = None) -> dict[str, Any] | None:
    """The document at `path` on `host` (None when there is none), checked to be ours."""
    try:
        text = host.read_text(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == 2:
            return None
        raise
    doc = parse_journal(text, path)
    identity = identity or host_identity(host)
    if not _same_host(doc["identity"], identity):
        theirs = doc["identity"]
        raise JournalError(
            f"the journal {path} was written on {theirs.get('hostname')} (machine-id {theirs.get('machine_id')}), "
            f"but this host is {identity.get('hostname')} (machine-id {identity.get('machine_id')}); it is refused",
            hint=f"run `vfiotest restore` on the host that wrote it; if that host is gone or the file was copied "
                 f"here by mistake, move it aside: mv {path} {path}.other-host",
            path=path, reason=JournalError.FOREIGN)
    return doc


def live_journals(host: Host, root: str = JOURNAL_ROOT, exclude: Iterable[str] = ()) -> dict[str, list[Entry]]:
    """{owner: entries} of the journals on `host` whose process is alive (their lock is held),
    read without taking them; `exclude` names owners to leave out. Unreadable ones are skipped."""
    root = root.rstrip("/")
    out: dict[str, list[Entry]] = {}
    for name in host.listdir(root) or []:
        owner = name[:-5]
        if not name.endswith(".json") or owner in exclude:
            continue
        probe = host.hold_lock(f"{root}/{owner}.lock", blocking=False)
        try:
            doc = load_journal(host, f"{root}/{name}")
        except (JournalError, OSError):
            doc = None
        finally:
            if probe is not None:
                probe.release()
        if probe is not None and not (doc and session_alive(doc)):
            continue                    # nobody holds it and no live session serves it: not live
        if doc:
            out[owner] = list(doc["entries"])
    return out


def local_lock_held(path: str) -> bool:
    """Whether a process on this machine holds an flock on `path` (False when there is no file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _local_machine_id() -> str | None:
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def session_alive(doc: dict[str, Any]) -> bool:
    """Whether the pytest session a journal serves (doc["session"]) is still running: its
    controlling process, on this machine, holds its liveness lock. A session controlled from
    another machine cannot be seen from here: only the journal's own lock counts then."""
    s = doc.get("session") or {}
    if not s.get("alive") or not s.get("controller") or s.get("controller") != _local_machine_id():
        return False
    return local_lock_held(s["alive"])


def orphaned_journals(host: Host, root: str = JOURNAL_ROOT, include_kept: bool = True) -> list[Journal]:
    """Journals on `host` whose process is gone, each opened (its lock now held by us).
    Corrupt or foreign ones raise JournalError after the lock is released."""
    root = root.rstrip("/")
    found: list[Journal] = []
    for name in host.listdir(root) or []:
        if not name.endswith(".json"):
            continue
        owner = name[:-5]
        try:
            j = Journal.open(host, owner, root)
        except JournalError as e:
            if e.reason == JournalError.HELD:
                continue  # alive
            for other in found:
                other.close()
            raise
        if session_alive(j.doc):
            j.release()                 # its worker ended, its session has not: not an orphan
            continue
        if j.doc.get("keep") and not include_kept:
            j.close()
            continue
        found.append(j)
    return found


def _sweep_lock_files(host: Host, root: str) -> None:
    """Remove the lock files of journals that never got an entry (their process died between
    taking the lock and its first change): nobody holds them and no journal goes with them.
    The CLI's shared lock file stays (Journal.close)."""
    root = root.rstrip("/")
    names = set(host.listdir(root) or [])
    for name in names:
        owner = name[:-5]
        if not name.endswith(".lock") or f"{owner}.json" in names or owner == "cli":
            continue
        probe = host.hold_lock(f"{root}/{name}", blocking=False)
        if probe is not None:
            try:
                host.remove(f"{root}/{name}")
            finally:
                probe.release()


def restore_orphans(host: Host, root: str = JOURNAL_ROOT, include_kept: bool = False) -> list[tuple[str, int]]:
    """Replay every orphaned journal on `host` (newest entry first). Returns
    [(owner, entries restored)]. Problems are collected and raised together at the end,
    after everything that could be restored was."""
    done: list[tuple[str, int]] = []
    problems: list[HarnessError] = []
    try:
        journals = orphaned_journals(host, root, include_kept)
    except JournalError as e:
        problems.append(e)
        journals = []
        # restore the others anyway: skip the bad file by name
        for name in host.listdir(root.rstrip("/")) or []:
            if name.endswith(".json"):
                try:
                    j = Journal.open(host, name[:-5], root)
                except JournalError:
                    continue
                if session_alive(j.doc):
                    j.release()
                    continue
                if j.doc.get("keep") and not include_kept:
                    j.close()
                    continue
                journals.append(j)
    # VF counts last: a PF's count cannot go back while its VFs are bound (another journal's
    # driver entries); what failed is tried again while the others' undo makes progress
    journals.sort(key=lambda j: all(e.get("kind") == "numvfs" for e in j.entries()))
    counts = {j.owner: len(j.entries()) for j in journals}
    pending: list[Journal] = journals
    failed: list[tuple[Journal, HarnessError]] = []
    try:
        while pending:
            failed = []
            for j in pending:
                try:
                    j.restore_all()
                except HarnessError as e:
                    failed.append((j, e))
            if not failed or len(failed) == len(pending):
                break
            pending = [j for j, _ in failed]
    finally:
        for j in journals:
            if not j.entries():
                done.append((j.owner, counts[j.owner]))
            j.close()
    problems += [e for _, e in failed]
    _sweep_lock_files(host, root)
    if problems:
        if len(problems) == 1:
            raise problems[0]
        raise JournalError("; ".join(p.message for p in problems),
                           hint=" / ".join(p.hint for p in problems if p.hint))
    return done


__all__ = ["Journal", "MemoryJournal", "Recorder", "EntryKind", "JOURNAL_ROOT", "KIND_MODULES", "default_owner",
           "host_identity", "load_journal", "parse_journal", "orphaned_journals", "restore_orphans",
           "register_kind", "registered_kinds", "kind_of", "entry_key", "undo_entry", "undo_entries"]
