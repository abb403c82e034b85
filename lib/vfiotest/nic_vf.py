"""NIC PFs and their VFs: what a VF needs from its PF before it can pass frames.

Measured on the emulated runner's igb (docs/nic-traffic.md), and the same on real igb, ixgbe
and i40e PFs: a NIC VF talks to its PF over a mailbox that the PF driver answers only while
the PF's netdev is up, and a userspace driver (DPDK's VF PMDs) uses the MAC the PF gave the VF
(`ip link set <pf> vf N mac ...`); without one the kernel's VF drivers make one up and DPDK's
may have none.

- `link_up(host, pf, journal)`: the netdev(s) of a PCI function up; done by sriov.set_numvfs
  for a NIC PF before it makes VFs, and by the NIC I/O test for the emulated runner's wire peer.
  Journal kind "link-up" {address, interface}; undo: that interface down again (only if it
  still belongs to that function).
- `set_vf_mac(host, pf, index, mac, journal)`: VF `index`'s MAC set by the PF. Journal kind
  "vf-mac" {address, interface, vf, mac (the one before)}; undo: the MAC before put back (a VF
  that is gone, because its VFs were removed, has nothing to put back).

A PF's netdev is found under /sys/bus/pci/devices/<pf>/net; a PF with none (NVMe, or a NIC
whose driver is not bound) is left alone. Names reach the shell only as argv of `ip`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import VFCreateError
from .host import Host
from .pci import PciAddress

SYS_DEV = "/sys/bus/pci/devices"
IFF_UP = 0x1
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
ZERO_MAC = "00:00:00:00:00:00"


class LinkError(VFCreateError):
    """`ip link` on a PF failed."""

    COMMAND = "ip-link"


def interfaces(host: Host, pf: str) -> list[str]:
    """The network interfaces of the PCI function `pf` (none: not a NIC, or no driver)."""
    base = f"{SYS_DEV}/{PciAddress(pf)}"
    names = list(host.listdir(f"{base}/net") or [])
    for sub in host.listdir(base) or []:      # a virtio NIC's netdev hangs off its virtio device
        if sub.startswith("virtio") and sub[6:].isdigit():
            names += host.listdir(f"{base}/{sub}/net") or []
    return sorted(n for n in names if _IFNAME_RE.match(n))


def is_up(host: Host, ifname: str) -> bool:
    flags = (host.read_text(f"/sys/class/net/{ifname}/flags") or "0").strip()
    return bool(int(flags, 16) & IFF_UP)


def _ip(host: Host, pf: str, args: list[str], what: str) -> str:
    res = host.run(["ip", *args], timeout=60)
    if res.rc != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-2:])
        raise LinkError(f"{what} on {pf} failed (exit {res.rc}): {tail}",
                        hint=f"run `ip {' '.join(args)}` on the target to see more; then `vfiotest restore`",
                        address=pf, cause=tail, reason=LinkError.COMMAND)
    return str(res.stdout)


def link_up(host: Host, pf: str, journal: Any = None) -> list[str]:
    """Bring the netdevs of PCI function `pf` up, each journaled before; returns those brought up."""
    done = []
    for ifname in interfaces(host, pf):
        if is_up(host, ifname):
            continue
        if journal is not None:
            journal.record({"kind": "link-up", "address": str(PciAddress(pf)), "interface": ifname})
        _ip(host, pf, ["link", "set", "dev", ifname, "up"], f"bringing {ifname} up")
        done.append(ifname)
    return done


def restore_link(host: Host, entry: dict[str, Any]) -> None:
    """Undo of "link-up": the interface down again, if it is still that function's."""
    pf, ifname = str(entry["address"]), str(entry["interface"])
    if ifname in interfaces(host, pf) and is_up(host, ifname):
        _ip(host, pf, ["link", "set", "dev", ifname, "down"], f"taking {ifname} down")


def vf_index(host: Host, pf: str, vf: str) -> int:
    """N of the PF's `virtfnN` link that points at `vf`."""
    pf, vf = str(PciAddress(pf)), str(PciAddress(vf))
    for name in host.listdir(f"{SYS_DEV}/{pf}") or []:
        if name.startswith("virtfn") and name[6:].isdigit():
            target = host.readlink(f"{SYS_DEV}/{pf}/{name}") or ""
            if target.rstrip("/").rsplit("/", 1)[-1] == vf:
                return int(name[6:])
    raise VFCreateError(f"{vf} is not a VF of {pf}", hint="see `vfiotest devices`", address=vf)


def vf_macs(host: Host, pf: str) -> dict[int, str]:
    """{VF index: MAC the PF holds for it} from `ip -j link show <pf netdev>`."""
    names = interfaces(host, pf)
    if not names:
        return {}
    out = json.loads(_ip(host, pf, ["-j", "link", "show", "dev", names[0]], f"reading the VF MACs of {names[0]}") or "[]")
    return {int(v["vf"]): str(v.get("address", ZERO_MAC)).lower() for link in out for v in link.get("vfinfo_list", [])}


def mac_for(pf: str, index: int) -> str:
    """A locally administered unicast MAC for VF `index` of `pf`, the same every time."""
    _dom, bus, devfn = PciAddress(pf).split(":")
    dev, fn = devfn.split(".")
    return f"02:76:{int(bus, 16):02x}:{(int(dev, 16) << 3 | int(fn)) & 0xff:02x}:{(index >> 8) & 0xff:02x}:{index & 0xff:02x}"


def set_vf_mac(host: Host, pf: str, index: int, mac: str, journal: Any = None) -> None:
    """The PF gives VF `index` the MAC `mac`; the one it had is journaled first."""
    mac = mac.lower()
    if not _MAC_RE.match(mac):
        raise VFCreateError(f"{mac!r} is not a MAC address", hint="write it as 02:00:00:00:00:10", address=pf)
    names = interfaces(host, pf)
    if not names:
        raise VFCreateError(f"{pf} has no network interface: its VFs' MACs cannot be set through it",
                            hint="is it a NIC PF on its driver? see `vfiotest devices`", address=pf)
    macs = vf_macs(host, pf)
    if index not in macs:
        raise VFCreateError(f"{pf} ({names[0]}) has no VF {index} (it has {len(macs)})",
                            hint="see `vfiotest devices` for its VFs", address=pf)
    before = macs[index]
    if before == mac:
        return
    if journal is not None:
        journal.record({"kind": "vf-mac", "address": str(PciAddress(pf)), "interface": names[0], "vf": index, "mac": before})
    _ip(host, pf, ["link", "set", "dev", names[0], "vf", str(index), "mac", mac], f"setting VF {index}'s MAC")


def restore_vf_mac(host: Host, entry: dict[str, Any]) -> None:
    """Undo of "vf-mac": the MAC before put back, if the VF is still there."""
    pf, ifname, index, mac = str(entry["address"]), str(entry["interface"]), int(entry["vf"]), str(entry["mac"])
    if ifname not in interfaces(host, pf) or index not in vf_macs(host, pf):
        return
    _ip(host, pf, ["link", "set", "dev", ifname, "vf", str(index), "mac", mac], f"putting VF {index}'s MAC back")


# The journal entry kinds this module owns; vfiotest.journal registers them (journal.KIND_MODULES).
JOURNAL_KINDS: list[dict[str, Any]] = [
    {"kind": "link-up", "required": ("address", "interface"), "undo": restore_link},
    {"kind": "vf-mac", "required": ("address", "interface", "vf", "mac"), "undo": restore_vf_mac},
]

__all__ = ["interfaces", "link_up", "restore_link", "set_vf_mac", "restore_vf_mac", "vf_index", "vf_macs", "mac_for"]
