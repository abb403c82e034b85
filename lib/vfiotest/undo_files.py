"""The "file" journal kind: a file on the target as it was before we changed it.

    {"kind": "file", "path": "/etc/...", "existed": true, "content": "<text>", "mode": 420}
    {"kind": "file", "path": "/etc/...", "existed": false}

`record_file(host, recorder, path)` snapshots the file (one round trip) and records
it BEFORE the caller changes it; `write_file()` does both and then writes. Undo puts
the file back exactly (content and permission bits, written atomically) or removes
it when it did not exist. Text files only (UTF-8): anything else is refused before
any change. Owner and group are not recorded (files are written as the target user).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from .errors import HarnessError, JournalError
from .host import Host

# Runs on the target (argv[1] = sysroot, argv[2] = path): does the file exist, its mode and text.
SNAPSHOT_SCRIPT = r"""
import json, os, stat, sys
p = sys.argv[1] + sys.argv[2]
try:
    st = os.stat(p)
except FileNotFoundError:
    print(json.dumps({"existed": False}))
    raise SystemExit(0)
except OSError as e:
    print(json.dumps({"error": "%s (errno %d)" % (e.strerror, e.errno)}))
    raise SystemExit(0)
if not stat.S_ISREG(st.st_mode):
    print(json.dumps({"error": "not a regular file"}))
    raise SystemExit(0)
try:
    with open(p, "rb") as f:
        text = f.read().decode("utf-8")
except UnicodeDecodeError:
    print(json.dumps({"error": "not UTF-8 text"}))
    raise SystemExit(0)
except OSError as e:
    print(json.dumps({"error": "%s (errno %d)" % (e.strerror, e.errno)}))
    raise SystemExit(0)
print(json.dumps({"existed": True, "mode": stat.S_IMODE(st.st_mode), "content": text}))
"""

# Runs on the target (argv[1] = sysroot, argv[2] = path, argv[3] = octal mode).
CHMOD_SCRIPT = r"""
import os, sys
os.chmod(sys.argv[1] + sys.argv[2], int(sys.argv[3], 8))
"""


def file_entry(host: Host, path: str, timeout: float = 30) -> dict[str, Any]:
    """The "file" entry for `path` on `host` as it is now (HarnessError for a file that
    cannot be recorded: not regular, not UTF-8 text, unreadable)."""
    res = host.python(SNAPSHOT_SCRIPT, [host.sysroot, path], timeout=timeout, check=True,
                      what=f"snapshot {path}")
    snap = json.loads(res.stdout.strip().splitlines()[-1])
    if "error" in snap:
        raise HarnessError(f"{path} on {host.name} cannot be recorded for undo: {snap['error']}; it was not changed",
                           hint="only regular UTF-8 text files can be journaled", path=path, cause=snap["error"])
    entry: dict[str, Any] = {"kind": "file", "path": path, "existed": snap["existed"]}
    if snap["existed"]:
        entry["content"], entry["mode"] = snap["content"], snap["mode"]
    return entry


class Records(Protocol):
    """What keeps an undo entry before a change: a journal (vfiotest.journal.Recorder, which
    returns the entry it keeps) or a session (vfiotest.session.Session.record, which returns None)."""

    def record(self, entry: dict[str, Any]) -> dict[str, Any] | None: ...


def record_file(host: Host, recorder: Records, path: str) -> dict[str, Any]:
    """Record `path` as it is now into `recorder` (before changing it). Returns the kept entry
    (a journal keeps the first, original state of a file recorded twice), else the one recorded."""
    entry = file_entry(host, path)
    kept = recorder.record(entry)
    return kept if kept is not None else entry


def write_file(host: Host, recorder: Records, path: str, text: str, mode: int = 0o644) -> dict[str, Any]:
    """Record `path`, then replace it atomically with `text` (permission bits `mode`)."""
    entry = record_file(host, recorder, path)
    host.write_atomic(path, text, mode=mode)
    _chmod(host, path, mode)
    return entry


def _chmod(host: Host, path: str, mode: int) -> None:
    # write_atomic creates the file through the umask: set the bits exactly
    host.python(CHMOD_SCRIPT, [host.sysroot, path, "%o" % mode], check=True, what=f"chmod {path}")


def undo_file(host: Host, entry: dict[str, Any]) -> None:
    """Undo a "file" entry: put the content and mode back, or remove a file that did not exist."""
    path = entry["path"]
    if not entry["existed"]:
        host.remove(path)
        return
    if "content" not in entry:
        raise JournalError(f"the file entry for {path} has no content to put back", path=path,
                           hint="the journal was edited by hand; put the file back yourself",
                           reason=JournalError.CORRUPT)
    mode = entry.get("mode")
    host.write_atomic(path, entry["content"], mode=0o600 if mode is None else int(mode))
    if mode is not None:
        _chmod(host, path, int(mode))


# The journal entry kind this module owns; vfiotest.journal registers it (journal.KIND_MODULES).
JOURNAL_KINDS = [{"kind": "file", "required": ("path", "existed"), "undo": undo_file}]

__all__ = ["file_entry", "record_file", "write_file", "undo_file"]
