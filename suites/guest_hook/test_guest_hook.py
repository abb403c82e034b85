"""The hook's effect in the guest: read from the guest's console (its /tmp log, /dev/vfio, PCI state).

The Kata 1.x agent runs the hook for a kata-vfio container holding a VF; the guest is read
over Kata's debug console while the container runs, and the hook is run again there by hand:
on the same device ("again"), with an empty annotation ("none") and with a state cut short
("malformed"). What the hook was given (argv, stage, state) is what its log in the guest
recorded. Group numbers asserted here are the GUEST's own, never the host's.
"""

import pytest

from vfiotest.kata.console import KATA_BUNDLE_DIR
from vfiotest.podman.client import VFIO_ANNOTATION

pytestmark = [pytest.mark.kata, pytest.mark.mutating]   # `vm` at run time, by the target


def guest_vfs(guest, vendor_device):
    """{address: PciDevice} of the guest's devices with that vendor:device (the guest's inventory
    after the hook: it still gives the IDs and the guest's groups)."""
    return {a: d for a, d in guest.inventory().devices.items() if d.vendor_device == vendor_device}


def test_agent_ran_the_hook_as_kata_does(guest, guest_boot):
    """The agent ran the hook once as a prestart hook for the container, with the argv and state
    the agent gives, as the hook's log in the guest recorded them."""
    starts = guest.log_for(container=guest_boot.main_container, action="start")
    assert len(starts) == 1, guest.hook_log
    start = starts[0]
    # a script's argv[0] is the path the kernel exec'd (the shebang rule), not the argv[0] the agent
    # chose: the hook the agent found under guest_hook_path/prestart in the image
    assert start["stage"] == "prestart" and start["argv"][1:] == ["prestart"], start
    assert start["argv"][0] == guest_boot.hook_path, start
    assert start["source"] == "annotation" and start["annotation"] == guest_boot.annotation
    state = start["state"]
    assert state["id"] == guest_boot.main_container and state["status"] == "creating"
    assert state["bundle"] == f"{KATA_BUNDLE_DIR}/{guest_boot.main_container}"
    assert isinstance(state["pid"], int) and state["pid"] > 1      # the container's init in the guest
    ends = guest.log_for(container=guest_boot.main_container, action="end")
    assert [e["result"] for e in ends] == ["ok"], ends


def test_log_shows_each_device_rebound_with_its_guest_group(guest, guest_boot):
    vfs = guest_vfs(guest, guest_boot.annotation)
    assert vfs, "the passed-through VF is not visible in the guest"
    binds = guest.log_for(container=guest_boot.main_container, action="bind")
    assert {e["device"] for e in binds} == set(vfs)
    for e in binds:
        assert e["result"] == "bound"
        # whether igbvf bound before the hook ran depends on the hot-plug timing (not asserted)
        assert e["new_driver"] == "vfio-pci"
        assert e["group"] == vfs[e["device"]].iommu_group       # the guest's own group
        assert e["time"] and e["vendor_device"] == guest_boot.annotation


def test_dev_vfio_of_the_guest_group_exists(guest, guest_boot):
    vfs = guest_vfs(guest, guest_boot.annotation)
    assert vfs, "the passed-through VF is not visible in the guest"
    vfio = guest.inventory().vfio
    for dev in vfs.values():
        assert dev.driver == "vfio-pci"
        assert vfio.get(dev.iommu_group) == "char", f"/dev/vfio/{dev.iommu_group} missing in the guest: {vfio}"


def test_already_bound_device_is_left_and_logged(guest):
    again = guest.run("again")
    assert again["results"][0]["rc"] == 0
    binds = guest.log_for(container="vfiotest-again-1", action="bind")
    assert binds and all(e["result"] == "already-bound" for e in binds)
    assert again["vfio_after"] == guest.dev_vfio


def test_no_devices_changes_nothing(guest):
    none = guest.run("none")
    assert none["results"][0]["rc"] == 0
    assert guest.log_for(container="vfiotest-none-2", action="bind") == []
    assert [e["result"] for e in guest.log_for(container="vfiotest-none-2", action="select")] == ["no-devices"]
    assert none["vfio_after"] == guest.run("again")["vfio_after"]


def test_malformed_state_is_logged_and_fails(guest):
    res = guest.run("malformed")["results"][0]
    assert res["rc"] == 2
    errors = [e for e in guest.hook_log if e["action"] == "state" and e["result"] == "error"]
    assert len(errors) == 1 and "not JSON" in errors[0]["error"]


def test_host_driver_state_after_the_guest_equals_before(guest_boot):
    assert guest_boot.host_changes() == []


def test_a_hook_that_cannot_bind_fails_the_container_start(container):
    """The agent fails the container when the hook exits non-zero, and the reason reaches podman-py."""
    absent = "0000:7f:1f.7"               # no such device in any Kata guest
    res = container.run(["true"], annotations={VFIO_ANNOTATION: absent}, timeout=300)
    assert res.exit_code is None, f"the container started although the hook could not bind {absent}:\n{res}"
    assert "hook" in res.stderr.lower() and absent in res.stderr, res.stderr
