#!/usr/bin/env python3
"""Real Kata 1.x on the emulated runner (or --target): prints numbers, asserts nothing.

  provision   which Kata (bundle verify/unpack), guest image, configuration.toml, registration
  vf          container with a VF, the seed's recipe: create -> probe JSON -> removed (N runs)
  plain       container without a device: create -> `true` -> removed (N runs)
  phases      where a VF run's time goes, from kata-runtime's own log in the runner (`logread`):
              runtime create -> QEMU up ("VM started") -> VFIO device_add (guest boot, agent
              ready, sandbox) -> create done (hot-plug, the agent creating the container: the
              guest hook runs here) -> start -> container ran (the probe) -> delete
  memory      the runner's QEMU RSS here, and the Kata VM's QEMU RSS in the runner while a
              container holds a VF

    .venv/bin/python benchmarks/bench_kata_real.py [--runs 3] [--target virtual] [--memory MB] [--quiet-guest] [--msize-9p BYTES]

Uses the runner that is up (`vfiotest runner up`), else boots one and stops it after.
Everything it changes on the target (the kata-vfio registration and its configuration.toml,
podman's drop-in, the API service, the containers, the VF count and binding) is recorded in a
journal on the target before it is made and undone at the end; after a kill, `vfiotest restore`
replays that journal.
"""

import argparse
import itertools
import json
import re
import statistics
import sys
import time

from vfiotest import targets
from vfiotest.bind import DeviceManager
from vfiotest.journal import Journal
from vfiotest.kata import bundle, provision
from vfiotest.kata import config as kata_config
from vfiotest.kata.runtime import RUNTIME_NAME
from vfiotest.lease import LeasePool
from vfiotest.pci import read_inventory
from vfiotest.podman import PodmanBaseSettings, RuntimeClient, ensure_image
from vfiotest.podman.client import vfio_recipe
from vfiotest.podman.conf import dropin_record
from vfiotest.sriov import set_numvfs

IGB_VF = "8086:10ca"
# kata-runtime logs to syslog: busybox's ring in the emulated runner, the journal on a systemd host
RUNTIME_LOG = ("logread 2>/dev/null || /run/vfiotest/busybox logread 2>/dev/null "
               "|| journalctl -q --no-pager -t kata-runtime")
_LINE = re.compile(r'time="([^"]+)".*?msg="((?:[^"\\]|\\.)*)"')


def stats(xs):
    return f"median {statistics.median(xs):6.2f} s  min {min(xs):6.2f}  max {max(xs):6.2f}  (n={len(xs)})"


def _ts(text):
    # 2026-11-28T15:48:42.682486193Z -> seconds (the runner's clock; only differences are used)
    m = re.match(r"(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)(\.\d+)?", text)
    d, h, mi, s = int(m.group(3)), int(m.group(4)), int(m.group(5)), int(m.group(6))
    return ((d * 24 + h) * 60 + mi) * 60 + s + float(m.group(7) or 0)


def phases(log_text, cid):
    """Seconds per phase of container `cid` from kata-runtime's syslog lines."""
    ev = []
    for line in log_text.splitlines():
        if cid not in line or "kata-runtime" not in line:
            continue
        m = _LINE.search(line)
        if not m:
            continue
        cmd = re.search(r"\bcommand=(\w+)", line)
        ev.append((_ts(m.group(1)), cmd.group(1) if cmd else "", m.group(2)))
    if not ev:
        return None

    def first(pred):
        return next((t for t, c, msg in ev if pred(c, msg)), None)

    def last(pred):
        return next((t for t, c, msg in reversed(ev) if pred(c, msg)), None)

    marks = [("create", first(lambda c, m: c == "create")),
             ("qemu_up", first(lambda c, m: c == "create" and m == "VM started")),
             ("device_add", first(lambda c, m: c == "create" and "device_add" in m and "vfio" in m.lower())),
             ("created", last(lambda c, m: c == "create")),
             ("start", first(lambda c, m: c == "start")),
             ("started", last(lambda c, m: c == "start")),
             ("delete", first(lambda c, m: c in ("delete", "kill"))),
             ("deleted", last(lambda c, m: c == "delete"))]
    got = [(k, t) for k, t in marks if t is not None]
    return {f"{a}->{b}": round(tb - ta, 2) for (a, ta), (b, tb) in itertools.pairwise(got)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="virtual")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=None,
                    help=f"the Kata VM's default_memory in MiB (default {kata_config.KATA_GUEST_MEMORY_MB})")
    ap.add_argument("--quiet-guest", action="store_true",
                    help="the hypervisor's enable_debug off: Kata boots the guest kernel with `quiet` instead "
                         "of `debug` (every kernel message on the console)")
    ap.add_argument("--msize-9p", type=int, default=None, metavar="BYTES",
                    help="the hypervisor's msize_9p: the largest 9p message the guest mounts the container's "
                         "rootfs with (Kata's default 8192; the guest kernel caps it at what virtio allows)")
    a = ap.parse_args()
    say = lambda s: print("  ..", s, flush=True)  # noqa: E731

    host, close = targets.open_host(a.target, progress=say)
    shares = targets.shares_controller_fs(a.target)
    # one journal on the target for everything below, each change recorded before it is made:
    # the end replays it, and after a kill `vfiotest restore` does
    journal = Journal.open(host)
    client = None
    try:
        t = time.monotonic()
        choice = bundle.choose_kata(host, progress=say, shares_controller_fs=shares)
        if not choice.supported:
            print(f"no Kata 1.x: {choice.reason}")
            return 1
        t_choice = time.monotonic() - t
        t = time.monotonic()
        image = provision.guest_image(choice, (IGB_VF,), host=host, shares_controller_fs=shares, progress=say)
        t_image = time.monotonic() - t
        t = time.monotonic()
        # podman's drop-in first (the directory it may create is removed last), as a session does
        settings = PodmanBaseSettings(host)
        settings.snapshot()
        journal.record(dropin_record(settings))
        settings.apply()
        provision.register_kata_vfio(host, choice, image, journal, progress=say, memory_mb=a.memory)
        edits = [("--quiet-guest", "enable_debug = true", "enable_debug = false")] if a.quiet_guest else []
        if a.msize_9p:
            edits.append(("--msize-9p", "#msize_9p = 8192", f"msize_9p = {a.msize_9p}"))
        for flag, line, replacement in edits:
            path = kata_config.KATA_VFIO_CONFIG
            text = host.read_text(path)
            if f"\n{line}\n" not in text:
                print(f"{flag}: no `{line}` line in {path}")
                return 2
            host.write_atomic(path, text.replace(f"\n{line}\n", f"\n{replacement}\n", 1), mode=0o644)
        t_reg = time.monotonic() - t
        print(f"provision        Kata {choice.version} ({choice.kind}) {t_choice:.2f} s, guest image "
              f"{image.size / 1e6:.1f} MB {'cached' if image.cached else 'built'} {t_image:.2f} s, "
              f"config + registration {t_reg:.2f} s")
        img = ensure_image(host)
        client = RuntimeClient.open(host, RUNTIME_NAME, recorder=journal)
        dm, pool = DeviceManager(host, "emulated", journal), LeasePool(host)
        pf = next(d for d in read_inventory(host).devices.values() if d.vendor_device == "8086:10c9" and d.sriov)
        if not pf.sriov.numvfs:
            set_numvfs(host, pf.address, 1, journal)
        lease = vf = None
        try:
            for d in read_inventory(host).devices.values():
                if d.vendor_device == IGB_VF and d.iommu_group:
                    lease = pool.try_acquire(d.iommu_group, test_id="bench_kata_real", retry=0)
                    if lease:
                        vf = d
                        break
            if vf is None:
                print("vf               no free igb VF group to lease")
                return 1
            dm.bind_group(vf.address)
            recipe = dict(vfio_recipe(True, f"/dev/vfio/{vf.iommu_group}", IGB_VF), cap_add=["CAP_IPC_LOCK"])
            vf_t, plain_t, vf_ids = [], [], []
            for _ in range(a.runs):
                t = time.monotonic()
                res = client.run(img.ref, img.probe_command, **recipe)
                vf_t.append(time.monotonic() - t)
                if res.exit_code != 0:
                    print(f"vf run failed:\n{res}")
                    return 1
                vf_ids.append(res.id)
                t = time.monotonic()
                res = client.run(img.ref, ["true"], **vfio_recipe(True))
                plain_t.append(time.monotonic() - t)
            print(f"vf               create -> probe JSON -> removed: {stats(vf_t)}")
            print(f"plain            create -> `true` -> removed:      {stats(plain_t)}")
            time.sleep(2)          # podman's cleanup runs `kata-runtime delete` after the container exits
            log = host.run(["sh", "-c", RUNTIME_LOG], timeout=60).stdout
            ph = [phases(log, cid) for cid in vf_ids]
            keys = [k for k in (ph[0] or {})]
            for k in keys:
                vals = [p[k] for p in ph if p and k in p]
                print(f"phase            {k:22} {stats(vals)}")
            # memory: a container holding the VF, sampled while it runs
            holder = client.start(img.ref, [*img.probe_command, "--hold", "120"], **recipe)
            deadline = time.monotonic() + 180
            rss = None
            while time.monotonic() < deadline:
                res = host.run(["sh", "-c", f'p=$(pgrep -f "sandbox-{holder.id}" | head -1); '
                                            '[ -n "$p" ] && grep VmRSS /proc/$p/status'], timeout=30)
                said = b"".join(x if isinstance(x, bytes) else x.encode() for x in holder.logs(stdout=True))
                if b'"ok": true' in said:
                    if res.ok:
                        rss = res.stdout.split()[1]
                    break
                time.sleep(2)
            client.remove(holder.id)
            from vfiotest.runner import Runner

            runner_rss = Runner.default().status().get("rss_bytes") if a.target == "virtual" else None
            print(f"memory           Kata VM QEMU RSS {int(rss) / 1024:.0f} MiB with a VF held" if rss else
                  "memory           Kata VM QEMU RSS not sampled")
            if runner_rss:
                print(f"memory           runner QEMU RSS {runner_rss / 2**20:.0f} MiB")
            print(json.dumps({"vf_median_s": statistics.median(vf_t), "plain_median_s": statistics.median(plain_t),
                              "phases": ph}, sort_keys=True))
        finally:
            if vf is not None:
                dm.restore_group(vf.address)
            if lease:
                lease.release()
    finally:
        try:
            if client is not None:
                client.close()
            journal.restore_all()   # newest first: containers, service, VF count, drop-in, registration
            journal.close()         # removed when empty; kept for `vfiotest restore` when an undo failed
        finally:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
