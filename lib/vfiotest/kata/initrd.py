"""Building the guest initrd: the VFIO modules, python3, the hook, cached by its inputs.

`build_initrd` runs Debian's dracut directly for the guest kernel (vfiotest.kata.kernel: built
for Kata from Debian's 6.1 source, or Debian's generic 6.1 kernel) (Kata's
osbuilder is not used, on any runner: dracut from Debian is the one path that is
built and booted here):

- a private `dracutbasedir` (symlinks to the system's dracut plus the module
  `95vfiotest` written per build), so nothing under /usr is touched;
- `-m "dash base vfiotest"`: no systemd; dracut's own init with udev, which
  loads the native drivers of passed-through devices;
- the VFIO drivers the guest kernel really has (`vfio_virqfd` only where it is
  a module), forced in;
- /usr/bin/python3 and exactly the stdlib files the hook imports (found by
  importing the hook with that interpreter), the hook at
  `<guest_hook_path>/prestart/vfio-hook` (0755) and the library it shares
  with the host side (`vfiotest.bind`, `host`, `pci`, `errors`) under
  `<guest_hook_path>/lib/`, and the hook's settings (allowed IDs, log path);
- the Kata agent (`agent=`: the Kata guest image). Without it the image holds
  the hook and its interpreter only (for listing and for running the hook by hand).

The Kata guest image boots a small init (`KATA_INIT_PATH`, given to the kernel
as `rdinit=` in configuration.toml) instead of dracut's: Kata passes
`console=hvc0` and virtio_console is a module in Debian's kernel, so the init
mounts proc/sys/dev, loads the virtio, vsock, 9p and VFIO modules (those the kernel
has as modules: none with the kernel built for Kata), opens the
console and execs kata-agent as PID 1. dracut is still what gathers the
modules with their dependencies, python3 and the libraries, without its own
`base` module in the Kata guest image (no dracut init, udev or systemd tools:
the image the guest kernel unpacks at every boot is about a third smaller).

The result is checked by listing the image (dracut says FAILED for a missing
driver and exits 0) and stored as CACHE/initrd/initrd-<key>.img with a JSON
manifest; the key hashes every input, so an unchanged build costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from .. import constants
from ..constants import KATA_STATE_DIR
from ..errors import ProvisionError
from . import image as image_mod

if TYPE_CHECKING:
    from ..host import Host
    from .kernel import GuestKernel

DEFAULT_HOOK_PATH = "/usr/share/oci/hooks"
HOOK_NAME = "vfio-hook"
HOOK_LOG = "/tmp/vfio-hook.log"
GUEST_PYTHON = "/usr/bin/python3"
SYSTEM_DRACUT = "/usr/lib/dracut"
BUILD_FORMAT = 3  # bump when the layout of the image changes

# The VFIO set, in load order. vfio_virqfd is its own module before 6.2 only.
VFIO_MODULES = ("irqbypass", "vfio", "vfio_iommu_type1", "vfio_virqfd", "vfio-pci-core", "vfio-pci")
# Native drivers of the devices the emulated runner passes through (igb VF, NVMe VF):
# the hook must find them bound to these and move them to vfio-pci.
NATIVE_DRIVERS = ("igbvf", "nvme")
# The library the hook shares with the host side (standard library only).
SHARED_MODULES = ("__init__.py", "constants.py", "errors.py", "host.py", "pci.py", "bind.py")
KATA_MODULES = ("__init__.py", "hook.py")
# The Kata guest: what the agent needs (console, vsock, 9p for the container rootfs), in load order.
KATA_GUEST_MODULES = ("virtio_pci", "virtio_console", "vsock", "vmw_vsock_virtio_transport", "9pnet_virtio", "9p",
                      "overlay", "virtio_blk", "virtio_scsi", "virtio_net", "virtio_rng")
KATA_INIT_PATH = "/usr/sbin/vfiotest-kata-init"
GUEST_AGENT_PATH = "/usr/bin/kata-agent"

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lib/vfiotest


def cache_dir() -> str:
    return constants.cache_dir("initrd")


@dataclass
class InitrdSpec:
    """What goes into a guest image. Every field is part of the cache key."""

    guest_hook_path: str = DEFAULT_HOOK_PATH
    allowed_ids: Tuple[str, ...] = ()          # the profile's vendor:device list (used without annotation)
    hook_log: str = HOOK_LOG
    hook_timeout: float = 30.0
    agent: Optional[str] = None                # a kata-agent binary: the real Kata guest image (agent as PID 1)
    extra_drivers: Tuple[str, ...] = NATIVE_DRIVERS
    compress: str = "zstd"                     # zstd | gzip | xz
    hook: bool = True                          # False only to break the subject on purpose (VFIOTEST_BREAK=no-hook)


@dataclass
class BuiltInitrd:
    path: str
    key: str
    kernel: str                # path of the matching vmlinuz
    kver: str
    size: int
    build_seconds: float       # of the build that made it (0 when it came from the cache and was not rebuilt)
    cached: bool
    modules: List[str] = field(default_factory=list)   # the VFIO modules asked for (those the kernel has)
    hook_path: str = ""        # the hook's path in the guest
    spec: dict = field(default_factory=dict)
    init: Optional[str] = None  # the init to give as rdinit= (Kata guest image), None: dracut's /init
    target_path: Optional[str] = None    # the image and kernel as the target sees them (stage_on_target)
    target_kernel: Optional[str] = None

    def manifest(self) -> dict[str, Any]:
        return asdict(self)


def vfio_modules_for(kernel: GuestKernel) -> list[str]:
    """The VFIO modules this guest kernel has as loadable modules or built in."""
    return [m for m in VFIO_MODULES if kernel.has_module(m)]


def _hook_launcher(spec: InitrdSpec) -> str:
    lib = f"{spec.guest_hook_path.rstrip('/')}/lib"
    # -IS: no site, no environment (a hook's start costs seconds in a nested guest); one option
    # cluster, as the kernel passes a shebang's arguments as one
    return (f"#!{GUEST_PYTHON} -IS\n"
            "# vfiotest guest hook: rebinds the container's devices to vfio-pci (see vfiotest.kata.hook)\n"
            "import sys\n"
            f"sys.path.insert(0, {lib!r})\n"
            "from vfiotest.kata.hook import main\n"
            f"sys.exit(main(sys.argv, settings_path={lib + '/vfio-hook.json'!r}))\n")


def _hook_settings(spec: InitrdSpec) -> str:
    return json.dumps({"allowed_ids": list(spec.allowed_ids), "log": spec.hook_log,
                       "timeout": spec.hook_timeout}, indent=1) + "\n"


def _module_setup(files_list: str, kata_guest: bool = False, modprobe: bool = True) -> str:
    """dracut's module-setup.sh for the module that installs the hook and python. For the Kata
    guest image (`kata_guest`) the module stands without dracut's `base`: the init is ours
    (KATA_INIT) and kata-agent is PID 1, so dracut's init, udev, systemd's tools and their
    libraries (about a third of the image, unpacked by the guest kernel at every boot) are left
    out; it installs what the init and the harness's console commands run (mkdir, mount, cat,
    readlink, dmesg), and modprobe only when the init has modules to load."""
    if kata_guest:
        depends = "depends() { return 0; }   # no base: dracut's init is not used"
        tools = "inst_multiple mkdir mount cat readlink dmesg" + ("\n    inst_multiple modprobe" if modprobe else "")
        users = "".join("\n    " + line for line in (
            'mkdir -p "$initdir/etc" "$initdir/proc" "$initdir/sys" "$initdir/dev" "$initdir/root"',
            'echo "root:x:0:0::/root:/bin/sh" > "$initdir/etc/passwd"',
            'echo "root:x:0:" > "$initdir/etc/group"'))
    else:
        depends = "depends() { echo base; return 0; }"
        tools = "inst_multiple -o modprobe"
        users = ""
    return f"""#!/bin/bash
# Written by vfiotest.kata.initrd for one build.
check() {{ return 255; }}
{depends}
install() {{
    inst_binary "$(readlink -f {GUEST_PYTHON})" "$(readlink -f {GUEST_PYTHON})"
    ln_r "$(readlink -f {GUEST_PYTHON})" {GUEST_PYTHON}
    {tools}
    while read -r src dst mode; do
        inst_simple "$src" "$dst" || return 1
        chmod "$mode" "$initdir$dst"
    done < {files_list}
    mkdir -p "$initdir/tmp" "$initdir/run/libcontainer"{users}
}}
"""


LOAD_MODULES = """# one modprobe for all (a process per module costs about 0.1 s each in a nested guest); when
# one fails, each again to say which
modprobe -a -q {modules} 2>/dev/null ||
    for m in {modules}; do modprobe -q "$m" || echo "vfiotest-kata-init: modprobe $m failed" > /dev/kmsg; done"""
NO_MODULES = "# the guest kernel has every driver built in: nothing to load"

KATA_INIT = """#!/bin/sh
# vfiotest: the Kata guest's init (rdinit=). Mount, load what the agent and the hook need,
# then hand PID 1 to kata-agent (AGENT_INIT=yes in osbuilder terms).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{load}
# a line in the kernel's log, timestamped by it: when the agent starts (bench_kata_real.py's timeline)
echo "vfiotest-kata-init: exec {agent}" > /dev/kmsg
exec </dev/console >/dev/console 2>&1
exec {agent}
"""


def _python_files(lib_dir: str, timeout: float = 60) -> list[str]:
    """The stdlib files the hook imports, found by importing it with the guest's
    interpreter from the staged library."""
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {lib_dir!r})\n"
        "import vfiotest.kata.hook, vfiotest.host, vfiotest.pci, vfiotest.bind\n"
        # what the scripts the host layer runs with `python3 -c` import (inventory, file ops)
        "import re as _re, vfiotest.pci as _p, vfiotest.host as _h\n"
        "for _s in (_p.INVENTORY_SCRIPT, _h.FILE_OP_SCRIPT):\n"
        "    for _l in _s.splitlines():\n"
        "        if _re.match(r'^(import|from) ', _l): exec(_l)\n"
        "import encodings.ascii, encodings.latin_1, encodings.utf_8\n"
        "files = set()\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f and not f.startswith(sys.path[0]): files.add(f)\n"
        "import os, importlib.util\n"
        "files.add(os.__file__)\n"
        # the interpreter's own byte-compiled files beside them (Debian compiles the stdlib at
        # install time): the guest then compiles nothing at each start
        "files |= {importlib.util.cache_from_source(f) for f in list(files) if f.endswith('.py')}\n"
        "print('\\n'.join(sorted(files)))\n")
    try:
        p = subprocess.run([GUEST_PYTHON, "-S", "-c", probe], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ProvisionError(f"{GUEST_PYTHON} is missing: the guest hook runs with Debian's python3",
                             hint="install the Debian package python3-minimal (a pyenv python cannot be copied into an image)") from None
    if p.returncode != 0:
        raise ProvisionError(f"importing the hook with {GUEST_PYTHON} failed: {p.stderr.strip()[-400:]}",
                             hint="the hook and vfiotest.{bind,host,pci,errors} must import with the standard library only")
    return [f for f in p.stdout.split() if os.path.isfile(f)]


def _stage_library(dest: str) -> str:
    """Copy the hook's library (standard-library-only modules) into `dest`/vfiotest."""
    pkg = os.path.join(dest, "vfiotest")
    os.makedirs(os.path.join(pkg, "kata"))
    for name in SHARED_MODULES:
        src = os.path.join(PKG_DIR, name)
        if not os.path.exists(src):
            raise ProvisionError(f"{src} is missing: the hook shares it with the host side",
                                 hint="check out the whole repository")
        shutil.copy(src, os.path.join(pkg, name))
    for name in KATA_MODULES:
        shutil.copy(os.path.join(PKG_DIR, "kata", name), os.path.join(pkg, "kata", name))
    # The package __init__ of kata may grow host-side imports: the guest gets a bare one.
    with open(os.path.join(pkg, "kata", "__init__.py"), "w") as f:
        f.write('"""vfiotest.kata, as shipped into the guest image: the hook."""\n')
    return pkg


def _compile_library(lib_dir: str, timeout: float = 60) -> None:
    """Byte-compile the staged library with the guest's python3 (unchecked-hash .pyc: valid
    whatever timestamps the image gives the sources), so the hook compiles nothing in the guest."""
    p = subprocess.run([GUEST_PYTHON, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", lib_dir],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise ProvisionError(f"byte-compiling the hook's library failed: {(p.stdout + p.stderr).strip()[-400:]}",
                             hint=f"the hook's modules must compile with {GUEST_PYTHON}")


def input_key(spec: InitrdSpec, kernel: GuestKernel) -> str:
    """A hash of everything that shapes the image."""
    h = hashlib.sha256()
    h.update(json.dumps({"spec": asdict(spec), "kernel": kernel.package, "kver": kernel.kver,
                         "format": BUILD_FORMAT}, sort_keys=True).encode())
    for name in SHARED_MODULES:
        h.update(name.encode())
        with open(os.path.join(PKG_DIR, name), "rb") as f:
            h.update(f.read())
    for name in KATA_MODULES + ("initrd.py",):
        with open(os.path.join(PKG_DIR, "kata", name), "rb") as f:
            h.update(f.read())
    for path in (os.path.realpath(GUEST_PYTHON), spec.agent):
        if path and os.path.exists(path):
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{int(st.st_mtime)}".encode())
    try:
        h.update(subprocess.run(["dracut", "--version"], capture_output=True, text=True, timeout=30).stdout.encode())
    except (OSError, subprocess.SubprocessError):
        pass
    return h.hexdigest()[:20]


def _dracut_base(dest: str, module_dir: str) -> None:
    """A dracutbasedir: the system's dracut by symlinks, plus our module."""
    if not os.path.isdir(SYSTEM_DRACUT):
        raise ProvisionError("dracut is not installed (no /usr/lib/dracut)",
                             hint="install the Debian package dracut-core (ci/setup does)")
    os.makedirs(os.path.join(dest, "modules.d"))
    for name in os.listdir(SYSTEM_DRACUT):
        if name != "modules.d":
            os.symlink(os.path.join(SYSTEM_DRACUT, name), os.path.join(dest, name))
    for name in os.listdir(os.path.join(SYSTEM_DRACUT, "modules.d")):
        os.symlink(os.path.join(SYSTEM_DRACUT, "modules.d", name), os.path.join(dest, "modules.d", name))
    os.symlink(module_dir, os.path.join(dest, "modules.d", "95vfiotest"))


def build_initrd(spec: InitrdSpec | None = None, kernel: GuestKernel | None = None, *, force: bool = False,
                 progress: Callable[[str], None] | None = None, timeout: float = 600) -> BuiltInitrd:
    """Build (or take from the cache) the guest initrd for `spec`; returns a `BuiltInitrd`."""
    import filelock

    from .kernel import guest_kernel

    spec = spec or InitrdSpec()
    kernel = kernel or guest_kernel(progress=progress)
    key = input_key(spec, kernel)
    out_dir = cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"initrd-{key}.img")
    manifest = out + ".json"
    with filelock.FileLock(out + ".lock", timeout=timeout + 60):
        if not force and os.path.exists(out) and os.path.exists(manifest):
            with open(manifest) as f:
                data = json.load(f)
            data["cached"] = True
            return BuiltInitrd(**data)
        if progress:
            progress(f"building the guest initrd {os.path.basename(out)} with dracut for {kernel.kver}")
        t0 = time.monotonic()
        work = tempfile.mkdtemp(prefix="vfiotest-initrd-")
        try:
            built = _build(spec, kernel, key, out, work, timeout)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        built.build_seconds = round(time.monotonic() - t0, 2)
        with open(manifest + ".tmp", "w") as f:
            json.dump(built.manifest(), f, indent=1)
        os.replace(manifest + ".tmp", manifest)
        return built


def _build(spec: InitrdSpec, kernel: GuestKernel, key: str, out: str, work: str, timeout: float) -> BuiltInitrd:
    hook_dir = spec.guest_hook_path.rstrip("/")
    lib = os.path.join(work, "lib")
    _stage_library(lib)
    _compile_library(lib, timeout)
    files: list[tuple[str, str, str]] = []  # (src, dst in guest, mode)
    for root, _, names in os.walk(lib):
        for n in names:
            src = os.path.join(root, n)
            files.append((src, f"{hook_dir}/lib/{os.path.relpath(src, lib)}", "0644"))
    launcher = os.path.join(work, HOOK_NAME)
    with open(launcher, "w") as f:
        f.write(_hook_launcher(spec))
    if spec.hook:
        files.append((launcher, f"{hook_dir}/prestart/{HOOK_NAME}", "0755"))
    settings = os.path.join(work, "vfio-hook.json")
    with open(settings, "w") as f:
        f.write(_hook_settings(spec))
    files.append((settings, f"{hook_dir}/lib/vfio-hook.json", "0644"))
    for py in _python_files(lib):
        files.append((py, py, "0755" if py.endswith(".so") else "0644"))
    guest_modules = [m for m in KATA_GUEST_MODULES if kernel.has_module(m)] if spec.agent else []
    # what dracut gathers and the init loads: the modules among them, not what the kernel has built in
    load = [m for m in guest_modules + list(VFIO_MODULES) + list(spec.extra_drivers)
            if kernel.has_module(m) and not kernel.module_is_builtin(m)]
    if spec.agent:
        if not os.access(spec.agent, os.X_OK):
            raise ProvisionError(f"the Kata agent {spec.agent} is not an executable file",
                                 hint="give the path of a built kata-agent binary, or leave --agent out")
        files.append((os.path.realpath(spec.agent), GUEST_AGENT_PATH, "0755"))
        init = os.path.join(work, "vfiotest-kata-init")
        with open(init, "w") as f:
            to_load = " ".join(m.replace("-", "_") for m in load)
            f.write(KATA_INIT.format(load=LOAD_MODULES.format(modules=to_load) if load else NO_MODULES,
                                     agent=GUEST_AGENT_PATH))
        files.append((init, KATA_INIT_PATH, "0755"))

    module_dir = os.path.join(work, "95vfiotest")
    os.makedirs(module_dir)
    files_list = os.path.join(module_dir, "files.list")
    with open(files_list, "w") as f:
        for src, dst, mode in files:
            if " " in src or " " in dst:
                raise ProvisionError(f"path with a space cannot go into the image: {src}", hint="move the file")
            f.write(f"{src} {dst} {mode}\n")
    setup = os.path.join(module_dir, "module-setup.sh")
    with open(setup, "w") as f:
        f.write(_module_setup(files_list, kata_guest=bool(spec.agent), modprobe=bool(load)))
    os.chmod(setup, 0o755)
    base = os.path.join(work, "dracut")
    _dracut_base(base, module_dir)
    confdir = os.path.join(work, "conf.d")
    os.makedirs(confdir)

    vfio = vfio_modules_for(kernel)
    loadable = [m for m in vfio if not kernel.module_is_builtin(m)]
    tmp_out = out + f".tmp.{os.getpid()}"
    cmd = ["dracut", "--force", "--quiet", "--no-hostonly", "--no-hostonly-cmdline", "--no-early-microcode",
           "--conf", "/dev/null", "--confdir", confdir, "--tmpdir", work,
           "--kver", kernel.kver, "--kmoddir", kernel.moddir,
           "-m", "dash vfiotest" if spec.agent else "dash base vfiotest", "--drivers", " ".join(load),
           "--force-drivers", " ".join(m for m in loadable if m in ("vfio", "vfio_iommu_type1", "vfio-pci")),
           "--install", "/usr/bin/sh", f"--{spec.compress}", tmp_out]
    env = dict(os.environ, dracutbasedir=base)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise ProvisionError("dracut is not installed", hint="install the Debian package dracut-core (ci/setup does)") from None
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"dracut did not finish in {timeout} s", hint="run it by hand: " + " ".join(cmd)) from None
    if p.returncode != 0 or not os.path.exists(tmp_out):
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        raise ProvisionError(f"dracut failed for {kernel.kver} (exit {p.returncode}): {tail}",
                             hint="run with `vfiotest kata build-initrd --force` and read dracut's output")
    listing = image_mod.read_initrd(tmp_out)
    check = image_mod.verify_guest_image(listing, hook_name=HOOK_NAME, guest_hook_path=spec.guest_hook_path,
                                         modules=vfio)
    problems = [p for p in check.problems if spec.hook or not p.startswith("hook ")]
    if spec.agent:
        problems += image_mod.verify_kata_guest(listing, init=KATA_INIT_PATH, agent=GUEST_AGENT_PATH,
                                                modules=guest_modules).problems
    for d in spec.extra_drivers:
        if kernel.has_module(d) and d.replace("-", "_") not in listing.modules() \
                and not kernel.module_is_builtin(d):
            problems.append(f"driver {d} is not in the image")
    if problems:
        os.remove(tmp_out)
        raise ProvisionError("the guest initrd came out incomplete: " + "; ".join(problems),
                             hint="dracut printed: " + " | ".join((p.stderr or p.stdout).strip().splitlines()[-6:]))
    os.replace(tmp_out, out)
    return BuiltInitrd(path=out, key=key, kernel=kernel.vmlinuz, kver=kernel.kver, size=os.path.getsize(out),
                       build_seconds=0.0, cached=False, modules=vfio,
                       hook_path=f"{hook_dir}/prestart/{HOOK_NAME}", spec=asdict(spec),
                       init=KATA_INIT_PATH if spec.agent else None)


TARGET_DIR = KATA_STATE_DIR


def stage_on_target(host: Host, built: BuiltInitrd, progress: Callable[[str], None] | None = None,
                    target_dir: str = TARGET_DIR) -> BuiltInitrd:
    """Copy the image and its kernel to a target that does not read this machine's files
    (an ssh:// runner), under content-named paths; sets `built.target_path`/`target_kernel`.
    A copy already there with the same sha256 is kept."""
    from .bundle import put_file, sha256_file

    for attr, local in (("target_path", built.path), ("target_kernel", built.kernel)):
        digest = sha256_file(local)
        remote = f"{target_dir}/{digest[:16]}-{os.path.basename(local)}"
        res = host.run(["sha256sum", "--", remote], timeout=60)
        if not (res.ok and res.stdout.split()[:1] == [digest]):
            if progress:
                progress(f"copying {os.path.basename(local)} ({os.path.getsize(local) / 1e6:.1f} MB) to {host.name}:{remote}")
            put_file(host, local, remote, digest=digest)
        setattr(built, attr, remote)
    return built

