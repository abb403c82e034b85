"""The QEMU side of the runner: what this QEMU can do, and the command line."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable

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


def choose_accel(qemu: str, kernel: str, want: str | None = None,
                 trial: Callable[[str, str], tuple[bool, str]] | None = None) -> tuple[str, str]:
    """("kvm" or "tcg", why) for the runner: `want` (else VFIOTEST_RUNNER_ACCEL, else auto).
    auto tries KVM (kvm_runs_a_guest) and falls back to TCG; kvm that does not work is an error."""
    want = (want or os.environ.get(ACCEL_ENV) or "auto").strip().lower()
    if want not in ACCELS:
        raise ProvisionError(f"{ACCEL_ENV}={want!r} is not an accelerator",
                             hint=f"use one of {', '.join(ACCELS)} (auto: KVM when it runs a guest here, else TCG)")
    if want == "tcg":
        return "tcg", f"TCG ({ACCEL_ENV}=tcg)"
    ok, why = (trial or kvm_runs_a_guest)(qemu, kernel)
    if ok:
        return "kvm", "KVM (a trial guest ran under /dev/kvm; nested virtualisation for the Kata VMs)"
    if want == "kvm":
        raise ProvisionError(f"{ACCEL_ENV}=kvm, but {why}",
                             hint=f"unset {ACCEL_ENV} (or set it to tcg) to run the runner under TCG")
    return "tcg", f"TCG ({why})"


def cpus_warning(accel: str, cpus: int) -> str | None:
    """What to say when the runner gets more than one vCPU under TCG (VFIOTEST_RUNNER_CPUS), else
    None. Measured here (QEMU 10.0, 2026-12-07, docs/runner.md): with 2 vCPUs the runner's QEMU
    exited while the main job's nested Kata VMs ran, in all three runs (2 to 11 min in)."""
    if accel != "tcg" or cpus <= 1:
        return None
    return (f"runner: {cpus} vCPUs under TCG: with 2, this runner's QEMU exited while nested Kata VMs ran "
            "(measured with QEMU 10.0; docs/runner.md); unset VFIOTEST_RUNNER_CPUS for 1 if the runner dies")


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


def command(qemu: str, *, kernel: str, initrd: str, append: str, port: int, console_log: str, pidfile: str,
            nvme_image: str, memory_mb: int = DEFAULT_MEMORY_MB, cpus: int = 2, igb: bool = True,
            name: str = "vfiotest-runner", etc_default: str | None = None, wire: bool = False,
            accel: str = "tcg") -> list[str]:
    """The QEMU argv. Device order matters: intel-iommu comes before the devices it translates.
    `etc_default`: the runner's persistent /etc/default (its GRUB defaults), shared read-write."""
    if etc_default and ("," in etc_default or not etc_default.startswith("/")):
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
        # management: user networking, SSH forwarded from localhost only
        "-netdev", f"user,id=mgmt,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=mgmt,addr=0x3",
        "-virtfs", f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-rng-pci,addr=0x5",
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
