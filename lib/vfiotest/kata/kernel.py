"""The guest kernel of the Kata VMs.

Two kinds, each a `GuestKernel` (vmlinuz, kernel version, the module tree that
dracut's `--kmoddir` reads, and which modules the kernel has, so the guest image
asks only for modules that exist):

- `kata_kernel()` (the default): built for Kata from Debian's `linux-source-6.1`
  with the fragment `data/kata/guest-kernel.config` over `allnoconfig`: everything
  the agent, the hook and the VFs' drivers need built in, little else, so the guest
  loads no modules at boot. Cached by its inputs (the source package's version, the
  fragment, `KERNEL_BUILD_FORMAT`) under CACHE/guest-kernel/; built once, with progress.
- `debian_kernel()`: Debian's generic 6.1 kernel, the same unpacked package the runner
  boots; the guest's init then loads the virtio, vsock, 9p and VFIO modules.

`guest_kernel()` picks one by `VFIOTEST_GUEST_KERNEL` (`kata`, `debian`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import constants
from ..errors import ProvisionError
from ..runner.assets import _run, _say, unpack_package

GUEST_KERNEL_ENV = "VFIOTEST_GUEST_KERNEL"
GUEST_KERNELS = ("kata", "debian")
SOURCE_PACKAGE = "linux-source-6.1"
KERNEL_BUILD_FORMAT = 1    # bump when how the kernel is built or laid out changes
FRAGMENT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "kata", "guest-kernel.config")
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc")   # and libelf's headers (objtool)


@dataclass(frozen=True)
class GuestKernel:
    package: str      # linux-image-6.1.0-56-amd64
    kver: str         # 6.1.0-56-amd64
    root: str         # the extracted package: root/boot/vmlinuz-*, root/lib/modules/<kver>

    @property
    def vmlinuz(self) -> str:
        return os.path.join(self.root, "boot", f"vmlinuz-{self.kver}")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "boot", f"config-{self.kver}")

    @property
    def moddir(self) -> str:
        return os.path.join(self.root, "lib", "modules", self.kver)

    def has_module(self, name: str) -> bool:
        """True when the kernel has module `name` (as a .ko file or built in)."""
        want = name.replace("-", "_")
        for listing in ("modules.builtin", "modules.order"):
            path = os.path.join(self.moddir, listing)
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        base = os.path.basename(line.strip())
                        base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")
                        if base == want:
                            return True
        return False

    def module_is_builtin(self, name: str) -> bool:
        want = name.replace("-", "_")
        path = os.path.join(self.moddir, "modules.builtin")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            return any(re.sub(r"\.ko$", "", os.path.basename(line.strip())).replace("-", "_") == want for line in f)


def debian_kernel(progress: Callable[[str], None] | None = None) -> GuestKernel:
    """The extracted Debian guest kernel: the runner's kernel asset (one download
    shared by the runner and the guest image, see vfiotest.runner.assets).
    Resolved once per process (asking apt costs seconds)."""
    global _RESOLVED
    if _RESOLVED is None or not os.path.exists(_RESOLVED.vmlinuz):
        from ..runner.assets import ensure_kernel

        k = ensure_kernel(progress=progress)
        _RESOLVED = GuestKernel(package=k.package, kver=k.kver, root=k.root)
    return _RESOLVED


_RESOLVED: GuestKernel | None = None


def guest_kernel_choice() -> str:
    """`VFIOTEST_GUEST_KERNEL`: `kata` (the default) or `debian`; a ProvisionError naming it otherwise."""
    raw = os.environ.get(GUEST_KERNEL_ENV, "")
    choice = raw.strip() or "kata"
    if choice not in GUEST_KERNELS:
        raise ProvisionError(f"{GUEST_KERNEL_ENV}={raw!r} is not a guest kernel",
                             hint="kata (built for Kata from Debian's linux-source-6.1, the default) "
                                  "or debian (Debian's generic kernel, its modules loaded at boot)")
    return choice


def guest_kernel(progress: Callable[[str], None] | None = None) -> GuestKernel:
    """The guest kernel `VFIOTEST_GUEST_KERNEL` names (`guest_kernel_choice`)."""
    if guest_kernel_choice() == "debian":
        return debian_kernel(progress=progress)
    return kata_kernel(progress=progress)


def parse_config(text: str) -> dict[str, str]:
    """A kernel configuration's (or fragment's) settings: CONFIG_X -> value, `# CONFIG_X is not
    set` as "n"."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^# (CONFIG_\w+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
        elif line.startswith("CONFIG_"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def fragment_lines(path: str = FRAGMENT) -> dict[str, str]:
    """The fragment's settings (parse_config)."""
    with open(path) as f:
        return parse_config(f.read())


def config_mismatches(want: dict[str, str], config_text: str) -> list[str]:
    """Settings of `want` that a `.config` did not keep (Kconfig drops what it cannot satisfy)."""
    have = parse_config(config_text)
    return [f"{k}={v} (got {have.get(k, 'nothing')})" for k, v in want.items() if have.get(k, "n") != v]


def source_version() -> str:
    """The version of Debian's linux-source-6.1 the apt sources offer (asked once per process:
    apt-cache costs seconds on a runner under TCG, where the local lane builds its image)."""
    global _SOURCE_VERSION
    if _SOURCE_VERSION is None:
        _SOURCE_VERSION = _ask_source_version()
    return _SOURCE_VERSION


_SOURCE_VERSION: str | None = None


def _ask_source_version() -> str:
    try:
        p = subprocess.run(["apt-cache", "policy", SOURCE_PACKAGE], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ProvisionError("apt-cache is not installed: the Kata guest kernel is built from Debian's "
                             f"{SOURCE_PACKAGE}", hint=f"on a Debian 12 controller, or {GUEST_KERNEL_ENV}=debian") from None
    m = re.search(r"Candidate:\s*(\S+)", p.stdout)
    if not m or m.group(1) == "(none)":
        raise ProvisionError(f"{SOURCE_PACKAGE} is not in the apt sources",
                             hint=f"run `apt-get update` (ci/setup does), or set {GUEST_KERNEL_ENV}=debian")
    return m.group(1)


def kata_kernel_key(version: str, fragment: str = FRAGMENT) -> str:
    h = hashlib.sha256()
    h.update(f"{SOURCE_PACKAGE}={version}\nformat={KERNEL_BUILD_FORMAT}\n".encode())
    with open(fragment, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def _cached_kata_kernels(base: str) -> list[str]:
    if not os.path.isdir(base):
        return []
    return sorted((os.path.join(base, n) for n in os.listdir(base) if os.path.exists(os.path.join(base, n, ".complete"))),
                  key=os.path.getmtime)


def _from_tree(root: str) -> GuestKernel:
    with open(os.path.join(root, ".complete")) as f:
        package, kver = f.read().split()
    return GuestKernel(package=package, kver=kver, root=root)


def kata_kernel(progress: Callable[[str], None] | None = None, *, jobs: int | None = None,
                timeout: float = 3600) -> GuestKernel:
    """The kernel built for Kata (module docstring), from the cache or built now."""
    import filelock

    base = constants.cache_dir("guest-kernel")
    try:
        version = source_version()
    except ProvisionError:
        cached = _cached_kata_kernels(base)
        if cached:                      # offline: the newest one built
            return _from_tree(cached[-1])
        raise
    key = kata_kernel_key(version)
    root = os.path.join(base, key)
    if os.path.exists(os.path.join(root, ".complete")):
        return _from_tree(root)
    os.makedirs(base, exist_ok=True)
    with filelock.FileLock(os.path.join(base, ".lock"), timeout=timeout + 60):
        if os.path.exists(os.path.join(root, ".complete")):
            return _from_tree(root)
        missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
        if missing:
            raise ProvisionError(f"building the Kata guest kernel needs {', '.join(missing)}",
                                 hint="run ci/setup (it installs make gcc flex bison bc libelf-dev), "
                                      f"or set {GUEST_KERNEL_ENV}=debian")
        work = tempfile.mkdtemp(prefix=".build-", dir=base)
        try:
            tree = _build_kata_kernel(version, key, work, progress, jobs or os.cpu_count() or 1, timeout)
            os.rename(tree, root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _from_tree(root)


def _build_kata_kernel(version: str, key: str, work: str, progress: Callable[[str], None] | None, jobs: int,
                       timeout: float) -> str:
    _say(progress, f"guest kernel: downloading {SOURCE_PACKAGE} {version} (about 140 MB)")
    unpack_package(SOURCE_PACKAGE, version, work, os.path.join(work, "pkg"), progress, "guest kernel: ")
    tarball = os.path.join(work, "pkg", "usr", "src", f"{SOURCE_PACKAGE}.tar.xz")
    _say(progress, f"guest kernel: unpacking {os.path.basename(tarball)}")
    _run(["tar", "-xJf", tarball], f"unpacking {tarball}", cwd=work)
    shutil.rmtree(os.path.join(work, "pkg"))
    src = os.path.join(work, SOURCE_PACKAGE)
    make = ["make", "-s", "ARCH=x86_64"]
    _run(make + ["allnoconfig"], "configuring the guest kernel (allnoconfig)", cwd=src)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", FRAGMENT], "merging the guest kernel's fragment", cwd=src)
    _run(make + ["olddefconfig"], "configuring the guest kernel (olddefconfig)", cwd=src)
    with open(os.path.join(src, ".config")) as f:
        bad = config_mismatches(fragment_lines(), f.read())
    if bad:
        raise ProvisionError("the guest kernel's configuration did not keep: " + ", ".join(bad),
                             hint=f"a setting of {FRAGMENT} depends on one the fragment lacks: add it")
    _say(progress, f"guest kernel: compiling on {jobs} job(s) (about 5 min on 2 cores, once)")
    t0 = time.monotonic()
    log = os.path.join(work, "build.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(["make", f"-j{jobs}", "ARCH=x86_64", "bzImage", "modules"], cwd=src,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        units, said = 0, t0
        for line in proc.stdout:
            out.write(line)
            if line.startswith("  CC "):
                units += 1
            if time.monotonic() - said >= 60:
                said = time.monotonic()
                _say(progress, f"guest kernel: {units} files compiled, {said - t0:.0f} s")
            if time.monotonic() - t0 > timeout:
                proc.kill()
        rc = proc.wait()
    if rc != 0:
        with open(log) as f:
            tail = " | ".join(f.read().strip().splitlines()[-8:])
        raise ProvisionError(f"building the guest kernel failed (exit {rc}): {tail}",
                             hint=f"{GUEST_KERNEL_ENV}=debian boots Debian's kernel instead")
    kver = _run(make + ["kernelrelease"], "the guest kernel's release", cwd=src).strip()
    tree = os.path.join(work, "tree")
    os.makedirs(os.path.join(tree, "boot"))
    shutil.copy(os.path.join(src, "arch", "x86", "boot", "bzImage"), os.path.join(tree, "boot", f"vmlinuz-{kver}"))
    shutil.copy(os.path.join(src, ".config"), os.path.join(tree, "boot", f"config-{kver}"))
    _run(make + [f"INSTALL_MOD_PATH={tree}", "modules_install"], "installing the guest kernel's module lists", cwd=src)
    with open(os.path.join(tree, "lib", "modules", kver, "modules.order")) as f:
        loadable = [os.path.basename(line.strip()) for line in f if line.strip()]
    if loadable:        # the guest's init loads nothing: a module here would never be loaded
        raise ProvisionError(f"the guest kernel came out with loadable modules: {', '.join(loadable)}",
                             hint=f"set each in {FRAGMENT} (=y, or '# CONFIG_... is not set')")
    for link in ("build", "source"):     # point into the source tree, which goes
        path = os.path.join(tree, "lib", "modules", kver, link)
        if os.path.islink(path):
            os.remove(path)
    _say(progress, f"guest kernel {kver} built in {time.monotonic() - t0:.0f} s")
    with open(os.path.join(tree, ".complete"), "w") as f:
        f.write(f"{SOURCE_PACKAGE}_{version}+vfiotest-{key} {kver}\n")
    return tree
