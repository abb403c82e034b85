"""The restore journal: written before changes, one per process, orphans replayed, bad ones refused."""

import json
import os
import subprocess
import sys

import pytest

from vfiotest import sriov
from vfiotest.bind import DeviceManager
from vfiotest.errors import JournalError
from vfiotest.journal import Journal, orphaned_journals, restore_orphans
from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

ROOT = "/var/lib/vfiotest/journal"
VF = "0000:10:10.0"


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}])


def jfile(sim, owner):
    return f"{sim.sysroot}{ROOT}/{owner}.json"


def test_written_before_the_change(sim):
    seen = []
    real = sim.write_text

    def spy(path, data, timeout=30):
        if path.endswith("driver_override"):
            seen.append(json.load(open(jfile(sim, "a")))["entries"])
        return real(path, data, timeout)

    sim.write_text = spy
    with Journal.open(sim, "a") as j:
        DeviceManager(sim, "emulated", j).bind_device(VF)
        assert seen[0] == [{"kind": "driver", "address": VF, "driver": "igbvf", "driver_override": None}]
        doc = json.load(open(jfile(sim, "a")))
        assert doc["identity"]["hostname"] == "simhost" and doc["identity"]["machine_id"]
    # closed with entries: it stays, as an orphan
    assert os.path.exists(jfile(sim, "a"))


def test_empty_journal_leaves_no_file(sim):
    with Journal.open(sim, "b") as j:
        DeviceManager(sim, "emulated", j).bind_device(VF)
        j.restore_all()
    assert not os.path.exists(jfile(sim, "b"))


def test_one_journal_per_process_and_live_ones_are_not_replayed(sim):
    j = Journal.open(sim, "live")
    DeviceManager(sim, "emulated", j).bind_device(VF)
    with pytest.raises(JournalError, match="held by another running process"):
        Journal.open(sim, "live")
    assert restore_orphans(sim) == []  # the live journal is not touched
    assert read_inventory(sim).devices[VF].driver == "vfio-pci"
    j.close()
    assert restore_orphans(sim) == [("live", 1)]
    assert read_inventory(sim).devices[VF].driver == "igbvf"


def test_orphan_of_a_dead_process_is_replayed_in_reverse(sim, tmp_path):
    first = read_inventory(sim)
    script = (f"from vfiotest.testing.simsysfs import SimulatedHost; from vfiotest.journal import Journal;"
              f"from vfiotest.bind import DeviceManager; from vfiotest import sriov;"
              f"h = SimulatedHost.open({sim.sysroot!r}); j = Journal.open(h);"
              f"sriov.set_numvfs(h, '0000:10:00.0', 4, j); DeviceManager(h, 'emulated', j).bind_device('0000:10:10.3');"
              f"import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert first.diff(read_inventory(sim))
    (owner, n), = restore_orphans(sim)
    assert n == 2
    assert first.diff(read_inventory(sim)) == []
    assert orphaned_journals(sim) == []


def test_kept_journal_only_replayed_on_request(sim):
    with Journal.open(sim, "cli", keep=True) as j:
        DeviceManager(sim, "emulated", j).bind_device(VF)
    assert restore_orphans(sim) == []
    assert restore_orphans(sim, include_kept=True) == [("cli", 1)]


def test_first_original_wins(sim):
    with Journal.open(sim, "c") as j:
        DeviceManager(sim, "emulated", j).bind_device(VF)
        j.record({"kind": "driver", "address": VF, "driver": "vfio-pci", "driver_override": "vfio-pci"})
        assert j.entries()[0]["driver"] == "igbvf"
        j.restore_all()


@pytest.mark.parametrize("text, why", [
    ("{not json", "not JSON"),
    ('{"version": 9, "identity": {}, "entries": []}', "version"),
    ('{"version": 1, "identity": {}, "entries": [{"kind": "driver"}]}', "bad entry"),
    ('[]', "version"),
])
def test_corrupt_journal_refused_with_recovery(sim, text, why):
    os.makedirs(f"{sim.sysroot}{ROOT}", exist_ok=True)
    open(jfile(sim, "bad"), "w").write(text)
    with pytest.raises(JournalError, match=why) as e:
        restore_orphans(sim)
    assert "corrupt" in e.value.message and f"mv {ROOT}/bad.json" in e.value.hint
    assert os.path.exists(jfile(sim, "bad"))  # refused: nothing deleted


def test_corrupt_journal_does_not_block_the_others(sim):
    with Journal.open(sim, "good") as j:
        DeviceManager(sim, "emulated", j).bind_device(VF)
    open(jfile(sim, "bad"), "w").write("garbage")
    with pytest.raises(JournalError, match="corrupt"):
        restore_orphans(sim)
    assert read_inventory(sim).devices[VF].driver == "igbvf"


def test_journal_from_another_host_refused(sim):
    with Journal.open(sim, "x") as j:
        DeviceManager(sim, "emulated", j).bind_device(VF)
    doc = json.load(open(jfile(sim, "x")))
    doc["identity"]["machine_id"] = "0" * 32
    doc["identity"]["hostname"] = "elsewhere"
    open(jfile(sim, "x"), "w").write(json.dumps(doc))
    with pytest.raises(JournalError, match="written on elsewhere") as e:
        restore_orphans(sim)
    assert "on the host that wrote it" in e.value.hint and ".other-host" in e.value.hint
    assert read_inventory(sim).devices[VF].driver == "vfio-pci"  # nothing was changed


# -- the registry of entry kinds ------------------------------------------------------------------
def test_journal_imports_no_kind_owner_at_load():
    code = ("import sys; import vfiotest.journal;"
            "bad = [m for m in ('vfiotest.bind', 'vfiotest.sriov', 'vfiotest.lease', 'vfiotest.undo_files') if m in sys.modules];"
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "..", "lib")})
    assert res.returncode == 0, res.stderr


def test_owning_modules_register_their_kinds():
    from vfiotest import bind, journal, undo_files

    kinds = journal.registered_kinds()
    assert {"driver", "new_id", "numvfs", "file"} <= set(kinds)
    assert kinds["driver"].undo is bind.undo_driver and kinds["numvfs"].undo is sriov.restore_numvfs
    assert kinds["file"].undo is undo_files.undo_file
    assert journal.entry_key({"kind": "new_id", "driver": "vfio-pci", "id": "8086:10ca"}) == \
        ("new_id", "8086:10ca", "vfio-pci")


def test_unknown_kind_in_a_journal_is_refused_naming_kind_and_file(sim):
    os.makedirs(f"{sim.sysroot}{ROOT}", exist_ok=True)
    with Journal.open(sim, "new") as j:
        DeviceManager(sim, "emulated", j).bind_device(VF)
    doc = json.load(open(jfile(sim, "new")))
    doc["entries"].append({"kind": "teleport", "address": VF})
    open(jfile(sim, "new"), "w").write(json.dumps(doc))
    with pytest.raises(JournalError, match=f"{ROOT}/new.json.*unknown kind 'teleport'") as e:
        restore_orphans(sim)
    assert e.value.reason == JournalError.UNKNOWN_KIND and e.value.kind == "teleport"
    assert e.value.path == f"{ROOT}/new.json" and "mv " in e.value.hint
    assert read_inventory(sim).devices[VF].driver == "vfio-pci"  # nothing undone from a journal we cannot read
    assert os.path.exists(jfile(sim, "new"))


def test_unknown_kind_cannot_be_recorded(sim):
    from vfiotest.journal import MemoryJournal

    with Journal.open(sim, "rec") as j:
        with pytest.raises(JournalError, match="unknown kind 'teleport'") as e:
            j.record({"kind": "teleport", "address": VF})
        assert e.value.reason == JournalError.UNKNOWN_KIND and j.entries() == []
    with pytest.raises(JournalError, match="unknown kind 'teleport'"):
        MemoryJournal().record({"kind": "teleport"})


def test_a_registered_kind_is_replayed(sim):
    from vfiotest import journal

    undone = []
    journal.register_kind("test-note", ("note",), lambda host, e: undone.append(e["note"]))
    try:
        with Journal.open(sim, "notes") as j:
            j.record({"kind": "test-note", "note": "a"})
            j.record({"kind": "test-note", "note": "b"})
            j.record({"kind": "test-note", "note": "a"})  # same thing: kept once
        assert restore_orphans(sim) == [("notes", 2)]
        assert undone == ["b", "a"]
    finally:
        journal._KINDS.pop("test-note")


def test_held_journal_error_has_fields(sim):
    with Journal.open(sim, "busy"):
        with pytest.raises(JournalError) as e:
            Journal.open(sim, "busy")
    assert e.value.reason == JournalError.HELD and e.value.path == f"{ROOT}/busy.json"


# -- the "file" kind --------------------------------------------------------------------------------
def test_file_kind_puts_back_content_and_mode(sim):
    from vfiotest.undo_files import write_file

    path = "/etc/vfiotest-test/app.conf"
    os.makedirs(f"{sim.sysroot}/etc/vfiotest-test")
    open(sim.sysroot + path, "w").write("original = 1\nünïcode\n")
    os.chmod(sim.sysroot + path, 0o640)
    with Journal.open(sim, "files") as j:
        write_file(sim, j, path, "changed = 2\n", mode=0o600)
        write_file(sim, j, path, "changed = 3\n")           # the first original wins
        write_file(sim, j, "/etc/vfiotest-test/new.conf", "x\n")
        assert open(sim.sysroot + path).read() == "changed = 3\n"
        assert [e["kind"] for e in j.entries()] == ["file", "file"]
        assert j.entries()[0] == {"kind": "file", "path": path, "existed": True,
                                  "content": "original = 1\nünïcode\n", "mode": 0o640}
        assert j.entries()[1] == {"kind": "file", "path": "/etc/vfiotest-test/new.conf", "existed": False}
    assert restore_orphans(sim) == [("files", 2)]
    assert open(sim.sysroot + path).read() == "original = 1\nünïcode\n"
    assert os.stat(sim.sysroot + path).st_mode & 0o777 == 0o640
    assert not os.path.exists(sim.sysroot + "/etc/vfiotest-test/new.conf")


def test_file_that_cannot_be_recorded_is_not_changed(sim):
    from vfiotest.errors import HarnessError
    from vfiotest.undo_files import write_file

    os.makedirs(f"{sim.sysroot}/etc/vfiotest-test")
    open(sim.sysroot + "/etc/vfiotest-test/blob", "wb").write(b"\xff\xfe\x00")
    with Journal.open(sim, "blob") as j:
        with pytest.raises(HarnessError, match="not UTF-8") as e:
            write_file(sim, j, "/etc/vfiotest-test/blob", "text")
        assert e.value.path == "/etc/vfiotest-test/blob" and j.entries() == []
    assert open(sim.sysroot + "/etc/vfiotest-test/blob", "rb").read() == b"\xff\xfe\x00"


def test_orphans_of_two_processes_are_undone_in_an_order_that_works(sim):
    """A killed session leaves its VF count in one journal (the session's) and a VF on
    vfio-pci in another (a worker's): the count can only go back once the VF is off vfio-pci,
    whichever journal is read first. Lock files of journals that never got an entry go too."""
    first = read_inventory(sim)
    pf = "0000:10:00.0"
    s = Journal.open(sim, "session-x")           # read first by name order: the count
    vfs = sriov.set_numvfs(sim, pf, 3, journal=s)
    w = Journal.open(sim, "worker-y")
    DeviceManager(sim, "emulated", w).bind_device(vfs[0])
    s.release()
    w.release()                                   # both processes killed
    empty = Journal.open(sim, "never-wrote")      # killed between its lock and its first change
    empty.release()
    assert os.path.exists(f"{sim.sysroot}{ROOT}/never-wrote.lock")
    done = restore_orphans(sim)
    assert sorted(done) == [("session-x", 1), ("worker-y", 1)], done
    assert read_inventory(sim).diff(first) == []
    assert sorted(os.listdir(f"{sim.sysroot}{ROOT}")) == [], os.listdir(f"{sim.sysroot}{ROOT}")


def test_journal_and_its_directory_are_not_open_to_others_whatever_the_umask(tmp_path):
    """Root replays journals: a journal directory others could write to would let them
    plant one. Under umask 0 the journal stays 0600 and its directory 0755."""
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}])
    old = os.umask(0)
    try:
        with Journal.open(sim, "m") as j:
            DeviceManager(sim, "emulated", j).bind_device(VF)
            st_j = os.stat(jfile(sim, "m"))
            st_d = os.stat(os.path.dirname(jfile(sim, "m")))
            st_l = os.stat(f"{sim.sysroot}{ROOT}/m.lock")
            j.restore_all()
    finally:
        os.umask(old)
    assert st_j.st_mode & 0o777 == 0o600
    assert st_d.st_mode & 0o777 == 0o755
    assert st_l.st_mode & 0o077 == 0
