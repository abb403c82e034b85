"""The test image: a Debian rootfs with python3 and the VFIO probe, built without any registry.

Built on the controller with mmdebstrap (the `essential` variant plus
python3-minimal: smaller than minbase, no apt in it; docs, man pages and
locales left out, full perl removed: about 75 MB, 15-20 s). The probe and the NVMe driver
(nvme_io.py, which imports the probe) sit byte-compiled in LIB_IN_IMAGE; PROBE_IN_IMAGE and
NVME_IN_IMAGE are launchers that import them from there with `python3 -I -S` (their .pyc used, no
site: every file Python opens in a Kata container is read over 9p, docs/measurements.md).
The tarball is cached under /var/cache/vfiotest/images by a hash of its inputs
(recipe, packages, the probe's and the NVMe driver's sources): the same inputs never build twice.

On the target it is loaded with `podman import`. The emulated runner sees the
controller's root read-only at the same paths, so the tarball is imported in
place; another target gets it over SFTP first. The emulated runner's podman storage is a tmpfs,
so that import came at every boot (about 90 s under TCG): `ensure_store` imports the tarball once
on the controller into a podman graph root of its own and makes it an ext4 disk image (2-5 s
there), which the runner boots with, read-only, as an additional image store
(runner/bootcfg.storage_conf), and the image is then there without an import.
`VFIOTEST_RUNNER_IMAGE_STORE=0` boots without it (the reliability campaign's kill rows do, so
that their image import phase is a real import).

The DPDK variant (`ImageRecipe(dpdk=True)`, the NIC VF I/O test's) adds DPDK's testpmd from
the controller's own Debian packages (dpdk-dev, installed by ci/setup): the binary, the
libraries it links (its `ldd` closure) and only the plugins a NIC VF needs (DPDK_PLUGINS: the
PCI and vdev buses, the ring mempool, the VF PMDs of igb, ixgbe, i40e/iavf and ice), copied in
links kept as links; about 20 MB more. Its inputs add the dpdk-dev version and that file list.

A bare-metal runner can bring its own image (`--image`): it needs python3; the
probe is then passed as `python3 -c <source>` (`Image.probe_command`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Tuple

from ..constants import cache_dir as _cache_dir
from ..errors import ProvisionError

if TYPE_CHECKING:
    from ..host import Host

CACHE_SUBDIR = "images"  # under constants.cache_dir()
IMAGE_REPO = "localhost/vfiotest-probe"
PROBE_IN_IMAGE = "/usr/local/bin/vfio-probe"
PROBE_SOURCE = Path(__file__).with_name("probe.py")
#: the userspace NVMe driver (nvme_io.py) and the probe it imports, side by side in the image
NVME_IO_SOURCE = Path(__file__).with_name("nvme_io.py")
LIB_IN_IMAGE = "/usr/local/lib/vfiotest"
NVME_IO_IN_IMAGE = f"{LIB_IN_IMAGE}/nvme_io.py"
#: /usr/local/bin/vfio-nvme in the image: the NVMe driver started as the probe is (NVME_LAUNCHER)
NVME_IN_IMAGE = "/usr/local/bin/vfio-nvme"
RECIPE_VERSION = 4  # 3: the probe runs from its .pyc through PROBE_LAUNCHER; 4: the NVMe driver too


def launcher(module: str) -> str:
    """An executable that runs `module`'s main() from LIB_IN_IMAGE with python3 -I -S (no site,
    no environment), so that its byte-compiled file and its neighbours' are used."""
    return (f"#!/usr/bin/python3 -IS\n"
            "import sys\n"
            f"sys.path.insert(0, {LIB_IN_IMAGE!r})\n"
            f"from {module} import main\n"
            "sys.exit(main())\n")


#: /usr/local/bin/vfio-probe in the image
PROBE_LAUNCHER = launcher("probe")
NVME_LAUNCHER = launcher("nvme_io")
#: (path in the image, its text): the launchers the image has
LAUNCHERS = ((PROBE_IN_IMAGE, PROBE_LAUNCHER), (NVME_IN_IMAGE, NVME_LAUNCHER))
TESTPMD = "/usr/bin/dpdk-testpmd"
#: where Debian's DPDK 22.11 loads its plugins from (EAL's default plugin directory: every .so in it)
DPDK_PLUGIN_DIR = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0"
#: the plugins a NIC VF under testpmd needs; the rest of the directory is left out of the image
#: (by the names EAL loads: it skips a plugin directory's files not ending in .so or .so.<ABI>)
DPDK_PLUGINS = ("librte_bus_pci.so.23.0", "librte_bus_vdev.so.23.0", "librte_mempool_ring.so.23.0",
                "librte_net_e1000.so.23.0", "librte_net_ixgbe.so.23.0", "librte_net_i40e.so.23.0",
                "librte_net_iavf.so.23.0", "librte_net_ice.so.23.0")


def dpdk_files() -> list[str]:
    """testpmd, the plugins of DPDK_PLUGINS that exist, and every library they link (ldd), as
    absolute paths on the controller; a ProvisionError when testpmd is not installed."""
    if not os.path.exists(TESTPMD):
        raise ProvisionError(f"{TESTPMD} is not installed on the controller (the NIC VF I/O image needs it)",
                             hint="apt-get install dpdk-dev (ci/setup installs it)")
    roots = [TESTPMD] + [p for p in (f"{DPDK_PLUGIN_DIR}/{n}" for n in DPDK_PLUGINS) if os.path.exists(p)]
    files = set()
    for root in roots:
        out = subprocess.run(["ldd", root], capture_output=True, text=True, timeout=60, check=True).stdout
        for line in [f"x => {root}", *out.splitlines()]:
            parts = line.split("=>")
            path = (parts[1] if len(parts) > 1 else parts[0]).strip().split(" (")[0].strip()
            if path.startswith("/") and os.path.exists(path):
                # the name as linked (often a link, kept as one: a library that is loaded both by
                # its soname and as a plugin must be one file) and the file it resolves to
                files.add(os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)))
                files.add(os.path.realpath(path))
    return sorted(files)


def dpdk_version() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "unknown"
REMOTE_UPLOAD_DIR = "/var/tmp/vfiotest/images"


@dataclass(frozen=True)
class ImageRecipe:
    """Everything the tarball depends on; `key()` is their hash."""

    suite: str = "bookworm"
    variant: str = "essential"
    include: Tuple[str, ...] = ("python3-minimal",)
    exclude_paths: Tuple[str, ...] = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
    # removed after installation: full perl (pulled in by usrmerge's converter), iconv
    # modules; nothing in the container runs them, and every MB costs import time under TCG
    trim_paths: Tuple[str, ...] = ("/usr/share/perl", "/usr/lib/x86_64-linux-gnu/perl", "/usr/lib/x86_64-linux-gnu/gconv",
                                   "/usr/share/perl5", "/var/cache/debconf/templates.dat-old", "/var/lib/apt/lists")
    mirror: str = ""  # empty: mmdebstrap's default (deb.debian.org), as the machine's own sources use
    dpdk: bool = False  # testpmd and what it needs, from the controller (dpdk_files)

    def inputs(self) -> dict[str, Any]:
        extra = {"dpdk": dpdk_version(), "dpdk_files": dpdk_files()} if self.dpdk else {}
        return {**extra, "recipe_version": RECIPE_VERSION, "suite": self.suite, "variant": self.variant,
                "include": list(self.include), "exclude_paths": list(self.exclude_paths), "trim_paths": list(self.trim_paths),
                "mirror": self.mirror,
                "probe_sha256": hashlib.sha256(PROBE_SOURCE.read_bytes()).hexdigest(),
                "nvme_io_sha256": hashlib.sha256(NVME_IO_SOURCE.read_bytes()).hexdigest(),
                "launchers": [list(x) for x in LAUNCHERS]}

    def key(self) -> str:
        # computed once per recipe: a DPDK recipe's inputs run ldd and dpkg-query on the controller,
        # and ensure_image asks for the tarball and the ref several times
        if "_key" not in self.__dict__:
            object.__setattr__(self, "_key", hashlib.sha256(json.dumps(self.inputs(), sort_keys=True).encode()).hexdigest())
        return self.__dict__["_key"]

    @property
    def tag(self) -> str:
        return self.key()[:12]

    @property
    def ref(self) -> str:
        return f"{IMAGE_REPO}:{self.tag}"

    def tarball(self, cache_dir: str | None = None) -> Path:
        name = "vfiotest-dpdk" if self.dpdk else "vfiotest-probe"
        return Path(cache_dir or _cache_dir(CACHE_SUBDIR)) / f"{name}-{self.tag}.tar"

    def store(self, cache_dir: str | None = None) -> Path:
        """The read-only podman image store holding this image (`ensure_store`): an ext4 image of a
        podman graph root."""
        return self.tarball(cache_dir).with_suffix(".store.ext4")

    def mmdebstrap_command(self, out: str | Path) -> list[str]:
        cmd = ["mmdebstrap", "--quiet", f"--variant={self.variant}", "--include=" + ",".join(self.include)]
        cmd += [f"--dpkgopt=path-exclude={p}" for p in self.exclude_paths]
        cmd += [f'--customize-hook=mkdir -p "$1{LIB_IN_IMAGE}"',
                f"--customize-hook=upload {PROBE_SOURCE} {LIB_IN_IMAGE}/probe.py",
                f"--customize-hook=upload {NVME_IO_SOURCE} {NVME_IO_IN_IMAGE}",
                # byte-compiled in the image (unchecked-hash: the image is keyed by the sources'
                # hashes, so they cannot change under it), and the probe and the NVMe driver
                # started from their .pyc by launchers, python with -I -S: no site, no sitecustomize
                f'--customize-hook=chroot "$1" python3 -m compileall -q --invalidation-mode unchecked-hash {LIB_IN_IMAGE}',
                *(hook for path, text in LAUNCHERS for hook in (
                    "--customize-hook=printf '%s\\n' " + " ".join(shlex.quote(line) for line in text.splitlines())
                    + f' > "$1{path}"',
                    f'--customize-hook=chmod 0755 "$1{path}"')),
                # files the image has already (its own libc, ...) are kept; links stay links
                *(['--customize-hook=for f in ' + shlex.join(p.lstrip("/") for p in dpdk_files())
                   + '; do [ -e "$1/$f" ] || echo "$f"; done | tar -C / -cf - -T - | tar -C "$1" -xf -']
                  if self.dpdk else []),
                f'--customize-hook=echo {self.key()} > "$1/etc/vfiotest-image"',
                "--customize-hook=rm -rf " + " ".join(f'"$1{p}"' for p in self.trim_paths),
                self.suite, str(out)]
        if self.mirror:
            cmd.append(self.mirror)
        return cmd


@dataclass
class Image:
    """An image on the target: its reference and how to run the probe in it."""

    ref: str
    built: bool = True  # False: the user's own image (--image)
    tarball: str = ""
    timings: dict = field(default_factory=dict)

    @property
    def probe_command(self) -> list[str]:
        if self.built:
            return [PROBE_IN_IMAGE]
        return ["python3", "-c", PROBE_SOURCE.read_text()]

    @property
    def nvme_command(self) -> list[str]:
        """The userspace NVMe driver (nvme_io.py): from the image, or for the user's own image
        passed as source with the probe loaded as the module it imports."""
        if self.built:
            return [NVME_IN_IMAGE]
        boot = ("import sys, types\n"
                "probe = types.ModuleType('probe')\n"
                f"exec(compile({PROBE_SOURCE.read_text()!r}, 'probe.py', 'exec'), probe.__dict__)\n"
                "sys.modules['probe'] = probe\n"
                f"exec(compile({NVME_IO_SOURCE.read_text()!r}, 'nvme_io.py', 'exec'), {{'__name__': '__main__'}})\n")
        return ["python3", "-c", boot]


def default_recipe() -> ImageRecipe:
    """Our image when none is named: the probe image, with DPDK's testpmd in it when the controller
    has it installed (`ImageRecipe(dpdk=True)`, as the NIC VF I/O test's `dpdk_image` asks). One
    image then serves every suite: each `podman import` into the emulated runner costs about a
    minute under TCG (its podman storage is a tmpfs: an import at every boot, unless the runner
    boots with the image's read-only store, `ensure_store`), and a session that imported the probe
    image and then the DPDK image paid twice (docs/measurements.md)."""
    return ImageRecipe(dpdk=os.path.exists(TESTPMD))


def build_tarball(recipe: ImageRecipe | None = None, cache_dir: str | None = None, rebuild: bool = False,
                  progress: Callable[[str], None] | None = None, timeout: float = 900) -> tuple[Path, float]:
    """The cached rootfs tarball for `recipe`, built if missing. Returns (path, seconds spent building or 0)."""
    import filelock

    recipe = recipe or default_recipe()
    out = recipe.tarball(cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(out) + ".lock", timeout=timeout):
        if out.exists() and not rebuild:
            return out, 0.0
        tmp = out.with_suffix(f".tmp{os.getpid()}.tar")
        cmd = recipe.mmdebstrap_command(tmp)
        if progress:
            progress(f"building the test image rootfs with mmdebstrap ({recipe.variant} + {', '.join(recipe.include)}"
                     f"{' + testpmd from the controller' if recipe.dpdk else ''}, ~15 s)")
        t0 = time.monotonic()
        p = _run_tool(cmd, timeout, "apt-get install mmdebstrap (ci/setup installs it)")
        if p.returncode == _TIMED_OUT:
            tmp.unlink(missing_ok=True)
            raise ProvisionError(f"mmdebstrap did not finish in {timeout} s", hint="check the apt mirror is reachable")
        if p.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise ProvisionError(f"mmdebstrap failed (exit {p.returncode}): {p.stderr.strip()[-800:]}",
                                 hint=f"run it by hand to see more: {shlex.join(cmd)}")
        (out.with_suffix(".json")).write_text(json.dumps(recipe.inputs(), indent=2, sort_keys=True))
        os.replace(tmp, out)
        return out, time.monotonic() - t0


#: _run_tool's return code for a tool that did not finish in its time
_TIMED_OUT = -1000


def _run_tool(argv: list[str], timeout: float, install_hint: str) -> subprocess.CompletedProcess:
    """`argv` run on the controller, its output captured. A ProvisionError naming the tool when it
    is not installed (`install_hint`: how to install it); return code _TIMED_OUT when it did not
    finish in `timeout` s."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ProvisionError(f"{argv[0]} is not installed on the controller", hint=install_hint) from None
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, _TIMED_OUT, "", f"did not finish in {timeout} s")


def _import_args(tarball: str, ref: str) -> list[str]:
    return ["import", "--change", f'CMD ["{PROBE_IN_IMAGE}"]', "--message", "vfiotest probe image", tarball, ref]


def ensure_store(recipe: ImageRecipe | None = None, cache_dir: str | None = None,
                 progress: Callable[[str], None] | None = None, timeout: float = 300) -> tuple[Path, float]:
    """The read-only image store holding `recipe`'s image, as a disk image, made if missing: the
    cached tarball (built if missing) imported by the controller's own podman into a graph root of
    its own (overlay driver, as the runner's podman uses), then that graph root made into an ext4
    filesystem image (`mkfs.ext4 -d`, no mount) under a temporary name and renamed, so that an
    image that exists is whole. A disk, not a directory over 9p: a container's files are read in
    the runner through its page cache, where the 9p root (cache=mmap) paid a round trip to the
    controller per file and made every Kata container slower. The controller's podman storage and
    events are not touched (`--root`, `--runroot`, `--events-backend none`). Returns (the disk
    image, seconds spent making it or 0)."""
    import filelock

    recipe = recipe or default_recipe()
    tar, _ = build_tarball(recipe, cache_dir, progress=progress)
    store = recipe.store(cache_dir)
    with filelock.FileLock(str(store) + ".lock", timeout=timeout):
        # made from this tarball, or a later one (`image build --rebuild` makes the tarball anew)
        if store.exists() and store.stat().st_mtime >= tar.stat().st_mtime:
            return store, 0.0
        t0 = time.monotonic()
        tmp = store.with_name(f"{store.name}.tmp{os.getpid()}")
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
        if progress:
            progress(f"importing {recipe.ref} into a read-only image store for the runner ({store})")
        import tempfile

        run = tempfile.mkdtemp(prefix="vfiotest-store-")   # podman wants a run root of 50 characters at most
        root = tmp / "root"
        argv = ["podman", "--root", str(root), "--runroot", run, "--storage-driver", "overlay",
                "--events-backend", "none", *_import_args(str(tar), recipe.ref)]
        try:
            try:
                p = _run_tool(argv, timeout, "apt-get install podman (ci/setup installs it)")
            finally:
                # podman leaves its overlay directory bind-mounted on itself
                unmount_under(str(tmp))
                subprocess.run(["rm", "-rf", run], check=False)
            if p.returncode != 0:
                raise ProvisionError(f"podman import into the image store {tmp} failed (exit {p.returncode}): "
                                     f"{p.stderr.strip()[-500:]}", hint=f"run it by hand to see more: {shlex.join(argv)}")
            # the graph root alone is the store; podman's own database is this import's
            subprocess.run(["rm", "-rf", str(root / "libpod")], check=False)
            used, files = 0, 0
            for d, dirs, names in os.walk(root):
                files += len(dirs) + len(names)
                used += sum(os.lstat(os.path.join(d, n)).st_size for n in names)
            size_mb = used * 5 // 4 // 2**20 + 32
            img = tmp / "store.ext4"
            mkfs = ["mkfs.ext4", "-q", "-F", "-d", str(root), "-L", "vfiotest-images", "-O", "^has_journal", "-m", "0",
                    "-N", str(files * 2 + 1024), "-E", "root_owner=0:0", str(img), f"{size_mb}M"]
            m = _run_tool(mkfs, timeout, "apt-get install e2fsprogs (ci/setup installs it)")
            if m.returncode != 0:
                raise ProvisionError(f"mkfs.ext4 of the image store failed (exit {m.returncode}): {m.stderr.strip()[-500:]}",
                                     hint=f"run it by hand to see more: {shlex.join(mkfs)}")
            os.replace(img, store)
        finally:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
        return store, time.monotonic() - t0


def unmount_under(path: str) -> None:
    """Unmount what is mounted at or under `path` on the controller (deepest first)."""
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((m for m in points if m == path or m.startswith(path + "/")), key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, check=False)


def image_exists(host: Host, ref: str, timeout: float = 60) -> bool:
    # CLI: a single round trip before any API service exists (the image is shared by all of them)
    return host.run(["podman", "image", "exists", ref], timeout=timeout).rc == 0


def import_tarball(host: Host, tarball: str | Path, ref: str, timeout: float = 600) -> None:
    """`podman import` the tarball on `host` as `ref` (copied there first unless the target
    sees the same file at the same path). CLI on purpose: podman-py has no import call, and
    the API would stream 125 MB through the socket for a file already on the target's disk."""
    tarball = str(tarball)
    size = os.path.getsize(tarball)
    remote, uploaded = tarball, False
    res = host.run(["stat", "-c", "%s", tarball], timeout=30)
    if not (res.ok and res.stdout.strip() == str(size)):
        remote = f"{REMOTE_UPLOAD_DIR}/{os.path.basename(tarball)}"
        _upload(host, tarball, remote)
        uploaded = True
    try:
        res = host.run(["podman", *_import_args(remote, ref)], timeout=timeout)
        if res.rc != 0:
            raise ProvisionError(f"podman import of {remote} as {ref} failed on {host.name}: {res.stderr.strip()[-500:]}",
                                 hint="check free space for podman's storage on the target (`podman info`)")
    finally:
        if uploaded:
            host.run(["rm", "-f", remote], timeout=30)


def _upload(host: Host, local: str, remote: str) -> None:
    from ..sshhost import SshHost

    if host.is_local or not isinstance(host, SshHost):
        raise ProvisionError(f"{local} is not readable as the same file on {host.name}",
                             hint="the cache directory changed under us; rebuild with `vfiotest image build --rebuild`")
    host.run(["mkdir", "-p", os.path.dirname(remote)], timeout=30, check=True)
    sftp = host.connect().open_sftp()
    try:
        sftp.put(local, remote)
    finally:
        sftp.close()


def ensure_image(host: Host, image: str | None = None, recipe: ImageRecipe | None = None,
                 cache_dir: str | None = None, rebuild: bool = False, progress: Callable[[str], None] | None = None) -> Image:
    """The image to run on `host`: the user's `image` (checked to exist), or ours built and imported."""
    if image:
        if not image_exists(host, image):
            raise ProvisionError(f"image {image!r} (--image) is not in podman's storage on {host.name}",
                                 hint=f"load it there first (`podman load`/`podman pull {image}` on the target), or drop --image to build ours")
        return Image(image, built=False)
    recipe = recipe or default_recipe()
    timings = {}
    tar, timings["build_s"] = build_tarball(recipe, cache_dir, rebuild, progress)
    t0 = time.monotonic()
    if rebuild or not image_exists(host, recipe.ref):
        if progress:
            progress(f"importing {recipe.ref} on {host.name}")
        import_tarball(host, tar, recipe.ref)
    elif progress:
        progress(f"{recipe.ref} is already in podman's storage on {host.name} (no import)")
    timings["import_s"] = time.monotonic() - t0
    return Image(recipe.ref, built=True, tarball=str(tar), timings=timings)
