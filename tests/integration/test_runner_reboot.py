"""The emulated runner boots like a bare-metal one: its kernel command line comes from its GRUB
defaults, kept across reboots; `reboot` inside it or `Runner.reboot()` boots it again with them.
A QEMU killed (not rebooted) stays down. One runner in a temporary state directory."""

import os
import signal
import time

import pytest
from _runner_env import no_process_refers_to

from vfiotest.errors import TargetError
from vfiotest.runner import Runner, bootcfg

pytestmark = [pytest.mark.vm, pytest.mark.duration(65)]


def _cmdline(r):
    h = r.host(register=False)
    try:
        return h.read_text("/proc/cmdline").split()
    finally:
        h.close()


def _no_process_left(r):
    assert r.qemu_pids() == [] and r.supervisor_pid() is None
    no_process_refers_to(r.state_dir)


def test_grub_defaults_reboots_and_a_killed_runner_stays_down(tmp_path):
    r = Runner(str(tmp_path / "runner"))
    try:
        # first boot: the file is made with the arguments the runner always had, minus what we asked
        r.up(without=["intel_iommu=on"], with_=[bootcfg.CGROUP_ARGS["v2"]])
        cmd = _cmdline(r)
        assert "intel_iommu=on" not in cmd and "systemd.unified_cgroup_hierarchy=1" in cmd, cmd
        assert bootcfg.linux_args(open(r.grub_path).read()) == ["systemd.unified_cgroup_hierarchy=1"]
        h = r.host(register=False)
        try:   # cgroup v2 alone, as systemd lays it out with =1
            assert h.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], timeout=30, check=True).stdout.strip() == "cgroup2fs"
            # the runner sees its GRUB defaults at /etc/default/grub, and edits reach the controller
            assert h.read_text("/etc/default/grub") == open(r.grub_path).read()
            h.run(["sed", "-i", "s/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX=\"intel_iommu=on "
                   "systemd.unified_cgroup_hierarchy=0\"/", "/etc/default/grub"], timeout=30, check=True)
        finally:
            h.close()
        assert bootcfg.linux_args(open(r.grub_path).read()) == ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"]
        with pytest.raises(TargetError, match="is up"):
            r.up(without=["intel_iommu=on"])     # refused while up: edit and reboot instead
        res = r.reboot()
        cmd = res["cmdline"].split()
        assert "intel_iommu=on" in cmd and "systemd.unified_cgroup_hierarchy=0" in cmd, cmd
        assert r.status()["boots"] == 2 and r.status()["ssh_ready"]

        # edited on the controller, then `reboot` typed inside the runner: the supervisor boots it again
        r.edit_boot_config(without=["intel_iommu=on"])
        old = r.qemu_pids()
        h = r.host(register=False)
        try:
            h.run(["sh", "-c", "(sleep 1; reboot) >/dev/null 2>&1 </dev/null &"], timeout=30, check=True)
        finally:
            h.close()
        deadline = time.monotonic() + r.boot_timeout
        while time.monotonic() < deadline and not (r.qemu_pids() and r.qemu_pids() != old and r.is_up()):
            time.sleep(1)
        assert r.is_up() and r.qemu_pids() != old
        assert "intel_iommu=on" not in _cmdline(r)
        assert r.status()["boots"] == 3

        # a QEMU killed (the campaign's SIGKILL) is not booted again: down until `up`
        for pid in r.qemu_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(5)
        assert r.qemu_pids() == [] and r.supervisor_pid() is None
        assert not r.status()["running"]
        r.up()
        assert "intel_iommu=on" not in _cmdline(r), "the boot configuration is kept across down/up"
    finally:
        r.down()
    _no_process_left(r)
