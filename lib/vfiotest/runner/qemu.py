"""The QEMU side of the runner: what this QEMU can do, and the command line."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence

from ..errors import ProvisionError

QEMU_ENV = "VFIOTEST_QEMU"
IGB_MIN_VERSION = (8, 0)
ROOT_TAG = "vfiotest-root"
ETC_DEFAULT_TAG = "vfiotest-etc-default"   # the runner's /etc/default, read-write (bootcfg)

# PCI IDs of the emulated PFs, as the guest sees them
PF_IDS = {"igb": ("8086", "10c9"), "nvme": ("1b36", "0010")}

#: The runner's RAM. With the wire (WIRE_ENV) it stays below 2816 MiB (0xb0000000, where q35
#: starts its PCI hole): all of it lies below 4 GiB, so SeaBIOS keeps every PCI window below 4 GiB
#: too. With RAM above 4 GiB (3072 MiB does that) it moves the 64-bit prefetchable windows above
#: 4 GiB, the kernel puts the igb VF BARs there, and QEMU 10.0 maps a VF BAR at the low 32 bits of
#: its address only: the VF's registers are then not where its driver looks and it never gets a
#: link (docs/nic-traffic.md). Without the wire (VFIOTEST_RUNNER_WIRE=0) the runner has 3072 MiB.
DEFAULT_MEMORY_MB = 3072
VF_BARS_BELOW_4G_MAX_MB = 2815
#: The runner whose igb VFs pass traffic (RAM below 4 GiB, the wire) is the default;
#: VFIOTEST_RUNNER_WIRE=0 boots the former one (3072 MiB, the PF on restricted user networking)
WIRE_ENV = "VFIOTEST_RUNNER_WIRE"

#: The igb PF's wire: a QEMU hub joining it to a second virtio NIC of the runner itself, the
#: "wire peer", on which frames the PF port puts on the wire are counted and from which frames
#: are sent to it (docs/nic-traffic.md). Found in the runner by this MAC or PCI address.
WIRE_PEER_MAC = "52:54:00:76:66:01"
WIRE_PEER_SLOT = 0x6
WIRE_PEER_PCI = f"0000:00:{WIRE_PEER_SLOT:02x}.0"


#: how the runner's CPU is emulated: auto (KVM when /dev/kvm runs a guest, else TCG), kvm, tcg
ACCEL_ENV = "VFIOTEST_RUNNER_ACCEL"
ACCELS = ("auto", "kvm", "tcg")
KVM_DEVICE = "/dev/kvm"


def kvm_runs_a_guest(qemu: str, kernel: str, timeout: float = 30.0, device: str = KVM_DEVICE) -> tuple[bool, str]:
    """Whether QEMU/KVM runs a guest here, found by trying: `kernel` booted under `-accel kvm`
    without a root file system (it prints its banner and panics; `-no-reboot` ends QEMU).
    (True, "") or (False, why). /dev/kvm being there is not enough: on some machines (these
    among them) it refuses to run a vCPU."""
    if not os.access(device, os.R_OK | os.W_OK):
        return False, f"{device} is absent or not accessible"
    argv = [qemu, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "128", "-nodefaults", "-no-user-config",
            "-display", "none", "-kernel", kernel, "-append", "console=ttyS0 panic=-1", "-serial", "stdio", "-no-reboot"]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:        # still running: what it printed decides
        out, err = e.stdout or b"", e.stderr or b""
    except OSError as e:
        return False, f"{qemu} did not run: {e}"
    text = out.decode("utf-8", "replace")
    if "Linux version" in text:
        return True, ""
    why = (err.decode("utf-8", "replace").strip().splitlines() or text.strip().splitlines() or ["no output"])[0]
    return False, f"a KVM guest did not start: {why[:200]}"


def trial_key(qemu: str, device: str = KVM_DEVICE) -> str:
    """What a KVM trial's outcome holds for: this boot of the machine (its boot id), the QEMU binary
    (path, size, mtime) and the /dev/kvm node (inode, mode, owner, change time: reloading the kvm
    modules or changing its permissions makes a new key)."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("no-boot-id")
    for path in (os.path.realpath(shutil.which(qemu) or qemu), device):
        try:
            st = os.stat(path)
            parts.append(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mode:o}:{st.st_uid}:{st.st_gid}:{st.st_mtime_ns}:{st.st_ctime_ns}")
        except OSError:
            parts.append(f"{path}:absent")
    return "|".join(parts)


def choose_accel(qemu: str, kernel: str, want: str | None = None,
                 trial: Callable[[str, str], tuple[bool, str]] | None = None,
                 cache: str | None = None) -> tuple[str, str]:
    """("kvm" or "tcg", why) for the runner: `want` (else VFIOTEST_RUNNER_ACCEL, else auto).
    auto tries KVM (kvm_runs_a_guest) and falls back to TCG; kvm that does not work is an error.
    `cache`: a JSON file that keeps the trial's outcome for its trial_key, so the trial runs once
    per boot of this machine (where /dev/kvm does not run a guest, the trial waits out its 30 s:
    every runner boot paid that before)."""
    want = (want or os.environ.get(ACCEL_ENV) or "auto").strip().lower()
    if want not in ACCELS:
        raise ProvisionError(f"{ACCEL_ENV}={want!r} is not an accelerator",
                             hint=f"use one of {', '.join(ACCELS)} (auto: KVM when it runs a guest here, else TCG)")
    if want == "tcg":
        return "tcg", f"TCG ({ACCEL_ENV}=tcg)"
    key = trial_key(qemu) if cache else ""
    kept = _read_trial(cache, key) if cache else None
    if kept is not None:
        ok, why = kept
        when = " (the trial earlier in this boot of the machine)"
    else:
        ok, why = (trial or kvm_runs_a_guest)(qemu, kernel)
        when = ""
        if cache:
            _write_trial(cache, key, ok, why)
    if ok:
        return "kvm", "KVM (a trial guest ran under /dev/kvm; nested virtualisation for the Kata VMs)" + when
    if want == "kvm":
        raise ProvisionError(f"{ACCEL_ENV}=kvm, but {why}{when}",
                             hint=f"unset {ACCEL_ENV} (or set it to tcg) to run the runner under TCG")
    return "tcg", f"TCG ({why}){when}"


def _read_trial(path: str, key: str) -> tuple[bool, str] | None:
    try:
        with open(path) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("key") != key or not isinstance(kept.get("ok"), bool):
        return None
    return kept["ok"], str(kept.get("why") or "")


def _write_trial(path: str, key: str, ok: bool, why: str) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"key": key, "ok": ok, "why": why}, f)
        os.replace(tmp, path)
    except OSError:
        pass          # not kept: the next boot tries again


def cpus_warning(accel: str, cpus: int) -> str | None:
    """What to say when the runner gets more than one vCPU under TCG (VFIOTEST_RUNNER_CPUS), else
    None. Measured here (QEMU 10.0, 2026-12-07, docs/runner.md): with 2 vCPUs the runner's QEMU
    exited while the main job's nested Kata VMs ran in three of four runs (2 to 11 min in); the
    fourth passed, no faster than with 1."""
    if accel != "tcg" or cpus <= 1:
        return None
    return (f"runner: {cpus} vCPUs under TCG: with 2, this runner's QEMU exited while nested Kata VMs ran "
            "in 3 of 4 runs, and was no faster when it lived (QEMU 10.0; docs/runner.md); unset VFIOTEST_RUNNER_CPUS for 1 if the runner dies")


def find_qemu(explicit: str | None = None) -> str:
    import os

    path = explicit or os.environ.get(QEMU_ENV) or shutil.which("qemu-system-x86_64")
    if not path:
        raise ProvisionError("qemu-system-x86_64 is not installed: the virtual runner cannot boot",
                             hint="apt-get install qemu-system-x86 (from bookworm-backports for igb; ci/setup does it), "
                                  "or use --target local / ssh://...")
    return path


@functools.lru_cache(maxsize=None)
def qemu_version(path: str) -> tuple[int, int]:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if not m:
        raise ProvisionError(f"cannot read the version of {path}: {out.strip()[:200]!r}",
                             hint="check the QEMU installation")
    return int(m.group(1)), int(m.group(2))


@functools.lru_cache(maxsize=None)
def qemu_devices(path: str) -> set[str]:
    out = subprocess.run([path, "-nodefaults", "-machine", "none", "-device", "help"],
                         capture_output=True, text=True, timeout=30).stdout
    return set(re.findall(r'^name "([^"]+)"', out, re.M))


def has_igb(path: str) -> bool:
    """igb SR-IOV needs QEMU 8.0 or later (Debian 12: bookworm-backports)."""
    return qemu_version(path) >= IGB_MIN_VERSION and "igb" in qemu_devices(path)


@functools.lru_cache(maxsize=None)
def log_items(path: str) -> set[str]:
    """The names `-d` takes in this QEMU (`-d help`)."""
    try:
        out = subprocess.run([path, "-d", "help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(re.findall(r"^(\w+)\s", out, re.M))


def keep_stderr_args(qemu: str, log_file: str) -> list[str]:
    """Arguments that keep what a daemonized QEMU says after it started: a daemon's standard error
    goes to /dev/null (os-posix.c) unless a log file is open, and then to that file (util/log.c);
    QEMU opens its `-D` file only for a log item, and `plugin` is one that stays silent without TCG
    plugins. [] when this QEMU has no such item (what it says later is then lost, as before)."""
    if "plugin" not in log_items(qemu):
        return []
    return ["-D", log_file, "-d", "plugin"]


def launch(argv: list[str], stderr_path: str, log_path: str | None = None,
           timeout: float = 120) -> tuple[int, str]:
    """Start the daemonizing QEMU `argv` with its standard error appended to `stderr_path` (a file,
    not a pipe: nothing waits for the daemon to close it). (the starting process's exit status,
    what it wrote): to `stderr_path`, then to its -D file `log_path`, where the daemonized child
    writes its errors (a taken forwarding port is said there, after the fork). Raises
    subprocess.TimeoutExpired as subprocess.run does."""
    paths = [stderr_path] + ([log_path] if log_path else [])
    starts = {}
    for path in paths:
        try:
            starts[path] = os.path.getsize(path)
        except OSError:
            starts[path] = 0
    with open(stderr_path, "ab") as f:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, timeout=timeout)
    said = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(starts[path] if f.tell() >= starts[path] else 0)   # QEMU may have truncated it
                said.append(f.read().decode("utf-8", "replace"))
        except OSError:
            continue
    return p.returncode, "".join(said)


def words(paths: Sequence[str], n: int = 20) -> list[str]:
    """The last `n` lines of the files QEMU wrote its words to (its start's standard error, then
    its -D log), those that exist."""
    lines: list[str] = []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                lines += [ln.rstrip("\n") for ln in f if ln.strip()]
        except OSError:
            continue
    return lines[-n:]


#: the PCI slot of the read-only disk holding the test image's store
IMAGE_DISK_SLOT = 0x7


def _option_path(path: str) -> bool:
    """Whether `path` can go into a QEMU option's value: absolute, and no comma (QEMU splits on it)."""
    return path.startswith("/") and "," not in path


def check_image_disk(path: str) -> None:
    """ProvisionError when the image store's disk `path` cannot be given to QEMU."""
    if not _option_path(path):
        raise ProvisionError(f"the image store {path!r} cannot be given to QEMU (not absolute, or it has a comma)",
                             hint="set VFIOTEST_CACHE_DIR to an absolute path without commas, or VFIOTEST_RUNNER_IMAGE_STORE=0")


def command(qemu: str, *, kernel: str, initrd: str, append: str, port: int, console_log: str, pidfile: str,
            nvme_image: str, memory_mb: int = DEFAULT_MEMORY_MB, cpus: int = 2, igb: bool = True,
            name: str = "vfiotest-runner", etc_default: str | None = None, wire: bool = False,
            accel: str = "tcg", log_file: str | None = None,
            image_disk: str | None = None) -> list[str]:
    """The QEMU argv. Device order matters: intel-iommu comes before the devices it translates.
    `etc_default`: the runner's persistent /etc/default (its GRUB defaults), shared read-write.
    `log_file`: QEMU's log (-D), opened so that the daemon keeps its standard error (keep_stderr_args).
    `image_disk`: the test image's read-only store (podman.image.ensure_store), a read-only
    virtio disk at IMAGE_DISK_SLOT (the runner's /dev/vda)."""
    if image_disk:
        check_image_disk(image_disk)
    if etc_default and not _option_path(etc_default):
        raise ProvisionError(f"the runner's state directory {etc_default!r} cannot be shared over 9p "
                             "(not absolute, or it has a comma, which QEMU's option syntax splits on)",
                             hint="set VFIOTEST_STATE_DIR to an absolute path without commas")
    argv = [
        qemu, "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35,kernel-irqchip=split",
        *(["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi", "-cpu", "max"]),
        "-smp", str(cpus), "-m", str(memory_mb),
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-kernel", kernel, "-initrd", initrd, "-append", append,
        "-serial", f"file:{console_log}", "-no-reboot",
        "-pidfile", pidfile, "-daemonize",
        *(keep_stderr_args(qemu, log_file) if log_file else []),
        # management: user networking, SSH forwarded from localhost only
        "-netdev", f"user,id=mgmt,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=mgmt,addr=0x3",
        "-virtfs", f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-rng-pci,addr=0x5",
        *(["-drive", f"file={image_disk},if=none,id=images,format=raw,readonly=on",
           "-device", f"virtio-blk-pci,drive=images,addr={IMAGE_DISK_SLOT:#x}"] if image_disk else []),
        *(["-virtfs", f"local,path={etc_default},mount_tag={ETC_DEFAULT_TAG},security_model=none"]
          if etc_default else []),
        # SR-IOV PFs, each behind its own root port (its own IOMMU group)
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0,addr=0x10",
        "-device", "pcie-root-port,id=rp2,chassis=2,slot=2,bus=pcie.0,addr=0x11",
        "-device", "nvme-subsys,id=nvmesubsys0,nqn=vfiotest-runner",
        "-device", "nvme,id=nvme0,serial=vfiotest0,subsys=nvmesubsys0,bus=rp2,"
                   "sriov_max_vfs=4,sriov_vq_flexible=8,sriov_vi_flexible=4",
        "-drive", f"file={nvme_image},if=none,id=nvm0,format=raw,cache=unsafe",
        "-device", "nvme-ns,drive=nvm0,bus=nvme0,nsid=1",
    ]
    if igb and wire:
        # the PF's wire is a hub with the runner's own wire-peer NIC on its other port
        argv += ["-netdev", "hubport,id=igbnet,hubid=0",
                 "-device", "igb,netdev=igbnet,bus=rp1",
                 "-netdev", "hubport,id=wirepeer,hubid=0",
                 "-device", f"virtio-net-pci,netdev=wirepeer,mac={WIRE_PEER_MAC},addr={WIRE_PEER_SLOT:#x}"]
    elif igb:
        argv += ["-netdev", "user,id=igbnet,restrict=on",
                 "-device", "igb,netdev=igbnet,bus=rp1"]
    return argv
