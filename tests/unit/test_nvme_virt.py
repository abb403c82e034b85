"""NVMe VF bring-up (vfiotest.nvme_virt through sriov.set_numvfs), on the simulated host,
whose `nvme` answers as QEMU's SR-IOV NVMe controller does (vfiotest.testing.simnvme)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vfiotest import nvme_virt, sriov
from vfiotest.bind import DeviceManager
from vfiotest.journal import MemoryJournal, registered_kinds
from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

NVME_PF = "0000:10:00.0"
IGB_PF = "0000:20:00.0"


@pytest.fixture
def sim(tmp_path: Path) -> SimulatedHost:
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=["nvme", "igb"])


def nvme(sim: SimulatedHost, *args: str) -> Any:
    return sim.run(["nvme", *args], timeout=10)


def ctrls(sim: SimulatedHost) -> dict[int, tuple[bool, int, int]]:
    """{cntlid: (online, nvq, nvi)} of the NVMe PF's secondary controllers."""
    return {c.cntlid: (c.online, c.nvq, c.nvi) for c in nvme_virt.secondaries(sim, NVME_PF) or []}


OFFLINE = (False, 0, 0)


def test_the_primary_device_comes_from_the_pfs_sysfs(sim: SimulatedHost) -> None:
    assert nvme_virt.primary_device(sim, NVME_PF) == "/dev/nvme0"
    assert nvme_virt.primary_device(sim, IGB_PF) is None
    assert ctrls(sim) == {1: OFFLINE, 2: OFFLINE, 3: OFFLINE, 4: OFFLINE}


def test_the_fake_controller_refuses_what_qemus_refuses(sim: SimulatedHost) -> None:
    """As measured in the emulated runner: online needs resources and an enabled VF; resources
    cannot change while online; offline returns them; disabling VFs puts controllers offline."""
    res = nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-a", "9")
    assert res.rc == 1 and "Invalid Secondary Controller State" in res.stderr          # no resources
    assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-r", "0", "-a", "8", "-n", "3").rc == 1  # > VQFRSM
    assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-r", "0", "-a", "8", "-n", "2").ok
    assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-r", "1", "-a", "8", "-n", "1").ok
    res = nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-a", "9")
    assert res.rc == 1 and "Invalid Secondary Controller State" in res.stderr          # its VF is not enabled
    sim.write_text(f"/sys/bus/pci/devices/{NVME_PF}/sriov_numvfs", "1")
    assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-a", "9").ok
    assert ctrls(sim)[1] == (True, 2, 1)
    res = nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-r", "0", "-a", "8", "-n", "1")
    assert res.rc == 1 and "0x4120" in res.stderr                                         # online: no change
    assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "9", "-a", "7").rc == 1            # no such controller
    sim.write_text(f"/sys/bus/pci/devices/{NVME_PF}/sriov_numvfs", "0")
    assert ctrls(sim)[1] == OFFLINE
    caps = json.loads(nvme(sim, "primary-ctrl-caps", "/dev/nvme0", "-o", "json").stdout)
    assert (caps["vqrfa"], caps["virfa"]) == (0, 0)


def test_creating_nvme_vfs_brings_them_up_and_the_journal_puts_all_back(sim: SimulatedHost) -> None:
    first = read_inventory(sim)
    j = MemoryJournal()
    vfs = sriov.set_numvfs(sim, NVME_PF, 2, j)
    assert ctrls(sim) == {1: (True, 2, 1), 2: (True, 2, 1), 3: OFFLINE, 4: OFFLINE}
    inv = read_inventory(sim)
    # autoprobe was on: back on, and the VFs probed once online (their native driver bound)
    assert inv.devices[NVME_PF].sriov.drivers_autoprobe is True
    assert [inv.devices[v].driver for v in vfs] == ["nvme", "nvme"]
    assert [e["kind"] for e in j.entries()] == ["numvfs", "nvme-secondary", "nvme-secondary"]
    assert j.entries()[1] == {"kind": "nvme-secondary", "address": NVME_PF, "cntlid": 1, "vfn": 1,
                              "online": False, "nvq": 0, "nvi": 0}
    DeviceManager(sim, "emulated", j).restore_all()
    assert j.entries() == []
    assert ctrls(sim) == {c: OFFLINE for c in (1, 2, 3, 4)}
    assert first.diff(read_inventory(sim)) == []


def test_autoprobe_off_stays_off_and_leaves_the_vfs_unbound(sim: SimulatedHost) -> None:
    j = MemoryJournal()
    vfs = sriov.set_numvfs(sim, NVME_PF, 3, j, autoprobe=False)
    inv = read_inventory(sim)
    assert inv.devices[NVME_PF].sriov.drivers_autoprobe is False
    assert all(inv.devices[v].driver is None for v in vfs)
    assert [ctrls(sim)[c][0] for c in (1, 2, 3, 4)] == [True, True, True, False]
    j.restore_all(sim)
    assert read_inventory(sim).devices[NVME_PF].sriov.drivers_autoprobe is True
    assert ctrls(sim)[3] == OFFLINE


def test_changing_the_count_brings_up_the_new_set_and_keeps_the_first_originals(sim: SimulatedHost) -> None:
    j = MemoryJournal()
    sriov.set_numvfs(sim, NVME_PF, 1, j)
    sriov.set_numvfs(sim, NVME_PF, 4, j)                    # through 0: the controllers went offline
    assert all(state[0] for state in ctrls(sim).values())
    entries = j.entries()
    assert [e.get("cntlid") for e in entries] == [None, 1, 2, 3, 4]
    assert all(e["online"] is False for e in entries[1:])
    sriov.set_numvfs(sim, NVME_PF, 0, j)
    assert ctrls(sim)[1] == OFFLINE
    j.restore_all(sim)
    assert ctrls(sim) == {c: OFFLINE for c in (1, 2, 3, 4)}


def test_bringup_is_skipped_where_not_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a NIC PF: no nvme device, no nvme command run
    sim = SimulatedHost.build(str(tmp_path / "a"), pfs=["igb"])
    commands: list[str] = []
    real = sim._exec

    def seen(command: str, *, timeout: float, input: Any) -> Any:
        commands.append(command)
        return real(command, timeout=timeout, input=input)

    monkeypatch.setattr(sim, "_exec", seen)
    j = MemoryJournal()
    sriov.set_numvfs(sim, "0000:10:00.0", 2, j)
    assert [e["kind"] for e in j.entries()] == ["numvfs"]
    assert commands and not [c for c in commands if c.startswith("nvme")]
    # an NVMe PF without virtualization management (fixed VF resources): nothing to bring up
    sim = SimulatedHost.build(str(tmp_path / "b"), pfs=[{"preset": "nvme", "virt_mgmt": False}])
    j = MemoryJournal()
    vfs = sriov.set_numvfs(sim, "0000:10:00.0", 2, j)
    assert [e["kind"] for e in j.entries()] == ["numvfs"]
    assert read_inventory(sim).devices[vfs[0]].driver == "nvme"  # autoprobe was never turned off


def test_controllers_already_online_are_left_alone(sim: SimulatedHost) -> None:
    """A drive set up by its owner (resources given, VF 1's controller online while the VFs are
    enabled, and kept so by a device that does not reset them with VF Enable): not journaled."""
    for rt, nr in (("0", "2"), ("1", "1")):
        assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-r", rt, "-a", "8", "-n", nr).ok
    p = nvme_virt.plan(sim, NVME_PF, 2)
    assert p is not None and [c.cntlid for c in p.controllers] == [1, 2]   # offline, even with resources
    sim.write_text(f"/sys/bus/pci/devices/{NVME_PF}/sriov_numvfs", "2")
    assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "1", "-a", "9").ok
    p = nvme_virt.plan(sim, NVME_PF, 2)
    assert p is not None and [c.cntlid for c in p.controllers] == [2]
    assert nvme_virt.plan(sim, NVME_PF, 1) is None


def test_a_controller_with_resources_of_its_own_gets_them_back(sim: SimulatedHost) -> None:
    assert nvme(sim, "virt-mgmt", "/dev/nvme0", "-c", "2", "-r", "0", "-a", "8", "-n", "2").ok
    j = MemoryJournal()
    sriov.set_numvfs(sim, NVME_PF, 2, j)
    assert ctrls(sim)[2] == (True, 2, 1)
    # the VFs are gone first (as the session ends: the numvfs entry is undone after), then the entry
    entry = next(e for e in j.entries() if e.get("cntlid") == 2)
    nvme_virt.restore_secondary(sim, entry)
    assert ctrls(sim)[2] == (False, 2, 0)


def test_too_few_resources_is_a_typed_error_naming_the_counts(tmp_path: Path) -> None:
    # a controller with 6 flexible VQ for 4 VFs: at most 1 per VF, below the 2 an online VF needs
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "nvme", "vq_flexible": 6}])
    first = read_inventory(sim)
    with pytest.raises(nvme_virt.VirtMgmtError, match="too few free flexible resources") as e:
        sriov.set_numvfs(sim, NVME_PF, 1, MemoryJournal())
    assert e.value.reason == nvme_virt.VirtMgmtError.RESOURCES and "2 VQ" in str(e.value)
    assert first.diff(read_inventory(sim)) == []


def test_a_target_without_nvme_cli_is_told_what_to_install(sim: SimulatedHost, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sim._exec

    def no_nvme(command: str, *, timeout: float, input: Any) -> Any:
        if command.startswith("nvme "):
            from vfiotest.host import CommandResult
            return CommandResult(command, 127, "", "nvme: command not found\n", sim.name)
        return real(command, timeout=timeout, input=input)

    monkeypatch.setattr(sim, "_exec", no_nvme)
    first = read_inventory(sim)
    with pytest.raises(nvme_virt.VirtMgmtError, match="nvme-cli is not installed") as e:
        sriov.set_numvfs(sim, NVME_PF, 1, MemoryJournal())
    assert "apt-get install nvme-cli" in e.value.hint
    assert first.diff(read_inventory(sim)) == []


def test_the_kind_is_registered_with_its_undo() -> None:
    kind = registered_kinds()["nvme-secondary"]
    assert kind.undo is nvme_virt.restore_secondary
    assert kind.key_of({"kind": "nvme-secondary", "address": NVME_PF, "cntlid": 3}) == ("nvme-secondary", NVME_PF, 3)


def test_devices_shows_each_nvme_vfs_state(sim: SimulatedHost) -> None:
    j = MemoryJournal()
    sriov.set_numvfs(sim, NVME_PF, 2, j)
    sriov.set_numvfs(sim, IGB_PF, 1, j)
    env = dict(os.environ, VFIOTEST_TARGET=f"sim:{sim.sysroot}")
    res = subprocess.run([sys.executable, "-m", "vfiotest", "devices", "--profile", "emulated"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    vf_rows = [line for line in res.stdout.splitlines() if f"VF of {NVME_PF}" in line]
    assert len(vf_rows) == 2 and all("nvme online, 2 VQ 1 VI" in line for line in vf_rows), res.stdout
    res = subprocess.run([sys.executable, "-m", "vfiotest", "devices", "--json", "--profile", "emulated"],
                         capture_output=True, text=True, timeout=60, env=env)
    rows = {d["address"]: d for d in json.loads(res.stdout)["devices"]}
    nvme_vfs = [d for d in rows.values() if d["physfn"] == NVME_PF]
    assert [d["nvme_secondary"]["cntlid"] for d in nvme_vfs] == [1, 2]
    assert all(d["nvme_secondary"] is None for d in rows.values() if d["physfn"] == IGB_PF)
    j.restore_all(sim)


def test_the_namespace_block_device_is_the_multipath_head_or_the_namespace(sim: SimulatedHost) -> None:
    ctrl = Path(sim.sysroot + f"/sys/bus/pci/devices/{NVME_PF}/nvme/nvme0")
    assert nvme_virt.namespace_device(sim, NVME_PF, 1) is None
    (ctrl / "nvme0c0n1").mkdir()                     # multipath: the path under the controller
    (ctrl / "nvme0c0n12").mkdir()
    assert nvme_virt.namespace_device(sim, NVME_PF, 1) == "/dev/nvme0n1"
    assert nvme_virt.namespace_device(sim, NVME_PF, 12) == "/dev/nvme0n12"
    (ctrl / "nvme0c0n1").rmdir()
    (ctrl / "nvme3n1").mkdir()                       # no multipath: the namespace itself
    assert nvme_virt.namespace_device(sim, NVME_PF, 1) == "/dev/nvme3n1"
    assert nvme_virt.namespace_device(sim, IGB_PF, 1) is None


def test_vfs_someone_else_made_offline_are_brought_up_in_place(tmp_path: Path) -> None:
    """A PF whose VFs exist already (another session's, made without bring-up): asking for the
    same count keeps the VFs and puts their controllers online, journaled and undone."""
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "nvme", "numvfs": 2}])
    sim.write_text("/sys/bus/pci/drivers/nvme/unbind", "0000:10:10.0")  # as a failed probe leaves it
    first = read_inventory(sim)
    before = [v.address for v in first.vfs_of(NVME_PF)]
    assert ctrls(sim)[1] == OFFLINE
    j = MemoryJournal()
    assert sriov.set_numvfs(sim, NVME_PF, 2, j) == before
    assert first.diff(read_inventory(sim)) == [], "drivers are left as found"
    # VF 1 (no driver) online; VF 2 is on the kernel's nvme: left as it is
    assert ctrls(sim) == {1: (True, 2, 1), 2: OFFLINE, 3: OFFLINE, 4: OFFLINE}
    assert [e.get("cntlid") for e in j.entries()] == [1]
    assert sriov.set_numvfs(sim, NVME_PF, 2, j) == before       # online now: nothing more to do
    assert len(j.entries()) == 1
    j.restore_all(sim)
    assert ctrls(sim)[1] == OFFLINE and first.diff(read_inventory(sim)) == []
