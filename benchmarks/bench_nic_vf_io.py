#!/usr/bin/env python3
"""Frames through an igb VF with DPDK's testpmd on the runner, without a container: prints
numbers (echo rate, round-trip times), asserts nothing but the frames.

One VF is made on the igb PF (the device layer brings the PF's netdev up first), bound to
vfio-pci, given a MAC by the PF; the wire peer's netdev is brought up. testpmd (the
controller's, which the emulated runner sees at the same path) runs the VF with the igbvf PMD
in macswap mode; per run the wire peer sends N marker frames to the VF's MAC, `--gap` seconds
apart, and times each one coming back (vfiotest.wire.exchange). Everything is journaled and put
back at the end (`vfiotest restore` after a kill).

Under TCG (the emulated runner) the figures say how fast the emulation is, not the device.

    .venv/bin/python benchmarks/bench_nic_vf_io.py [--frames 200] [--gap 0.005] [--runs 3] [--target virtual]
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import time
from typing import Any

from _held_pf import held_pf

from vfiotest import nic_vf, sriov, targets, wire
from vfiotest.bind import DeviceManager
from vfiotest.journal import Journal
from vfiotest.pci import read_inventory
from vfiotest.runner.qemu import PF_IDS, WIRE_PEER_MAC, WIRE_PEER_PCI

LOG = "/tmp/vfiotest-bench-testpmd.log"
FORWARDING = "packet forwarding - ports="
STATS = re.compile(r"Accumulated forward statistics for all ports.*?RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)", re.S)


def sh(host: Any, cmd: str, timeout: float = 120) -> str:
    return str(host.run(["sh", "-c", cmd], timeout=timeout, check=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="virtual")
    ap.add_argument("--frames", type=int, default=200, help="frames per run (default 200)")
    ap.add_argument("--gap", type=float, default=0.005, help="seconds between frames (default 0.005)")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    if a.frames < 1 or a.runs < 1 or a.gap < 0:
        ap.error("--frames and --runs must be at least 1, --gap 0 or more")

    host, close = targets.open_host(a.target, progress=lambda s: print("  ..", s))
    try:
        inv = read_inventory(host)
        igb = ":".join(PF_IDS["igb"])
        pf = next((d for d in inv.devices.values() if d.sriov and d.vendor_device == igb and d.driver), None)
        if pf is None:
            print(f"no igb SR-IOV PF ({igb}) on its driver on the target")
            return 1
        stop = lambda: sh(host, "pkill -INT -f '^dpdk-testpmd .*vfiotest-bench' || true")  # noqa: E731
        with held_pf(host, pf.address, "bench_nic_vf_io", before_restore=stop) as journal:
            return run(host, a, pf.address, journal)
    finally:
        close()


def run(host: Any, a: argparse.Namespace, pf: str, journal: Journal) -> int:
    (vf,) = sriov.set_numvfs(host, pf, 1, journal)
    DeviceManager(host, "emulated", journal).bind_device(vf)
    mac = nic_vf.mac_for(pf, 0)
    nic_vf.set_vf_mac(host, pf, 0, mac, journal)
    peer = wire.interface_by_mac(host, WIRE_PEER_MAC)
    nic_vf.link_up(host, WIRE_PEER_PCI, journal)
    cmd = ["dpdk-testpmd", "--no-huge", "-m", "256", "--lcores=0@0,1@0", "-a", vf, "--no-telemetry",
           "--file-prefix=vfiotest-bench", "--", "--forward-mode=macswap", "--stats-period=86400",
           "--total-num-mbufs=2048"]
    sh(host, f"setsid nohup stdbuf -oL {shlex.join(cmd)} > {LOG} 2>&1 < /dev/null &")
    t0 = time.monotonic()
    while FORWARDING not in sh(host, f"cat {LOG}"):
        if time.monotonic() - t0 > 300:
            print(f"testpmd did not start forwarding in 300 s:\n{sh(host, f'tail -20 {LOG}')}")
            return 1
        time.sleep(2)
    print(f"VF {vf} (MAC {mac}) under testpmd (net_e1000_igb_vf, macswap) in {time.monotonic() - t0:.1f} s; "
          f"frames from {peer} (the wire peer), {a.frames} per run, {a.gap * 1000:.1f} ms apart")
    time.sleep(3)
    rates, rtts, ok = [], [], True
    for i in range(a.runs):
        ex = wire.exchange(host, peer, mac, peer, a.frames, tag=f"bn{i}", window=60, timeout=600, gap=a.gap)
        rate = ex.received / ex.span_s if ex.span_s else 0.0
        rates.append(rate)
        rtts.extend(ex.rtt_ms)
        ok &= ex.received == a.frames
        med = statistics.median(ex.rtt_ms) if ex.rtt_ms else float("nan")
        print(f"run {i + 1}: {ex.received}/{ex.sent} back, in order {ex.in_order}, {rate:8.1f} frames/s echoed "
              f"({rate * 60 / 1e6:.3f} MB/s of 60-byte frames), RTT median {med:7.2f} ms")
    sh(host, "pkill -INT -f '^dpdk-testpmd .*vfiotest-bench' || true")
    time.sleep(3)
    m = STATS.findall(sh(host, f"cat {LOG}"))
    print(f"testpmd forward statistics: RX {m[-1][0] if m else '?'}, TX {m[-1][1] if m else '?'}")
    if rtts:
        q = statistics.quantiles(rtts, n=100, method="inclusive") if len(rtts) > 1 else rtts * 99
        print(f"echo frames/s  median {statistics.median(rates):8.1f}  min {min(rates):8.1f}  max {max(rates):8.1f}")
        print(f"RTT ms         median {statistics.median(rtts):8.2f}  p99 {q[98]:8.2f}  max {max(rtts):8.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
