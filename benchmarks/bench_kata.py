#!/usr/bin/env python3
"""Kata guest image numbers: initrd size and build time (cold: forced rebuild; warm: cache hit),
for the Kata guest image with the Kata 1.x bundle's kata-agent (VFIOTEST_KATA_BUNDLE, else
../shared/kata). The Kata VM's boot and the hook's run are timed by the guest_hook suite's
progress lines and by ci/campaign.

    .venv/bin/python benchmarks/bench_kata.py
"""

import argparse
import sys
import time

from vfiotest.kata import bundle, initrd


def bench_build() -> initrd.BuiltInitrd:
    found = bundle.find_bundle()
    if found is None:
        sys.exit(f"no Kata 1.x bundle: set {bundle.BUNDLE_ENV} (see {bundle.BUILD_SCRIPT} and its README.md)")
    spec = initrd.InitrdSpec(allowed_ids=("8086:10ca", "1b36:0010"), agent=found.agent)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    bench_build()


if __name__ == "__main__":
    main()
