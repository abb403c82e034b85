"""The userspace NVMe driver (podman/nvme_io.py): its layouts, its error paths, and that it runs
from the image's layout (next to the probe) and as the source a user's own image gets. Its I/O
against a real controller runs in the emulated runner (suites/podman_run/test_vf_io.py)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vfiotest.podman import image, nvme_io, probe


def test_command_layouts_match_the_nvme_spec() -> None:
    sqe = struct.pack("<BBHI8x8xQQ6I", 1, 0, 7, 1, 0x1000, 0x2000, 10, 11, 12, 13, 14, 15)
    assert len(sqe) == nvme_io.SQE == 64
    assert sqe[0] == 1 and struct.unpack_from("<H", sqe, 2)[0] == 7          # opcode, command id
    assert struct.unpack_from("<I", sqe, 4)[0] == 1                           # NSID
    assert struct.unpack_from("<QQ", sqe, 24) == (0x1000, 0x2000)             # PRP1, PRP2
    assert struct.unpack_from("<6I", sqe, 40) == (10, 11, 12, 13, 14, 15)     # CDW10..15
    # the DMA layout leaves the data pages after every fixed page
    assert nvme_io.PG_DATA > max(nvme_io.PG_ASQ, nvme_io.PG_ACQ, nvme_io.PG_IOSQ, nvme_io.PG_IOCQ,
                                 nvme_io.PG_IDENT, nvme_io.PG_PRP)
    # one PRP list page covers the largest command
    assert nvme_io.MAX_XFER // nvme_io.PAGE - 1 <= nvme_io.PAGE // 8


def test_no_vfio_fails_at_the_vfio_step_with_json(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-S", nvme_io.__file__, "--vfio-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] is False and out["step"] == "vfio" and str(tmp_path) in out["error"]
    assert "FAILED at step vfio" in res.stderr


def test_bad_arguments_exit_2() -> None:
    res = subprocess.run([sys.executable, "-S", nvme_io.__file__, "--blocks", "many"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2


def test_runs_from_the_images_layout_without_site_packages(tmp_path: Path) -> None:
    """In the image the driver and a copy of the probe sit in one directory (image.LIB_IN_IMAGE);
    python3-minimal has no json module: the probe's own encoder prints the report."""
    shutil.copy(probe.__file__, tmp_path / "probe.py")
    shutil.copy(nvme_io.__file__, tmp_path / "nvme_io.py")
    code = ("import sys; sys.modules['json'] = None; sys.argv = ['nvme_io.py', '--vfio-dir', sys.argv[1]];"
            f"sys.path.insert(0, {str(tmp_path)!r}); import runpy; runpy.run_path({str(tmp_path / 'nvme_io.py')!r},"
            " run_name='__main__')")
    res = subprocess.run([sys.executable, "-S", "-I", "-c", code, str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, res.stderr
    assert json.loads(res.stdout)["step"] == "vfio"
    mods = subprocess.run([sys.executable, "-S", "-I", "-c",
                           f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import nvme_io;"
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vfiotest', 'ctypes', 'mmap')))"],
                          capture_output=True, text=True, timeout=30)
    assert mods.returncode == 0 and mods.stdout.strip() == "[]", mods.stderr


def test_a_users_own_image_gets_the_driver_as_source(tmp_path: Path) -> None:
    cmd = image.Image("docker.io/library/python:3", built=False).nvme_command
    assert cmd[:2] == ["python3", "-c"]
    res = subprocess.run([sys.executable, "-S", "-I", "-c", cmd[2], "--vfio-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and json.loads(res.stdout)["step"] == "vfio", res.stderr
    assert image.Image("localhost/x:1").nvme_command == [image.NVME_IN_IMAGE]


def test_the_image_recipe_ships_both_files_and_hashes_the_driver() -> None:
    recipe = image.ImageRecipe()
    cmd = " ".join(recipe.mmdebstrap_command("/tmp/out.tar"))
    assert f"{image.LIB_IN_IMAGE}/probe.py" in cmd and image.NVME_IO_IN_IMAGE in cmd
    assert "nvme_io_sha256" in recipe.inputs()


@pytest.mark.parametrize("value", [0.25, 1e-05, 3.0])
def test_the_fallback_encoder_writes_floats(value: float) -> None:
    assert json.loads(probe._encode({"t": value})) == {"t": value}
