"""The podman API service start: a service that dies at once (an unknown runtime) is reported
at once with podman's own words, not after the start timeout. A fake `podman` that exits
like podman does for an unregistered runtime; no podman runs."""

import time

import pytest

from vfiotest.errors import ProvisionError
from vfiotest.host import LocalHost
from vfiotest.podman.service import PodmanService

PODMAN_SAYS = 'Error: default OCI runtime "nope" not found: invalid argument'


def test_a_service_that_exits_at_once_is_reported_at_once(tmp_path):
    fake = tmp_path / "podman"
    fake.write_text(f"#!/bin/sh\necho '{PODMAN_SAYS}' >&2\nexit 125\n")
    fake.chmod(0o755)
    svc = PodmanService(LocalHost(), "nope", socket_dir=str(tmp_path / "sock"), podman=str(fake), start_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(ProvisionError) as e:
        svc.start()
    assert time.monotonic() - t0 < 10, "waited for the start timeout although podman had exited"
    assert PODMAN_SAYS in e.value.message and "'nope'" in e.value.message
    assert "registered in containers.conf" in e.value.hint


def test_the_vfio_recipe_on_kata_is_the_seeds():
    from vfiotest.podman.client import VFIO_ANNOTATION, vfio_recipe

    kata = vfio_recipe(True, "/dev/vfio/9", "8086:10ca")
    assert kata["devices"] == ["/dev/vfio/9"]                 # Kata hot-plugs the group; no container node
    assert kata["mounts"] == [{"type": "bind", "source": "/dev", "target": "/dev"}]
    assert kata["network_mode"] == "none"
    assert kata["annotations"] == {VFIO_ANNOTATION: "8086:10ca"}
    runc = vfio_recipe(False, "/dev/vfio/9", "8086:10ca")
    assert runc["devices"] == ["/dev/vfio/vfio", "/dev/vfio/9"] and "mounts" not in runc
    # no device: the same container without the group; broken on purpose: pieces left out
    assert vfio_recipe(True)["devices"] == [] and vfio_recipe(True)["mounts"]
    assert "mounts" not in vfio_recipe(True, "/dev/vfio/9", dev_mount=False)
    assert vfio_recipe(True, "/dev/vfio/9", device=False)["devices"] == []
