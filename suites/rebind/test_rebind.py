"""Host VF <-> vfio-pci on the target's real kernel: what the seed's rebind.sh did, and what it got wrong.

Every test leaves the device as it found it; the session's host state guard checks
the whole host at the end.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from vfiotest.errors import (
    ENVIRONMENT,
    AddressError,
    DeviceNotFound,
    JournalError,
    NotAllowed,
    VFCreateError,
)
from vfiotest.fixtures.allure_report import attach_json, attach_text
from vfiotest.fixtures.layers import failure_text
from vfiotest.journal import JOURNAL_ROOT, restore_orphans
from vfiotest.lease import OthersLeases
from vfiotest.nic_vf import is_up
from vfiotest.pci import read_inventory
from vfiotest.sriov import hold_vfs, pf_lease_name, set_numvfs

pytestmark = [pytest.mark.mutating]   # `vm` at run time, by the target


def _drivers(host, *addresses):
    return {a: {"driver": driver_of(host, a), "driver_override": override_of(host, a)} for a in addresses}


def driver_of(host, address):
    link = host.readlink(f"/sys/bus/pci/devices/{address}/driver")
    return link.rsplit("/", 1)[-1] if link else None


def is_char_device(host, path):
    return host.run(["test", "-c", path]).ok


def override_of(host, address):
    value = host.read_text(f"/sys/bus/pci/devices/{address}/driver_override").strip()
    return None if value in ("", "(null)") else value


def test_bind_one_vf_gives_vfio_group_node(target_host, vfio_group, testinfra_host):
    assert driver_of(target_host, vfio_group.address) == "vfio-pci"
    assert is_char_device(target_host, vfio_group.dev_path), f"{vfio_group.dev_path} is not a char device"
    assert testinfra_host.file(f"/sys/bus/pci/devices/{vfio_group.address}/driver").linked_to.endswith("/vfio-pci")
    assert is_char_device(target_host, "/dev/vfio/vfio")


def test_bind_whole_group(target_host, vf_lease, device_manager):
    inv = read_inventory(target_host)
    members = inv.group_of(vf_lease.address)
    bound = device_manager.bind_group(vf_lease.address)
    try:
        endpoints = [a for a in members if not inv.devices[a].is_bridge]
        assert sorted(bound) == sorted(endpoints), f"group {vf_lease.group}: bound {bound}, endpoints {endpoints}"
        for a in endpoints:
            assert driver_of(target_host, a) == "vfio-pci", a
        assert is_char_device(target_host, vf_lease.dev_path)
    finally:
        device_manager.restore_group(vf_lease.address)
    assert driver_of(target_host, vf_lease.address) == vf_lease.original_driver


def test_rebind_is_idempotent(target_host, vfio_group, device_manager):
    entries_before = device_manager.journal.entries()
    again = device_manager.bind_group(vfio_group.address)
    assert again == vfio_group.members
    assert driver_of(target_host, vfio_group.address) == "vfio-pci"
    assert is_char_device(target_host, vfio_group.dev_path)
    assert device_manager.journal.entries() == entries_before, "a second bind must not record a second original"


def test_restore_returns_original_driver_and_clears_override(target_host, vf_lease, device_manager):
    before = read_inventory(target_host).device(vf_lease.address)
    device_manager.bind_group(vf_lease.address)
    assert override_of(target_host, vf_lease.address) == "vfio-pci"
    device_manager.restore_group(vf_lease.address)
    assert driver_of(target_host, vf_lease.address) == before.driver
    assert override_of(target_host, vf_lease.address) is None
    assert not target_host.exists(vf_lease.dev_path) or before.driver == "vfio-pci"


def test_two_vfs_with_the_same_id_bind_independently(request, target_host, vf_leaser, device_manager):
    """The seed's rebind.sh wrote new_id: the second VF of an ID got EEXIST after it was already unbound."""
    with vf_leaser.lease(request.node.nodeid) as first, \
            vf_leaser.lease(request.node.nodeid, first.vendor_device) as second:
        try:
            before = _drivers(target_host, first.address, second.address)
            device_manager.bind_group(first.address)
            device_manager.bind_group(second.address)
            attach_json("two VFs of one ID: drivers before and after both were bound",
                        {"vendor_device": [first.vendor_device, second.vendor_device], "before": before,
                         "after": _drivers(target_host, first.address, second.address)})
            assert first.vendor_device == second.vendor_device
            assert driver_of(target_host, first.address) == "vfio-pci"
            assert driver_of(target_host, second.address) == "vfio-pci"
            assert is_char_device(target_host, first.dev_path) and is_char_device(target_host, second.dev_path)
            device_manager.restore_group(first.address)
            assert driver_of(target_host, first.address) == first.original_driver
            assert driver_of(target_host, second.address) == "vfio-pci", "restoring one VF must leave the other bound"
        finally:
            device_manager.restore_group(first.address)
            device_manager.restore_group(second.address)
    assert driver_of(target_host, second.address) == second.original_driver


@pytest.fixture
def whole_pf(request, target_host, sriov_pfs, lease_pool):
    """A PF all of whose VF groups this test holds, and the PF's own lease (which the sriov layer
    of every session and the PF tests below take too), so it may change the VF count
    (sriov.hold_vfs). Waits (up to 5 min) for other tests, of this session or another, to let
    go of one."""
    deadline = time.monotonic() + 300
    while True:
        for pf in sorted(sriov_pfs, key=lambda p: -len(p.vfs)):
            leases = hold_vfs(target_host, lease_pool, pf.address, test_id=request.node.nodeid)
            if leases is None:
                continue
            try:
                yield pf, OthersLeases(lease_pool, [lease.group for lease in leases])
            finally:
                for lease in leases:
                    lease.release()
            return
        if time.monotonic() > deadline:
            # the PFs are there, only busy: that is a failure of the environment, not "cannot exist here"
            pytest.fail(failure_text("sriov", "no PF whose VFs were all free within 5 min", ENVIRONMENT),
                        pytrace=False)
        time.sleep(1)


@pytest.fixture
def pf_held(request, lease_pool):
    """hold(pf): this test holds the PF's lease, so no other test (or session) changes its VF
    count or binds it meanwhile; returns the lease's name."""
    def hold(pf):
        lease = lease_pool.wait_acquire(pf_lease_name(pf), test_id=request.node.nodeid)
        request.addfinalizer(lease.release)
        return lease.group
    return hold


def test_numvfs_n_to_m_and_back(target_host, whole_pf, profile):
    pf, leases = whole_pf
    n = len(pf.vfs)
    assert n >= 2, f"{pf.address} has {n} VFs; the runner needs at least 2 (--numvfs)"
    seen = {"pf": pf.address, f"{n} (before)": pf.vfs}
    try:
        vfs = set_numvfs(target_host, pf.address, n - 1, profile=profile, leases=leases)  # N -> M: 0 first
        seen[f"{n - 1}"] = vfs
        assert len(vfs) == n - 1
        inv = read_inventory(target_host)
        seen[f"{n - 1}: IOMMU groups"] = {v: inv.device(v).iommu_group for v in vfs}
        assert inv.device(pf.address).sriov.numvfs == n - 1
        groups = [inv.device(v).iommu_group for v in vfs]
        assert len(set(groups)) == len(groups), f"VFs share IOMMU groups: {groups}"
        assert all(inv.device(v).physfn == pf.address for v in vfs)
        assert set_numvfs(target_host, pf.address, 0, profile=profile, leases=leases) == []
        assert read_inventory(target_host).device(pf.address).virtfns == {}
    finally:
        vfs = set_numvfs(target_host, pf.address, n, profile=profile, leases=leases)
        seen[f"{n} (after)"] = vfs
        attach_json("the PF's VFs at each count", seen)
    assert vfs == pf.vfs, "VF addresses must come back the same"


def test_pf_driver_and_link_untouched(target_host, sriov_pfs, vfio_group):
    inv = read_inventory(target_host)
    pf = inv.device(vfio_group.pf)
    expected = next(p for p in sriov_pfs if p.address == vfio_group.pf)
    attach_json("the PF before VFs were bound (the sriov layer's record) and now", {
        "pf": pf.address,
        "before": {"driver": expected.driver, "links": expected.link},
        "now": {"driver": pf.driver, "driver_override": pf.driver_override,
                "links": {i: "up" if is_up(target_host, i) else "down" for i in pf.net}}})
    assert pf.driver == expected.driver, f"PF {pf.address} driver {pf.driver}, was {expected.driver}"
    assert pf.driver_override is None
    assert sorted(pf.net) == sorted(expected.link), f"PF interfaces {pf.net}, were {sorted(expected.link)}"
    # the administrative state: binding VFs must not take the PF down or up (its carrier comes and
    # goes with the link partner, on its own time, and is not the harness's doing)
    for iface, was in expected.link.items():
        state = "up" if is_up(target_host, iface) else "down"
        assert state == was, f"PF interface {iface} is administratively {state}, was {was}"


# -- bad input: a clear error and no change -----------------------------------------------------
def _state(host, lease_pool, mine=()):
    """(Tests using it ask for sriov_pfs, so that VF creation is over before the first snapshot.)
    The host state minus what other tests hold (pytest -n: they change their own leased groups
    and PFs meanwhile); the leases are read before and after the inventory, and what either names
    is left out. The session's host state guard checks the whole host."""
    held = set(lease_pool.held())
    inv = read_inventory(host)
    held = (held | set(lease_pool.held())) - set(mine)
    pfs = {name[3:] for name in held if name.startswith("pf-")}
    state = inv.state()
    for addr, dev in inv.devices.items():
        if dev.iommu_group in held or addr in pfs or (dev.physfn and dev.physfn in pfs):
            state["devices"].pop(addr, None)
    state["held"] = held
    return state


def _unchanged(before, after):
    """Devices and /dev/vfio nodes that no other test held in either snapshot are the same."""
    held = before["held"] | after["held"]
    common = sorted(set(before["devices"]) & set(after["devices"]))
    vfio = lambda st: sorted((g for g in st["vfio"] if g not in held), key=str)  # noqa: E731
    changed = [a for a in common if before["devices"][a] != after["devices"][a]]
    attach_json("host state before and after (devices and /dev/vfio no other test held)", {
        "changed": changed, "vfio_before": vfio(before), "vfio_after": vfio(after), "left_out_held": sorted(held, key=str),
        "before": {a: before["devices"][a] for a in common}, "after": {a: after["devices"][a] for a in common}})
    return not changed and vfio(before) == vfio(after)


def test_bad_address_malformed(target_host, device_manager, lease_pool, sriov_pfs):
    before = _state(target_host, lease_pool)
    with pytest.raises(AddressError, match="not a PCI address"):
        device_manager.bind_group("0000:zz:00.0")
    assert _unchanged(before, _state(target_host, lease_pool))


def test_bad_address_missing_device(target_host, device_manager, lease_pool, sriov_pfs):
    before = _state(target_host, lease_pool)
    with pytest.raises(DeviceNotFound, match="no PCI device 0000:7f:1f.7"):
        device_manager.bind_group("0000:7f:1f.7")
    assert _unchanged(before, _state(target_host, lease_pool))


def test_device_outside_allowlist_refused(target_host, device_manager, profile, lease_pool, sriov_pfs):
    inv = read_inventory(target_host)
    outside = [d for d in inv.devices.values()
               if not profile.allows(d.vendor_device) and not d.is_bridge and d.address not in inv.protected
               and d.iommu_group]
    if not outside:
        pytest.skip("every device on the target is in the profile")
    before = _state(target_host, lease_pool)
    with pytest.raises(NotAllowed, match="allowlist") as e:
        device_manager.bind_group(outside[0].address)
    assert e.value.reason == NotAllowed.NOT_ALLOWLISTED and e.value.address == outside[0].address
    assert _unchanged(before, _state(target_host, lease_pool))


def test_device_the_host_needs_refused(target_host, device_manager, lease_pool, sriov_pfs):
    inv = read_inventory(target_host)
    assert inv.protected, "the target's SSH/default-route NIC was not recognised as needed by the host"
    address, why = next(iter(inv.protected.items()))
    before = _state(target_host, lease_pool)
    with pytest.raises(NotAllowed, match="the host needs it|also holds") as e:
        device_manager.bind_group(address)
    assert e.value.reason == NotAllowed.PROTECTED and e.value.cause
    assert _unchanged(before, _state(target_host, lease_pool))


def test_pf_with_vfs_in_use_keeps_its_vfs(target_host, vfio_group, profile, lease_pool, sriov_pfs, pf_held):
    mine = [pf_held(vfio_group.pf), vfio_group.group]
    pf = read_inventory(target_host).device(vfio_group.pf)
    before = _state(target_host, lease_pool, mine)
    with pytest.raises(VFCreateError, match="in use") as e:
        set_numvfs(target_host, pf.address, max(pf.sriov.numvfs - 1, 1), profile=profile)
    assert e.value.reason == VFCreateError.IN_USE and e.value.address == pf.address
    assert _unchanged(before, _state(target_host, lease_pool, mine))


def test_pf_with_enabled_vfs_refused_and_keeps_them(target_host, device_manager, sriov_pfs, lease_pool, target_spec,
                                                    profile, pf_held):
    """Binding a PF unbinds its driver, which destroys its VFs (and unbind would not bring them
    back): refused, through the library and the CLI, with the VFs as they were."""
    pf = next(p for p in sriov_pfs if p.vfs)
    mine = [pf_held(pf.address)]
    before = _state(target_host, lease_pool, mine)
    with pytest.raises(NotAllowed) as e:
        device_manager.bind_group(pf.address)
    assert e.value.reason == NotAllowed.PF_WITH_VFS and e.value.address == pf.address
    # the session's profile too: with the CLI's default for the target, the PF may be refused as
    # outside the allowlist instead, which is not what this test is about
    p = subprocess.run([sys.executable, "-m", "vfiotest", "bind", "--target", target_spec, "--profile", profile.name,
                        pf.address], capture_output=True, text=True, timeout=120)
    attach_text("vfiotest bind on the PF: exit code and stderr", f"exit {p.returncode}\n{p.stderr}")
    assert p.returncode == 3 and "VFs enabled" in p.stderr and "next step" in p.stderr, (p.returncode, p.stderr)
    assert _unchanged(before, _state(target_host, lease_pool, mine))
    assert read_inventory(target_host).device(pf.address).sriov.numvfs == len(pf.vfs)


def test_more_vfs_than_totalvfs_refused(target_host, sriov_pfs, profile, lease_pool, pf_held):
    mine = [pf_held(sriov_pfs[0].address)]
    pf = read_inventory(target_host).device(sriov_pfs[0].address)
    before = _state(target_host, lease_pool, mine)
    with pytest.raises(VFCreateError, match="at most") as e:
        set_numvfs(target_host, pf.address, pf.sriov.totalvfs + 1, profile=profile)
    assert e.value.reason == VFCreateError.TOO_MANY and e.value.address == pf.address
    assert _unchanged(before, _state(target_host, lease_pool, mine))


def test_corrupt_journal_refused_with_recovery_step(target_host, prereqs_met, lease_pool, sriov_pfs):
    root = f"{JOURNAL_ROOT}-test-{os.getpid()}"  # not the real root: other sessions read that one
    path = f"{root}/corrupt-by-test.json"
    target_host.write_atomic(path, "{not json", mode=0o600)
    try:
        before = _state(target_host, lease_pool)
        with pytest.raises(JournalError) as e:
            restore_orphans(target_host, root=root)
        assert "corrupt-by-test" in str(e.value) and e.value.hint
        assert e.value.reason == JournalError.CORRUPT and e.value.path == path
        assert _unchanged(before, _state(target_host, lease_pool))
    finally:
        target_host.run(["rm", "-rf", root])


def test_journal_from_another_host_refused(target_host, prereqs_met, lease_pool, sriov_pfs):
    root = f"{JOURNAL_ROOT}-test-{os.getpid()}"
    path = f"{root}/foreign-by-test.json"
    doc = {"version": 1, "owner": "foreign-by-test", "pid": 1, "created": 0, "keep": False,
           "identity": {"machine_id": "0" * 32, "hostname": "elsewhere", "boot_id": None},
           "entries": [{"kind": "numvfs", "address": "0000:01:00.0", "numvfs": 0}]}
    target_host.write_atomic(path, json.dumps(doc), mode=0o600)
    try:
        before = _state(target_host, lease_pool)
        with pytest.raises(JournalError, match="elsewhere") as e:
            restore_orphans(target_host, root=root)
        assert e.value.reason == JournalError.FOREIGN and e.value.path == path
        assert _unchanged(before, _state(target_host, lease_pool))
    finally:
        target_host.run(["rm", "-rf", root])


def test_cli_bad_address_exits_non_zero_with_next_step(target_spec, prereqs_met):
    p = subprocess.run([sys.executable, "-m", "vfiotest", "bind", "--target", target_spec, "0000:zz:00.0"],
                       capture_output=True, text=True, timeout=120)
    attach_text("vfiotest bind 0000:zz:00.0: exit code and stderr", f"exit {p.returncode}\n{p.stderr}")
    assert p.returncode != 0
    assert "not a PCI address" in p.stderr and "next step" in p.stderr, p.stderr
