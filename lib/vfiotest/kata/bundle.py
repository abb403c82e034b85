"""The Kata 1.x bundle (a build of Kata 1.12.1, shared/kata) as a verified asset.

Where it comes from: `$VFIOTEST_KATA_BUNDLE` (a `.tar.zst`, `.tar.gz`, `.tar` or an
unpacked directory), else `<checkout>/../shared/kata/kata-1.12.1-x86_64.tar.zst`.
A tarball is unpacked once into `<cache>/kata/<sha256[:16]>/` (temp dir + rename,
under a file lock, so parallel pytest workers unpack once) and every file listed in
its `SHA256SUMS` is checked; a `.verified` stamp lets later calls reuse it after a
size check. `copy_bundle_to()` puts it on a target that does not see the
controller's filesystem, checked there with `sha256sum -c`. `choose_kata()` picks
the Kata a target uses: the env bundle, else an installed Kata 1.x, else the
default bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Tuple

import filelock

from ..constants import CACHE_ENV, KATA_STATE_DIR
from ..constants import cache_dir as _cache_dir
from ..errors import ProvisionError

if TYPE_CHECKING:  # pragma: no cover
    from ..host import CommandResult, Host
    from .runtime import KataInstall

BUNDLE_ENV = "VFIOTEST_KATA_BUNDLE"
BUNDLE_NAME = "kata-1.12.1-x86_64.tar.zst"
# lib/vfiotest/kata/bundle.py -> the checkout; shared/ is its sibling (X/<clone>, X/shared)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_BUNDLE = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "kata", BUNDLE_NAME))
BUILD_SCRIPT = os.path.join(os.path.dirname(DEFAULT_BUNDLE), "build.sh")

SUMS = "SHA256SUMS"
STAMP = ".verified"
STAMP_FORMAT = 1
TAR_SUFFIXES = (".tar.zst", ".tzst", ".tar.gz", ".tgz", ".tar")
REQUIRED = {
    "runtime": "bin/kata-runtime",
    "agent": "bin/kata-agent",
    "shim": "libexec/kata-containers/kata-shim",
    "proxy": "libexec/kata-containers/kata-proxy",
    "config": "share/defaults/kata-containers/configuration-qemu.toml",
}
EXEC_DIRS = ("bin/", "libexec/")       # files under these must be executable
LOCK_TIMEOUT = 600.0
# The kata layer's state directory on a target.
REMOTE_DIR = KATA_STATE_DIR
# One `cat >> file` per chunk: at most half of sshd's 2 MiB initial channel window, so
# SshHost's sendall never waits for a window adjust (its channel timeout is 0.2 s).
COPY_CHUNK = 1 << 20

Progress = Optional[Callable[[str], None]]
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def _hint(source: Optional[str] = None) -> str:
    again = f"copy {source} again" if source else "copy the bundle again"
    return f"{again} from shared/kata, or rebuild it: {BUILD_SCRIPT} SRC OUT (about 70 s)"


def default_bundle_path() -> Optional[str]:
    """The shared bundle beside the checkout, when it is there."""
    return DEFAULT_BUNDLE if os.path.isfile(DEFAULT_BUNDLE) else None


def bundle_source() -> Tuple[Optional[str], Optional[str]]:
    """(path, "env") from $VFIOTEST_KATA_BUNDLE, else (path, "default"), else (None, None).
    An env value naming nothing is an error, not a fall back to the default."""
    value = os.environ.get(BUNDLE_ENV, "").strip()
    if value:
        path = os.path.abspath(os.path.expanduser(value))
        if not os.path.exists(path):
            err = ProvisionError(f"{BUNDLE_ENV}={value} names nothing: {path} does not exist",
                                 hint=f"point {BUNDLE_ENV} at a Kata 1.x .tar.zst or an unpacked bundle "
                                      f"directory (e.g. {DEFAULT_BUNDLE}; {BUILD_SCRIPT} builds one, see the "
                                      f"README.md beside it), or unset it", reason=ProvisionError.ABSENT)
            err.exit_code = 2   # a bad setting: a usage error
            raise err
        return path, "env"
    default = default_bundle_path()
    return (default, "default") if default else (None, None)


def bundle_cache_dir(cache_dir: Optional[str] = None) -> str:
    """`<cache>/kata`; the cache is $VFIOTEST_CACHE_DIR or /var/cache/vfiotest."""
    return os.path.join(cache_dir, "kata") if cache_dir else _cache_dir("kata")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe_rel(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts


def _needs_exec(rel: str) -> bool:
    return rel.startswith(EXEC_DIRS)


def parse_sums(text: str, where: str) -> List[Tuple[str, str]]:
    """[(relative path, sha256)] of a sha256sum-format file; refuses absolute and `..` paths."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUMS_LINE.match(line)
        if not m or not _safe_rel(m.group(2)):
            raise ProvisionError(f"{where} line {n} is not `<sha256>  <relative path>`: {line[:120]!r}",
                                 hint=_hint())
        out.append((posixpath.normpath(m.group(2)), m.group(1).lower()))
    if not out:
        raise ProvisionError(f"{where} lists no files", hint=_hint())
    return out


def verify_tree(root: str, source: str) -> Tuple[str, Dict[str, int]]:
    """Check every file listed in `root/SHA256SUMS` (present, regular, sha256, binaries
    executable). Returns (sha256 of SHA256SUMS, {relative path: size})."""
    sums_path = os.path.join(root, SUMS)
    try:
        with open(sums_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ProvisionError(f"the Kata bundle {source} has no readable {SUMS} ({sums_path}: {e.strerror})",
                             hint=_hint(source)) from None
    entries = parse_sums(raw.decode("utf-8", "replace"), sums_path)
    listed = {rel for rel, _ in entries}
    missing = [rel for rel in REQUIRED.values() if rel not in listed]
    if missing:
        raise ProvisionError(f"{sums_path} does not list {', '.join(missing)}: not a Kata 1.x bundle",
                             hint=_hint(source))
    sizes = {}
    for rel, want in entries:
        path = os.path.join(root, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ProvisionError(f"{path} is listed in {SUMS} but missing from the Kata bundle {source}",
                                 hint=_hint(source)) from None
        if not stat.S_ISREG(st.st_mode):
            raise ProvisionError(f"{path} (listed in {SUMS}) is not a regular file in the Kata bundle {source}",
                                 hint=_hint(source))
        got = sha256_file(path)
        if got != want:
            raise ProvisionError(f"{path} in the Kata bundle {source} is damaged: sha256 {got}, "
                                 f"{SUMS} says {want}", hint=_hint(source))
        if _needs_exec(rel) and not st.st_mode & 0o111:
            raise ProvisionError(f"{path} in the Kata bundle {source} is not executable (mode {st.st_mode & 0o7777:o})",
                                 hint=_hint(source))
        sizes[rel] = st.st_size
    return hashlib.sha256(raw).hexdigest(), sizes


def bundle_version(root: str, timeout: float = 15.0) -> str:
    """`<root>/bin/kata-runtime --version`, run here, parsed."""
    from .runtime import parse_kata_version

    exe = os.path.join(root, REQUIRED["runtime"])
    try:
        p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise ProvisionError(f"cannot run {exe} --version: {e}",
                             hint="the bundle is built for x86_64 Linux with glibc (Debian 12); " + _hint()) from None
    version = parse_kata_version(p.stdout + p.stderr) if p.returncode == 0 else None
    if not version:
        said = (p.stderr or p.stdout).strip()[-300:]
        raise ProvisionError(f"{exe} --version (exit {p.returncode}) names no Kata version: {said!r}", hint=_hint())
    return version


@dataclass
class KataBundle:
    """An unpacked, verified Kata bundle on the controller."""

    root: str          # the unpacked kata-1.12.1 directory
    source: str        # the tarball or directory it came from
    sha256: str        # of the tarball; for a directory source, of its SHA256SUMS
    version: str       # from `bin/kata-runtime --version`

    @property
    def major(self) -> Optional[int]:
        try:
            return int(self.version.split(".")[0])
        except (AttributeError, ValueError):
            return None

    @property
    def runtime(self) -> str:
        return os.path.join(self.root, REQUIRED["runtime"])

    @property
    def agent(self) -> str:
        return os.path.join(self.root, REQUIRED["agent"])

    @property
    def shim(self) -> str:
        return os.path.join(self.root, REQUIRED["shim"])

    @property
    def proxy(self) -> str:
        return os.path.join(self.root, REQUIRED["proxy"])

    @property
    def config(self) -> str:
        return os.path.join(self.root, REQUIRED["config"])

    def entries(self) -> List[Tuple[str, str]]:
        """[(relative path, sha256)] from its SHA256SUMS."""
        with open(os.path.join(self.root, SUMS)) as f:
            return parse_sums(f.read(), os.path.join(self.root, SUMS))

    def describe(self) -> str:
        return f"Kata {self.version} bundle {self.source} (sha256 {self.sha256[:12]}…), unpacked at {self.root}"


# -- unpacking --------------------------------------------------------------------

def _refuse(source: str, what: str) -> NoReturn:
    raise ProvisionError(f"the Kata bundle {source}: {what}: refused",
                         hint=_hint(source))


_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # Python >= 3.11.4


def _extract_members(tf: tarfile.TarFile, dest: str, source: str) -> None:
    kw: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    for m in tf:
        p = PurePosixPath(m.name)
        if p.is_absolute() or ".." in p.parts:
            _refuse(source, f"member {m.name!r} has an absolute path or `..`")
        if not (m.isfile() or m.isdir()):
            _refuse(source, f"member {m.name!r} is not a regular file or directory")
        try:
            tf.extract(m, dest, set_attrs=True, **kw)
        except _FILTER_ERROR as e:
            _refuse(source, f"member {m.name!r}: {e}")


def _extract(source: str, dest: str) -> None:
    try:
        if source.endswith((".tar.zst", ".tzst")):
            zstd = shutil.which("zstd")
            if not zstd:
                raise ProvisionError(f"unpacking {source} needs the zstd command", hint="apt-get install zstd")
            with tempfile.TemporaryFile() as err:
                proc = subprocess.Popen([zstd, "-d", "-c", "-q", "--", source], stdout=subprocess.PIPE, stderr=err)
                assert proc.stdout is not None  # stdout=PIPE
                try:
                    with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
                        _extract_members(tf, dest, source)
                    proc.stdout.read()  # drain the end-of-archive padding
                finally:
                    proc.stdout.close()
                    rc = proc.wait(timeout=60)
                if rc != 0:
                    err.seek(0)
                    raise ProvisionError(f"zstd could not decompress {source} (exit {rc}): "
                                         f"{err.read().decode('utf-8', 'replace').strip()[-300:]}", hint=_hint(source))
        else:
            with open(source, "rb") as f, tarfile.open(fileobj=f, mode="r|gz" if source.endswith(("gz", "tgz")) else "r|") as tf:
                _extract_members(tf, dest, source)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ProvisionError(f"{source} is not a readable tarball: {e}", hint=_hint(source)) from None


def _top_dir(tmp: str, source: str) -> str:
    names = sorted(os.listdir(tmp))
    if len(names) != 1 or not os.path.isfile(os.path.join(tmp, names[0], SUMS)):
        raise ProvisionError(f"the Kata bundle {source} must hold exactly one top directory with {SUMS}; "
                             f"it holds {names[:10]}", hint=_hint(source))
    return names[0]


def _reusable(final: str, sha: str) -> Optional[str]:
    """The root of a complete, verified unpack of tarball `sha` at `final`, or None.
    Cheap: the stamp, the SHA256SUMS hash and the sizes (the full hash ran at unpack)."""
    try:
        with open(os.path.join(final, STAMP)) as f:
            stamp = json.load(f)
        if stamp.get("format") != STAMP_FORMAT or stamp.get("tarball_sha256") != sha:
            return None
        root = os.path.join(final, stamp["top"])
        if sha256_file(os.path.join(root, SUMS)) != stamp["sums_sha256"]:
            return None
        for rel, size in stamp["sizes"].items():
            st = os.lstat(os.path.join(root, rel))
            if not stat.S_ISREG(st.st_mode) or st.st_size != size or (_needs_exec(rel) and not st.st_mode & 0o111):
                return None
        return root
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def unpack_bundle(source: str, cache_dir: Optional[str] = None, progress: Progress = None) -> KataBundle:
    """A verified KataBundle from `source`: a tarball (unpacked into the cache once) or a
    directory (verified in place). Raises ProvisionError naming what is wrong."""
    say = progress or (lambda msg: None)
    source = os.path.abspath(source)
    root: str | None
    if os.path.isdir(source):
        root = source
        if not os.path.isfile(os.path.join(root, SUMS)):   # the parent of kata-1.12.1/ will do too
            subs = [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, SUMS))]
            if len(subs) == 1:
                root = os.path.join(root, subs[0])
        say(f"verifying the Kata bundle directory {root}")
        sums_sha, _ = verify_tree(root, source)
        return KataBundle(root, source, sums_sha, bundle_version(root))
    if not os.path.isfile(source):
        raise ProvisionError(f"the Kata bundle {source} does not exist", hint=_hint(source), reason=ProvisionError.ABSENT)
    if not source.endswith(TAR_SUFFIXES):
        raise ProvisionError(f"the Kata bundle {source} is neither a directory nor a {'/'.join(TAR_SUFFIXES)} file",
                             hint=f"give {BUNDLE_ENV} a .tar.zst or an unpacked bundle directory")
    sha = sha256_file(source)
    base = bundle_cache_dir(cache_dir)
    final = os.path.join(base, sha[:16])
    root = _reusable(final, sha)
    if root is None:
        try:
            os.makedirs(base, exist_ok=True)
            lock = filelock.FileLock(final + ".lock", timeout=LOCK_TIMEOUT)
            lock.acquire()
        except filelock.Timeout:
            raise ProvisionError(f"another process has held {final}.lock for {LOCK_TIMEOUT:.0f} s",
                                 hint="wait for the other unpack, or remove the lock if no vfiotest runs") from None
        except OSError as e:
            raise ProvisionError(f"cannot use the asset cache {base}: {e.strerror}",
                                 hint=f"set {CACHE_ENV} to a writable directory") from None
        try:
            root = _reusable(final, sha)
            if root is None:
                root = _unpack_locked(source, sha, final, base, say)
        finally:
            lock.release()
    return KataBundle(root, source, sha, bundle_version(root))


def _unpack_locked(source: str, sha: str, final: str, base: str, say: Callable[[str], None]) -> str:
    if os.path.lexists(final):
        say(f"{final} is incomplete or does not match its stamp: unpacking again")
        shutil.rmtree(final)
    for name in os.listdir(base):   # left by a process killed while unpacking (we hold the lock)
        if name.startswith(f".{sha[:16]}.") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    say(f"unpacking the Kata bundle {source} into {final}")
    tmp = tempfile.mkdtemp(prefix=f".{sha[:16]}.", suffix=".partial", dir=base)
    try:
        _extract(source, tmp)
        top = _top_dir(tmp, source)
        sums_sha, sizes = verify_tree(os.path.join(tmp, top), source)
        with open(os.path.join(tmp, STAMP), "w") as f:
            json.dump({"format": STAMP_FORMAT, "tarball_sha256": sha, "source": source, "top": top,
                       "sums_sha256": sums_sha, "sizes": sizes}, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700: the runner reads it over 9p
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(final, top)


def find_bundle(progress: Progress = None) -> Optional[KataBundle]:
    """The bundle bundle_source() names, unpacked and verified; None when there is none."""
    path, _how = bundle_source()
    return unpack_bundle(path, progress=progress) if path else None


# -- onto a target ------------------------------------------------------------------

_REMOTE_CHECK = ('cd "$1" || exit 3; shift; sha256sum -c --quiet --strict - || exit 1; '
                 'for f do [ -x "$f" ] || { echo "$f: not executable" >&2; exit 1; }; done')


def _remote_check(host: Host, root: str, check_list: bytes, exec_files: List[str], timeout: float) -> CommandResult:
    return host.run(["sh", "-c", _REMOTE_CHECK, "sh", root, *exec_files], input=check_list, timeout=timeout)


def _check_dest(dest: str) -> None:
    if not dest.startswith("/") or posixpath.normpath(dest) != dest or dest.count("/") < 2:
        raise ProvisionError(f"refusing {dest!r} as where to copy the Kata bundle: not an absolute, "
                             "normalized path at least two levels deep",
                             hint=f"use the default ({REMOTE_DIR}/bundle-<sha16>)")


def _send(host: Host, local: str, remote: str, timeout: float) -> None:
    """Write the local file `local` to `remote` on `host` in COPY_CHUNK pieces (an SSH channel's
    window stays small; see sshhost)."""
    with open(local, "rb") as f:
        op = 'cat > "$1"'
        while True:
            chunk = f.read(COPY_CHUNK)
            host.run(["sh", "-c", op, "sh", remote], input=chunk, timeout=timeout, check=True,
                     what=f"writing {remote}")
            op = 'cat >> "$1"'
            if len(chunk) < COPY_CHUNK:
                break


def put_file(host: Host, local: str, remote: str, digest: Optional[str] = None, timeout: float = 120.0) -> None:
    """Copy one file to `host` (written beside `remote`, checked with sha256sum, then moved into place)."""
    _check_dest(remote)
    digest = digest or sha256_file(local)
    partial = remote + ".partial"
    host.run(["mkdir", "-p", "--", posixpath.dirname(remote)], timeout=timeout, check=True,
             what=f"creating {posixpath.dirname(remote)}")
    _send(host, local, partial, timeout)
    res = host.run(["sha256sum", "--", partial], timeout=timeout)
    if not (res.ok and res.stdout.split()[:1] == [digest]):
        host.run(["rm", "-f", "--", partial], timeout=timeout)
        raise ProvisionError(f"the copy of {local} at {host.name}:{partial} does not match its sha256 {digest[:16]}",
                             hint="check free space on the target, then run again")
    host.run(["mv", "-f", "--", partial, remote], timeout=timeout, check=True, what=f"moving {partial} to {remote}")


def copy_bundle_to(host: Host, bundle: KataBundle, dest_root: Optional[str] = None,
                   progress: Progress = None, timeout: float = 120.0) -> str:
    """Copy the files listed in the bundle's SHA256SUMS (and SHA256SUMS) to `dest_root`
    on `host` and check them there with `sha256sum -c`; nothing is sent when a checked
    copy is already there. Returns `dest_root`."""
    say = progress or (lambda msg: None)
    dest = dest_root or f"{REMOTE_DIR}/bundle-{bundle.sha256[:16]}"
    _check_dest(dest)
    entries = bundle.entries()
    with open(os.path.join(bundle.root, SUMS), "rb") as f:
        sums_raw = f.read()
    files = [rel for rel, _ in entries] + [SUMS]
    check_list = b"".join(f"{h}  {rel}\n".encode() for rel, h in entries)
    check_list += f"{hashlib.sha256(sums_raw).hexdigest()}  {SUMS}\n".encode()
    exec_files = [rel for rel, _ in entries if _needs_exec(rel)]
    if _remote_check(host, dest, check_list, exec_files, timeout).ok:
        say(f"the Kata bundle is already on {host.name} at {dest}")
        return dest
    lock = host.hold_lock(dest + ".lock", blocking=True, timeout=LOCK_TIMEOUT)
    if lock is None:
        raise ProvisionError(f"another process holds {dest}.lock on {host.name}",
                             hint="wait for the other copy, then run again")
    try:
        if _remote_check(host, dest, check_list, exec_files, timeout).ok:
            return dest
        partial = dest + ".partial"
        total = sum(os.path.getsize(os.path.join(bundle.root, rel)) for rel in files)
        say(f"copying the Kata bundle ({total / 1e6:.0f} MB) to {host.name}:{dest}")
        host.run(["rm", "-rf", "--", partial], timeout=timeout, check=True, what=f"removing {partial}")
        dirs = sorted({posixpath.dirname(posixpath.join(partial, rel)) for rel in files})
        host.run(["mkdir", "-p", "--", *dirs], timeout=timeout, check=True, what=f"creating {partial}")
        modes: Dict[str, List[str]] = {}
        for rel in files:
            local = os.path.join(bundle.root, rel)
            remote = posixpath.join(partial, rel)
            _send(host, local, remote, timeout)
            modes.setdefault("%o" % (os.stat(local).st_mode & 0o755), []).append(remote)
        for mode, paths in sorted(modes.items()):
            host.run(["chmod", mode, "--", *paths], timeout=timeout, check=True, what=f"chmod {mode}")
        res = _remote_check(host, partial, check_list, exec_files, timeout)
        if not res.ok:
            host.run(["rm", "-rf", "--", partial], timeout=timeout)
            raise ProvisionError(f"the copy of the Kata bundle at {host.name}:{partial} does not verify: "
                                 f"{(res.stdout + res.stderr).strip()[-400:]}",
                                 hint="check free space and sha256sum (coreutils) on the target, then run again")
        host.run(["sh", "-c", 'rm -rf -- "$1" && mv -- "$2" "$1"', "sh", dest, partial], timeout=timeout,
                 check=True, what=f"moving {partial} to {dest}")
    finally:
        lock.release()
    say(f"the Kata bundle is on {host.name} at {dest}, checked with sha256sum -c")
    return dest


# -- which Kata a target uses ---------------------------------------------------------

@dataclass
class KataChoice:
    """The Kata a target uses, and why. runtime_path is kata-runtime as the target sees it."""

    kind: str                                 # "bundle" | "installed" | "none"
    version: Optional[str]
    runtime_path: Optional[str]
    bundle: Optional[KataBundle]
    installed: Optional[KataInstall]        # what the target has installed (always detected)
    reason: str
    how: Optional[str] = None                 # bundle: "env" | "default"
    target_root: Optional[str] = None         # bundle: its root as the target sees it

    @property
    def major(self) -> Optional[int]:
        try:
            return int((self.version or "").split(".")[0])
        except ValueError:
            return None

    @property
    def supported(self) -> bool:
        """A Kata podman can drive (1.x, with the OCI CLI) is there."""
        return self.kind in ("bundle", "installed") and self.major == 1

    @property
    def refused(self) -> bool:
        """The target has only a Kata podman cannot drive (2.x/3.x) and there is no bundle."""
        return self.kind == "none" and self.installed is not None and self.installed.installed

    @property
    def source(self) -> Optional[str]:
        if self.kind == "bundle" and self.bundle is not None:
            return f"{BUNDLE_ENV}={self.bundle.source}" if self.how == "env" else self.bundle.source
        if self.kind == "installed" and self.installed is not None:
            return f"installed ({self.installed.path})"
        return None

    def as_dict(self) -> dict:
        inst = self.installed
        return {"kind": self.kind, "version": self.version, "runtime_path": self.runtime_path,
                "source": self.source, "how": self.how, "target_root": self.target_root,
                "sha256": self.bundle.sha256 if self.bundle else None,
                "bundle_root": self.bundle.root if self.bundle else None,
                "supported": self.supported, "reason": self.reason,
                "installed": {"path": inst.path, "version": inst.version} if inst is not None and inst.installed else None}


def choose_kata(host: Host, progress: Progress = None, shares_controller_fs: bool = False) -> KataChoice:
    """The Kata for `host`: the $VFIOTEST_KATA_BUNDLE bundle, else an installed Kata 1.x,
    else the default shared bundle; else none (with the refusal reason when only 2.x/3.x
    is installed). A bundle is copied to the target with copy_bundle_to() unless
    `shares_controller_fs` (local, or the emulated runner reading the controller over 9p)."""
    from .runtime import detect_kata

    path, how = bundle_source()
    installed = detect_kata(host)
    have = (f"Kata {installed.version} at {installed.path} is installed on {host.name}" if installed.installed
            else f"no Kata is installed on {host.name}")

    def with_bundle(reason: str) -> KataChoice:
        assert path is not None          # how is "env" or "default" only with a path
        bundle = unpack_bundle(path, progress=progress)
        if bundle.major != 1:
            raise ProvisionError(f"the bundle {path} is Kata {bundle.version}, not 1.x: podman cannot drive it",
                                 hint=f"point {BUNDLE_ENV} at a Kata 1.x bundle ({DEFAULT_BUNDLE})")
        root = bundle.root if shares_controller_fs else copy_bundle_to(host, bundle, progress=progress)
        return KataChoice("bundle", bundle.version, posixpath.join(root, REQUIRED["runtime"]), bundle, installed,
                          reason, how=how, target_root=root)

    if how == "env":
        return with_bundle(f"{BUNDLE_ENV} names it, and wins over the target ({have})")
    if installed.installed and installed.has_oci_cli:
        return KataChoice("installed", installed.version, installed.path, None, installed,
                          installed.describe())
    if how == "default":
        why = (f"{have}, which has no OCI runtime CLI (2.x/3.x are shim v2 only)" if installed.installed
               else have)
        return with_bundle(f"{why}: the default bundle beside the checkout is used")
    if installed.installed:
        return KataChoice("none", installed.version, installed.path, None, installed,
                          f"{installed.describe()} (no bundle either: set {BUNDLE_ENV})")
    return KataChoice("none", None, None, None, installed,
                      f"{installed.describe()} (no bundle: {BUNDLE_ENV} unset, {DEFAULT_BUNDLE} absent)")
