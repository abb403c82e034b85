"""kill -9 at every mutating step, then restore: the simulated host is back to its first state.

A real child process binds devices / creates VFs against a simulated sysroot, with
its host's write_text and write_atomic wrapped (in the child script, not in the
library) so that it SIGKILLs itself right before or right after its k-th
mutating write. The parent then runs what `vfiotest restore` runs
(journal.restore_orphans) and compares the inventory with the first one.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vfiotest.journal import restore_orphans
from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

CHILD = textwrap.dedent(r"""
    import os, signal, sys
    from vfiotest.testing.simsysfs import SimulatedHost
    from vfiotest.journal import Journal
    from vfiotest.bind import DeviceManager
    from vfiotest import sriov

    root, k, when, scenario = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    host = SimulatedHost.open(root)
    count = 0

    def killing(fn):
        def wrapper(*a, **kw):
            global count
            count += 1
            if count == k and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = fn(*a, **kw)
            if count == k and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    host.write_text = killing(host.write_text)
    host.write_atomic = killing(host.write_atomic)
    journal = Journal.open(host, owner="child")
    dm = DeviceManager(host, "emulated", journal)
    if scenario == "bind":
        dm.bind_device("0000:10:10.0")
    elif scenario == "bind-new-id":
        dm.bind_device("0000:10:10.1")
    elif scenario == "group":
        dm.bind_group("0000:00:05.0")
    elif scenario == "numvfs":
        sriov.set_numvfs(host, "0000:10:00.0", 4, journal)   # N -> M: 0 first
        sriov.set_numvfs(host, "0000:20:00.0", 3, journal)   # 0 -> M
        dm.bind_device(sriov.set_numvfs(host, "0000:20:00.0", 3, journal)[1])
    print("WRITES", count)
""")

GROUPED = [
    {"id": "1b36:0001", "class": "0x060400", "address": "0000:00:04.0", "group": "g"},  # a bridge: left alone
    {"id": "1b36:0010", "class": "0x010802", "address": "0000:00:05.0", "group": "g"},
    {"id": "1b36:0010", "class": "0x010802", "address": "0000:00:06.0", "group": "g"},
]


def build(path, scenario):
    others = ["host-bridge", "virtio-net", "virtio-blk"] + (GROUPED if scenario == "group" else [])
    pfs = [{"preset": "igb", "numvfs": 2}, {"preset": "nvme"}]
    return SimulatedHost.build(str(path), pfs=pfs, others=others, driver_override=scenario != "bind-new-id")


def run_child(script, root, k, when, scenario):
    return subprocess.run([sys.executable, str(script), str(root), str(k), when, scenario],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("scenario", ["bind", "bind-new-id", "group", "numvfs"])
def test_kill_at_every_step_then_restore(tmp_path, scenario):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # a full run, to count the mutating writes (and to check the scenario changes something)
    host = build(tmp_path / "dry", scenario)
    first = read_inventory(host)
    done = run_child(script, host.sysroot, 0, "never", scenario)
    assert done.returncode == 0, done.stderr
    writes = int(done.stdout.split()[-1])
    assert writes >= 3
    assert first.diff(read_inventory(host)), "the scenario changed nothing"
    restore_orphans(host)
    assert first.diff(read_inventory(host)) == []

    for k in range(1, writes + 1):
        for when in ("before", "after"):
            host = build(tmp_path / f"k{k}{when}", scenario)
            first = read_inventory(host)
            res = run_child(script, host.sysroot, k, when, scenario)
            assert res.returncode == -signal.SIGKILL, (k, when, res.stdout, res.stderr)
            restored = restore_orphans(host)
            assert first.diff(read_inventory(host)) == [], (k, when, restored)
            assert first.state() == read_inventory(host).state()
            # nothing left to replay
            assert not [n for n in os.listdir(host.sysroot + "/var/lib/vfiotest/journal") if n.endswith(".json")] \
                if os.path.isdir(host.sysroot + "/var/lib/vfiotest/journal") else True


FILE_CHILD = textwrap.dedent(r"""
    import os, signal, sys
    from vfiotest.testing.simsysfs import SimulatedHost
    from vfiotest.journal import Journal
    from vfiotest.undo_files import write_file

    root, k, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    host = SimulatedHost.open(root)
    count = 0
    real = host.write_atomic

    def killing(*a, **kw):
        global count
        count += 1
        if count == k and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(*a, **kw)
        if count == k and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    host.write_atomic = killing
    journal = Journal.open(host, owner="child")
    write_file(host, journal, "/etc/vfiotest-kill/a.conf", "changed\n", mode=0o600)
    write_file(host, journal, "/etc/vfiotest-kill/b.conf", "new\n")
    write_file(host, journal, "/etc/vfiotest-kill/a.conf", "changed again\n")
    print("WRITES", count)
""")


def _files(root):
    d = root + "/etc/vfiotest-kill"
    return {n: (open(f"{d}/{n}").read(), os.stat(f"{d}/{n}").st_mode & 0o777) for n in sorted(os.listdir(d))}


def test_kill_at_every_file_write_then_restore(tmp_path):
    script = tmp_path / "file_child.py"
    script.write_text(FILE_CHILD)

    def fresh(name):
        host = build(tmp_path / name, "bind")
        os.makedirs(host.sysroot + "/etc/vfiotest-kill")
        open(host.sysroot + "/etc/vfiotest-kill/a.conf", "w").write("original\n")
        os.chmod(host.sysroot + "/etc/vfiotest-kill/a.conf", 0o644)
        return host

    host = fresh("dry")
    first = _files(host.sysroot)
    done = subprocess.run([sys.executable, str(script), host.sysroot, "0", "never"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    writes = int(done.stdout.split()[-1])
    assert writes >= 5 and _files(host.sysroot) != first
    restore_orphans(host)
    assert _files(host.sysroot) == first
    for k in range(1, writes + 1):
        for when in ("before", "after"):
            host = fresh(f"f{k}{when}")
            res = subprocess.run([sys.executable, str(script), host.sysroot, str(k), when], capture_output=True,
                                 text=True, timeout=60)
            assert res.returncode == -signal.SIGKILL, (k, when, res.stdout, res.stderr)
            restore_orphans(host)
            assert _files(host.sysroot) == first, (k, when)
