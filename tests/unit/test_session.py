"""The session object (vfiotest.session) on a simulated sysfs: its states, undo records
replayed newest first, the session journal, and the host state guard's verdict."""

import os

import pytest

from vfiotest import journal
from vfiotest.bind import DeviceManager
from vfiotest.errors import HarnessError, JournalError
from vfiotest.journal import Journal
from vfiotest.pci import read_inventory
from vfiotest.session import BASELINED, NEW, REACHED, Session, orphaned_sessions
from vfiotest.sriov import set_numvfs
from vfiotest.testing.simsysfs import SimulatedHost
from vfiotest.undo_files import file_entry

VF = "0000:10:10.0"
PF = "0000:10:00.0"


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}])


@pytest.fixture
def sess(sim, tmp_path):
    return Session("t1", f"sim:{sim.sysroot}", str(tmp_path / "sessions" / "t1"))


@pytest.fixture
def undo_log():
    log = []
    journal.register_kind("test-undo", ("n",), lambda host, entry: log.append(entry["n"]))
    yield log
    journal._KINDS.pop("test-undo", None)


def test_a_session_that_never_started_leaves_nothing(sess, tmp_path):
    assert sess.state == NEW
    v = sess.finish(say=lambda s: None)
    assert v.ok and not v.reached
    assert not (tmp_path / "sessions").exists()


def test_states_and_a_clean_finish(sim, sess):
    lines = []
    host = sess.open_host()
    assert sess.state in (NEW, REACHED)
    inv = sess.baseline(host)
    assert inv is not None and VF in inv.devices
    assert sess.state == BASELINED
    assert sess.baseline(host) is None, "the baseline is taken once per session"
    v = sess.finish(say=lines.append)
    assert v.ok and v.reached and v.diff == []
    assert any("left as found" in line for line in lines), lines
    assert not os.path.exists(sess.dir)


def test_undo_records_are_replayed_newest_first(sim, sess, undo_log):
    sess.baseline(sess.open_host())
    for n in (1, 2, 3):
        sess.record({"kind": "test-undo", "n": n})
    assert sess.recorded("test-undo") == {"kind": "test-undo", "n": 1}
    v = sess.finish(say=lambda s: None)
    assert v.ok
    assert undo_log == [3, 2, 1]


def test_a_record_nobody_can_undo_is_refused_before_the_change(sess, undo_log):
    with pytest.raises(JournalError) as e:
        sess.record({"kind": "no-such-kind"})
    assert e.value.kind == "no-such-kind"
    with pytest.raises(HarnessError, match="lacks n"):
        sess.record({"kind": "test-undo"})
    assert sess.recorded("test-undo") is None


def test_a_file_the_session_wrote_is_put_back(sim, sess):
    """The journal's "file" kind as a session record: a file that did not exist is removed,
    one that did gets its content and mode back."""
    host = sess.open_host()
    sess.baseline(host)
    path = "/etc/containers/containers.conf.d/zz-test.conf"
    sess.record(file_entry(host, path))
    host.write_atomic(path, "written by the session\n", mode=0o644)
    assert host.exists(path)
    assert sess.finish(say=lambda s: None).ok
    assert not host.exists(path)


def test_the_session_journal_puts_vf_counts_back(sim, sess):
    host = sess.open_host()
    sess.baseline(host)
    before = read_inventory(host).devices[PF].sriov.numvfs
    j = Journal.open(host, owner=sess.journal_owner)
    set_numvfs(host, PF, before + 2, journal=j)
    j.close()
    assert read_inventory(host).devices[PF].sriov.numvfs == before + 2
    v = sess.finish(say=lambda s: None)
    assert v.ok, v
    assert read_inventory(host).devices[PF].sriov.numvfs == before


def test_the_guard_reports_a_leak_and_fails(sim, sess):
    host = sess.open_host()
    sess.baseline(host)
    # a change nobody journaled: the guard sees it, cannot put it back, and says so
    DeviceManager(host, "emulated", None).bind_device(VF)
    lines = []
    v = sess.finish(say=lines.append)
    assert not v.ok
    assert any(VF in d and "driver" in d for d in v.diff), v.diff
    assert v.still_different, "nothing journaled it, so nothing could restore it"
    assert any("differs from how the session found it" in line for line in lines)


def test_a_crashed_session_is_undone_by_the_next_one(sim, tmp_path):
    """The controlling process holds a liveness lock; when it is gone (a crash, kill -9), the
    next session's baseline undoes what the crashed one recorded; a live one is left alone."""
    root = tmp_path / "sessions"
    spec = f"sim:{sim.sysroot}"
    crashed = Session("dead", spec, str(root / "dead"))
    crashed.hold()
    host = crashed.open_host()
    crashed.baseline(host)
    path = "/etc/containers/containers.conf.d/zz-crashed.conf"
    crashed.record(file_entry(host, path))
    host.write_atomic(path, "left by a crashed session\n", mode=0o644)
    live = Session("live", spec, str(root / "live"))
    live.hold()
    live.path("marker")
    other_target = Session("elsewhere", "sim:/nonexistent", str(root / "elsewhere"))
    other_target.path("marker")
    with open(other_target.path("baseline-inventory.json"), "w") as f:
        f.write('{"target": "sim:/nonexistent", "inventory": {}}')

    # the crash: its process lets go of the lock without finishing
    os.close(crashed._alive_fd)
    crashed._alive_fd = None

    assert [s.id for s in orphaned_sessions(str(root), spec)] == ["dead"]
    nxt = Session("next", spec, str(root / "next"))
    nxt.hold()
    lines = []
    nxt.baseline(nxt.open_host(), progress=lines.append)
    assert not host.exists(path), "the crashed session's file was not put back"
    assert any("crashed session dead" in line for line in lines), lines
    assert not (root / "dead").exists() and not (root / "dead.alive").exists()
    assert (root / "live").exists() and (root / "elsewhere").exists(), "a live session or another target's was touched"
    assert nxt.finish(say=lambda s: None).ok and live.finish(say=lambda s: None).ok
    assert not (root / "live.alive").exists() and not (root / "next.alive").exists()


def test_one_session_id_one_live_holder(sim, tmp_path):
    a = Session("same", f"sim:{sim.sysroot}", str(tmp_path / "s" / "same"))
    a.hold()
    b = Session("same", f"sim:{sim.sysroot}", str(tmp_path / "s" / "same"))
    with pytest.raises(HarnessError, match="held by another live process"):
        b.hold()
    a.finish(say=lambda s: None)
    assert not (tmp_path / "s").exists(), "an empty sessions directory is left behind"


def test_two_sessions_on_one_target_each_guards_its_own(tmp_path):
    """Session B starts while session A has made VFs (A's live journal records the count) and
    A finishes first: B's guard does not take A's VF count for B's leak, but still fails B
    for what B itself left behind."""
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}, {"preset": "nvme", "numvfs": 0}])
    spec, root = f"sim:{sim.sysroot}", tmp_path / "sessions"
    a = Session("a", spec, str(root / "a"))
    a.hold()
    host = a.open_host()
    a.baseline(host)
    ja = Journal.open(host, owner=a.journal_owner)
    set_numvfs(host, PF, 4, journal=ja)           # A's VFs, journaled by A (live)
    b = Session("b", spec, str(root / "b"))
    b.hold()
    b.baseline(b.open_host())                      # B's baseline has A's 4 VFs
    ja.close()
    assert a.finish(say=lambda s: None).ok         # A puts its count back: 2 VFs
    assert read_inventory(host).devices[PF].sriov.numvfs == 2
    lines = []
    v = b.finish(say=lines.append)
    assert v.ok, v.diff
    assert any("numvfs was 4, now 2" in o for o in v.others), v.others
    assert any("other live sessions hold" in line for line in lines), lines

    # the same, with B leaving something of its own behind: that still fails B
    a2 = Session("a2", spec, str(root / "a2"))
    a2.hold()
    a2.baseline(host)
    ja = Journal.open(host, owner=a2.journal_owner)
    set_numvfs(host, PF, 4, journal=ja)
    b2 = Session("b2", spec, str(root / "b2"))
    b2.hold()
    b2.baseline(host)
    ja.close()
    assert a2.finish(say=lambda s: None).ok
    nvme = next(d.address for d in read_inventory(host).devices.values() if d.vendor_device == "1b36:0010" and d.is_pf)
    set_numvfs(host, nvme, 1)                      # B's own change, not journaled
    v = b2.finish(say=lambda s: None)
    assert not v.ok and any(nvme in d and "numvfs" in d for d in v.diff), v.diff
    assert all(nvme not in o for o in v.others)


def test_the_session_journal_stays_live_after_its_worker_ends(tmp_path):
    """The xdist worker that made the session's VFs ends before its session does: another
    session's baseline must not take the session journal for an orphan and put the count back
    under the first session's feet; once the first session's controller is gone, it is one."""
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}])
    spec, root = f"sim:{sim.sysroot}", tmp_path / "sessions"
    a = Session("a", spec, str(root / "a"))
    a.hold()
    host = a.open_host()
    a.baseline(host)
    ja = Journal.open(host, owner=a.journal_owner, session=a.journal_meta)
    set_numvfs(host, PF, 4, journal=ja)
    ja.close()                                     # the worker ends; the session goes on
    assert a.journal_owner in journal.live_journals(host)
    b = Session("b", spec, str(root / "b"))
    b.hold()
    b.baseline(b.open_host())
    assert read_inventory(host).devices[PF].sriov.numvfs == 4, "B put back the VFs of a live session"
    assert b.finish(say=lambda s: None).ok
    a._let_go()                                    # A's controller is killed
    assert a.journal_owner not in journal.live_journals(host)
    assert journal.restore_orphans(host) == [(a.journal_owner, 1)]
    assert read_inventory(host).devices[PF].sriov.numvfs == 2


@pytest.mark.parametrize("first", ["a", "b"])
def test_the_last_session_using_shared_vfs_puts_the_count_back(tmp_path, first):
    """A made the VFs, B uses them (and records A's original count, as the sriov layer does):
    whichever ends first leaves the count to the other, and the last one puts it back."""
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}])
    spec, root = f"sim:{sim.sysroot}", tmp_path / "sessions"
    s = {n: Session(n, spec, str(root / n)) for n in "ab"}
    host = s["a"].open_host()
    for n in "ab":
        s[n].hold()
        s[n].baseline(host)
    ja = Journal.open(host, owner=s["a"].journal_owner, session=s["a"].journal_meta)
    set_numvfs(host, PF, 4, journal=ja)
    ja.close()
    from vfiotest.session import shared_counts
    shared = shared_counts(host, s["b"].journal_owner)
    assert shared[PF][0] == s["a"].journal_owner and shared[PF][1]["numvfs"] == 2
    jb = Journal.open(host, owner=s["b"].journal_owner, session=s["b"].journal_meta)
    jb.record(shared[PF][1])
    assert set_numvfs(host, PF, 4, journal=jb)     # already there: no change
    jb.close()
    last = "b" if first == "a" else "a"
    lines = []
    assert s[first].finish(say=lines.append).ok
    assert read_inventory(host).devices[PF].sriov.numvfs == 4, "the first to end took the other's VFs away"
    assert any("left" in line and s[last].journal_owner in line for line in lines), lines
    v = s[last].finish(say=lambda x: None)
    assert v.ok, (v.diff, v.error)
    assert read_inventory(host).devices[PF].sriov.numvfs == 2


def test_the_vfio_node_of_a_vf_another_session_made_is_theirs(tmp_path):
    """Another live session made VFs (its journal holds the count) and has one of them on
    vfio-pci when this session's guard looks: the VF appearing and its group's /dev/vfio node
    are both theirs (seen in CI: the node alone failed the other session's guard)."""
    from vfiotest.session import split_others

    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 0}])
    a = Session("a", f"sim:{sim.sysroot}", str(tmp_path / "a"))
    host = a.open_host()
    base = read_inventory(host)
    set_numvfs(host, PF, 2)
    now = read_inventory(host)
    vf = next(iter(now.devices[PF].virtfns.values()))
    group = now.devices[vf].iommu_group
    diff = base.diff(now) + [f"/dev/vfio/{group}: was absent, now char"]
    mine, theirs = split_others(diff, base, now, {"counts": [PF], "devices": []})
    assert mine == [], mine
    assert f"/dev/vfio/{group}: was absent, now char" in theirs
    # without the other session's claim, all of it is this session's
    mine, theirs = split_others(diff, base, now, {"counts": [], "devices": []})
    assert theirs == [] and f"/dev/vfio/{group}: was absent, now char" in mine


def test_rebaseline_makes_the_host_now_the_baseline(sim, sess):
    """After a reboot the session made (--allow-reboot), the new boot is what the session's
    end is compared with: a VF count the boot changed is not a leak."""
    host = sess.open_host()
    sess.baseline(host)
    before = read_inventory(host).devices[PF].sriov.numvfs
    set_numvfs(host, PF, 0)                        # as a new boot can find it
    inv = sess.rebaseline(host)
    assert inv.devices[PF].sriov.numvfs == 0
    assert sess.baseline_inventory().devices[PF].sriov.numvfs == 0
    assert sess.baseline(host) is None, "still one baseline per session"
    v = sess.finish(say=lambda s: None)
    assert v.ok and v.diff == [], v
    assert read_inventory(host).devices[PF].sriov.numvfs == 0 != before


def test_what_another_session_leases_is_its_own_unless_the_group_number_moved_on(sim, sess):
    """The guard leaves out devices another live session leases; a lease on a group number that
    was taken for devices no longer in that group (the number was freed and given to a new
    group) holds nothing, so this session's guard still checks that group's devices."""
    from vfiotest.lease import LeasePool

    host = sess.open_host()
    inv = read_inventory(host)
    group = inv.devices[VF].iommu_group
    pool = LeasePool(host, session="another")
    with pool.acquire(group, test_id="t::theirs", devices=[VF]):
        assert VF in sess.others_claims(host, inv)["devices"]
    with pool.acquire(group, test_id="t::stale", devices=["0000:99:00.1"]):
        assert VF not in sess.others_claims(host, inv)["devices"]
    with pool.acquire(group, test_id="t::unnamed"):
        assert VF in sess.others_claims(host, inv)["devices"]


def _restore_cli(state_dir, spec):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env.update(VFIOTEST_STATE_DIR=str(state_dir))
    return subprocess.run([sys.executable, "-m", "vfiotest", "restore", "--target", spec, "--profile", "emulated"],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_session_that_cannot_reach_its_target_at_finish_keeps_its_records_for_restore(sim, tmp_path):
    """The target is cut before finish(): the drop-in the session wrote cannot be removed, so its
    record stays (and says so); `vfiotest restore` on that target removes the drop-in later."""
    state = tmp_path / "state"
    spec = f"sim:{sim.sysroot}"
    sess = Session("cut", spec, str(state / "sessions" / "cut"))
    sess.hold()
    host = sess.open_host()
    sess.baseline(host)
    path = "/etc/containers/containers.conf.d/zz-kata-vfio.conf"
    sess.record(file_entry(host, path))
    host.write_atomic(path, "[engine.runtimes]\nkata-vfio = ['/x']\n", mode=0o644)
    os.rename(sim.sysroot, sim.sysroot + ".cut")          # the target is unreachable now
    lines = []
    v = sess.finish(say=lines.append)
    os.rename(sim.sysroot + ".cut", sim.sysroot)          # and back
    assert not v.ok and "cannot reach the target" in (v.error or ""), v
    assert v.kept == ["000-file.json"], v
    assert any("kept 1 undo record(s)" in line and "vfiotest restore" in line for line in lines), lines
    assert host.exists(path), "nothing could have removed it"
    assert (state / "sessions" / "cut" / "undo" / "000-file.json").exists()
    assert [s.id for s in orphaned_sessions(str(state / "sessions"), spec)] == ["cut"], "it must read as crashed"
    res = _restore_cli(state, spec)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "crashed session cut: 1 recorded change(s) undone" in res.stdout, res.stdout
    assert not host.exists(path), "restore did not remove the drop-in"
    assert not (state / "sessions" / "cut").exists()


def test_an_undo_that_fails_keeps_its_record_and_the_others_are_undone(sim, sess, undo_log):
    journal.register_kind("test-broken-undo", ("n",), _raise_harness)
    try:
        sess.hold()
        sess.baseline(sess.open_host())
        sess.record({"kind": "test-undo", "n": 1})
        sess.record({"kind": "test-broken-undo", "n": 2})
        sess.record({"kind": "test-undo", "n": 3})
        v = sess.finish(say=lambda s: None)
        assert undo_log == [3, 1], "every record that can be undone is"
        assert v.kept == ["001-test-broken-undo.json"] and not v.ok, v
        assert "could not undo test-broken-undo" in (v.error or "")
        assert os.path.isdir(sess.dir) and os.path.exists(sess.alive_path)
    finally:
        journal._KINDS.pop("test-broken-undo", None)


def _raise_harness(host, entry):
    raise HarnessError(f"the undo of record {entry['n']} failed on purpose")


def test_a_crashed_sessions_failed_undo_does_not_stop_the_pci_replay(sim, tmp_path, undo_log):
    """The next session finds a crashed one whose record cannot be undone and whose journal
    changed a VF count: the count is put back all the same, the record is kept, and the next
    baseline is taken over the host as found."""
    journal.register_kind("test-broken-undo", ("n",), _raise_harness)
    try:
        root = tmp_path / "sessions"
        spec = f"sim:{sim.sysroot}"
        crashed = Session("dead", spec, str(root / "dead"))
        crashed.hold()
        host = crashed.open_host()
        before = crashed.baseline(host).devices[PF].sriov.numvfs
        crashed.record({"kind": "test-broken-undo", "n": 1})
        crashed.record({"kind": "test-undo", "n": 2})
        j = Journal.open(host, owner=crashed.journal_owner, session=crashed.journal_meta)
        set_numvfs(host, PF, before + 2, journal=j)
        j.close()
        os.close(crashed._alive_fd)                       # the crash
        crashed._alive_fd = None
        nxt = Session("next", spec, str(root / "next"))
        nxt.hold()
        lines = []
        base = nxt.baseline(nxt.open_host(), progress=lines.append)
        assert read_inventory(host).devices[PF].sriov.numvfs == before, lines
        assert base is not None and base.devices[PF].sriov.numvfs == before
        assert undo_log == [2]
        assert any("could not undo" in line and "dead" in line for line in lines), lines
        assert (root / "dead" / "undo" / "000-test-broken-undo.json").exists(), "the failed record is kept"
        assert not (root / "dead" / "undo" / "001-test-undo.json").exists(), "an undone record is dropped"
        nxt.finish(say=lambda s: None)
    finally:
        journal._KINDS.pop("test-broken-undo", None)
def test_states_move_forward_only(sim, sess, undo_log):
    from vfiotest.errors import SessionStateError
    from vfiotest.session import FINISHED, TRANSITIONS, SessionState

    assert set(TRANSITIONS) == set(SessionState) and TRANSITIONS[FINISHED] == frozenset()
    with pytest.raises(SessionStateError) as e:
        sess.transition(BASELINED)           # a baseline before the target was reached
    assert e.value.reason == "new -> baselined" and sess.state == NEW
    host = sess.open_host()
    assert sess.state == REACHED
    sess.baseline(host)
    assert sess.state == BASELINED
    sess.open_host()                         # another process opening the host: still baselined
    assert sess.state == BASELINED
    with pytest.raises(SessionStateError):
        sess.transition(REACHED)             # never back
    assert sess.finish(say=lambda s: None).ok
    assert sess.state == FINISHED
    for step in (lambda: sess.open_host(), lambda: sess.rebaseline(host),
                 lambda: sess.record({"kind": "test-undo", "n": 1}),
                 lambda: sess.finish(say=lambda s: None)):
        with pytest.raises(SessionStateError, match="finished"):
            step()
    assert not os.path.exists(sess.dir), "a step refused after finish() leaves nothing behind"
