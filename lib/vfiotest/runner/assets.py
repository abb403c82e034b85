"""The runner's boot assets, cached by content under $VFIOTEST_CACHE_DIR/runner.

- kernel: Debian's `linux-image-6.1.*-amd64`, fetched with `apt-get download`
  and unpacked with `dpkg-deb -x` (modules indexed with `depmod -b`); keyed by
  package name and version.
- initramfs: busybox-static, the few modules needed to mount the root, and
  the init scripts; keyed by a hash of all of those.
- SSH keys: made once per runner (state directory), never regenerated while
  they exist.

Everything is built into a temporary name and renamed into place, under a
file lock, so concurrent sessions never see half a cache entry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

import filelock

from .. import constants
from ..constants import CACHE_ENV  # noqa: F401  (re-exported)
from ..errors import ProvisionError
from . import guestinit

KERNEL_PKG_ENV = "VFIOTEST_RUNNER_KERNEL"  # e.g. linux-image-6.1.0-56-amd64
KERNEL_SERIES = "6.1"
BUSYBOX = "/bin/busybox"


def cache_root() -> str:
    return constants.cache_dir("runner")


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    if progress:
        progress(text)


def _run(cmd: Sequence[str], what: str, timeout: float = 600, cwd: str | None = None) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except FileNotFoundError:
        raise ProvisionError(f"{what}: {cmd[0]} is not installed",
                             hint="run ci/setup (it installs the Debian packages the runner needs)") from None
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"{what}: {' '.join(cmd)} did not finish in {timeout} s",
                             hint="check the apt sources and the network, then retry") from None
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-4:])
        raise ProvisionError(f"{what}: {' '.join(cmd)} failed (exit {p.returncode}): {tail}",
                             hint="run the command by hand to see the whole output")
    return p.stdout


def _version_key(v: str) -> list[int | str]:
    return [int(x) if x.isdigit() else x for x in re.split(r"[.+~-]", v)]


class Kernel:
    """An unpacked kernel package: `vmlinuz`, `modules` (the /lib/modules/<kver> dir), `kver`."""

    def __init__(self, root: str) -> None:
        self.root = root
        boot = os.path.join(root, "boot")
        names = sorted(n for n in os.listdir(boot) if n.startswith("vmlinuz-"))
        if not names:
            raise ProvisionError(f"kernel cache entry {root} has no vmlinuz",
                                 hint=f"remove {root} and run `vfiotest runner up` again")
        self.vmlinuz = os.path.join(boot, names[-1])
        self.kver = names[-1][len("vmlinuz-"):]
        self.modules = os.path.join(root, "lib", "modules", self.kver)
        self.package = os.path.basename(root)

    def module_paths(self, names: Iterable[str]) -> list[str]:
        """Absolute .ko paths for `names` and everything they depend on, dependencies first."""
        deps = {}
        for line in open(os.path.join(self.modules, "modules.dep")):
            path, _, rest = line.partition(":")
            deps[_modname(path)] = (path, rest.split())
        builtin = set()
        try:
            builtin = {_modname(line.strip()) for line in open(os.path.join(self.modules, "modules.builtin"))}
        except FileNotFoundError:
            pass
        order, seen = [], set()

        def visit(name: str) -> None:
            name = _modname(name)
            if name in seen:
                return
            seen.add(name)
            if name not in deps:
                if name in builtin:
                    return
                raise ProvisionError(f"module {name} is not in kernel {self.kver}",
                                     hint="pick a kernel built with it (VFIOTEST_RUNNER_KERNEL)")
            path, needs = deps[name]
            for d in reversed(needs):  # modules.dep lists the deepest dependency last
                visit(d)
            order.append(os.path.join(self.modules, path))

        for n in names:
            visit(n)
        return order


def _modname(path: str) -> str:
    base = os.path.basename(path.strip())
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base.replace("-", "_")


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of Debian's 6.1 kernel image, from the machine's apt sources."""
    forced = os.environ.get(KERNEL_PKG_ENV)
    if forced:
        return forced, _candidate_version(forced)
    out = _run(["apt-cache", "show", "linux-image-amd64"], "finding the runner kernel", timeout=60)
    best = None
    for stanza in out.split("\n\n"):
        ver = re.search(r"^Version: (\S+)", stanza, re.M)
        dep = re.search(r"^Depends: (linux-image-[\w.+-]+)", stanza, re.M)
        if ver and dep and ver.group(1).startswith(KERNEL_SERIES + "."):
            if best is None or _version_key(ver.group(1)) > _version_key(best[1]):
                best = (dep.group(1), ver.group(1))
    if not best:
        raise ProvisionError(f"no linux-image-{KERNEL_SERIES}.*-amd64 in the apt sources",
                             hint="run `apt-get update` (ci/setup does), or set VFIOTEST_RUNNER_KERNEL to a kernel package")
    return best[0], _candidate_version(best[0])


def _candidate_version(pkg: str) -> str:
    out = _run(["apt-cache", "policy", pkg], f"looking up {pkg}", timeout=60)
    m = re.search(r"Candidate: (\S+)", out)
    if not m or m.group(1) == "(none)":
        raise ProvisionError(f"kernel package {pkg} has no candidate version in the apt sources",
                             hint="run `apt-get update`, or set VFIOTEST_RUNNER_KERNEL to a package apt can download")
    return m.group(1)


def _cache_lock() -> filelock.FileLock:
    os.makedirs(cache_root(), exist_ok=True)
    return filelock.FileLock(os.path.join(cache_root(), ".lock"), timeout=1800)


def unpack_package(pkg: str, ver: str, workdir: str, tree: str,
                   progress: Callable[[str], None] | None = None, label: str = "") -> None:
    """`apt-get download PKG=VER` into `workdir`, then `dpkg-deb -x` it into `tree`; the .deb goes."""
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg}={ver}"],
         f"downloading {pkg}", cwd=workdir)
    debs = [n for n in os.listdir(workdir) if n.endswith(".deb")]
    if not debs:
        raise ProvisionError(f"apt-get download {pkg} left no .deb", hint="check the apt sources")
    _say(progress, f"{label}unpacking {debs[0]}")
    _run(["dpkg-deb", "-x", os.path.join(workdir, debs[0]), tree], f"unpacking {debs[0]}")
    os.remove(os.path.join(workdir, debs[0]))


def _cached_kernels() -> list[str]:
    d = os.path.join(cache_root(), "kernel")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, n) for n in os.listdir(d)
                  if os.path.exists(os.path.join(d, n, ".complete")))


def ensure_kernel(progress: Callable[[str], None] | None = None) -> Kernel:
    """The kernel, downloaded and unpacked on first use."""
    try:
        pkg, ver = resolve_kernel_package()
    except ProvisionError:
        cached = _cached_kernels()
        if cached:  # offline: use what we have
            return Kernel(cached[-1])
        raise
    root = os.path.join(cache_root(), "kernel", f"{pkg}_{ver}")
    if os.path.exists(os.path.join(root, ".complete")):
        return Kernel(root)
    with _cache_lock():
        if os.path.exists(os.path.join(root, ".complete")):
            return Kernel(root)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(root))
        try:
            _say(progress, f"runner: downloading {pkg} {ver} (about 70 MB)")
            tree = os.path.join(tmp, "tree")
            unpack_package(pkg, ver, tmp, tree, progress, "runner: ")
            k = Kernel(tree)
            _say(progress, f"runner: indexing modules of {k.kver}")
            _run(["depmod", "-b", tree, k.kver], f"depmod for {k.kver}")
            open(os.path.join(tree, ".complete"), "w").close()
            if os.path.exists(root):
                shutil.rmtree(root)
            os.rename(tree, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Kernel(root)


# -- initramfs -----------------------------------------------------------------

class CpioWriter:
    """A newc cpio archive (what the kernel unpacks as an initramfs), root-owned entries."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.f, self.ino = fileobj, 1000

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        self.ino += 1
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.f.write(b"070701" + b"".join(b"%08X" % v for v in fields))
        self.f.write(name.encode() + b"\0")
        self.f.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.f.write(data)
        self.f.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, 0o040000 | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120000 | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)


def initramfs_inputs(kernel: Kernel) -> str:
    """Everything the initramfs is made of, for its cache key."""
    h = hashlib.sha256()
    h.update(kernel.package.encode() + b"\0" + kernel.kver.encode() + b"\0")
    for part in (guestinit.INIT, guestinit.STAGE2, guestinit.SSHD_CONFIG, " ".join(guestinit.INITRAMFS_MODULES)):
        h.update(part.encode() + b"\0")
    with open(BUSYBOX, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def ensure_initramfs(kernel: Kernel, progress: Callable[[str], None] | None = None) -> str:
    """Path of the initramfs for `kernel`, built when its inputs changed."""
    if not os.path.exists(BUSYBOX):
        raise ProvisionError(f"{BUSYBOX} is missing: the runner's initramfs needs busybox-static",
                             hint="apt-get install busybox-static (ci/setup does)")
    path = os.path.join(cache_root(), f"initramfs-{initramfs_inputs(kernel)}.cpio.gz")
    if os.path.exists(path):
        return path
    with _cache_lock():
        if os.path.exists(path):
            return path
        _say(progress, "runner: building the initramfs")
        mods = kernel.module_paths(guestinit.INITRAMFS_MODULES)
        buf = io.BytesIO()
        w = CpioWriter(buf)
        for d in ("bin", "dev", "etc", "proc", "sys", "lib", "lib/modules", "newroot", "lower", "rw"):
            w.dir(d)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        with open(BUSYBOX, "rb") as f:
            w.file("bin/busybox", f.read(), 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", guestinit.INIT.encode(), 0o755)
        w.file("etc/vfiotest-stage2", guestinit.STAGE2.encode(), 0o755)
        w.file("etc/vfiotest-sshd_config", guestinit.SSHD_CONFIG.encode(), 0o644)
        order = []
        for m in mods:
            name = "lib/modules/" + os.path.basename(m)
            with open(m, "rb") as f:
                w.file(name, f.read())
            order.append("/" + name)
        w.file("etc/vfiotest-modules", ("\n".join(order) + "\n").encode())
        w.close()
        tmp = path + f".tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
        os.replace(tmp, path)
        for old in os.listdir(cache_root()):  # drop stale builds
            if old.startswith("initramfs-") and os.path.join(cache_root(), old) != path:
                try:
                    os.remove(os.path.join(cache_root(), old))
                except OSError:
                    pass
    return path


# -- keys ----------------------------------------------------------------------

def ensure_keys(ssh_dir: str) -> dict[str, str]:
    """The runner's host key and client key (ed25519), made once. Returns their paths."""
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    keys = {}
    for kind in ("host", "client"):
        path = os.path.join(ssh_dir, f"{kind}_ed25519_key")
        if not (os.path.exists(path) and os.path.exists(path + ".pub")):
            for p in (path, path + ".pub"):
                if os.path.exists(p):
                    os.remove(p)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vfiotest-runner-{kind}", "-f", path],
                 f"making the runner's {kind} key")
        keys[kind] = path
    return keys


def public_key(path: str) -> str:
    """`type base64` of an OpenSSH public key file."""
    return " ".join(open(path + ".pub").read().split()[:2])
