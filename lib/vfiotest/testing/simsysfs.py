"""A simulated host for unit tests: a fake /sys, /dev/vfio and /proc under a
temp directory, and `write_text()` that behaves like the kernel (../shared/notes/facts.md §3).

The tree uses real symlinks laid out like sysfs, so the real INVENTORY_SCRIPT
reads it unchanged. All state lives on disk (links, attribute files and
`<sysroot>/.sim/state.json`): a process killed with SIGKILL leaves exactly the
state another process opening the same sysroot will see.

    host = SimulatedHost.build(tmpdir, pfs=["igb", "nvme"])
    host.write_text("/sys/bus/pci/devices/0000:10:00.0/sriov_numvfs", "2")

Modelled: driver_override, drivers/<d>/{bind,unbind,new_id,remove_id},
drivers_probe (nothing bound is still success), sriov_numvfs (ERANGE, EBUSY on
N->M, ENOENT without a PF driver, VFs in their own IOMMU groups with
physfn/virtfnN links, VF driver autoprobe), /dev/vfio/<group> present exactly
while every non-bridge device of the group is bound to vfio-pci, and `modprobe
vfio-pci` through run(), and `nvme` (nvme-cli) for an NVMe PF's primary and secondary
controllers (vfiotest.testing.simnvme). Never touches anything outside the sysroot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import CommandTimeout, TargetError
from ..host import DEFAULT_TIMEOUT, CommandResult, Input, LocalHost
from . import simnvme

VFIO = "vfio-pci"

# vendor:device -> the Linux driver that claims it (these are the real pairings).
NATIVE_DRIVERS = {
    "8086:10c9": "igb", "8086:10ca": "igbvf",              # 82576 (QEMU igb) PF / VF
    "8086:1521": "igb", "8086:1520": "igbvf",              # I350 PF / VF
    "8086:158b": "i40e", "8086:154c": "iavf",              # XXV710 PF / 700-series VF
    "15b3:1015": "mlx5_core", "15b3:1016": "mlx5_core",    # ConnectX-4 Lx PF / VF
    "15b3:1017": "mlx5_core", "15b3:1018": "mlx5_core",    # ConnectX-5 PF / VF
    "1b36:0010": "nvme",                                   # QEMU NVMe (PF and VFs)
    "1af4:1000": "virtio-pci", "1af4:1001": "virtio-pci",  # virtio net / block (legacy)
    "1af4:1041": "virtio-pci", "1af4:1042": "virtio-pci",
    "1b36:000c": "pcieport",                               # QEMU PCIe root port
}

# PF presets: vendor:device, VF vendor:device, class, sriov_totalvfs.
PF_PRESETS = {
    "igb": {"id": "8086:10c9", "vf_id": "8086:10ca", "class": "0x020000", "totalvfs": 7},
    "nvme": {"id": "1b36:0010", "vf_id": "1b36:0010", "class": "0x010802", "totalvfs": 4},
    "i350": {"id": "8086:1521", "vf_id": "8086:1520", "class": "0x020000", "totalvfs": 7},
    "xxv710": {"id": "8086:158b", "vf_id": "8086:154c", "class": "0x020000", "totalvfs": 64},
    "cx4lx": {"id": "15b3:1015", "vf_id": "15b3:1016", "class": "0x020000", "totalvfs": 8},
    "cx5": {"id": "15b3:1017", "vf_id": "15b3:1018", "class": "0x020000", "totalvfs": 8},
}

# Other devices: what a small VM has besides the PFs.
OTHER_PRESETS = {
    "host-bridge": {"id": "8086:29c0", "class": "0x060000"},
    "virtio-net": {"id": "1af4:1000", "class": "0x020000", "net": ["eth0"], "default_route": "eth0"},
    "virtio-blk": {"id": "1af4:1001", "class": "0x010000", "disk": "vda", "mount": "/"},
    "pci-bridge": {"id": "1b36:0001", "class": "0x060400"},
    "nvme-disk": {"id": "1b36:0010", "class": "0x010802", "disk": "nvme0n1"},
    "e1000e": {"id": "8086:10d3", "class": "0x020000", "net": ["eth1"]},
}
DEFAULT_OTHERS = ("host-bridge", "virtio-net", "virtio-blk")

ROOT_BUS = "/sys/devices/pci0000:00"
SIM_DIR = "/.sim"


def _oserror(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class SimulatedHost(LocalHost):
    """A LocalHost whose sysfs is a simulation under `sysroot` (see the module doc)."""

    simulated = True

    def __init__(self, sysroot: str, name: str | None = None) -> None:
        sysroot = os.path.abspath(sysroot)
        if sysroot in ("/", "") or not os.path.isfile(sysroot + SIM_DIR + "/state.json"):
            raise TargetError(f"{sysroot} is not a simulated sysroot (no {SIM_DIR}/state.json)",
                              hint="build one with vfiotest.testing.simsysfs.SimulatedHost.build(dir) (sim: targets are for tests)")
        super().__init__(name or f"sim:{sysroot}")
        self.sysroot = sysroot
        #: commands run through _exec (the round trips a real target would see)
        self.exec_count = 0

    @classmethod
    def open(cls, sysroot: str, name: str | None = None) -> SimulatedHost:
        return cls(sysroot, name)

    # -- building ------------------------------------------------------------
    @classmethod
    def build(cls, tmpdir: str, pfs: Iterable[str | dict[str, Any]] = ("igb", "nvme"),
              others: Iterable[str | dict[str, Any]] = DEFAULT_OTHERS, protected: Iterable[str] = (),
              vfio_loaded: bool = True, vfio_loadable: bool = True, driver_override: bool = True,
              hostname: str = "simhost", sriov_delay: float = 0.0) -> SimulatedHost:
        """Create a simulated host under `tmpdir` and return it.

        pfs: presets ("igb", "nvme", "i350", "xxv710", "cx4lx", "cx5") or dicts
          {"preset"|"id", "vf_id", "address", "totalvfs", "numvfs", "driver", "autoprobe", "group"}; an
          NVMe PF also {"virt_mgmt", "vq_flexible", "vi_flexible"} (vfiotest.testing.simnvme).
        others: presets ("host-bridge", "virtio-net", "virtio-blk", "pci-bridge", "nvme-disk",
          "e1000e") or dicts {"id", "class", "address", "driver", "group", "net", "default_route",
          "disk", "mount"}. Devices with the same "group" label share an IOMMU group.
        protected: addresses that get a NIC carrying the default route.
        vfio_loaded / vfio_loadable: vfio-pci present at start / `modprobe vfio-pci` works.
        driver_override: False models an old kernel without the attribute (new_id fallback).
        sriov_delay: seconds a write to sriov_numvfs blocks (to test timeouts).
        """
        root = os.path.abspath(tmpdir)
        os.makedirs(root, exist_ok=True)
        state = {"dynids": {}, "driver_order": [], "vfio_loadable": vfio_loadable,
                 "driver_override": driver_override, "pfs": {}, "sriov_delay": sriov_delay}
        for d in ("/sys/bus/pci/devices", "/sys/bus/pci/drivers", "/sys/kernel/iommu_groups", "/sys/class/net",
                  "/sys/class/iommu/dmar0",
                  "/sys/class/block", "/sys/module", "/dev/vfio", "/proc/net", "/proc/sys/kernel/random", "/etc",
                  ROOT_BUS, SIM_DIR):
            os.makedirs(root + d, exist_ok=True)
        _write(root + "/sys/bus/pci/drivers_probe", "", 0o200)
        _write(root + "/etc/machine-id", uuid.uuid4().hex + "\n")
        _write(root + "/proc/sys/kernel/hostname", hostname + "\n")
        _write(root + "/proc/sys/kernel/random/boot_id", str(uuid.uuid4()) + "\n")
        _write(root + "/proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/vda1 intel_iommu=on iommu=pt "
                                       "systemd.unified_cgroup_hierarchy=0\n")
        _write(root + "/proc/interrupts", "           CPU0\n 24:   0  IR-PCI-MSI 512000-edge  eth0\n")
        for mod in ("vfio", "vfio_iommu_type1"):
            os.makedirs(f"{root}/sys/module/{mod}/parameters", exist_ok=True)
        _write(root + "/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts", "N\n")
        with open(root + SIM_DIR + "/state.json", "w") as f:
            json.dump(state, f)
        host = cls(root)
        host._populate(pfs, others, protected, vfio_loaded)
        return host

    def _populate(self, pfs: Iterable[str | dict[str, Any]], others: Iterable[str | dict[str, Any]],
                  protected: Iterable[str], vfio_loaded: bool) -> None:
        st = self._load()
        routes: list[str] = []
        mounts: list[str] = []
        group_ids: dict[str, str] = {}
        devices: list[dict] = []
        slot = 1
        for spec in others or ():
            spec = dict(OTHER_PRESETS[spec]) if isinstance(spec, str) else dict(spec)  # type: ignore[call-overload]
            if "address" not in spec:
                if spec["id"] == "8086:29c0":
                    spec["address"] = "0000:00:00.0"
                else:
                    spec["address"] = f"0000:00:{slot:02x}.0"
                    slot += 1
            devices.append(spec)
        for k, spec in enumerate(pfs or ()):
            if isinstance(spec, str):
                spec = {"preset": spec}
            spec = dict(spec)
            preset = PF_PRESETS.get(spec.get("preset", ""), {})
            for key, value in preset.items():
                spec.setdefault(key, value)
            spec.setdefault("address", f"0000:{0x10 * (k + 1):02x}:00.0")
            spec.setdefault("vf_id", spec["id"])
            spec["pf"] = True
            devices.append(spec)
        for spec in devices:
            addr = spec["address"]
            drv = spec.get("driver", "auto")
            if drv == "auto":
                drv = NATIVE_DRIVERS.get(spec["id"])
            label = spec.get("group")
            if label is not None and label in group_ids:
                group = group_ids[label]
            else:
                group = self._free_group()
                if label is not None:
                    group_ids[label] = group
            self._make_device(addr, spec["id"], spec["class"], group)
            if drv:
                self._ensure_driver(st, drv)
                self._attach(addr, drv)
            for ifname in spec.get("net", ()):
                self._make_netdev(addr, ifname)
            if spec.get("default_route") or addr in protected:
                ifname = spec.get("default_route") or (spec.get("net") or [f"enp{len(routes)}"])[0]
                if ifname not in spec.get("net", ()):
                    self._make_netdev(addr, ifname)
                routes.append(ifname)
            if spec.get("disk"):
                disk = spec["disk"]
                part = disk + ("p1" if disk[-1].isdigit() else "1")
                os.makedirs(f"{self.sysroot}{ROOT_BUS}/{addr}/block/{disk}/{part}", exist_ok=True)
                os.symlink(f"../../devices/pci0000:00/{addr}/block/{disk}", f"{self.sysroot}/sys/class/block/{disk}")
                os.symlink(f"../../devices/pci0000:00/{addr}/block/{disk}/{part}", f"{self.sysroot}/sys/class/block/{part}")
                if spec.get("mount"):
                    mounts.append(f"/dev/{part} {spec['mount']} ext4 rw,relatime 0 0")
            if spec.get("pf"):
                d = f"{self.sysroot}{ROOT_BUS}/{addr}"
                _write(d + "/sriov_totalvfs", f"{spec['totalvfs']}\n", 0o444)
                _write(d + "/sriov_numvfs", "0\n")
                _write(d + "/sriov_drivers_autoprobe", "1\n" if spec.get("autoprobe", True) else "0\n")
                st["pfs"][addr] = {"vf_id": spec["vf_id"], "class": spec["class"]}
                if drv == "nvme":  # the primary controller's char device, with its secondaries (simnvme)
                    ctrl = simnvme.new_controller(len(st.setdefault("nvme", {})), int(spec["totalvfs"]),
                                                  vq_flexible=spec.get("vq_flexible", 8),
                                                  vi_flexible=spec.get("vi_flexible", 4), virt_mgmt=spec.get("virt_mgmt", True))
                    os.makedirs(f"{d}/nvme/{ctrl['dev']}")
                    st["nvme"]["/dev/" + ctrl["dev"]] = dict(ctrl, pf=addr)
                if NATIVE_DRIVERS.get(spec["vf_id"]):
                    self._ensure_driver(st, NATIVE_DRIVERS[spec["vf_id"]])
        mounts += ["proc /proc proc rw 0 0", "sysfs /sys sysfs rw 0 0",
                   "tmpfs /sys/fs/cgroup tmpfs ro,mode=755 0 0",
                   "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0"]
        _write(self.sysroot + "/proc/mounts", "\n".join(mounts) + "\n")
        lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
        for ifname in routes:
            lines.append(f"{ifname}\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0")
        _write(self.sysroot + "/proc/net/route", "\n".join(lines) + "\n")
        if vfio_loaded:
            self._load_vfio(st)
        self._save(st)
        # PFs created with VFs already enabled
        for spec in devices:
            if spec.get("pf") and spec.get("numvfs"):
                self.write_text(f"/sys/bus/pci/devices/{spec['address']}/sriov_numvfs", str(spec["numvfs"]))

    # -- state -----------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        with open(self.sysroot + SIM_DIR + "/state.json") as f:
            return json.load(f)

    def _save(self, st: dict[str, Any]) -> None:
        path = self.sysroot + SIM_DIR + "/state.json"
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.sysroot + SIM_DIR + "/lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _free_group(self) -> str:
        """The lowest unused group number, as the kernel's ida_alloc() hands them out."""
        used = {int(g) for g in os.listdir(self.sysroot + "/sys/kernel/iommu_groups")}
        return str(min(set(range(len(used) + 1)) - used))

    def _dev(self, addr: str) -> str:
        return f"{self.sysroot}{ROOT_BUS}/{addr}"

    def _make_device(self, addr: str, vd: str, cls: str, group: str) -> None:
        d = self._dev(addr)
        os.makedirs(d)
        ven, dev = vd.split(":")
        _write(d + "/vendor", f"0x{ven}\n", 0o444)
        _write(d + "/device", f"0x{dev}\n", 0o444)
        _write(d + "/class", f"{cls}\n", 0o444)
        if self._load()["driver_override"]:
            _write(d + "/driver_override", "(null)\n")
        os.symlink(f"../../../devices/pci0000:00/{addr}", f"{self.sysroot}/sys/bus/pci/devices/{addr}")
        gdir = f"{self.sysroot}/sys/kernel/iommu_groups/{group}/devices"
        os.makedirs(gdir, exist_ok=True)
        os.symlink(f"../../../../devices/pci0000:00/{addr}", f"{gdir}/{addr}")
        os.symlink(f"../../../kernel/iommu_groups/{group}", d + "/iommu_group")

    def _remove_device(self, addr: str) -> None:
        d = self._dev(addr)
        if os.path.islink(d + "/driver"):
            self._detach(addr)
        group = os.path.basename(os.readlink(d + "/iommu_group"))
        gdir = f"{self.sysroot}/sys/kernel/iommu_groups/{group}"
        os.remove(f"{gdir}/devices/{addr}")
        if not os.listdir(gdir + "/devices"):
            os.rmdir(gdir + "/devices")
            os.rmdir(gdir)
        self._update_vfio_node(group)
        os.remove(f"{self.sysroot}/sys/bus/pci/devices/{addr}")
        for root, dirs, files in os.walk(d, topdown=False):
            for n in files + dirs:
                p = os.path.join(root, n)
                if os.path.islink(p) or not os.path.isdir(p):
                    os.remove(p)
                else:
                    os.rmdir(p)
        os.rmdir(d)

    def _make_netdev(self, addr: str, ifname: str) -> None:
        os.makedirs(f"{self._dev(addr)}/net/{ifname}", exist_ok=True)
        _write(f"{self._dev(addr)}/net/{ifname}/flags", "0x1002\n")   # IFF_BROADCAST|IFF_MULTICAST: down
        os.symlink(f"../../devices/pci0000:00/{addr}/net/{ifname}", f"{self.sysroot}/sys/class/net/{ifname}")

    def _ensure_driver(self, st: dict[str, Any], drv: str) -> None:
        d = f"{self.sysroot}/sys/bus/pci/drivers/{drv}"
        if not os.path.isdir(d):
            os.makedirs(d)
            for attr in ("bind", "unbind", "new_id", "remove_id"):
                _write(f"{d}/{attr}", "", 0o200)
        if drv not in st["driver_order"]:
            st["driver_order"].append(drv)
        os.makedirs(f"{self.sysroot}/sys/module/{drv.replace('-', '_')}", exist_ok=True)

    def _load_vfio(self, st: dict[str, Any]) -> None:
        self._ensure_driver(st, VFIO)
        node = self.sysroot + "/dev/vfio/vfio"
        if not os.path.exists(node):
            _mknod_char(node, 10, 196)

    # -- reading the device model --------------------------------------------------
    def _id(self, addr: str) -> str:
        d = self._dev(addr)
        return f"{_rd(d + '/vendor')[2:]}:{_rd(d + '/device')[2:]}"

    def _driver(self, addr: str) -> str | None:
        p = self._dev(addr) + "/driver"
        return os.path.basename(os.readlink(p)) if os.path.islink(p) else None

    def _override(self, addr: str) -> str | None:
        p = self._dev(addr) + "/driver_override"
        if not os.path.exists(p):
            return None
        v = _rd(p)
        return None if v in ("(null)", "") else v

    def _group(self, addr: str) -> str:
        return os.path.basename(os.readlink(self._dev(addr) + "/iommu_group"))

    def _exists(self, addr: str) -> bool:
        return os.path.isdir(self._dev(addr))

    def _matches(self, st: dict[str, Any], addr: str, drv: str) -> bool:
        """The kernel's pci_match_device: driver_override wins, else dynamic IDs, else the ID table.
        vfio-pci's own table only matches with driver_override set."""
        override = self._override(addr)
        if override is not None:
            return override == drv
        vd = self._id(addr)
        if vd in st["dynids"].get(drv, []):
            return True
        return drv != VFIO and NATIVE_DRIVERS.get(vd) == drv

    def _loaded(self, drv: str) -> bool:
        return os.path.isdir(f"{self.sysroot}/sys/bus/pci/drivers/{drv}")

    def _probe(self, st: dict[str, Any], addr: str) -> None:
        if self._driver(addr):
            return
        for drv in st["driver_order"]:
            if self._loaded(drv) and self._matches(st, addr, drv):
                self._attach(addr, drv)
                return

    def _attach(self, addr: str, drv: str) -> None:
        os.symlink(f"../../../bus/pci/drivers/{drv}", self._dev(addr) + "/driver")
        os.symlink(f"../../../../devices/pci0000:00/{addr}", f"{self.sysroot}/sys/bus/pci/drivers/{drv}/{addr}")
        self._update_vfio_node(self._group(addr))

    def _detach(self, addr: str) -> None:
        drv = self._driver(addr)
        os.remove(self._dev(addr) + "/driver")
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{self.sysroot}/sys/bus/pci/drivers/{drv}/{addr}")
        self._update_vfio_node(self._group(addr))

    def _update_vfio_node(self, group: str) -> None:
        gdir = f"{self.sysroot}/sys/kernel/iommu_groups/{group}/devices"
        members = sorted(os.listdir(gdir)) if os.path.isdir(gdir) else []
        endpoints = [a for a in members if not _rd(self._dev(a) + "/class").startswith("0x0604")]
        full = bool(endpoints) and all(self._driver(a) == VFIO for a in endpoints)
        node = f"{self.sysroot}/dev/vfio/{group}"
        if full and not os.path.exists(node):
            _mknod_char(node, 0, int(group) % 256)
        elif not full and os.path.lexists(node):
            os.remove(node)

    # -- the kernel's side of writes ---------------------------------------------------
    def write_text(self, path: str, data: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        full = self.sysroot + path
        if not path.startswith("/sys/"):
            return super().write_text(path, data, timeout)
        if not os.path.exists(full):
            raise _oserror(errno.ENOENT, path)
        real = os.path.realpath(full)[len(self.sysroot):]
        parts = real.strip("/").split("/")
        value = data.strip()
        with self._locked():
            st = self._load()
            if real == "/sys/bus/pci/drivers_probe":
                self._w_drivers_probe(st, value, path)
            elif len(parts) == 6 and parts[:4] == ["sys", "bus", "pci", "drivers"]:
                self._w_driver_attr(st, parts[4], parts[5], value, path)
            elif len(parts) == 5 and real.startswith(ROOT_BUS + "/"):
                addr, attr = parts[3], parts[4]
                if attr == "driver_override":
                    # the kernel keeps the text up to the first newline; empty clears
                    v = data.split("\n", 1)[0]
                    _write(self._dev(addr) + "/driver_override", (v or "(null)") + "\n")
                elif attr == "sriov_numvfs":
                    self._w_numvfs(st, addr, value, path, timeout)
                elif attr == "sriov_drivers_autoprobe":
                    if value not in ("0", "1"):
                        raise _oserror(errno.EINVAL, path)
                    _write(self._dev(addr) + "/sriov_drivers_autoprobe", value + "\n")
                else:
                    raise _oserror(errno.EACCES, path)
            else:
                raise _oserror(errno.EACCES, path)
            self._save(st)

    def _w_drivers_probe(self, st: dict[str, Any], addr: str, path: str) -> None:
        if not self._exists(addr):
            raise _oserror(errno.ENODEV, path)
        self._probe(st, addr)  # succeeds whether or not anything bound

    def _w_driver_attr(self, st: dict[str, Any], drv: str, attr: str, value: str, path: str) -> None:
        if attr == "unbind":
            if not self._exists(value) or self._driver(value) != drv:
                raise _oserror(errno.ENODEV, path)
            self._detach(value)
        elif attr == "bind":
            if not self._exists(value) or not self._matches(st, value, drv):
                raise _oserror(errno.ENODEV, path)
            if self._driver(value):
                raise _oserror(errno.EBUSY, path)
            self._attach(value, drv)
        elif attr in ("new_id", "remove_id"):
            words = value.split()
            try:
                vd = "%04x:%04x" % (int(words[0], 16), int(words[1], 16))
            except (IndexError, ValueError):
                raise _oserror(errno.EINVAL, path) from None
            ids = st["dynids"].setdefault(drv, [])
            if attr == "new_id":
                if vd in ids:
                    raise _oserror(errno.EEXIST, path)
                ids.append(vd)
                # driver_attach(): every unbound device that now matches gets bound
                for a in sorted(os.listdir(self.sysroot + "/sys/bus/pci/devices")):
                    if not self._driver(a) and self._matches(st, a, drv):
                        self._attach(a, drv)
            else:
                if vd not in ids:
                    raise _oserror(errno.ENODEV, path)
                ids.remove(vd)
        else:
            raise _oserror(errno.EACCES, path)

    def _w_numvfs(self, st: dict[str, Any], pf: str, value: str, path: str, timeout: float) -> None:
        try:
            n = int(value)
        except ValueError:
            raise _oserror(errno.EINVAL, path) from None
        d = self._dev(pf)
        total, cur = int(_rd(d + "/sriov_totalvfs")), int(_rd(d + "/sriov_numvfs"))
        if n < 0:
            raise _oserror(errno.EINVAL, path)
        if n > total:
            raise _oserror(errno.ERANGE, path)
        if n == cur:
            return
        if not self._driver(pf):
            raise _oserror(errno.ENOENT, path)
        if n and cur:
            raise _oserror(errno.EBUSY, path)
        delay = float(st.get("sriov_delay") or 0)
        if delay:
            time.sleep(min(delay, timeout))
            if delay > timeout:
                raise CommandTimeout(f"write of {n} to {path} did not finish in {timeout:.0f} s on {self.name}",
                                     hint="the PF driver is blocking; look at dmesg on the target")
        if n == 0:
            for ctrl in st.get("nvme", {}).values():
                if ctrl["pf"] == pf:
                    simnvme.disable_vfs(ctrl)
            for name in sorted(os.listdir(d)):
                if name.startswith("virtfn"):
                    vf = os.path.basename(os.readlink(f"{d}/{name}"))
                    self._remove_device(vf)
                    os.remove(f"{d}/{name}")
            _write(d + "/sriov_numvfs", "0\n")
            return
        info = st["pfs"][pf]
        dom, bus, rest = pf.split(":")
        slot, fn = rest.split(".")
        rid = (int(bus, 16) << 8) | (int(slot, 16) << 3) | int(fn)
        autoprobe = _rd(d + "/sriov_drivers_autoprobe") == "1"
        for i in range(n):
            vrid = rid + 0x80 + i  # VF offset 0x80, stride 1
            vf = f"{dom}:{vrid >> 8:02x}:{(vrid >> 3) & 0x1f:02x}.{vrid & 7}"
            group = self._free_group()
            self._make_device(vf, info["vf_id"], info["class"], group)
            os.symlink(f"../{pf}", self._dev(vf) + "/physfn")
            os.symlink(f"../{vf}", f"{d}/virtfn{i}")
            if autoprobe:
                self._probe(st, vf)
        _write(d + "/sriov_numvfs", f"{n}\n")

    # -- commands: only what the device layer runs; nothing reaches this machine ------
    def _exec(self, command: str, *, timeout: float, input: Input) -> CommandResult:
        self.exec_count += 1
        try:
            words = shlex.split(command)
        except ValueError:
            words = []
        if words and words[0] == "python3":
            # the simulated host's python is ours; -S skips site (as fast as a system python3)
            return super()._exec(shlex.join([sys.executable, "-S", *words[1:]]), timeout=timeout, input=input)
        if words and words[0] == "modprobe":
            return self._modprobe(command, words[1:])
        if words and words[0] == "nvme":
            with self._locked():
                st = self._load()
                ctrls = st.get("nvme", {})
                numvfs = {dev: int(_rd(self._dev(c["pf"]) + "/sriov_numvfs")) for dev, c in ctrls.items()}
                rc, out, err = simnvme.run(ctrls, numvfs, words)
                self._save(st)
            return CommandResult(command, rc, out, err, self.name)
        if words and words[0] == "ip":
            return self._ip(command, words[1:])
        if words in (["true"], [":"]):
            return CommandResult(command, 0, "", "", self.name)
        return CommandResult(command, 127, "", f"{words[0] if words else command}: not available on the simulated host\n",
                             self.name)

    def _ip(self, command: str, args: list[str]) -> CommandResult:
        """`ip link set dev X up|down`, `ip link set dev X vf N mac M`, `ip -j link show dev X`
        (vfinfo_list of a PF's VFs: their MACs, 00:00:00:00:00:00 until the PF sets one), as
        iproute2 and the kernel answer them; the VF MACs go away with the VFs."""
        def fail(msg: str) -> CommandResult:
            return CommandResult(command, 2, "", msg + "\n", self.name)

        js = args[:1] == ["-j"]
        args = args[1:] if js else args
        if len(args) < 4 or args[0] != "link" or args[2] != "dev":
            return fail(f"ip: simulated: unsupported: {' '.join(args)}")
        ifname = args[3]
        flags_path = f"{self.sysroot}/sys/class/net/{ifname}/flags"
        if not os.path.exists(flags_path):
            return fail(f'Cannot find device "{ifname}"')
        pf = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(flags_path)))))
        with self._locked():
            st = self._load()
            macs = st.setdefault("vf_macs", {}).setdefault(pf, {})
            numvfs = int(_rd(self._dev(pf) + "/sriov_numvfs") or 0) if os.path.exists(self._dev(pf) + "/sriov_numvfs") else 0
            for k in [k for k in macs if int(k) >= numvfs]:     # VFs removed: their MACs with them
                del macs[k]
            if args[1] == "show":
                out = [{"ifname": ifname, "flags": [],
                        "vfinfo_list": [{"vf": i, "address": macs.get(str(i), "00:00:00:00:00:00")} for i in range(numvfs)]}]
                self._save(st)
                return CommandResult(command, 0, json.dumps(out) if js else "", "", self.name)
            rest = args[4:]
            if args[1] == "set" and rest in (["up"], ["down"]):
                flags = int(_rd(flags_path), 16)
                _write(flags_path, f"{(flags | 1) if rest == ['up'] else (flags & ~1):#x}\n")
            elif args[1] == "set" and len(rest) == 4 and rest[0] == "vf" and rest[2] == "mac":
                if not rest[1].isdigit() or int(rest[1]) >= numvfs:
                    return fail("RTNETLINK answers: Invalid argument")
                macs[rest[1]] = rest[3].lower()
            else:
                return fail(f"ip: simulated: unsupported: {' '.join(args)}")
            self._save(st)
        return CommandResult(command, 0, "", "", self.name)

    def _modprobe(self, command: str, args: list[str]) -> CommandResult:
        mods = [a for a in args if not a.startswith("-")]
        out_err = ""
        with self._locked():
            st = self._load()
            for mod in mods:
                name = mod.replace("_", "-")
                if name == VFIO:
                    if not st["vfio_loadable"]:
                        out_err = (f"modprobe: FATAL: Module {mod} not found in directory "
                                   f"/lib/modules/6.1.0-sim-amd64\n")
                        return CommandResult(command, 1, "", out_err, self.name)
                    self._load_vfio(st)
                elif name in ("vfio", "vfio-iommu-type1"):
                    pass
                else:
                    return CommandResult(command, 1, "", f"modprobe: FATAL: Module {mod} not found\n", self.name)
            self._save(st)
        return CommandResult(command, 0, "", "", self.name)

    # -- conveniences for tests ----------------------------------------------------------
    def set_flag(self, **flags: Any) -> None:
        """Change a simulation switch (vfio_loadable, sriov_delay, ...) on disk."""
        with self._locked():
            st = self._load()
            st.update(flags)
            self._save(st)

    def unload_vfio(self) -> None:
        """`modprobe -r vfio-pci`: only when nothing is bound to it."""
        d = f"{self.sysroot}/sys/bus/pci/drivers/{VFIO}"
        if any(PciLike(n) for n in os.listdir(d)):
            raise _oserror(errno.EBUSY, d)
        for n in os.listdir(d):
            os.remove(f"{d}/{n}")
        os.rmdir(d)

    def dynids(self, driver: str = VFIO) -> list[str]:
        return list(self._load()["dynids"].get(driver, []))


def PciLike(name: str) -> bool:
    return len(name) == 12 and name[4] == ":" and name[10] == "."


def _rd(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _mknod_char(path: str, major: int, minor: int) -> None:
    """A real char node (we run as root); a regular file if mknod is refused."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
    except PermissionError:
        _write(path, "")


def make_tmp_sysroot(prefix: str = "vfiotest-sim-") -> str:
    return tempfile.mkdtemp(prefix=prefix)


__all__ = ["SimulatedHost", "NATIVE_DRIVERS", "PF_PRESETS", "OTHER_PRESETS", "make_tmp_sysroot"]
