"""Every host_prereqs check fails when its subject is broken on the runner itself (a runner of its
own, temporary state directory), with the check's fix in the message. The kernel-argument, IOMMU
and cgroup checks are broken through the boot configuration in test_kernel_args.py; SELinux and
CAP_IPC_LOCK (which this runner cannot lack) on a simulated target in tests/unit/test_host_prereqs_sim.py.
Each break is undone after its run; the whole suite passing on an intact runner is shown by
test_kernel_args.py's --allow-reboot run."""

import os
import subprocess
import sys

import pytest
from _runner_env import runner_env

from vfiotest.runner import Runner

pytestmark = [pytest.mark.vm, pytest.mark.mutating, pytest.mark.timeout(1800),
              pytest.mark.xdist_group("host-prereqs-break"), pytest.mark.duration(90)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = "suites/host_prereqs/test_host_prereqs.py"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from runner_env(tmp_path_factory.mktemp("breaks") / "state")


def runner(env):
    return Runner(os.path.join(env["VFIOTEST_STATE_DIR"], "runner"))


def sh(env, script):
    h = runner(env).host(register=False)
    try:
        return h.run(["sh", "-c", script], timeout=120, check=True, what="breaking or mending the runner")
    finally:
        h.close()


def check(env, test):
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rf", f"{SUITE}::{test}"],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    return p.returncode, p.stdout


HIDE_VFIO = ('K=$(uname -r); modprobe -r vfio_pci vfio_iommu_type1 vfio; '
             'mount -t tmpfs -o size=1m,mode=0755 hidden /usr/lib/modules/$K')
MEND_VFIO = 'K=$(uname -r); umount /usr/lib/modules/$K; modprobe -a vfio vfio_pci vfio_iommu_type1'

BREAKS = [
    # (test, break, mend, what its failure says)
    ("test_vfio_modules_available", HIDE_VFIO, MEND_VFIO,
     "VFIO modules available: vfio absent, vfio_iommu_type1 absent, vfio_pci absent"),
    ("test_podman_present", "mount --bind /dev/null /usr/bin/podman", "umount /usr/bin/podman",
     "podman present: not installed"),
    ("test_kata_check_passes", "mv /dev/kvm /dev/kvm.hidden", "mv /dev/kvm.hidden /dev/kvm",
     "kata-check failed"),
]


@pytest.mark.parametrize("test,broken,mend,said", BREAKS, ids=[b[0] for b in BREAKS])
def test_a_broken_subject_fails_its_check(env, test, broken, mend, said):
    sh(env, broken)
    try:
        rc, out = check(env, test)
    finally:
        sh(env, mend)
    assert rc == 1 and f"FAILED {SUITE}::{test}" in out, out[-4000:]
    assert said in out, out[-4000:]


def test_interrupt_remapping_off_fails_and_allow_reboot_states_unsafe_interrupts(env):
    """intremap=off: the check fails naming the fix; the emulated profile allows unsafe interrupts,
    so --allow-reboot boots with vfio_iommu_type1.allow_unsafe_interrupts=1 and the check passes."""
    r = runner(env)
    r.edit_boot_config(with_=["intremap=off"])
    try:
        r.reboot()
        rc, out = check(env, "test_interrupt_remapping_or_unsafe_interrupts_stated")
        assert rc == 1 and "interrupt remapping: off" in out and "allow_unsafe_interrupts=1" in out, out[-4000:]
        grub = open(r.grub_path).read()
        p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--allow-reboot",
                            f"{SUITE}::test_interrupt_remapping_or_unsafe_interrupts_stated"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-4000:]
        cmd = sh(env, "cat /proc/cmdline; cat /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts").stdout
        assert "intremap=off" in cmd and "vfio_iommu_type1.allow_unsafe_interrupts=1" in cmd and cmd.split()[-1] == "Y", cmd
        assert open(r.grub_path).read() == grub, "the session's end puts the boot configuration back"
    finally:
        r.edit_boot_config(without=["intremap"])
