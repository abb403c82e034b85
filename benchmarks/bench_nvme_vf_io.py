#!/usr/bin/env python3
"""The userspace NVMe driver (podman/nvme_io.py) on an NVMe VF of the runner, without a container:
prints numbers, asserts nothing but the data.

One VF is made on the NVMe PF (brought up by the device layer: resources, online), bound to
vfio-pci, and the driver is run on the target with its python3 (the emulated runner sees this
checkout at the same path). Per run: a random pattern written to the block range and read
back through one polled queue pair; then the runner reads the same range through the PF's
namespace with O_DIRECT and compares. The range's original bytes are saved first and written
back at the end; the VF and its controller are put back through a journal (`vfiotest restore`
after a kill).

    .venv/bin/python benchmarks/bench_nvme_vf_io.py [--blocks 2048] [--slba 4096] [--runs 3] [--target virtual]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from _held_pf import held_pf

from vfiotest import nvme_virt, sriov, targets
from vfiotest.bind import DeviceManager
from vfiotest.journal import Journal
from vfiotest.pci import read_inventory

DRIVER = Path(__file__).resolve().parents[1] / "lib" / "vfiotest" / "podman" / "nvme_io.py"


def sh(host: Any, cmd: str, timeout: float = 120) -> str:
    return str(host.run(["sh", "-c", cmd], timeout=timeout, check=True).stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="virtual")
    ap.add_argument("--slba", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()

    host, close = targets.open_host(a.target, progress=lambda s: print("  ..", s))
    try:
        inv = read_inventory(host)
        pf = next((d for d in inv.devices.values() if d.sriov and nvme_virt.primary_device(host, d.address)), None)
        if pf is None:
            print("no NVMe SR-IOV PF on the nvme driver on the target")
            return 1
        with held_pf(host, pf.address, "bench_nvme_vf_io") as journal:
            return run(host, a, pf.address, journal)
    finally:
        close()


def run(host: Any, a: argparse.Namespace, pf: str, journal: Journal) -> int:
    (vf,) = sriov.set_numvfs(host, pf, 1, journal)
    print(f"VF {vf}: {nvme_virt.vf_states(host, pf, [vf]).get(vf)}")
    DeviceManager(host, "emulated", journal).bind_device(vf)
    group = read_inventory(host).devices[vf].iommu_group
    dev = nvme_virt.namespace_device(host, pf, 1)
    if dev is None:
        print(f"{pf} shows no block device for namespace 1 on the target")
        return 1
    saved = sh(host, "mktemp /tmp/vfiotest-bench-nvme.XXXXXX").strip()
    rng = f"bs=512 skip={a.slba} count={a.blocks}"
    sh(host, f"dd if={shlex.quote(dev)} of={shlex.quote(saved)} iflag=direct {rng} status=none")
    original = sh(host, f"sha256sum {shlex.quote(saved)}").split()[0]
    writes, reads, totals = [], [], []
    ok = True
    try:
        for i in range(a.runs):
            seed = random.SystemRandom().getrandbits(48)
            res = host.run(["timeout", "600", "python3", str(DRIVER), "--group", group, "--device", vf,
                            "--slba", a.slba, "--blocks", a.blocks, "--seed", seed], timeout=630)
            rep = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {"error": res.stderr}
            if res.rc != 0:
                print(f"run {i + 1}: the driver failed at {rep.get('step')}: {rep.get('error')}")
                return 1
            io = rep["io"]
            runner = sh(host, f"dd if={shlex.quote(dev)} iflag=direct {rng} status=none | sha256sum").split()[0]
            pattern = hashlib.sha256(random.Random(seed).randbytes(io["bytes"])).hexdigest()
            same = runner == io["written_sha256"] == pattern
            ok &= same
            if i == 0:
                print(f"controller {rep['identify']['model']!r} serial {rep['identify']['serial']!r} fw "
                      f"{rep['identify']['firmware']!r}; namespace {rep['namespace']['nsid']}: "
                      f"{rep['namespace']['blocks']} x {rep['namespace']['lba_bytes']} B")
            print(f"run {i + 1}: {io['blocks']} blocks from {io['slba']} ({io['bytes']} B) in {io['write_commands']} write "
                  f"and {io['read_commands']} read commands; compared {io['compared_bytes']} B, "
                  f"{io['mismatched_bytes']} differ; runner's read of {dev} {'matches' if same else 'DIFFERS'}")
            writes.append(io["bytes"] / max(io["write_s"], 1e-9) / 1e6)
            reads.append(io["bytes"] / max(io["read_s"], 1e-9) / 1e6)
            totals.append(rep["elapsed_s"])
    finally:
        sh(host, f"dd if={shlex.quote(saved)} of={shlex.quote(dev)} oflag=direct bs=512 seek={a.slba} count={a.blocks} "
                 f"conv=notrunc status=none; rm -f {shlex.quote(saved)}")
        back = sh(host, f"dd if={shlex.quote(dev)} iflag=direct {rng} status=none | sha256sum").split()[0]
        print(f"range restored: {back == original}")
    print(f"write MB/s  median {statistics.median(writes):8.1f}  min {min(writes):8.1f}  max {max(writes):8.1f}")
    print(f"read MB/s   median {statistics.median(reads):8.1f}  min {min(reads):8.1f}  max {max(reads):8.1f}")
    print(f"driver run  median {statistics.median(totals):8.2f} s (VFIO setup to teardown, pattern made and compared)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
