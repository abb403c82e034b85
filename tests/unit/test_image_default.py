"""Our image when none is named (vfiotest.podman.image.default_recipe): the probe image, with
testpmd when the controller has it, so that the session's image and the NIC test's DPDK image are
one image, imported once per runner boot."""

import os

from vfiotest.podman import image


def test_without_testpmd_the_probe_image(monkeypatch, tmp_path):
    monkeypatch.setattr(image, "TESTPMD", str(tmp_path / "no-testpmd"))
    assert image.default_recipe() == image.ImageRecipe()
    assert image.default_recipe().dpdk is False


def test_with_testpmd_the_dpdk_image_that_dpdk_image_asks_for(monkeypatch, tmp_path):
    testpmd = tmp_path / "dpdk-testpmd"
    testpmd.write_text("")
    monkeypatch.setattr(image, "TESTPMD", str(testpmd))
    monkeypatch.setattr(image, "dpdk_files", lambda: [str(testpmd)])
    monkeypatch.setattr(image, "dpdk_version", lambda: "22.11")
    r = image.default_recipe()
    assert r == image.ImageRecipe(dpdk=True)           # fixtures/podman.py dpdk_image's recipe
    assert r.tarball("/c").name.startswith("vfiotest-dpdk-")


class FakeHost:
    name = "fake"
    is_local = True

    def __init__(self):
        self.imported = []

    def run(self, argv, timeout=None, check=False):
        class R:
            rc, ok, stdout, stderr = 1, False, "", ""
        r = R()
        if argv[:3] == ["podman", "image", "exists"]:
            r.rc = 0 if argv[3] in self.imported else 1
        elif argv[:2] == ["podman", "import"]:
            self.imported.append(argv[-1])
            r.rc, r.ok = 0, True
        elif argv[0] == "stat":
            r.rc, r.ok, r.stdout = 0, True, str(os.path.getsize(argv[-1]))
        return r


def test_the_session_image_then_the_dpdk_image_is_one_import(monkeypatch, tmp_path):
    testpmd = tmp_path / "dpdk-testpmd"
    testpmd.write_text("")
    monkeypatch.setattr(image, "TESTPMD", str(testpmd))
    monkeypatch.setattr(image, "dpdk_files", lambda: ["/usr/bin/dpdk-testpmd"])
    monkeypatch.setattr(image, "dpdk_version", lambda: "22.11")
    cache = tmp_path / "cache"
    tar = image.ImageRecipe(dpdk=True).tarball(str(cache))
    tar.parent.mkdir(parents=True)
    tar.write_bytes(b"rootfs")                          # cached: no mmdebstrap run
    host = FakeHost()
    first = image.ensure_image(host, cache_dir=str(cache))                                   # podman_image
    second = image.ensure_image(host, recipe=image.ImageRecipe(dpdk=True), cache_dir=str(cache))  # dpdk_image
    assert first.ref == second.ref and host.imported == [first.ref]
