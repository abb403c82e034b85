#!/usr/bin/env python3
"""Real Kata 1.x on the emulated runner (or --target): prints numbers, asserts nothing.

  provision   which Kata (bundle verify/unpack), guest image, configuration.toml, registration
  vf          container with a VF, the seed's recipe: create -> probe JSON -> removed (N runs)
  plain       container without a device: create -> `true` -> removed (N runs)
  vf idle     container with the VF and `true` (the hook binds it, nothing opens it): once
  phases      where a VF run's time goes, from kata-runtime's own log in the runner (`logread`):
              runtime create -> QEMU up ("VM started") -> VFIO device_add (guest boot, agent
              ready, sandbox) -> create done (hot-plug, the agent creating the container: the
              guest hook runs here) -> start -> container ran (the probe) -> delete
  probe steps the first VF run's probe: each VFIO step's own time and its descriptors' close
  create wait the longest silences in the runtime's `create` log of the first VF and plain runs
              (the message before and after: the guest booting, the agent creating the container)
  calls       each kata-runtime process podman ran for a container, when it logged first and last
  timeline    one container holding a VF, read in its guest over the debug console (the guest's
              uptime, clock, dmesg, process start times and the hook's log) and put beside the
              runtime's log on one clock: QEMU up -> guest kernel starts (firmware, kernel and
              initrd loaded) -> init runs -> kata-agent runs -> the agent answers and the VF is
              hot-plugged (device_add) -> the guest sees the VF -> the hook runs and ends -> the
              container's process is forked -> the container is created -> the probe's result
              (the guest's uptime clock, which dmesg and process start times are on, and its wall
              clock, which the hook's log and the runtime's marks are put on, were seen to disagree
              by several seconds: compare steps on one clock only)
  python start a python3 start in the guest's own root and in the container's 9p root, cold and
              warm, and the probe's launcher with --help
  memory      the runner's QEMU RSS here, and the Kata VM's QEMU RSS in the runner while a
              container holds a VF

    .venv/bin/python benchmarks/bench_kata_real.py [--runs 3] [--target virtual] [--memory MB] [--quiet-guest] [--msize-9p BYTES] [--godebug VALUE]

Uses the runner that is up (`vfiotest runner up`), else boots one and stops it after.
Everything it changes on the target (the kata-vfio registration and its configuration.toml,
podman's drop-in, the API service, the containers, the VF count and binding) is recorded in a
journal on the target before it is made and undone at the end; after a kill, `vfiotest restore`
replays that journal.
"""

import argparse
import datetime
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
from vfiotest.kata.console import KataConsole
from vfiotest.kata.runtime import RUNTIME_NAME, WRAPPER_PATH
from vfiotest.lease import LeasePool
from vfiotest.pci import read_inventory
from vfiotest.podman import PodmanBaseSettings, RuntimeClient, ensure_image
from vfiotest.podman.client import vfio_recipe
from vfiotest.podman.conf import dropin_record
from vfiotest.runner.bootcfg import GODEBUG_VALUE
from vfiotest.sriov import set_numvfs

IGB_VF = "8086:10ca"
# kata-runtime logs to syslog: busybox's ring in the emulated runner, the journal on a systemd host
RUNTIME_LOG = ("logread 2>/dev/null || /run/vfiotest/busybox logread 2>/dev/null "
               "|| journalctl -q --no-pager -t kata-runtime")


def stats(xs):
    return f"median {statistics.median(xs):6.2f} s  min {min(xs):6.2f}  max {max(xs):6.2f}  (n={len(xs)})"


def _ts(text):
    # 2026-11-28T15:48:42.682486193Z -> epoch seconds (the runner's clock)
    m = re.match(r"(\d+-\d+-\d+T\d+:\d+:\d+)(\.\d+)?", text)
    whole = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return whole.timestamp() + float(m.group(2) or 0)


_PID = re.compile(r"kata-runtime\[(\d+)\]")
_TIME = re.compile(r'time="([^"]+)"')
_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)("|$)')


def _runtime_lines(log_text, cid):
    """kata-runtime's syslog lines as (pid, epoch, command, msg, names cid), and {pid: command}
    of the runtime processes that named container `cid`. busybox's syslogd cuts long lines (its read
    buffer is 256 bytes), which drops the container's id from many of them: a line is put to a
    command by the runtime's process id in its syslog tag (`kata-runtime[PID]:`), found from any
    line of that process that still names the container."""
    lines = []
    for line in log_text.splitlines():
        pid, ts = _PID.search(line), _TIME.search(line)
        if not pid or not ts:
            continue
        msg = _MSG.search(line)
        cmd = re.search(r"\bcommand=(\w+)", line)
        lines.append((pid.group(1), _ts(ts.group(1)), cmd.group(1) if cmd else "", msg.group(1) if msg else "",
                      cid in line))
    commands = {}                  # pid -> the command of a runtime process that named cid
    for pid, _t, cmd, _m, named in lines:
        if named and cmd:
            commands.setdefault(pid, cmd)
    return lines, commands


def runtime_invocations(log_text, cid):
    """[(first line's epoch, last line's epoch, command, pid)] of each kata-runtime process that
    named container `cid`, in order: every call podman made for it (create, start, state, kill,
    delete), with how long each logged for."""
    lines, commands = _runtime_lines(log_text, cid)
    spans = {}
    for pid, t, _c, _m, _n in lines:
        if pid in commands:
            a, b = spans.get(pid, (t, t))
            spans[pid] = (min(a, t), max(b, t))
    return sorted((a, b, commands[pid], pid) for pid, (a, b) in spans.items())


def runtime_gaps(log_text, cid, command="create", n=6):
    """The `n` longest silences of container `cid`'s kata-runtime `command` process: [(seconds,
    seconds after its first line, the message before, the message after)], longest first."""
    lines, commands = _runtime_lines(log_text, cid)
    ev = sorted((t, msg) for pid, t, _c, msg, _n in lines if commands.get(pid) == command)
    if not ev:
        return []
    gaps = [(round(t - ev[i - 1][0], 2), round(t - ev[0][0], 2), ev[i - 1][1], msg)
            for i, (t, msg) in enumerate(ev) if i]
    return sorted(gaps, key=lambda g: -g[0])[:n]


def runtime_marks(log_text, cid):
    """{mark: epoch seconds} of container `cid` from kata-runtime's syslog lines, in the order
    of a container's life; marks not found are None (see _runtime_lines)."""
    lines, commands = _runtime_lines(log_text, cid)
    ev = [(t, commands[pid], msg) for pid, t, _c, msg, _n in lines if pid in commands]

    def first(pred):
        return next((t for t, c, msg in ev if pred(c, msg)), None)

    def last(pred):
        return next((t for t, c, msg in reversed(ev) if pred(c, msg)), None)

    return {"create": first(lambda c, m: c == "create"),
            "qemu_up": first(lambda c, m: c == "create" and m == "VM started"),
            "device_add": first(lambda c, m: c == "create" and "device_add" in m and "vfio" in m.lower()),
            "created": last(lambda c, m: c == "create"),
            "start": first(lambda c, m: c == "start"),
            "started": last(lambda c, m: c == "start"),
            "delete": first(lambda c, m: c in ("delete", "kill")),
            "deleted": last(lambda c, m: c == "delete")}


def phases(log_text, cid):
    """Seconds per phase of container `cid` from kata-runtime's syslog lines."""
    got = [(k, t) for k, t in runtime_marks(log_text, cid).items() if t is not None]
    if not got:
        return None
    return {f"{a}->{b}": round(tb - ta, 2) for (a, ta), (b, tb) in itertools.pairwise(got)}


# read in the guest in one console line: its uptime and clock at one instant (python3 is in the
# guest for the hook; the guest has no `date`), every process's name and start time
# (/proc/PID/stat field 22, clock ticks since boot), the kernel's log (the guest's init writes a
# line to it when it execs kata-agent)
# the guest's boot-time clock and wall clock at one instant
GUEST_CLOCKS = "python3 -I -S -c 'import time; print(time.clock_gettime(7), time.time())'"
GUEST_TIMELINE = (GUEST_CLOCKS + "; "
                  "for d in /proc/[0-9]*; do [ -r $d/stat ] && echo \"PROC $(cat $d/stat 2>/dev/null)\"; done; dmesg")
# read in the guest after the probe ran: how long a python3 start takes in the guest's own root
# (the initrd, in memory) and in the container's root (9p from the runner: Kata 1.x's default
# shared filesystem, cache=mmap), with the page cache dropped first and again warm, and the
# probe's launcher asked for --help the same way (its imports, no VFIO work). One line:
# PROBECOST <initrd> <container cold> <container warm> <probe --help cold> <warm>
_PROBE_COST_CODE = """
import os, time
def timed(root, argv, drop):
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    t = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.chroot(root)
        os.chdir("/")
        fd = os.open("/dev/null", os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execv(argv[0], argv)
    os.waitpid(pid, 0)
    return round(time.monotonic() - t, 3)
py = ["/usr/bin/python3", "-I", "-S", "-c", "pass"]
top = "/run/kata-containers/shared/containers"
for root in sorted(f"{top}/{d}/rootfs" for d in os.listdir(top)):
    if os.path.exists(root + "/usr/local/bin/vfio-probe"):
        probe = ["/usr/local/bin/vfio-probe", "--help"]
        print("PROBECOST", timed("/", py, True), timed(root, py, True), timed(root, py, False),
              timed(root, probe, True), timed(root, probe, False))
"""
# one console line, the code in hex (no quoting, no newline for the guest's shell to continue;
# the guest's python has a few modules only: os, time and builtins here)
GUEST_PROBE_COST = "python3 -I -S -c 'exec(bytes.fromhex(\"%s\").decode())'" % _PROBE_COST_CODE.encode().hex()
CLK_TCK = 100          # USER_HZ, what /proc/PID/stat counts in on Linux
_DMESG = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")
_STAT = re.compile(r"^PROC (\d+) \((.*)\) (.*)$")


def guest_timeline(text, vendor_device, hook_log, runtime_marks, probe_done_epoch=None, probe="vfio-probe"):
    """Seconds after the guest kernel started of each step of one container's start, from what
    GUEST_TIMELINE printed in the guest, the guest hook's log entries, and kata-runtime's marks
    for the container (epoch seconds on the runner's clock: qemu_up, device_add, created,
    start). The runtime's marks are put on the guest's timeline through the guest's uptime and
    wall clock read at one instant, which assumes the two clocks run together: in the emulated
    runner they were seen to differ by several seconds (docs/measurements.md), so the hook's and
    the runtime's rows are not to be read against the kernel's and the processes'. Returns
    [(step, seconds after kernel start)] in time order, steps not seen left out. `probe`: the
    probe's process name (its launcher's file name, cut to the kernel's 15 characters)."""
    lines = [ln.strip() for ln in text.replace("\r", "").splitlines()]
    clock = None
    for ln in lines:
        parts = ln.split()
        if len(parts) == 2:
            try:
                clock = float(parts[0]), float(parts[1])
                break
            except ValueError:
                continue
    if clock is None:
        raise ValueError(f"no uptime and clock in the guest's answer: {text[:200]!r}")
    uptime, now = clock
    boot = now - uptime            # the guest kernel's start, epoch seconds
    steps = []
    for name, epoch in runtime_marks.items():
        if epoch is not None:
            steps.append((f"runtime: {name}", epoch - boot))
    kernel_log = [(float(m.group(1)), m.group(2)) for m in map(_DMESG.match, lines) if m]

    def logged(pred):
        return next((t for t, msg in kernel_log if pred(msg)), None)

    for name, t in (("guest: init runs", logged(lambda m: "Run /init as init process" in m or "Run /usr/sbin/" in m)),
                    ("guest: kata-agent runs", logged(lambda m: m.startswith("vfiotest-kata-init: exec"))),
                    ("guest: sees the VF", logged(lambda m: f"[{vendor_device}]" in m))):
        if t is not None:
            steps.append((name, t))
    starts = {}
    for ln in lines:
        m = _STAT.match(ln)
        if m:
            fields = m.group(3).split()
            try:
                starts.setdefault(m.group(2), []).append(int(fields[19]) / CLK_TCK)   # field 22
            except (IndexError, ValueError):
                continue
    epochs = [e["epoch"] for e in hook_log if isinstance(e.get("epoch"), (int, float))]
    if epochs:
        steps.append(("guest: hook starts", min(epochs) - boot))
        steps.append(("guest: hook ends", max(epochs) - boot))
    # the container's process, named after the probe exec'd into it at start; its start time is
    # its fork, which the agent makes at create (the guest's wall clock, which the hook's entries
    # are on, is offset from the uptime this is counted in: no order against the hook is asked)
    py = starts.get(probe[:15], [])
    if py:
        steps.append(("guest: the container's process forked (at create; the probe is exec'd into it at start)", min(py)))
    if probe_done_epoch is not None:
        steps.append(("probe result read", probe_done_epoch - boot))
    return sorted(steps, key=lambda s: s[1])


def kernel_gaps(text, n=5):
    """The `n` longest waits in the guest kernel's log before its init ran: [(seconds waited,
    at, the line after the wait)], longest first: where the kernel's part of the boot goes."""
    log = [(float(m.group(1)), m.group(2)) for m in map(_DMESG.match, text.replace("\r", "").splitlines()) if m]
    end = next((i for i, (_t, msg) in enumerate(log) if "as init process" in msg), len(log))
    gaps = [(round(t - log[i - 1][0], 2), t, msg) for i, (t, msg) in enumerate(log[:end + 1]) if i]
    return sorted(gaps, key=lambda g: -g[0])[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="virtual")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=None,
                    help=f"the Kata VM's default_memory in MiB (default {kata_config.KATA_GUEST_MEMORY_MB})")
    ap.add_argument("--quiet-guest", action="store_true",
                    help="the hypervisor's enable_debug off: Kata boots the guest kernel with `quiet` instead "
                         "of `debug` (every kernel message on the console)")
    ap.add_argument("--godebug", default=None, metavar="VALUE",
                    help="GODEBUG for the Go programs of Kata: kata-runtime and what it starts (set in the "
                         "kata-vfio wrapper) and kata-agent (on the guest kernel's line, which the kernel passes "
                         "to the init's environment), e.g. cpu.all=off: Go's AVX and SHA code paths off, "
                         "which TCG emulates slowly (not the default; docs/measurements.md)")
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
        if a.godebug:
            if not GODEBUG_VALUE.fullmatch(a.godebug):
                print(f"--godebug {a.godebug!r}: letters, digits and _ . , = only")
                return 2
            text = host.read_text(kata_config.KATA_VFIO_CONFIG)
            m = re.search(r'^kernel_params = "([^"]*)"$', text, re.M)
            if not m:
                print(f"--godebug: no kernel_params line in {kata_config.KATA_VFIO_CONFIG}")
                return 2
            edits.append(("--godebug", m.group(0), f'kernel_params = "{m.group(1)} GODEBUG={a.godebug}"'))
            wrapper = host.read_text(WRAPPER_PATH)
            host.write_atomic(WRAPPER_PATH, wrapper.replace("\nexec ", f"\nexport GODEBUG={a.godebug}\nexec ", 1),
                              mode=0o755)
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
            plain = vfio_recipe(True)
            kinds = {k: ([], []) for k in ("vf", "plain", "idle", "echo", "quiet")}   # kind -> (seconds, ids)

            def timed_run(kind, command, recipe):
                t = time.monotonic()
                res = client.run(img.ref, command, **recipe)
                kinds[kind][0].append(time.monotonic() - t)
                kinds[kind][1].append(res.id)
                return res

            vf_out = []
            for i in range(a.runs):
                res = timed_run("vf", img.probe_command, recipe)
                if res.exit_code != 0:
                    print(f"vf run failed:\n{res}")
                    return 1
                vf_out.append(res.stdout)
                timed_run("plain", ["true"], plain)
                if not i:
                    # once each: the VF passed in, the hook binding it, nothing opening it; a line
                    # of output without a device; the probe with its output dropped
                    timed_run("idle", ["true"], recipe)
                    timed_run("echo", ["echo", "hello"], plain)
                    timed_run("quiet", ["sh", "-c", " ".join(img.probe_command) + " > /dev/null"], recipe)
            (vf_t, vf_ids), (plain_t, plain_ids), (idle_t, idle_ids), (echo_t, echo_ids), (quiet_t, quiet_ids) = \
                kinds.values()
            print(f"vf               create -> probe JSON -> removed: {stats(vf_t)}")
            print(f"plain            create -> `true` -> removed:      {stats(plain_t)}")
            print(f"vf idle          create -> `true` with the VF -> removed: {stats(idle_t)}")
            print(f"plain echo       create -> `echo hello` -> removed: {stats(echo_t)}")
            print(f"vf quiet         create -> the probe, its output to /dev/null -> removed: {stats(quiet_t)}")
            time.sleep(2)          # podman's cleanup runs `kata-runtime delete` after the container exits
            log = host.run(["sh", "-c", RUNTIME_LOG], timeout=60).stdout
            ph = [phases(log, cid) for cid in vf_ids]
            keys = [k for k in (ph[0] or {})]
            for k in keys:
                vals = [p[k] for p in ph if p and k in p]
                print(f"phase            {k:22} {stats(vals)}")
            try:
                said = json.loads(vf_out[0]) if vf_out else {}
            except ValueError:
                said = {}
            step_s = said.get("step_seconds")
            if step_s:
                top = sorted(step_s.items(), key=lambda kv: -kv[1])
                print(f"probe steps      the first VF run's probe, {sum(step_s.values()):.2f} s in its steps: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in top[:6])
                      + f"; closing its descriptors (the device's reset) {said.get('close_seconds', '?')} s")
            for what, ids in (("VF", vf_ids), ("plain", plain_ids)):
                for waited, at, before, after in (runtime_gaps(log, ids[0]) if ids else []):
                    print(f"create wait      {what:5} {waited:5.2f} s at {at:6.2f}: {before[:60]!r} -> {after[:60]!r}")
            for what, ids in (("VF", vf_ids), ("plain", plain_ids), ("VF idle", idle_ids), ("plain echo", echo_ids),
                              ("VF quiet", quiet_ids)):
                calls = runtime_invocations(log, ids[0]) if ids else []
                if calls:
                    print(f"calls            the first {what} run's kata-runtime processes, seconds after its create "
                          "(first to last line logged):")
                    for first_t, last_t, cmd, pid in calls:
                        print(f"calls            {first_t - calls[0][0]:7.2f} .. {last_t - calls[0][0]:7.2f}  {cmd} [{pid}]")
            # memory: a container holding the VF, sampled while it runs
            holder = client.start(img.ref, [*img.probe_command, "--hold", "120"], **recipe)
            try:
                deadline = time.monotonic() + 180
                rss = t_ok = None
                while time.monotonic() < deadline:
                    res = host.run(["sh", "-c", f'p=$(pgrep -f "sandbox-{holder.id}" | head -1); '
                                                '[ -n "$p" ] && grep VmRSS /proc/$p/status; date +%s.%N'], timeout=30)
                    said = b"".join(x if isinstance(x, bytes) else x.encode() for x in holder.logs(stdout=True))
                    if b'"ok": true' in said:
                        out = res.stdout.split()
                        t_ok = float(out[-1])
                        if len(out) > 1:
                            rss = out[1]
                        break
                    time.sleep(0.5)
                timeline = None
                if t_ok is not None:
                    console = KataConsole(host, holder.id)
                    rc, text = console.run(GUEST_TIMELINE, timeout=90)
                    hook_log = console.hook_log()
                    marks = runtime_marks(host.run(["sh", "-c", RUNTIME_LOG], timeout=60).stdout, holder.id)
                    marks = {k: marks[k] for k in ("qemu_up", "device_add", "created", "start")}
                    timeline = guest_timeline(text, IGB_VF, hook_log, marks, probe_done_epoch=t_ok,
                                              probe=img.probe_command[0].rsplit("/", 1)[-1])
                    print("timeline         one container holding a VF, seconds after the guest kernel started "
                          "(the runtime's marks on the guest's clock):")
                    prev = None
                    for step, t in timeline:
                        gap = f"  (+{t - prev:5.2f})" if prev is not None else ""
                        print(f"timeline         {t:7.2f} s{gap}  {step}")
                        prev = t
                    if not any(step.startswith("guest: the container's process") for step, _t in timeline):
                        names = sorted({m.group(2) for m in map(_STAT.match, text.splitlines()) if m})
                        print(f"timeline         (the probe's process was not among the guest's: {' '.join(names)})")
                    for waited, at, msg in kernel_gaps(text):
                        print(f"kernel wait      {waited:5.2f} s before [{at:9.3f}] {msg[:90]}")
                    # the guest's clocks against the runner's: two readings 20 s apart on the runner's clock
                    rate = []
                    for i in range(2):
                        if i:
                            time.sleep(20)
                        t_runner = float(host.run(["date", "+%s.%N"], timeout=30).stdout.strip())
                        _rc, up = console.run(GUEST_CLOCKS, timeout=60)
                        nums = [float(x) for x in up.split() if re.fullmatch(r"\d+\.\d+", x)]
                        rate.append((t_runner, *nums[:2]))
                    if all(len(r) == 3 for r in rate):
                        d_runner = rate[1][0] - rate[0][0]
                        print(f"guest clocks     over {d_runner:.1f} s of the runner's clock the guest's uptime advanced "
                              f"{rate[1][1] - rate[0][1]:.1f} s and its wall clock {rate[1][2] - rate[0][2]:.1f} s")
                    _rc, said = console.run(GUEST_PROBE_COST, timeout=180)
                    cost = next((ln.split()[1:] for ln in said.splitlines() if ln.startswith("PROBECOST ")), None)
                    if cost and len(cost) == 5:
                        print(f"python start     initrd {cost[0]} s; container root cold {cost[1]} s, warm {cost[2]} s; "
                              f"probe --help cold {cost[3]} s, warm {cost[4]} s")
                    else:
                        print(f"python start     not measured: {said.strip()[-300:]!r}")
            finally:
                client.remove(holder.id)    # before the VF's group is restored: the VM holds it
            from vfiotest.runner import Runner

            runner_rss = Runner.default().status().get("rss_bytes") if a.target == "virtual" else None
            print(f"memory           Kata VM QEMU RSS {int(rss) / 1024:.0f} MiB with a VF held" if rss else
                  "memory           Kata VM QEMU RSS not sampled")
            if runner_rss:
                print(f"memory           runner QEMU RSS {runner_rss / 2**20:.0f} MiB")
            print(json.dumps({"vf_median_s": statistics.median(vf_t), "plain_median_s": statistics.median(plain_t),
                              "phases": ph, "timeline": timeline}, sort_keys=True))
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
