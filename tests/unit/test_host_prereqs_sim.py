"""host_prereqs checks whose subject cannot be broken on the emulated runner (it has no SELinux;
the harness's SSH session is root with every capability) fail on a simulated target where it is
broken, and pass where it is not: the suite itself is run, against `--target sim:DIR`."""

import os
import subprocess
import sys

import pytest

from vfiotest.testing.simsysfs import SimulatedHost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = "suites/host_prereqs/test_host_prereqs.py"
TESTS = ("test_selinux_permissive_or_absent", "test_harness_has_cap_ipc_lock_on_target")
STATUS = "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{eff}\n"


def run(tmp_path, selinux, cap_eff):
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=("igb",))
    if selinux is not None:
        os.makedirs(sim.sysroot + "/sys/fs/selinux")
        with open(sim.sysroot + "/sys/fs/selinux/enforce", "w") as f:
            f.write(selinux)
    os.makedirs(sim.sysroot + "/proc/self")
    with open(sim.sysroot + "/proc/self/status", "w") as f:
        f.write(STATUS.format(eff=cap_eff))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf",
                           "--target", f"sim:{sim.sysroot}", "--vfio-profile", "emulated",
                           *(f"{SUITE}::{t}" for t in TESTS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_broken_subjects_fail_the_checks(tmp_path):
    p = run(tmp_path, selinux="1", cap_eff="000001ffffffbfff")     # enforcing; bit 14 (CAP_IPC_LOCK) cleared
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    for t in TESTS:
        assert f"FAILED {SUITE}::{t}" in out, out[-3000:]
    assert "SELinux permissive or absent: enforcing" in out and "setenforce 0" in out, out[-3000:]
    assert "CAP_IPC_LOCK (bit 14) missing from CapEff 1ffffffbfff" in out, out[-3000:]


@pytest.mark.parametrize("selinux", [None, "0"])
def test_the_same_checks_pass_when_the_subject_is_fine(tmp_path, selinux):
    p = run(tmp_path, selinux=selinux, cap_eff="000001ffffffffff")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "3 passed" in p.stdout, p.stdout[-2000:]     # the two checks and the host state guard


def test_every_check_attaches_what_it_read(tmp_path):
    """Evidence for a qualification report (issue 19): each host_prereqs result carries what was
    read on the target (Allure attachments), whatever its verdict."""
    import glob
    import json

    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=("igb",))
    os.makedirs(sim.sysroot + "/proc/self")
    with open(sim.sysroot + "/proc/self/status", "w") as f:
        f.write(STATUS.format(eff="000001ffffffffff"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env.update(VFIOTEST_STATE_DIR=str(tmp_path / "state"))
    alluredir = tmp_path / "allure"
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", SUITE, "-k", "not kata_check",
                    "--target", f"sim:{sim.sysroot}", f"--alluredir={alluredir}"],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    results = [json.load(open(p)) for p in glob.glob(str(alluredir / "*-result.json"))]
    mine = [r for r in results if "host_prereqs" in r.get("fullName", "")]
    assert len(mine) == 8, [r.get("fullName") for r in results]
    bare = [r["name"] for r in mine if not r.get("attachments")]
    assert bare == [], f"results without evidence: {bare}"
