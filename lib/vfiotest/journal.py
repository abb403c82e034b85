"""The restore journal: on the TARGET host, written atomically BEFORE every change.

One journal per process (`<root>/<owner>.json`, default root
/var/lib/vfiotest/journal), each held by a lock (`<owner>.lock`, host.hold_lock)
for the life of its process. A journal whose lock is free belongs to a process
that is gone: it is an orphan, and `restore_orphans()` (what `vfiotest restore`
and the start of every session run) puts back what it records, newest first.

A journal records the host it was written on (machine-id, hostname); one from
another host, or one that does not parse, is refused with the way out.

Entries (see vfiotest.bind.restore_entry):
  {"kind": "driver", "address", "driver", "driver_override"}   original driver binding
  {"kind": "new_id", "driver", "id"}                             an ID we added to new_id
  {"kind": "numvfs", "address", "numvfs", "drivers_autoprobe"}   original SR-IOV state
"""

import json
import os
import socket
import time

from .bind import entry_key, restore_entries
from .errors import HarnessError, JournalError

JOURNAL_ROOT = "/var/lib/vfiotest/journal"
VERSION = 1
REQUIRED = {"driver": ("address", "driver"), "new_id": ("driver", "id"), "numvfs": ("address", "numvfs")}


def default_owner():
    """A name unique to this process: controller host, pid, xdist worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{worker}" if worker else "")


def host_identity(host):
    """{"machine_id", "hostname", "boot_id"} of the target, as its files say."""
    def rd(p):
        try:
            return host.read_text(p).strip() or None
        except OSError:
            return None
    return {"machine_id": rd("/etc/machine-id"), "hostname": rd("/proc/sys/kernel/hostname"),
            "boot_id": rd("/proc/sys/kernel/random/boot_id")}


def _same_host(a, b):
    for key in ("machine_id", "hostname"):
        if a.get(key) and b.get(key) and a[key] != b[key]:
            return False
    return True


def _corrupt(path, why):
    return JournalError(
        f"the restore journal {path} is corrupt ({why}); it is refused",
        hint=f"read it (`cat {path}`), put the devices it lists back by hand if needed (`vfiotest devices`, "
             f"`vfiotest unbind ADDR`), then move it aside: mv {path} {path}.corrupt")


def parse_journal(text, path="journal"):
    """The journal document in `text`, validated; JournalError when it is not a journal."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise _corrupt(path, f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise _corrupt(path, f"no version {VERSION} header")
    if not isinstance(doc.get("identity"), dict) or not isinstance(doc.get("entries"), list):
        raise _corrupt(path, "identity or entries missing")
    for e in doc["entries"]:
        if not isinstance(e, dict) or e.get("kind") not in REQUIRED or any(k not in e for k in REQUIRED[e["kind"]]):
            raise _corrupt(path, f"bad entry {e!r}")
    return doc


class Journal:
    """A durable recorder (same interface as bind.MemoryJournal) for one process.

    Open it with `Journal.open(host)`; `close()` releases its lock and removes it when empty.
    keep=True marks a journal that sessions must not replay on their own (the CLI's manual
    binds); `vfiotest restore` replays it."""

    def __init__(self, host, owner, root, lock, doc, keep=False):
        self.host, self.owner, self.root, self._lock = host, owner, root.rstrip("/"), lock
        self.doc = doc
        self.doc["keep"] = bool(keep or doc.get("keep"))

    @property
    def path(self):
        return f"{self.root}/{self.owner}.json"

    @classmethod
    def open(cls, host, owner=None, root=JOURNAL_ROOT, keep=False, wait=0.0):
        """Take the journal `owner` (default: this process) on `host`, loading what it already holds.
        JournalError when another live process holds it, or it is corrupt or from another host."""
        owner = owner or default_owner()
        root = root.rstrip("/")
        lock = host.hold_lock(f"{root}/{owner}.lock", blocking=wait > 0, timeout=wait)
        if lock is None:
            raise JournalError(f"the journal {root}/{owner}.json on {host.name} is held by another running process",
                               hint="wait for that vfiotest/pytest process to finish (journals are one per process)")
        try:
            ident = host_identity(host)
            doc = load_journal(host, f"{root}/{owner}.json", ident)
            if doc is None:
                doc = {"version": VERSION, "owner": owner, "pid": os.getpid(), "identity": ident,
                       "created": round(time.time(), 3), "entries": []}
        except BaseException:
            lock.release()
            raise
        return cls(host, owner, root, lock, doc, keep)

    # -- the recorder interface ------------------------------------------------------------
    def record(self, entry):
        """Write `entry` to the target (atomically) before the change it describes.
        If the same thing is already recorded, the first (original) state is kept."""
        for e in self.doc["entries"]:
            if entry_key(e) == entry_key(entry):
                return e
        self.doc["entries"].append(dict(entry))
        self._save()
        return entry

    def done(self, entry):
        before = len(self.doc["entries"])
        self.doc["entries"] = [e for e in self.doc["entries"] if entry_key(e) != entry_key(entry)]
        if len(self.doc["entries"]) != before:
            self._save()

    def entries(self):
        return [dict(e) for e in self.doc["entries"]]

    def _save(self):
        if self._lock is None:
            raise JournalError(f"the journal {self.path} was closed", hint="open a new one (Journal.open)")
        if not self.doc["entries"] and not self.doc["keep"]:
            self.host.remove(self.path)
            return
        self.doc["updated"] = round(time.time(), 3)
        self.host.write_atomic(self.path, json.dumps(self.doc, indent=1), mode=0o600)

    # -- restore ------------------------------------------------------------------------------
    def restore_all(self):
        """Undo every entry, newest first (UnbindError lists what could not be undone)."""
        restore_entries(self.host, self)

    def close(self):
        """Release the lock; an empty journal is removed, one with entries stays (an orphan)."""
        if self._lock is None:
            return
        if not self.doc["entries"]:
            self.host.remove(self.path)
        self._lock.release()
        self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Journal {self.path} {len(self.doc['entries'])} entries>"


def load_journal(host, path, identity=None):
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
                 f"here by mistake, move it aside: mv {path} {path}.other-host")
    return doc


def orphaned_journals(host, root=JOURNAL_ROOT, include_kept=True):
    """Journals on `host` whose process is gone, each opened (its lock now held by us).
    Corrupt or foreign ones raise JournalError after the lock is released."""
    root = root.rstrip("/")
    found = []
    for name in host.listdir(root) or []:
        if not name.endswith(".json"):
            continue
        owner = name[:-5]
        try:
            j = Journal.open(host, owner, root)
        except JournalError as e:
            if "held by another running process" in e.message:
                continue  # alive
            for other in found:
                other.close()
            raise
        if j.doc.get("keep") and not include_kept:
            j.close()
            continue
        found.append(j)
    return found


def restore_orphans(host, root=JOURNAL_ROOT, include_kept=False):
    """Replay every orphaned journal on `host` (newest entry first). Returns
    [(owner, entries restored)]. Problems are collected and raised together at the end,
    after everything that could be restored was."""
    done, problems = [], []
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
                if j.doc.get("keep") and not include_kept:
                    j.close()
                    continue
                journals.append(j)
    for j in journals:
        n = len(j.entries())
        try:
            j.restore_all()
            done.append((j.owner, n))
        except HarnessError as e:
            problems.append(e)
        finally:
            j.close()
    if problems:
        if len(problems) == 1:
            raise problems[0]
        raise JournalError("; ".join(p.message for p in problems),
                           hint=" / ".join(p.hint for p in problems if p.hint))
    return done


__all__ = ["Journal", "JOURNAL_ROOT", "default_owner", "host_identity", "load_journal", "parse_journal",
           "orphaned_journals", "restore_orphans"]
