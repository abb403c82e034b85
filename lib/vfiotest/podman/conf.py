"""The podman base settings these machines need, as a containers.conf drop-in on the target.

Measured (../shared/notes/facts.md §4): without `default_ulimits` runc's setrlimit fails with EPERM,
crun fails on the hybrid cgroup layout (runtime runc), and the systemd cgroup
manager and journald events need systemd. The drop-in is written to
/etc/containers/containers.conf.d/ (read by podman >= 4.x after the main
containers.conf), never into a distro-owned file. Whatever was at that path
before is recorded and put back at teardown; a file we wrote ourselves in a
crashed earlier run (it carries MARKER) is removed instead of restored.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import tomlkit

from ..errors import ProvisionError

if TYPE_CHECKING:
    from typing import Self

    from ..host import Host

DROPIN_DIR = "/etc/containers/containers.conf.d"
DROPIN_PATH = f"{DROPIN_DIR}/50-vfiotest-podman.conf"
MARKER = "# written by vfiotest (podman base settings); removed at teardown"

BASE_SETTINGS: dict[str, dict[str, Any]] = {
    "containers": {"default_ulimits": ["nofile=20000:20000", "nproc=32768:32768"]},
    "engine": {"runtime": "runc", "cgroup_manager": "cgroupfs", "events_logger": "file"},
}


def render(settings: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The drop-in's text for `settings` (tables of keys), with the marker on top."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment(MARKER[2:]))
    for table, values in (settings or BASE_SETTINGS).items():
        t = tomlkit.table()
        for k, v in values.items():
            t.add(k, v)
        doc.add(table, t)
    return tomlkit.dumps(doc)


def parse(text: str) -> dict[str, Any]:
    """The settings in a drop-in's text (plain dicts)."""
    return tomlkit.parse(text).unwrap()


class PodmanBaseSettings:
    """Write the drop-in on `host`, remember what was there, put it back with `restore()`."""

    def __init__(self, host: Host, settings: Mapping[str, Mapping[str, Any]] | None = None,
                 path: str = DROPIN_PATH) -> None:
        self.host, self.settings, self.path = host, settings or BASE_SETTINGS, path
        self.previous: str | None = None        # text that was at `path` before apply(), None if nothing
        self.created_dir = False
        self.applied = False

    def _read(self) -> str | None:
        try:
            return self.host.read_text(self.path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise ProvisionError(f"cannot read {self.path} on {self.host.name}: {e}",
                                 hint="check permissions on /etc/containers on the target (the harness runs podman as root)") from e

    def snapshot(self) -> "PodmanBaseSettings":
        """Take what restore() will put back (apply() does it when not done): to record before writing."""
        old = self._read()
        # our own file left by a crashed run is not "the user's state": drop it at teardown
        self.previous = None if old is not None and old.startswith(MARKER) else old
        self.created_dir = not self.host.exists(os.path.dirname(self.path))
        self._snapshotted = True
        return self

    def apply(self) -> str:
        if not getattr(self, "_snapshotted", False):
            self.snapshot()
        text = render(self.settings)
        try:
            self.host.write_atomic(self.path, text, mode=0o644)
        except OSError as e:
            raise ProvisionError(f"cannot write the podman drop-in {self.path} on {self.host.name}: {e}",
                                 hint="the harness needs root on the target to configure podman") from e
        self.applied = True
        return text

    def restore(self) -> None:
        """Put back what apply() found (or remove the drop-in). Safe to call twice."""
        if not self.applied:
            return
        if self.previous is None:
            self.host.remove(self.path)
            if self.created_dir:
                self.host.run(["rmdir", "--ignore-fail-on-non-empty", os.path.dirname(self.path)], timeout=15)
        else:
            self.host.write_atomic(self.path, self.previous, mode=0o644)
        self.applied = False

    def __enter__(self) -> Self:
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def dropin_record(settings: "PodmanBaseSettings") -> dict:
    """The journal entry ("podman-dropin") `undo_dropin` needs, once `snapshot()` has taken
    the file's previous content."""
    return {"kind": "podman-dropin", "path": settings.path, "previous": settings.previous,
            "created_dir": settings.created_dir}


def undo_dropin(host: Host, rec: dict[str, Any]) -> None:
    """Put back what the containers.conf drop-in replaced (or remove it)."""
    s = PodmanBaseSettings(host, path=rec["path"])
    s.previous, s.created_dir, s.applied = rec["previous"], rec["created_dir"], True
    s.restore()


#: the journal's entry kinds this module owns (vfiotest.journal.register_kind arguments)
JOURNAL_KINDS = [{"kind": "podman-dropin", "required": ("path", "previous", "created_dir"), "undo": undo_dropin}]
