"""The hook's effect in the guest: read from the guest's console (its /tmp log, /dev/vfio, PCI state).

On the emulated runner the guest is the nested stand-in (fixtures/guest.py): the agent
stand-in runs the prestart hooks with the container's annotation ("main"), again on the
same device ("again"), with an empty annotation ("none") and with a state cut short
("malformed"). Group numbers asserted here are the GUEST's own, never the host's.
"""

import os


def guest_vfs(guest, vendor_device):
    v, d = vendor_device.split(":")
    return {a: s for a, s in guest.pci_before.items() if s["vendor"] == "0x" + v and s["device"] == "0x" + d}


def test_agent_ran_the_hook_as_kata_does(guest):
    assert [os.path.basename(h) for h in guest.hooks] == ["vfio-hook"]
    main = guest.run("main")["results"]
    assert [r["argv"][1:] for r in main] == [["prestart"]]
    assert main[0]["rc"] == 0, main[0]["stderr"]


def test_log_shows_each_device_rebound_with_its_guest_group(guest, guest_boot):
    vfs = guest_vfs(guest, guest_boot.annotation)
    assert vfs, "the passed-through VF is not visible in the guest"
    binds = guest.log_for(container="vfiotest-main-0", action="bind")
    assert {e["device"] for e in binds} == set(vfs)
    for e in binds:
        assert e["result"] == "bound"
        assert e["old_driver"] == vfs[e["device"]]["driver"] == "igbvf"
        assert e["new_driver"] == "vfio-pci"
        assert e["group"] == vfs[e["device"]]["iommu_group"]       # the guest's own group
        assert e["time"] and e["vendor_device"] == guest_boot.annotation


def test_dev_vfio_of_the_guest_group_exists(guest, guest_boot):
    vfs = guest_vfs(guest, guest_boot.annotation)
    for addr, before in vfs.items():
        group = before["iommu_group"]
        assert guest.pci_after[addr]["driver"] == "vfio-pci"
        assert guest.dev_vfio.get(group) == "char", f"/dev/vfio/{group} missing in the guest: {guest.dev_vfio}"
        assert group not in guest.data["vfio_before"]


def test_already_bound_device_is_left_and_logged(guest):
    again = guest.run("again")
    assert again["results"][0]["rc"] == 0
    binds = guest.log_for(container="vfiotest-again-1", action="bind")
    assert binds and all(e["result"] == "already-bound" for e in binds)
    assert again["vfio_after"] == guest.run("main")["vfio_after"]


def test_no_devices_changes_nothing(guest):
    none = guest.run("none")
    assert none["results"][0]["rc"] == 0
    assert guest.log_for(container="vfiotest-none-2", action="bind") == []
    assert [e["result"] for e in guest.log_for(container="vfiotest-none-2", action="select")] == ["no-devices"]
    assert none["vfio_after"] == guest.run("again")["vfio_after"]


def test_malformed_state_is_logged_and_fails_fast(guest):
    res = guest.run("malformed")["results"][0]
    assert res["rc"] == 2
    assert res["seconds"] < 15            # python start-up in a nested guest under TCG dominates
    errors = [e for e in guest.hook_log if e["action"] == "state" and e["result"] == "error"]
    assert len(errors) == 1 and "not JSON" in errors[0]["error"]


def test_host_driver_state_after_the_guest_equals_before(guest_boot):
    assert guest_boot.host_after == guest_boot.host_before
