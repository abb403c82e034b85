"""The PCI device model and the one-round-trip inventory of a host.

`read_inventory(host)` runs INVENTORY_SCRIPT on the target once and returns an
`Inventory`: every PCI device with its IDs, driver, override, IOMMU group, SR-IOV
state and network interfaces, the IOMMU groups, `/dev/vfio`, and the devices the
host itself needs (default-route NIC, SSH NIC, disks backing mounted filesystems).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import AddressError, DeviceNotFound
from .host import Host

_ADDR_RE = re.compile(r"^(?:(?P<dom>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<dev>[01][0-9a-fA-F])\.(?P<fn>[0-7])$")


class PciAddress(str):
    """A normalised PCI address `dddd:bb:dd.f`. `01:00.1` gets domain 0000."""

    def __new__(cls, text: str) -> PciAddress:
        if isinstance(text, PciAddress):
            return text
        m = _ADDR_RE.match(str(text).strip())
        if not m:
            raise AddressError(
                f"{text!r} is not a PCI address",
                hint="give it as DDDD:BB:DD.F or BB:DD.F, e.g. 0000:01:00.1 (see `vfiotest devices`)")
        return super().__new__(cls, f"{(m['dom'] or '0000').lower()}:{m['bus'].lower()}:{m['dev'].lower()}.{m['fn']}")

    @classmethod
    def is_valid(cls, text: str) -> bool:
        return bool(_ADDR_RE.match(str(text).strip()))


SYS_PCI = "/sys/bus/pci"

# Readers for the scripts that run on the target.
SYSFS_READERS = r"""
def rd(p):
    try:
        with open(p) as f: return f.read().strip()
    except OSError: return None
def link(p):
    try: return os.path.basename(os.readlink(p))
    except OSError: return None
"""

# Runs on the target with python3: argv[1] = sysroot ("" on a real host), then optionally
# "--groups" and the addresses to read (none: every device). Reads everything in one process
# so that a host with hundreds of VFs costs one round trip.
INVENTORY_SCRIPT = r"""
import json, os, re, sys
R = sys.argv[1] if len(sys.argv) > 1 else ""
want = sys.argv[2:]
expand = bool(want) and want[0] == "--groups"
if expand: want = want[1:]
BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
""" + SYSFS_READERS + r"""
def ls(p):
    try: return sorted(os.listdir(p))
    except OSError: return []
def bdfs_in(p):
    try: real = os.path.realpath(p)
    except OSError: return []
    return [c for c in real.split("/") if BDF.match(c)]
base = R + "/sys/bus/pci/devices"
gbase = R + "/sys/kernel/iommu_groups"
def read_dev(a):
    d = base + "/" + a
    try:
        names = os.listdir(d)
    except OSError:
        return None  # absent, or removed while we read (VFs going away)
    dev = {"address": a, "vendor": rd(d + "/vendor"), "device": rd(d + "/device"), "class": rd(d + "/class"),
           "driver": link(d + "/driver"), "driver_override": rd(d + "/driver_override"),
           "override_attr": "driver_override" in names,
           "iommu_group": link(d + "/iommu_group"), "physfn": link(d + "/physfn"),
           "net": ls(d + "/net") if "net" in names else [],
           "virtfns": {n[6:]: link(d + "/" + n) for n in names if n.startswith("virtfn")}}
    if dev["driver_override"] in ("(null)", ""): dev["driver_override"] = None
    if dev["vendor"] is None:
        return None  # removed while we read
    if "sriov_totalvfs" in names:
        dev["sriov"] = {"totalvfs": int(rd(d + "/sriov_totalvfs") or 0), "numvfs": int(rd(d + "/sriov_numvfs") or 0),
                        "drivers_autoprobe": rd(d + "/sriov_drivers_autoprobe") == "1"}
    return dev
devs = {}
for a in want or (sorted(os.listdir(base)) if os.path.isdir(base) else []):
    dev = read_dev(a)
    if dev is not None:
        devs[a] = dev
groups = {}
for g in (sorted({d["iommu_group"] for d in devs.values() if d["iommu_group"]}) if want
          else (os.listdir(gbase) if os.path.isdir(gbase) else [])):
    try:
        groups[g] = sorted(os.listdir(gbase + "/" + g + "/devices"))
    except OSError:
        pass  # a group that went away with its VF
if expand:
    for g in list(groups):
        for a in groups[g]:
            if a not in devs:
                dev = read_dev(a)
                if dev is not None:
                    devs[a] = dev
vfio = {}
vbase = R + "/dev/vfio"
for n in (sorted(groups) if want else (os.listdir(vbase) if os.path.isdir(vbase) else [])):
    try:
        st = os.stat(vbase + "/" + n)
    except OSError:
        continue
    vfio[n] = "char" if (st.st_mode & 0o170000) == 0o020000 else "file"
drivers = sorted(os.listdir(R + "/sys/bus/pci/drivers")) if os.path.isdir(R + "/sys/bus/pci/drivers") else []
# What the host itself needs: the default-route NIC, the NIC of this SSH session, mounted disks.
protected = {}
def protect(bdfs, why):
    for b in bdfs: protected.setdefault(b, why)
for line in (rd(R + "/proc/net/route") or "").splitlines()[1:]:
    f = line.split()
    if len(f) > 2 and f[1] == "00000000":
        protect(bdfs_in(R + "/sys/class/net/" + f[0]), "carries the default route (" + f[0] + ")")
for line in (rd(R + "/proc/net/ipv6_route") or "").splitlines():
    f = line.split()
    if len(f) == 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo":
        protect(bdfs_in(R + "/sys/class/net/" + f[9]), "carries the IPv6 default route (" + f[9] + ")")
ssh = os.environ.get("SSH_CONNECTION", "").split()
if len(ssh) == 4 and not R:
    import subprocess  # only here: importing it costs more than reading 256 VFs
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            f = line.split()
            if len(f) > 3 and f[3].split("/")[0] == ssh[2]:
                protect(bdfs_in("/sys/class/net/" + f[1]), "carries this SSH session (" + f[1] + ")")
    except (OSError, subprocess.SubprocessError):
        pass
for line in (rd(R + "/proc/mounts") or "").splitlines():
    src, mnt = line.split()[:2]
    if src.startswith("/dev/"):
        blk = R + "/sys/class/block/" + os.path.basename(os.path.realpath(src) if not R else src)
        paths = [blk] + [blk + "/slaves/" + s for s in (os.listdir(blk + "/slaves") if os.path.isdir(blk + "/slaves") else [])]
        for p in paths:
            protect(bdfs_in(p), "backs the mounted filesystem " + mnt + " (" + src + ")")
ident = {"hostname": rd(R + "/proc/sys/kernel/hostname") or os.uname().nodename,
         "machine_id": rd(R + "/etc/machine-id"), "boot_id": rd(R + "/proc/sys/kernel/random/boot_id")}
print(json.dumps({"devices": devs, "groups": groups, "vfio": vfio, "drivers": drivers,
                  "protected": protected, "identity": ident}))
"""


@dataclass
class SriovState:
    totalvfs: int
    numvfs: int
    drivers_autoprobe: bool = True


@dataclass
class PciDevice:
    address: PciAddress
    vendor: str
    device: str
    pci_class: str
    driver: str | None
    driver_override: str | None
    iommu_group: str | None
    physfn: PciAddress | None = None
    virtfns: dict[int, PciAddress] = field(default_factory=dict)
    sriov: SriovState | None = None
    net: list[str] = field(default_factory=list)
    #: the device has a driver_override attribute (kernels before 3.16 do not: bind falls back to new_id)
    has_override: bool = True

    @property
    def vendor_device(self) -> str:
        """`8086:10ca` (no 0x)."""
        return f"{self.vendor[2:] if self.vendor.startswith('0x') else self.vendor}:" \
               f"{self.device[2:] if self.device.startswith('0x') else self.device}"

    @property
    def is_vf(self) -> bool:
        return self.physfn is not None

    @property
    def is_pf(self) -> bool:
        return self.sriov is not None

    @property
    def is_bridge(self) -> bool:
        """A PCI-to-PCI bridge (class 0x0604): left alone when a group is bound."""
        return (self.pci_class or "").startswith("0x0604")


@dataclass
class Inventory:
    """A snapshot of a host's PCI state. Compare two with `diff()`."""

    devices: dict[str, PciDevice]
    groups: dict[str, list[str]]
    vfio: dict[str, str]
    drivers: list[str]
    protected: dict[str, str]
    identity: dict[str, str | None]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Inventory:
        devs = {}
        for a, d in data["devices"].items():
            s = d.get("sriov")
            devs[a] = PciDevice(
                address=PciAddress(a), vendor=d["vendor"] or "", device=d["device"] or "", pci_class=d["class"] or "",
                driver=d["driver"], driver_override=d["driver_override"], iommu_group=d["iommu_group"],
                physfn=PciAddress(d["physfn"]) if d.get("physfn") else None,
                virtfns={int(k): PciAddress(v) for k, v in d.get("virtfns", {}).items() if v},
                sriov=SriovState(**s) if s else None, net=d.get("net", []),
                has_override=d.get("override_attr", True))
        return cls(devs, data["groups"], data["vfio"], data["drivers"], data["protected"], data["identity"])

    def device(self, address: str) -> PciDevice:
        addr = PciAddress(address)
        try:
            return self.devices[addr]
        except KeyError:
            raise DeviceNotFound(f"no PCI device {addr} on {self.identity.get('hostname') or 'the target'}",
                                 hint="list the devices with `vfiotest devices`", address=addr) from None

    def vfio_node(self, address: str) -> str | None:
        """What /dev/vfio/<group> of `address` is: "char", "file", or None (missing, or no group)."""
        group = self.device(address).iommu_group
        return self.vfio.get(group) if group else None

    def group_of(self, address: str) -> list[PciAddress]:
        """The addresses in the IOMMU group of `address` (itself included)."""
        dev = self.device(address)
        if dev.iommu_group is None:
            return [dev.address]
        return [PciAddress(a) for a in self.groups.get(dev.iommu_group, [dev.address])]

    def vfs_of(self, pf: str) -> list[PciDevice]:
        return [self.devices[a] for _, a in sorted(self.device(pf).virtfns.items()) if a in self.devices]

    def state(self) -> dict[str, Any]:
        """What the host state guard compares: drivers, overrides, VF counts, groups, /dev/vfio."""
        return {
            "devices": {a: {"driver": d.driver, "driver_override": d.driver_override,
                            "numvfs": d.sriov.numvfs if d.sriov else None,
                            "drivers_autoprobe": d.sriov.drivers_autoprobe if d.sriov else None,
                            "iommu_group": d.iommu_group}
                        for a, d in sorted(self.devices.items())},
            "vfio": dict(sorted(self.vfio.items())),
        }

    def diff(self, other: Inventory) -> list[str]:
        """Readable lines saying how `other` differs from this snapshot; [] when equal."""
        a, b = self.state(), other.state()
        lines = []
        for addr in sorted(set(a["devices"]) | set(b["devices"])):
            x, y = a["devices"].get(addr), b["devices"].get(addr)
            if x is None:
                lines.append(f"{addr}: appeared ({y['driver'] or 'no driver'})")
            elif y is None:
                lines.append(f"{addr}: disappeared (was on {x['driver'] or 'no driver'})")
            else:
                for k in x:
                    if x[k] != y[k]:
                        lines.append(f"{addr}: {k} was {x[k]!r}, now {y[k]!r}")
        for g in sorted(set(a["vfio"]) | set(b["vfio"])):
            if a["vfio"].get(g) != b["vfio"].get(g):
                lines.append(f"/dev/vfio/{g}: was {a['vfio'].get(g) or 'absent'}, now {b['vfio'].get(g) or 'absent'}")
        return lines


def _inventory_args(host: Host, addresses: Iterable[str] | None, groups: bool) -> list[str]:
    args = [host.sysroot]
    if addresses is not None:
        wanted = [str(PciAddress(a)) for a in addresses]
        if not wanted:
            raise ValueError("read_inventory: an empty address list (give None for every device)")
        args += (["--groups"] if groups else []) + wanted
    return args


def read_inventory_json(host: Host, timeout: float = 30, *, addresses: Iterable[str] | None = None,
                        groups: bool = False) -> dict[str, Any]:
    """The PCI state of `host` as the script printed it (JSON-ready), in one round trip
    (the arguments are those of read_inventory)."""
    res = host.python(INVENTORY_SCRIPT, _inventory_args(host, addresses, groups), timeout=timeout, check=True,
                      what="PCI inventory")
    return json.loads(res.stdout)


def read_inventory(host: Host, timeout: float = 30, *, addresses: Iterable[str] | None = None,
                   groups: bool = False) -> Inventory:
    """The PCI state of `host`, in one round trip.

    addresses: read only these devices (an absent one is simply not in `devices`), with
    their IOMMU groups' member lists and /dev/vfio nodes; groups=True also reads every
    other member of those groups. None (the default) reads every device. `protected`,
    `drivers` and `identity` are always the whole host's."""
    return Inventory.from_json(read_inventory_json(host, timeout, addresses=addresses, groups=groups))
