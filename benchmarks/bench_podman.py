#!/usr/bin/env python3
"""Podman layer timings on the emulated runner (or --target): prints numbers, asserts nothing.

  image            tarball build (0 when cached) and `podman import` on the target
  service          `podman system service` start to first ping (through the SSH relay)
  probe            container create -> probe JSON -> removed, with a VF group bound (N runs)
  no-device        the same container without a device (the container cost alone)
  fixture overhead lease + bind group + restore + release per test (the vfio_group layer's cost)

    .venv/bin/python benchmarks/bench_podman.py [--runs 3] [--runtime runc] [--target virtual]

What it changes on the target (podman's drop-in, the API service, the containers, the VF count and
binding) is recorded in a journal on the target before it is made and undone at the end; after
a kill, `vfiotest restore` replays that journal.
"""

import argparse
import statistics
import time

from vfiotest import targets
from vfiotest.bind import DeviceManager
from vfiotest.errors import HarnessError
from vfiotest.journal import Journal
from vfiotest.lease import LeasePool
from vfiotest.pci import read_inventory
from vfiotest.podman import PodmanBaseSettings, RuntimeClient, ensure_image, vfio_devices
from vfiotest.podman.conf import dropin_record
from vfiotest.sriov import set_numvfs


def stats(xs):
    return f"median {statistics.median(xs):6.2f} s  min {min(xs):6.2f}  max {max(xs):6.2f}  (n={len(xs)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="virtual")
    ap.add_argument("--runtime", default="runc", help="runc (default: no registration needed) or kata-vfio")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()

    host, close = targets.open_host(a.target, progress=lambda s: print("  ..", s))
    # one journal on the target, each change recorded before it is made: the end replays it,
    # and after a kill `vfiotest restore` does
    journal = Journal.open(host)
    client = None
    try:
        settings = PodmanBaseSettings(host)
        settings.snapshot()
        journal.record(dropin_record(settings))
        settings.apply()
        t = time.monotonic()
        img = ensure_image(host)
        print(f"image            build {img.timings['build_s']:.1f} s, import {img.timings['import_s']:.1f} s "
              f"(total {time.monotonic() - t:.1f} s)")
        t = time.monotonic()
        client = RuntimeClient.open(host, a.runtime, recorder=journal)
        print(f"service          start to ping {time.monotonic() - t:.2f} s ({a.runtime})")
        vf = lease = None
        try:
            inv = read_inventory(host)
            pool = LeasePool(host)
            dm = DeviceManager(host, "emulated", journal)
            nvme = next(d for d in inv.devices.values() if d.vendor_device == "1b36:0010" and d.sriov)
            if not nvme.sriov.numvfs:
                try:
                    set_numvfs(host, nvme.address, 2, journal)
                except HarnessError as e:  # another session made VFs meanwhile: use theirs when free
                    print(f"  .. {e.message}")
            inv = read_inventory(host)
            for d in inv.devices.values():
                if d.vendor_device == "1b36:0010" and d.sriov is None and d.iommu_group:
                    lease = pool.try_acquire(d.iommu_group, test_id="bench_podman", retry=0)
                    if lease:
                        vf = d
                        break
            if vf is None:
                print("probe            no free NVMe VF group to lease")
                return 1
            overhead, probe_t, bare_t = [], [], []
            for _ in range(a.runs):
                t = time.monotonic()
                dm.bind_group(vf.address)
                overhead.append(time.monotonic() - t)
                t = time.monotonic()
                res = client.run(img.ref, img.probe_command, devices=vfio_devices(f"/dev/vfio/{vf.iommu_group}"),
                                 cap_add=["CAP_IPC_LOCK"])
                probe_t.append(time.monotonic() - t)
                assert res.exit_code == 0, str(res)
                t = time.monotonic()
                dm.restore_group(vf.address)
                overhead[-1] += time.monotonic() - t
                t = time.monotonic()
                client.run(img.ref, ["true"])
                bare_t.append(time.monotonic() - t)
            print(f"probe            create -> probe JSON -> removed: {stats(probe_t)}")
            print(f"no-device        create -> `true` -> removed:      {stats(bare_t)}")
            print(f"fixture overhead bind group + restore per test:    {stats(overhead)}")
            print(f"relay channels   {getattr(client.service._forward, 'channels_opened', 0)} SSH channels for the whole run")
        finally:
            if lease is not None:
                lease.release()
    finally:
        try:
            if client is not None:
                client.close()
            journal.restore_all()   # newest first: containers, service, VF binding and count, drop-in
            journal.close()         # removed when empty; kept for `vfiotest restore` when an undo failed
        finally:
            close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
