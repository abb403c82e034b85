"""The `kata-vfio` runtime for podman: a wrapper script and a containers.conf drop-in.

- Kata 1.x (`kata-runtime --version` says 1.x): the wrapper runs
  `kata-runtime --kata-config <our configuration.toml> "$@"`, so the system's
  configuration is never edited.
- Kata 2.x / 3.x: `kata-runtime` has no OCI CLI any more (shim v2 only), so
  podman cannot drive it: registration refuses with that reason.
- No Kata (no bundle, none installed): nothing to register; the Kata layers are
  unavailable (vfiotest.kata.bundle.KataChoice says why and how to get a bundle).

The drop-in is `/etc/containers/containers.conf.d/60-vfiotest-kata-vfio.conf`
(`[engine.runtimes] kata-vfio = [wrapper]`), never the distro-owned
containers.conf. Registration is idempotent; what was at the path before is
put back by `unregister()`; podman itself verifies it (`podman --runtime
kata-vfio info` resolves the name to the wrapper, and a created container's
`inspect` shows `OCIRuntime`).
"""

from __future__ import annotations

import errno
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import tomlkit

from ..errors import ProvisionError
from .config import KATA_VFIO_CONFIG, STATE_DIR

if TYPE_CHECKING:
    from ..host import Host

RUNTIME_NAME = "kata-vfio"
DROPIN_DIR = "/etc/containers/containers.conf.d"
DROPIN_PATH = f"{DROPIN_DIR}/60-vfiotest-kata-vfio.conf"
WRAPPER_PATH = f"{STATE_DIR}/kata-vfio"
MARKER = "written by vfiotest (kata-vfio runtime); removed at teardown"
NO_OCI_CLI = ("Kata {version} has no OCI runtime CLI (2.x and 3.x are shim v2 only): podman cannot "
              "drive it. Use Kata 1.x for the podman suites, or containerd/CRI-O with the shim.")


@dataclass
class KataInstall:
    """What `kata-runtime --version` told."""

    path: Optional[str]          # None: not installed
    version: Optional[str]       # "1.12.1"
    major: Optional[int]
    raw: str = ""

    @property
    def installed(self) -> bool:
        return self.path is not None

    @property
    def has_oci_cli(self) -> bool:
        return self.major == 1

    def describe(self) -> str:
        if not self.installed:
            return "Kata is not installed"
        if self.has_oci_cli:
            return f"Kata {self.version} at {self.path}: an OCI runtime CLI, podman can use it through kata-vfio"
        return NO_OCI_CLI.format(version=self.version or "(unknown version)")


def parse_kata_version(text: str) -> str | None:
    """The version in `kata-runtime --version` output (1.x: `kata-runtime  : 1.12.1`,
    2.x/3.x the same line with a later version), or None."""
    m = re.search(r"kata-runtime\s*:\s*v?(\d+\.\d+(?:\.\d+)?\S*)", text) or \
        re.search(r"\bversion\s*:?\s*v?(\d+\.\d+\.\d+\S*)", text, re.I)
    return m.group(1) if m else None


def detect_kata(host: Host, timeout: float = 15) -> KataInstall:
    """Which Kata is installed on `host`."""
    res = host.run("command -v kata-runtime || true", timeout=timeout)
    path = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else None
    if not path:
        return KataInstall(None, None, None)
    out = host.run([path, "--version"], timeout=timeout)
    text = out.stdout + out.stderr
    version = parse_kata_version(text)
    major = int(version.split(".")[0]) if version else None
    return KataInstall(path, version, major, text.strip())


def render_wrapper(kata: KataInstall, config_path: str = KATA_VFIO_CONFIG) -> str:
    """The wrapper podman runs as `kata-vfio`: Kata 1.x's kata-runtime with our configuration.
    ProvisionError when `kata` is not an installed Kata 1.x."""
    if kata.path is None:
        raise ProvisionError("kata-vfio needs a Kata 1.x kata-runtime and none was given",
                             hint="set VFIOTEST_KATA_BUNDLE to a Kata 1.x bundle (`vfiotest kata detect` says "
                                  "what was found)")
    if not kata.has_oci_cli:
        raise ProvisionError(NO_OCI_CLI.format(version=kata.version),
                             hint="install Kata 1.x (kata-runtime with the OCI CLI) on the runner")
    body = f"exec {shlex.quote(kata.path)} --kata-config {shlex.quote(config_path)} \"$@\""
    return f"#!/bin/sh\n# {MARKER}\n# kata-vfio -> Kata {kata.version} with {config_path}\n{body}\n"


def render_dropin(wrapper: str = WRAPPER_PATH, name: str = RUNTIME_NAME) -> str:
    doc = tomlkit.document()
    doc.add(tomlkit.comment(MARKER))
    engine = tomlkit.table(is_super_table=True)
    runtimes = tomlkit.table()
    runtimes.add(name, [wrapper])
    engine.add("runtimes", runtimes)
    doc.add("engine", engine)
    return tomlkit.dumps(doc)


def set_runtime(conf_text: str, name: str, paths: Iterable[str]) -> str:
    """`conf_text` (any containers.conf, comments kept) with `[engine.runtimes] name = paths`.
    Creates the tables when missing; replaces an existing entry of that name."""
    doc = tomlkit.parse(conf_text)
    engine = doc.get("engine")
    if engine is None:
        engine = tomlkit.table()
        doc.add("engine", engine)
    runtimes = engine.get("runtimes")
    if runtimes is None:
        runtimes = tomlkit.table()
        engine.add("runtimes", runtimes)
    arr = tomlkit.array()
    arr.extend(paths)
    if name in runtimes:
        runtimes[name] = arr
    else:
        runtimes.add(name, arr)
    return tomlkit.dumps(doc)


def remove_runtime(conf_text: str, name: str) -> str:
    """`conf_text` without `[engine.runtimes] name` (comments kept)."""
    doc = tomlkit.parse(conf_text)
    runtimes = doc.get("engine", {}).get("runtimes")
    if runtimes is not None and name in runtimes:
        del runtimes[name]
    return tomlkit.dumps(doc)


def runtimes_of(conf_text: str) -> dict[str, Any]:
    return dict(tomlkit.parse(conf_text).unwrap().get("engine", {}).get("runtimes", {}))


@dataclass
class RuntimeInfo:
    name: str
    wrapper: str
    dropin: str
    config: str             # the configuration.toml the wrapper gives kata-runtime
    kata: KataInstall

    def describe(self) -> str:
        return f"{self.name}: {self.wrapper} (Kata {self.kata.version}), registered in {self.dropin}"


class RuntimeRegistration:
    """Register `kata-vfio` on `host`; `unregister()` puts back what was there."""

    def __init__(self, host: Host, name: str = RUNTIME_NAME, dropin: str = DROPIN_PATH, wrapper: str = WRAPPER_PATH,
                 config_path: str = KATA_VFIO_CONFIG, kata: KataInstall | None = None) -> None:
        self.host, self.name, self.dropin, self.wrapper, self.config_path = host, name, dropin, wrapper, config_path
        self.kata = kata
        self.previous: dict[str, str | None] = {}     # path -> text before (None: absent)
        self.applied = False

    def _read(self, path: str) -> str | None:
        try:
            return self.host.read_text(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def snapshot(self) -> dict[str, str | None]:
        """Record what is at the wrapper and drop-in paths now (what `unregister()` puts back)."""
        for path in (self.wrapper, self.dropin):
            if path not in self.previous:
                old = self._read(path)
                # a file of ours left by a crashed run is not "what was there before"
                self.previous[path] = None if (old is not None and MARKER in old) else old
        return dict(self.previous)

    def info(self) -> RuntimeInfo:
        """The RuntimeInfo of this registration (as `register()` returns it)."""
        kata = self.kata if self.kata is not None else detect_kata(self.host)
        self.kata = kata
        return RuntimeInfo(self.name, self.wrapper, self.dropin, self.config_path, kata)

    def register(self) -> RuntimeInfo:
        """Write the wrapper and the drop-in (idempotent); returns a RuntimeInfo."""
        info = self.info()
        wrapper_text = render_wrapper(info.kata, self.config_path)
        dropin_text = render_dropin(self.wrapper, self.name)
        self.snapshot()
        for path, text, mode in ((self.wrapper, wrapper_text, 0o755), (self.dropin, dropin_text, 0o644)):
            old = self._read(path)
            if old != text:
                self.host.write_atomic(path, text, mode=mode)      # makes its directory (0755) if needed
        self.applied = True
        return info

    def unregister(self) -> None:
        """Put back what was at the drop-in and wrapper paths (remove what we created)."""
        for path, old in self.previous.items():
            if old is None:
                self.host.remove(path)
            else:
                self.host.write_atomic(path, old, mode=0o755 if path == self.wrapper else 0o644)
        self.previous.clear()
        self.applied = False

    def verify(self, image: str | None = None, timeout: float = 60) -> dict[str, str]:
        """podman resolves the name to the wrapper; with `image`, a created (not started)
        container's inspect shows OCIRuntime = kata-vfio. Returns what podman said."""
        res = self.host.run(["podman", "--runtime", self.name, "info", "--format",
                             "{{.Host.OCIRuntime.Name}}|{{.Host.OCIRuntime.Path}}"], timeout=timeout)
        got = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        if not res.ok or got != f"{self.name}|{self.wrapper}":
            raise ProvisionError(
                f"podman does not resolve the runtime {self.name} to {self.wrapper} on {self.host.name}: "
                f"{(res.stderr or res.stdout).strip()[-300:] or got}",
                hint=f"check {self.dropin} and that podman reads {DROPIN_DIR} (podman 4.x does)")
        said = {"info": got}
        if image:
            cname = f"vfiotest-runtime-check-{os.getpid()}"
            self.host.run(["podman", "rm", "-f", cname], timeout=timeout)
            create = self.host.run(["podman", "--runtime", self.name, "create", "--name", cname, image, "true"],
                                   timeout=timeout)
            try:
                if not create.ok:
                    raise ProvisionError(f"podman create with --runtime {self.name} failed: {create.stderr.strip()[-300:]}",
                                         hint=f"is the image {image} present? (`podman images`)")
                ins = self.host.run(["podman", "inspect", "--format", "{{.OCIRuntime}}", cname], timeout=timeout)
                said["inspect"] = ins.stdout.strip()
                if said["inspect"] != self.name:
                    raise ProvisionError(f"podman inspect shows OCIRuntime {said['inspect']!r}, not {self.name}",
                                         hint="podman ignored --runtime; check its version and containers.conf")
            finally:
                self.host.run(["podman", "rm", "-f", cname], timeout=timeout)
        return said


# Where Kata 1.x keeps a sandbox's state on the host (the runtime's store, QEMU's sockets,
# the shared directory the guest mounts over 9p).
KATA_STATE_DIRS = ("/run/vc/sbs/{id}", "/run/vc/vm/{id}", "/run/kata-containers/shared/sandboxes/{id}")
_LEFTOVERS_SCRIPT = ('for p in $(pgrep -f "sandbox-$1"); do echo "process $p: $(tr "\\0" " " < /proc/$p/cmdline | cut -c1-120)"; done; '
                     'shift; for d do [ -e "$d" ] && echo "directory $d"; done; true')


def kata_leftovers(host: Host, sandbox_id: str, timeout: float = 30) -> list[str]:
    """What the Kata 1.x sandbox `sandbox_id` left on `host`: its QEMU (and any process named
    after the sandbox) and its state directories, one line each; [] when it is all gone."""
    if not re.fullmatch(r"[0-9a-f]{12,64}", sandbox_id or ""):
        raise ValueError(f"{sandbox_id!r} is not a container id")
    dirs = [d.format(id=sandbox_id) for d in KATA_STATE_DIRS]
    res = host.run(["sh", "-c", _LEFTOVERS_SCRIPT, "sh", sandbox_id, *dirs], timeout=timeout, check=True,
                   what=f"looking for what Kata sandbox {sandbox_id[:12]} left")
    return [line for line in res.stdout.splitlines() if line.strip()]


REGISTRATION = "registration"   # the journal entry kind of a kata-vfio registration (undo: undo_registration)


def registration_record(reg: RuntimeRegistration, config_path: Optional[str]) -> dict[str, Any]:
    """The journal entry ("registration") `undo_registration` needs, taken (with
    `reg.snapshot()`) before `register()`."""
    return {"kind": REGISTRATION, "runtime": reg.name, "previous": reg.previous, "config": config_path}


def undo_registration(host: Host, rec: dict[str, Any]) -> None:
    """Remove the kata-vfio registration (putting back what it replaced) and the derived configuration."""
    reg = RuntimeRegistration(host, name=rec.get("runtime", RUNTIME_NAME))
    reg.previous = rec["previous"]
    reg.unregister()
    if rec.get("config"):
        host.remove(rec["config"])


#: the journal's entry kinds this module owns (vfiotest.journal.register_kind arguments)
JOURNAL_KINDS = [{"kind": REGISTRATION, "required": ("runtime", "previous"), "undo": undo_registration}]
