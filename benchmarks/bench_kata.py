#!/usr/bin/env python3
"""Kata guest numbers: initrd size and build time (cold: forced rebuild; warm: cache hit),
and the nested guest's boot-to-hook time in the emulated runner with an igb VF passed through.

    .venv/bin/python benchmarks/bench_kata.py [--no-nested]

Uses the runner that is up (`vfiotest runner up`), else boots one and stops it after.
The VF is leased and its group bound to vfio-pci for the measurement, then restored.
"""

import argparse
import sys
import time

from vfiotest.kata import initrd
from vfiotest.kata.nested import NestedGuest


def bench_build():
    spec = initrd.InitrdSpec(allowed_ids=("8086:10ca", "1b36:0010"))
    t0 = time.monotonic()
    cold = initrd.build_initrd(spec, force=True)
    cold_wall = time.monotonic() - t0
    t0 = time.monotonic()
    warm = initrd.build_initrd(spec)
    warm_wall = time.monotonic() - t0
    print(f"initrd_size_bytes       {cold.size}  ({cold.size / 1e6:.1f} MB, zstd)")
    print(f"initrd_build_seconds    {cold.build_seconds:.2f}  (dracut, forced rebuild; wall {cold_wall:.2f})")
    print(f"initrd_cached_seconds   {warm_wall:.3f}  (cache hit: {warm.cached})")
    return cold


def bench_nested(built):
    from vfiotest.pci import read_inventory
    from vfiotest.runner import Runner

    r = Runner.default()
    booted = not r.is_up()
    if booted:
        r.up(progress=lambda m: print(m, file=sys.stderr))
    host = r.host()
    try:
        inv = read_inventory(host)
        vfs = [d for d in inv.devices.values() if d.vendor_device == "8086:10ca" and d.iommu_group]
        if not vfs:  # make one VF on the igb PF for the measurement, put the count back after
            from vfiotest.journal import MemoryJournal
            from vfiotest.sriov import restore_numvfs, set_numvfs

            pf = next(d for d in inv.devices.values() if d.vendor_device == "8086:10c9")
            journal = MemoryJournal()
            set_numvfs(host, pf.address, 1, journal=journal)
            try:
                return bench_nested_on(host, built)
            finally:
                for e in journal.entries():
                    restore_numvfs(host, e)
        return bench_nested_on(host, built)
    finally:
        host.close()
        if booted:
            r.down()


def bench_nested_on(host, built):
    from vfiotest.bind import DeviceManager
    from vfiotest.lease import LeasePool
    from vfiotest.pci import read_inventory

    inv = read_inventory(host)
    vfs = [d for d in inv.devices.values() if d.vendor_device == "8086:10ca" and d.iommu_group]
    lease = LeasePool(host).acquire_first([d.iommu_group for d in vfs], test_id="bench_kata")
    if lease is None:
        print("nested_boot_to_hook     n/a  (every VF group is leased)")
        return
    vf = next(d for d in vfs if d.iommu_group == lease.group)
    dm = DeviceManager(host, "emulated")
    try:
        dm.bind_group(vf.address)
        rep = NestedGuest(host, built.kernel, built.path).boot(vfs=[vf.address], annotation="8086:10ca",
                                                               runs=("main",))
    finally:
        dm.restore_group(vf.address)
        lease.release()
    main = rep.run("main")["results"][0]
    print(f"nested_boot_to_hook     {rep.hook_seconds:.2f}  (guest uptime when the agent stand-in started the hooks)")
    print(f"nested_hook_seconds     {main['seconds']:.2f}  (the hook's run: inventory, bind, verify; rc {main['rc']})")
    print(f"nested_qemu_total       {rep.boot_seconds:.2f}  (QEMU start to power-off, in the runner)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-nested", action="store_true")
    args = ap.parse_args()
    built = bench_build()
    if not args.no_nested:
        bench_nested(built)


if __name__ == "__main__":
    main()
