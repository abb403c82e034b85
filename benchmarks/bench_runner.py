"""Benchmark of the emulated runner: boot-to-SSH-ready time with a warm asset cache,
and QEMU's resident memory. Targets (issue 3): under 45 s, under 1.5 GiB RSS.

    .venv/bin/python benchmarks/bench_runner.py [--rounds N] [--json]

Each round boots a fresh runner in a temporary state directory (a runner kept up
with `vfiotest runner up` is not touched), waits until a command runs over SSH,
measures QEMU's RSS right after boot and after a small workload (a podman
container), then stops it.
"""

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time

from vfiotest.runner import Runner, assets, qemu_rss

TARGET_BOOT_S = 45.0
TARGET_RSS = 1.5 * 2**30


def busybox_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        ti = tarfile.TarInfo("bin/sh")
        ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(ti)
    return buf.getvalue()


def one_round(workload):
    with tempfile.TemporaryDirectory(prefix="vfiotest-bench-") as d:
        r = Runner(os.path.join(d, "runner"))
        t0 = time.monotonic()
        r.up()
        h = r.host()
        h.run(["true"], timeout=30, check=True)
        boot = time.monotonic() - t0
        pid = r.qemu_pids()[0]
        rss_boot = qemu_rss(pid)
        t1 = time.monotonic()
        h.run(["true"], timeout=30, check=True)
        rtt = time.monotonic() - t1
        rss_work = None
        if workload:
            h.run(["podman", "import", "-", "localhost/bench:latest"], input=busybox_tar(), timeout=300, check=True)
            h.run(["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                   "run", "--rm", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
                   "localhost/bench:latest", "sh", "-c", "true"], timeout=300, check=True)
            rss_work = qemu_rss(pid)
        h.close()
        r.down()
        return {"boot_s": boot, "rss_boot": rss_boot, "rss_after_podman": rss_work, "command_rtt_s": rtt}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-workload", action="store_true", help="skip the podman run after boot")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # warm the cache first (not timed): kernel download, initramfs
    k = assets.ensure_kernel(progress=lambda s: print(s, file=sys.stderr))
    assets.ensure_initramfs(k, progress=lambda s: print(s, file=sys.stderr))
    rounds = []
    for i in range(args.rounds):
        res = one_round(not args.no_workload)
        rounds.append(res)
        if not args.json:
            work = f", after podman {res['rss_after_podman'] / 2**20:.0f} MiB" if res["rss_after_podman"] else ""
            print(f"round {i + 1}: boot-to-SSH-ready {res['boot_s']:.1f} s, QEMU RSS {res['rss_boot'] / 2**20:.0f} MiB"
                  f"{work}, command round trip {res['command_rtt_s'] * 1000:.0f} ms")
    boots = [r["boot_s"] for r in rounds]
    peak = max(max(r["rss_boot"], r["rss_after_podman"] or 0) for r in rounds)
    summary = {"rounds": len(rounds), "boot_s_median": statistics.median(boots), "boot_s_max": max(boots),
               "rss_peak_bytes": peak, "boot_target_s": TARGET_BOOT_S, "rss_target_bytes": TARGET_RSS,
               "boot_ok": max(boots) < TARGET_BOOT_S, "rss_ok": peak < TARGET_RSS, "per_round": rounds}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"boot-to-SSH-ready: median {summary['boot_s_median']:.1f} s, max {summary['boot_s_max']:.1f} s "
              f"(target < {TARGET_BOOT_S:.0f} s: {'ok' if summary['boot_ok'] else 'MISSED'})")
        print(f"QEMU RSS peak: {peak / 2**20:.0f} MiB (target < {TARGET_RSS / 2**30:.1f} GiB: "
              f"{'ok' if summary['rss_ok'] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
