#!/usr/bin/env python3
"""Inventory of a simulated host with 256 VFs: time per read, and round trips over the host layer.

Targets (issue 2): under 50 ms, 1 round trip. Prints numbers; asserts nothing.
    .venv/bin/python benchmarks/bench_inventory.py [--vfs 256] [--repeat 20]
"""

import argparse
import resource
import statistics
import tempfile
import time

from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vfs", type=int, default=256, help="VFs in total (64 per PF)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    per_pf = 64
    npf = max(1, -(-args.vfs // per_pf))
    with tempfile.TemporaryDirectory(prefix="vfiotest-bench-") as tmp:
        pfs = [{"preset": "xxv710", "totalvfs": per_pf, "numvfs": min(per_pf, args.vfs - i * per_pf)} for i in range(npf)]
        t0 = time.perf_counter()
        host = SimulatedHost.build(tmp, pfs=pfs)
        build = time.perf_counter() - t0

        calls = []
        real_exec = host._exec

        def counting(command, **kw):
            calls.append(command[:40])
            return real_exec(command, **kw)

        host._exec = counting
        inv = read_inventory(host)  # warm-up (page cache)
        calls.clear()
        times = []
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(args.repeat):
            t = time.perf_counter()
            inv = read_inventory(host)
            times.append(time.perf_counter() - t)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / args.repeat
        trips = len(calls) / args.repeat
        vfs = sum(1 for d in inv.devices.values() if d.is_vf)
        print(f"simulated host: {len(inv.devices)} PCI devices, {vfs} VFs on {npf} PFs, {len(inv.groups)} IOMMU groups "
              f"(built in {build * 1000:.0f} ms)")
        print(f"inventory time: median {statistics.median(times) * 1000:.1f} ms, "
              f"min {min(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms over {args.repeat} reads (target < 50 ms)")
        print(f"CPU time of the target-side process per inventory: {cpu * 1000:.1f} ms "
              f"(wall time suffers when the machine is loaded; load average {open('/proc/loadavg').read().split()[0]})")
        print(f"round trips per inventory (host._exec calls): {trips:g} (target 1)")


if __name__ == "__main__":
    main()
