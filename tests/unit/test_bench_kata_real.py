"""benchmarks/bench_kata_real.py: the runtime's marks from its syslog lines, and one container's
timeline put together from what the guest prints and the runtime's marks."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kata_real", os.path.join(ROOT, "benchmarks", "bench_kata_real.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CID = "4f" * 32


def syslog(t, command, msg, pid=99, cut=False):
    line = (f'Dec  7 07:00:00 runner user.notice kata-runtime[{pid}]: time="2026-12-07T07:{t}Z" level=info '
            f'msg="{msg}" command={command} container={CID} name=kata-runtime pid={pid} source=runtime')
    # busybox syslogd keeps 256 bytes of a line: a long message loses its closing quote and the id
    return line[:170] if cut else line


LOG = "\n".join([
    syslog("00:01.000000000", "create", "loaded configuration"),
    syslog("00:01.500000000", "create", "VM started"),
    syslog("00:14.250000000", "create", r"device_add {\"driver\": \"vfio-pci\", \"id\": \"vfio-xyz\"}", cut=True),
    syslog("00:23.000000000", "create", "a long message about the container's mounts " * 3, cut=True),
    syslog("00:23.400000000", "start", "start container", pid=120),
    syslog("00:23.900000000", "start", "x" * 200, pid=120, cut=True),
    'Dec  7 07:00:30 runner kata-runtime[98]: time="2026-12-07T07:00:30Z" msg="VM started" command=create container=other',
])
def test_runtime_invocations_are_each_runtime_process_of_this_container(bench):
    calls = bench.runtime_invocations(LOG, CID)
    base = bench._ts("2026-12-07T07:00:00Z")
    assert [(a - base, b - base, cmd, pid) for a, b, cmd, pid in calls] == [
        pytest.approx((1.0, 23.0, "create", "99")), pytest.approx((23.4, 23.9, "start", "120"))]
    assert bench.runtime_invocations(LOG, "ab" * 32) == []


def test_runtime_marks_are_epochs_of_this_containers_lines(bench):
    marks = bench.runtime_marks(LOG, CID)
    base = bench._ts("2026-12-07T07:00:00Z")
    assert base == 1796626800.0           # 2026-12-07 07:00:00 UTC, not the controller's zone
    assert marks["qemu_up"] - base == pytest.approx(1.5)
    assert marks["device_add"] - base == pytest.approx(14.25)
    assert marks["created"] - base == pytest.approx(23.0)
    assert marks["start"] - base == pytest.approx(23.4)
    assert marks["started"] - base == pytest.approx(23.9)
    assert marks["delete"] is None        # another container's lines are not this one's
    assert bench.phases(LOG, CID)["qemu_up->device_add"] == pytest.approx(12.75)


def test_timeline_puts_guest_and_runtime_steps_on_the_guests_clock(bench):
    base = bench._ts("2026-12-07T07:00:00Z")
    # the guest read 30 s after its kernel started, which was at base + 4.5 s (the firmware's 3 s)
    uptime, now = 30.0, base + 34.5
    guest = "\n".join([
        "# python3 -I -S -c 'import time; print(time.clock_gettime(7), time.time())'; for d in ...",
        f"{uptime:.6f} {now:.6f}",
        "PROC 1 (kata-agent) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 9 0 420 9000 100",
        "PROC 66 (python3) S 1 66 66 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 1520 9000 100",
        "PROC 80 (vfio-probe) S 1 80 80 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 2300 9000 100",
        "[    0.000000] Linux version 6.1.0",
        "[    4.180000] Run /usr/sbin/vfiotest-kata-init as init process",
        "[    6.100000] vfiotest-kata-init: exec /usr/bin/kata-agent",
        "[   11.100000] pci 0000:00:02.0: [8086:10ca] type 00 class 0x020000",
        "[   11.300000] igbvf 0000:00:02.0: enabling device",
    ])
    hook = [{"epoch": base + 4.5 + 15.0, "action": "wait"}, {"epoch": base + 4.5 + 16.2, "action": "verify"}]
    marks = {k: v for k, v in bench.runtime_marks(LOG, CID).items() if k in ("qemu_up", "device_add", "created", "start")}
    steps = bench.guest_timeline(guest, "8086:10ca", hook, marks, probe_done_epoch=base + 4.5 + 26.0)
    got = {name: round(t, 2) for name, t in steps}
    assert got == {"runtime: qemu_up": -3.0, "guest: init runs": 4.18, "guest: kata-agent runs": 6.1,
                   "runtime: device_add": 9.75, "guest: sees the VF": 11.1, "guest: hook starts": 15.0,
                   "guest: hook ends": 16.2, "runtime: created": 18.5, "runtime: start": 18.9,
                   "guest: the container's process forked (at create; the probe is exec'd into it at start)": 23.0, "probe result read": 26.0}
    assert [t for _, t in steps] == sorted(t for _, t in steps)


def test_timeline_refuses_an_answer_without_uptime_and_clock(bench):
    with pytest.raises(ValueError, match="no uptime and clock"):
        bench.guest_timeline("/bin/sh: 1: python3: not found\n", "8086:10ca", [], {})


def test_kernel_gaps_are_the_longest_waits_before_init(bench):
    text = "\n".join(["[    0.000000] Linux version", "[    0.500000] a", "[    3.500000] after 3 s",
                      "[    3.600000] b", "[    5.100000] Run /usr/sbin/vfiotest-kata-init as init process",
                      "[   20.000000] after init: not the kernel's boot"])
    assert bench.kernel_gaps(text, n=2) == [(3.0, 3.5, "after 3 s"), (1.5, 5.1, "Run /usr/sbin/vfiotest-kata-init as init process")]


def test_runtime_gaps_are_the_longest_silences_of_one_command(bench):
    gaps = bench.runtime_gaps(LOG, CID, "create", n=2)
    assert [(g[0], g[1]) for g in gaps] == [(pytest.approx(12.75), pytest.approx(13.25)),
                                           (pytest.approx(8.75), pytest.approx(22.0))]
    assert gaps[0][2] == "VM started"
    assert bench.runtime_gaps(LOG, CID, "delete") == []
