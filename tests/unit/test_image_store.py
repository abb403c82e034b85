"""The read-only image store the emulated runner boots with (podman.image.ensure_store), made by
the controller's real podman from a small rootfs tarball in a cache directory of the test's own."""

import json
import os
import shutil
import subprocess
import tarfile

import pytest

from vfiotest.errors import ProvisionError
from vfiotest.podman.image import ImageRecipe, ensure_store

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (ci/setup installs it)")


def _tarball(path, payload=b"hello\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.parent / "src.txt"
    src.write_bytes(payload)
    with tarfile.open(path, "w") as t:
        t.add(src, arcname="etc/hello")


def _read(img, path):
    """A file of the ext4 image, read with debugfs (e2fsprogs): no mount."""
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(img)], capture_output=True, text=True, check=True).stdout


def _mounts_under(path):
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


def test_the_store_holds_the_image_is_made_once_and_leaves_the_controllers_podman_alone(tmp_path):
    recipe = ImageRecipe(dpdk=False)
    _tarball(recipe.tarball(str(tmp_path)))
    before = subprocess.run(["podman", "images", "-q"], capture_output=True, text=True).stdout
    store, made_s = ensure_store(recipe, cache_dir=str(tmp_path))
    assert store == recipe.store(str(tmp_path)) and made_s > 0
    assert not list(tmp_path.glob("*.tmp*"))        # nothing half made left beside it
    assert not _mounts_under(tmp_path)
    # an ext4 filesystem holding a podman graph root (overlay driver) with the image in it, named
    assert "filesystem volume name:   vfiotest-images" in subprocess.run(
        ["dumpe2fs", "-h", str(store)], capture_output=True, text=True, check=True).stdout.lower()
    images = json.loads(_read(store, "/overlay-images/images.json"))
    assert [n for img in images for n in img.get("names", [])] == [recipe.ref], images
    layer = images[0]["layer"]
    assert _read(store, f"/overlay/{layer}/diff/etc/hello") == "hello\n"   # the tarball's file, in its layer
    top = subprocess.run(["debugfs", "-R", "ls -p /", str(store)], capture_output=True, text=True, check=True).stdout
    names = {line.split("/")[5] for line in top.splitlines() if line.count("/") >= 6}
    assert {"overlay", "overlay-images", "overlay-layers"} <= names and "libpod" not in names, names   # not podman's database
    assert ensure_store(recipe, cache_dir=str(tmp_path)) == (store, 0.0)
    # a tarball made anew (`vfiotest image build --rebuild`) makes the store anew
    tar = recipe.tarball(str(tmp_path))
    os.utime(store, (tar.stat().st_mtime - 10, tar.stat().st_mtime - 10))     # the store older than the tarball
    again, made_s = ensure_store(recipe, cache_dir=str(tmp_path))
    assert again == store and made_s > 0 and store.stat().st_mtime >= tar.stat().st_mtime
    assert subprocess.run(["podman", "images", "-q"], capture_output=True, text=True).stdout == before


def test_a_tarball_podman_refuses_leaves_no_store_and_says_what_to_run(tmp_path):
    recipe = ImageRecipe(dpdk=False)
    bad = recipe.tarball(str(tmp_path))
    bad.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(ProvisionError, match="podman import into the image store") as e:
        ensure_store(recipe, cache_dir=str(tmp_path))
    assert "podman --root" in e.value.hint
    assert not recipe.store(str(tmp_path)).exists()
    assert not list(tmp_path.glob("*.tmp*"))
    assert not _mounts_under(tmp_path)


def test_a_tool_that_is_missing_is_named_and_one_that_hangs_is_stopped():
    from vfiotest.podman import image

    with pytest.raises(ProvisionError, match="no-such-mkfs is not installed on the controller") as e:
        image._run_tool(["no-such-mkfs", "-d", "x"], 5, "apt-get install e2fsprogs")
    assert e.value.hint == "apt-get install e2fsprogs"
    hung = image._run_tool(["sleep", "30"], 0.3, "")
    assert hung.returncode == image._TIMED_OUT and "did not finish in 0.3 s" in hung.stderr
