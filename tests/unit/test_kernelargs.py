"""--allow-reboot's bootloader edit on the emulated runner's GRUB defaults: recorded in the session
before the change, the change itself, and the undo a crashed session's restore does."""

import os

import pytest

from vfiotest import kernelargs
from vfiotest.errors import ProvisionError
from vfiotest.runner import bootcfg
from vfiotest.session import Session, restore_orphaned_sessions
from vfiotest.testing.simsysfs import SimulatedHost


@pytest.fixture
def sim(tmp_path):
    h = SimulatedHost.build(str(tmp_path / "sim"), pfs=("igb",))
    os.makedirs(h.sysroot + "/etc/default")
    with open(h.sysroot + "/etc/default/grub", "w") as f:
        f.write(bootcfg.edit(bootcfg.default_grub(), without=["intel_iommu=on"], with_=["systemd.unified_cgroup_hierarchy=1"]))
    os.chmod(h.sysroot + "/etc/default/grub", 0o644)
    return h


def test_emulated_edit_is_recorded_first_and_a_crashed_sessions_restore_puts_it_back(sim, tmp_path):
    before = open(sim.sysroot + "/etc/default/grub").read()
    root = str(tmp_path / "sessions")
    s = Session("s1", "virtual", os.path.join(root, "s1"))
    said = []
    done = kernelargs.apply(sim, ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"], recorder=s,
                            emulated=True, progress=said.append)
    assert "GRUB_CMDLINE_LINUX" in done and "emulated runner" in done
    after = open(sim.sysroot + "/etc/default/grub").read()
    # the same-name cgroup argument is replaced, the rest of the file kept; the runner can boot it
    assert bootcfg.linux_args(after) == ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"]
    assert bootcfg.grub_args(after) == ["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"]
    assert after.splitlines()[:-1] == before.splitlines()[:-1]
    assert os.stat(sim.sysroot + "/etc/default/grub").st_mode & 0o777 == 0o644
    assert [e for _n, e in s._records()] == [{"kind": "file", "path": "/etc/default/grub", "existed": True,
                                              "content": before, "mode": 0o644}]
    assert any("recorded /etc/default/grub" in line for line in said)
    # the session crashed (its liveness lock was never held): the next session or `vfiotest restore` undoes it
    assert restore_orphaned_sessions(sim, root, "virtual") == [("s1", 1)]
    assert open(sim.sysroot + "/etc/default/grub").read() == before


def test_a_bad_argument_changes_nothing_and_records_nothing(sim, tmp_path):
    s = Session("s2", "virtual", str(tmp_path / "sessions" / "s2"))
    before = open(sim.sysroot + "/etc/default/grub").read()
    with pytest.raises(ProvisionError, match="refusing kernel argument"):
        kernelargs.apply(sim, ["intel_iommu=on; reboot"], recorder=s, emulated=True, progress=lambda t: None)
    assert s._records() == [] and open(sim.sysroot + "/etc/default/grub").read() == before


def test_fix_command_names_the_file_and_the_reboot():
    text = kernelargs.fix_command(["intel_iommu=on"], emulated=True, grub_path="/s/runner/etc-default/grub")
    assert "/s/runner/etc-default/grub" in text and "vfiotest runner reboot" in text and "--allow-reboot" in text
    text = kernelargs.fix_command(["intel_iommu=on", "systemd.unified_cgroup_hierarchy=0"])
    assert "grubby --update-kernel=ALL --args='intel_iommu=on systemd.unified_cgroup_hierarchy=0'" in text
    assert "update-grub" in text
    with pytest.raises(ProvisionError):
        kernelargs.fix_command(["$(reboot)"])
