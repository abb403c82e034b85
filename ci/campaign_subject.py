"""The subject that `ci/campaign` kills at seeded points: one pass through every layer the
harness provisions, each announced by a phase line, ending with a Kata container that holds a
VF. It is not a suite (nothing collects it on its own); the campaign runs it as

    pytest ci/campaign_subject.py -p no:cacheprovider -q

and kills the whole process group a seeded delay after a phase line appears, then checks that
`vfiotest restore` puts the runner back exactly as it was.
"""

import time

import pytest

from vfiotest.fixtures.layers import progress
from vfiotest.podman.factory import ContainerFactory

PHASES = ("VF creation", "bind", "group bind", "runtime registration", "image import", "container start",
          "Kata VM running")
MARK = "campaign phase: "


def phase(name):
    progress(MARK + name)


@pytest.mark.mutating
def test_every_layer(request):
    phase("VF creation")
    request.getfixturevalue("sriov_pfs")
    leaser = request.getfixturevalue("vf_leaser")
    dm = request.getfixturevalue("device_manager")
    host = request.getfixturevalue("target_host")
    with leaser.lease(request.node.nodeid) as one:
        phase("bind")
        dm.bind_device(one.address)
        phase("group bind")
        with leaser.vfio(request.node.nodeid) as vf:
            phase("runtime registration")
            request.getfixturevalue("kata_runtime")
            phase("image import")
            image = request.getfixturevalue("podman_image")
            client = request.getfixturevalue("podman_client")
            factory = ContainerFactory(client, image, kata=True)
            phase("container start")
            c = factory.start(["sleep", "600"], vfio=vf, ipc_lock=True)
            try:
                phase("Kata VM running")
                time.sleep(8)
                c.reload()
                assert c.status == "running", c.status
                rc, out, _ = client.exec(c, ["ls", "/dev/vfio"])
                assert rc == 0 and "vfio" in out.split(), out
            finally:
                client.cleanup()
        dm.restore_device(one.address)
    link = host.readlink(f"/sys/bus/pci/devices/{one.address}/driver") or ""
    assert link.rsplit("/", 1)[-1] == one.original_driver, (one.address, link, one.original_driver)
    phase("done")
