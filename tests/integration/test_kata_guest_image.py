"""The guest image boots for real (QEMU under TCG here, no runner, no device): dracut's init
reaches the agent stand-in, which runs the hook from <guest_hook_path>/prestart as the agent
would and reports on the console. The VF cases are in suites/guest_hook (nested in the runner)."""

import pytest

from vfiotest.host import LocalHost
from vfiotest.kata import initrd
from vfiotest.kata.nested import NestedGuest

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def built():
    return initrd.build_initrd(initrd.InitrdSpec(allowed_ids=("8086:10ca",)))


def test_image_boots_and_the_hook_runs_without_devices(built):
    guest = NestedGuest(LocalHost(), built.kernel, built.path, accel="tcg", memory_mb=512, timeout=240)
    rep = guest.boot(annotation="8086:10ca", runs=("main", "none", "malformed"))
    assert [h.rsplit("/", 1)[-1] for h in rep.hooks] == ["vfio-hook"]
    main, none, bad = (rep.run(k)["results"][0] for k in ("main", "none", "malformed"))
    # the container asked for 8086:10ca and this guest has none: the hook fails the start, saying so
    assert main["rc"] == 5 and main["argv"] == ["vfio-hook", "prestart"], main
    assert "8086:10ca was asked for" in main["stderr"], main["stderr"]
    assert none["rc"] == 0                      # an empty annotation asks for nothing
    assert bad["rc"] == 2
    assert [e["result"] for e in rep.log_for(container="vfiotest-none-1", action="select")] == ["no-devices"]
    assert rep.log_for(action="bind") == []
    assert set(rep.dev_vfio) <= {"vfio"}
