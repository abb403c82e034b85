"""Marker frames sent from one interface of a target and counted on another (docs/nic-traffic.md).

Each frame carries the local experimental EtherType 0x88B5, a tag and a sequence number, so
that the counting side counts only these frames and sees losses and reordering. The work is
one stdlib Python script run on the target (raw `AF_PACKET` sockets: root), so it runs the same
on the emulated runner and on a bare-metal one. On the emulated runner the igb PF's wire ends
in the runner's wire peer (`vfiotest.runner.qemu.WIRE_PEER_MAC`), found with
`interface_by_mac`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import TargetError
from .host import Host

MARKER_ETHERTYPE = 0x88B5
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9]{1,8}$")

# argv: tx_if dst_mac rx_if count tag window_s gap_s; prints one JSON object
EXCHANGE_SCRIPT = r"""
import json, socket, sys, threading, time
tx_if, dst, rx_if, count, tag, window = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5].encode(), float(sys.argv[6])
gap = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
ET = 0x88B5
def stat(i, k):
    with open(f"/sys/class/net/{i}/statistics/{k}") as f:
        return int(f.read())
for i in (tx_if, rx_if):
    try:
        stat(i, "rx_packets")
    except OSError:
        print(json.dumps({"error": f"no network interface {i!r}"})); sys.exit(0)
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ET))
rx.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)   # SO_RCVBUFFORCE: the default buffer drops frames under load
rx.bind((rx_if, 0))
rx.settimeout(0.2)
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
tx.bind((tx_if, 0))
with open(f"/sys/class/net/{tx_if}/address") as f:
    src = bytes.fromhex(f.read().strip().replace(":", ""))
head = bytes.fromhex(dst.replace(":", "")) + src + ET.to_bytes(2, "big") + tag.ljust(8, b"\0")
tx0, rx0 = stat(tx_if, "tx_packets"), stat(rx_if, "rx_packets")
seen = []
sent_at, seen_at = {}, {}
done = threading.Event()
def receive():
    while not done.is_set():
        try:
            data, addr = rx.recvfrom(2048)
        except socket.timeout:
            continue
        if addr[2] != socket.PACKET_OUTGOING and data[14:22] == tag.ljust(8, b"\0"):
            n = int.from_bytes(data[22:26], "big")
            seen.append(n)
            seen_at.setdefault(n, time.monotonic())
t = threading.Thread(target=receive)
t.start()
sent = 0
t0 = time.monotonic()
for n in range(count):
    sent_at[n] = time.monotonic()
    sent += tx.send(head + n.to_bytes(4, "big") + bytes(34)) > 0
    if gap:
        time.sleep(gap)
deadline = time.monotonic() + window
while time.monotonic() < deadline and len(set(seen)) < count:
    time.sleep(0.05)
done.set()
t.join()
rtt = sorted((seen_at[n] - sent_at[n]) * 1000 for n in seen_at if n in sent_at)
last = max(seen_at.values()) if seen_at else t0
print(json.dumps({"sent": sent, "seen": seen, "tx_packets": stat(tx_if, "tx_packets") - tx0,
                  "rx_packets": stat(rx_if, "rx_packets") - rx0, "rtt_ms": rtt, "span_s": last - t0}))
"""

# argv: mac; prints the names of the interfaces with that MAC, one JSON list
_BY_MAC_SCRIPT = r"""
import json, os, sys
out = []
for n in sorted(os.listdir("/sys/class/net")):
    try:
        with open(f"/sys/class/net/{n}/address") as f:
            if f.read().strip().lower() == sys.argv[1]:
                out.append(n)
    except OSError:
        pass
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Exchange:
    """What one `exchange` saw. `received`: distinct marker frames counted on the receiving side."""

    sent: int
    received: int
    in_order: bool
    duplicates: int
    tx_packets: int   # change of the sending interface's counter
    rx_packets: int   # change of the receiving interface's counter (all frames, not only ours)
    rtt_ms: tuple[float, ...] = ()   # per frame seen: its first sighting minus its sending, sorted
    span_s: float = 0.0              # first frame sent to the last one seen

    @property
    def lost(self) -> int:
        return self.sent - self.received


def _check_mac(mac: str) -> str:
    mac = mac.lower()
    if not _MAC_RE.match(mac):
        raise TargetError(f"{mac!r} is not a MAC address", hint="write it as 02:00:00:00:00:10")
    return mac


def _check_ifname(name: str) -> str:
    if not _IFNAME_RE.match(name):
        raise TargetError(f"{name!r} is not a network interface name", hint="see `ip -br link` on the target")
    return name


def interface_by_mac(host: Host, mac: str, *, timeout: float = 30.0) -> str:
    """The name of the target's one network interface with this MAC."""
    mac = _check_mac(mac)
    names = host.python(_BY_MAC_SCRIPT, [mac], timeout=timeout, check=True,
                        what=f"finding the interface with MAC {mac}").json()
    if len(names) != 1:
        raise TargetError(f"{host.name}: {len(names)} network interfaces have MAC {mac} ({', '.join(names) or 'none'})",
                          hint="on the emulated runner the wire peer comes with the igb PF: boot it with a QEMU "
                               "that has igb (vfiotest runner status)")
    return str(names[0])


def exchange(host: Host, tx_if: str, dst_mac: str, rx_if: str, count: int, *, tag: str = "vfiotest",
             window: float = 10.0, timeout: float = 120.0, gap: float = 0.0) -> Exchange:
    """Send `count` marker frames from `tx_if` to `dst_mac` (`gap` seconds apart) and count those
    arriving on `rx_if` (waiting up to `window` seconds after the last was sent); with their
    round-trip times when `rx_if` is where they come back. Needs root on the target."""
    tx_if, rx_if, dst_mac = _check_ifname(tx_if), _check_ifname(rx_if), _check_mac(dst_mac)
    if not _TAG_RE.match(tag) or count < 0:
        raise TargetError(f"bad frame tag {tag!r} or count {count}", hint="a tag of 1-8 letters/digits, count >= 0")
    if gap < 0:
        raise TargetError(f"bad gap {gap} between frames", hint="give seconds, 0 or more")
    res = host.python(EXCHANGE_SCRIPT, [tx_if, dst_mac, rx_if, count, tag, window, gap], timeout=timeout, check=True,
                      what=f"sending {count} frames {tx_if} -> {dst_mac}, counting on {rx_if}")
    out = json.loads(res.stdout)
    if "error" in out:
        raise TargetError(f"{host.name}: {out['error']}", hint="see `ip -br link` on the target")
    seen: list[int] = out["seen"]
    distinct = set(seen)
    return Exchange(sent=out["sent"], received=len(distinct), in_order=seen == sorted(distinct),
                    duplicates=len(seen) - len(distinct), tx_packets=out["tx_packets"], rx_packets=out["rx_packets"],
                    rtt_ms=tuple(out.get("rtt_ms", ())), span_s=float(out.get("span_s", 0.0)))
