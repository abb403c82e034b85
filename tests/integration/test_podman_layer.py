"""The podman layer for real: API service per runtime, container lifecycle and cleanup.

`test_local_*` run on this machine's podman (runc, no devices); `test_runner_*`
(marker vm) run on the emulated runner through the SSH socket relay.
"""

import shutil

import pytest

from vfiotest.host import LocalHost
from vfiotest.podman import PodmanBaseSettings, RuntimeClient, ensure_image

pytestmark = [pytest.mark.skipif(shutil.which("podman") is None or shutil.which("mmdebstrap") is None,
                                 reason="podman and mmdebstrap needed"),
              pytest.mark.xdist_group("podman-layer"), pytest.mark.duration(95)]


def _exercise(host):
    img = ensure_image(host)
    client = RuntimeClient.open(host, "runc")
    sock = client.service.socket_path
    try:
        ok = client.run(img.ref, ["sh", "-c", "echo hi; ulimit -n"], annotations={"io.katacontainers.x.vfio": "0000:01:10.0"})
        assert (ok.exit_code, ok.stdout.split()) == (0, ["hi", "20000"]), str(ok)
        assert ok.oci_runtime == "runc"
        assert ok.inspect["Config"]["Annotations"]["io.katacontainers.x.vfio"] == "0000:01:10.0"
        bad = client.run(img.ref, ["sh", "-c", "exit 7"])
        assert bad.exit_code == 7
        nostart = client.run(img.ref, ["/no/such/binary"])
        assert nostart.exit_code is None and "no/such/binary" in nostart.stderr
        probe = client.run(img.ref, img.probe_command)
        assert probe.exit_code == 1 and probe.json()["step"] == "open-container"
        running = client.start(img.ref, ["sleep", "300"])
        assert running.status == "running"
        assert [c.id for c in client.leftovers()] == [running.id]
    finally:
        client.close()
    assert not host.exists(sock), "the service socket is left behind"
    res = host.run(["podman", "ps", "-a", "--filter", f"label=vfiotest.owner={client.owner}", "--format", "{{.ID}}"], timeout=60)
    assert res.stdout.strip() == "", f"containers left: {res.stdout}"


def test_local_service_and_cleanup():
    _exercise(LocalHost())


@pytest.mark.vm
def test_runner_service_over_ssh_relay_and_dropin():
    from vfiotest.runner import Runner

    r = Runner.default().up()
    h = r.host()
    try:
        h.connect()
        with PodmanBaseSettings(h) as s:
            assert h.read_text(s.path).startswith("# written by vfiotest")
            _exercise(h)
        assert not h.exists(s.path)
    finally:
        h.close()
        r.release()
