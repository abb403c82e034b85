"""A suite that changes the target behind the harness's back (no journal, no restore).
Not collected on its own (no test_ prefix): test_state_guard.py runs it to show that the
host state guard fails such a session."""

from vfiotest.sriov import set_numvfs


def test_leaves_a_vf_behind(target_host, runner):
    pf = runner.pfs()["nvme"]
    set_numvfs(target_host, pf, 1)  # no journal: only the guard can notice
