"""A NIC PF's netdev brought up before its VFs are made, a VF's MAC set by the PF, and both
undone from the journal, against the simulated sysfs (which answers `ip link` as the kernel
does: VF MACs go away with the VFs)."""

import pytest

from vfiotest import nic_vf, sriov
from vfiotest.errors import VFCreateError
from vfiotest.journal import MemoryJournal, undo_entries
from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

PF = "0000:10:00.0"


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "net": ["eth2"]}, "nvme"])


def test_vfs_are_made_with_the_pf_up_and_it_goes_down_again_on_undo(sim):
    first = read_inventory(sim)
    assert nic_vf.interfaces(sim, PF) == ["eth2"] and not nic_vf.is_up(sim, "eth2")
    j = MemoryJournal()
    sriov.set_numvfs(sim, PF, 2, j)
    assert nic_vf.is_up(sim, "eth2")
    assert [e["kind"] for e in j.entries()] == ["numvfs", "link-up"]
    assert j.entries()[1] == {"kind": "link-up", "address": PF, "interface": "eth2"}
    undo_entries(sim, j)
    assert not nic_vf.is_up(sim, "eth2") and first.diff(read_inventory(sim)) == []


def test_a_pf_already_up_is_left_up_and_nothing_is_journaled_for_it(sim):
    sim.run(["ip", "link", "set", "dev", "eth2", "up"], check=True)
    j = MemoryJournal()
    sriov.set_numvfs(sim, PF, 1, j)
    assert [e["kind"] for e in j.entries()] == ["numvfs"]
    undo_entries(sim, j)
    assert nic_vf.is_up(sim, "eth2") and read_inventory(sim).vfs_of(PF) == []


def test_a_vf_mac_is_set_and_the_one_before_put_back(sim):
    sriov.set_numvfs(sim, PF, 3)
    vf = read_inventory(sim).vfs_of(PF)[2].address
    index = nic_vf.vf_index(sim, PF, vf)
    mac = nic_vf.mac_for(PF, index)
    assert index == 2 and mac == "02:76:10:00:00:02" and mac != nic_vf.mac_for("0000:11:00.0", 2)
    j = MemoryJournal()
    nic_vf.set_vf_mac(sim, PF, index, mac, j)
    assert nic_vf.vf_macs(sim, PF) == {0: nic_vf.ZERO_MAC, 1: nic_vf.ZERO_MAC, 2: mac}
    nic_vf.set_vf_mac(sim, PF, index, mac, j)          # the same MAC again: nothing more to undo
    assert j.entries() == [{"kind": "vf-mac", "address": PF, "interface": "eth2", "vf": 2, "mac": nic_vf.ZERO_MAC}]
    undo_entries(sim, j)
    assert nic_vf.vf_macs(sim, PF)[2] == nic_vf.ZERO_MAC


def test_undo_of_a_mac_whose_vf_is_gone_does_nothing(sim):
    j = MemoryJournal()
    sriov.set_numvfs(sim, PF, 2, j)
    nic_vf.set_vf_mac(sim, PF, 1, "02:00:00:00:00:01", j)
    undo_entries(sim, j)      # newest first: the MAC, the link, then the VFs
    assert read_inventory(sim).vfs_of(PF) == [] and nic_vf.vf_macs(sim, PF) == {}


@pytest.mark.parametrize(("index", "mac", "match"), [(7, "02:00:00:00:00:01", "has no VF 7"),
                                                     (0, "02:00:00:00:00", "not a MAC address"),
                                                     (0, "02:00:00:00:00:01; reboot", "not a MAC address")])
def test_bad_vf_or_mac_is_refused_and_nothing_is_journaled(sim, index, mac, match):
    sriov.set_numvfs(sim, PF, 1)
    j = MemoryJournal()
    with pytest.raises(VFCreateError, match=match):
        nic_vf.set_vf_mac(sim, PF, index, mac, j)
    assert nic_vf.vf_macs(sim, PF) == {0: nic_vf.ZERO_MAC}
    assert j.entries() == []


def test_a_pf_without_a_netdev_gets_no_mac_and_no_link(sim):
    nvme = "0000:11:00.0"
    assert nic_vf.interfaces(sim, nvme) == [] and nic_vf.link_up(sim, nvme, MemoryJournal()) == []
    with pytest.raises(VFCreateError, match="has no network interface"):
        nic_vf.set_vf_mac(sim, nvme, 0, "02:00:00:00:00:01")
