"""The in-container probe: ioctl numbers and struct layouts against <linux/vfio.h>, and its error paths."""

import json
import subprocess
import sys

import pytest

from vfiotest.podman import probe

PROBE = probe.__file__


def test_ioctl_numbers_match_linux_vfio_h():
    # _IO(';', 100 + n): no direction, no size
    assert probe.VFIO_GET_API_VERSION == 0x3B64
    assert probe.VFIO_CHECK_EXTENSION == 0x3B65
    assert probe.VFIO_SET_IOMMU == 0x3B66
    assert probe.VFIO_GROUP_GET_STATUS == 0x3B67
    assert probe.VFIO_GROUP_SET_CONTAINER == 0x3B68
    assert probe.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert probe.VFIO_DEVICE_GET_INFO == 0x3B6B
    assert probe.VFIO_DEVICE_GET_REGION_INFO == 0x3B6C
    assert probe.VFIO_DEVICE_GET_IRQ_INFO == 0x3B6D
    assert probe.VFIO_IOMMU_GET_INFO == 0x3B70
    assert probe.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert probe.VFIO_IOMMU_UNMAP_DMA == 0x3B72
    assert probe.VFIO_TYPE1v2_IOMMU == 3


def test_struct_sizes_match_the_kernel():
    assert probe.GROUP_STATUS.size == 8
    assert probe.DEVICE_INFO.size == 16
    assert probe.REGION_INFO.size == 32
    assert probe.IRQ_INFO.size == 16
    assert probe.DMA_MAP.size == 32
    assert probe.DMA_UNMAP.size == 24
    assert probe.IOMMU_INFO.size == 16


def test_dma_map_encoding():
    b = probe.encode_dma_map(0x7F0000001000, 0x10000000, 1 << 20)
    argsz, flags, vaddr, iova, size = probe.DMA_MAP.unpack(b)
    assert (argsz, flags, vaddr, iova, size) == (32, 3, 0x7F0000001000, 0x10000000, 1 << 20)
    assert isinstance(b, bytearray)  # mutable: fcntl.ioctl then returns the syscall's result
    assert probe.DMA_UNMAP.unpack(probe.encode_dma_unmap(0x2000, 4096)) == (24, 0, 0x2000, 4096)
    assert probe.REGION_INFO.unpack(probe.encode_region_info(7))[:3] == (32, 0, 7)


def test_aligned_buffer_is_page_aligned_and_inside_the_array():
    buf, addr = probe.aligned_buffer(1 << 20)
    start = buf.buffer_info()[0]
    assert addr % probe.PAGE_SIZE == 0
    assert start <= addr and addr + (1 << 20) <= start + len(buf)
    with pytest.raises(ValueError):
        probe.aligned_buffer(1000)


def _run(*args):
    p = subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True, timeout=30)
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_missing_container_node_names_open_container(tmp_path):
    rc, rep, err = _run("--vfio-dir", str(tmp_path))
    assert rc == 1 and rep["ok"] is False
    assert (rep["step"], rep["errname"]) == ("open-container", "ENOENT")
    assert "FAILED at step open-container" in err


def test_a_regular_file_is_not_vfio(tmp_path):
    (tmp_path / "vfio").write_text("")
    rc, rep, _ = _run("--vfio-dir", str(tmp_path))
    assert (rc, rep["step"], rep["errname"]) == (1, "api-version", "ENOTTY")
    assert rep["steps"] == ["open-container"]
    # each passed step says how long it took (where a slow probe spends its time)
    assert list(rep["step_seconds"]) == ["open-container"] and rep["step_seconds"]["open-container"] >= 0


def test_bad_dma_size_is_a_usage_error(tmp_path):
    p = subprocess.run([sys.executable, PROBE, "--dma-size", "zz"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2


def test_group_discovery(tmp_path):
    with pytest.raises(probe.ProbeFailed) as e:
        probe.find_group(str(tmp_path))
    assert e.value.step == "open-group"
    (tmp_path / "12").write_text("")
    (tmp_path / "vfio").write_text("")
    assert probe.find_group(str(tmp_path)) == "12"
    (tmp_path / "13").write_text("")
    with pytest.raises(probe.ProbeFailed, match="exactly one"):
        probe.find_group(str(tmp_path))


def test_device_discovery_from_sysfs(tmp_path):
    d = tmp_path / "kernel" / "iommu_groups" / "7" / "devices"
    d.mkdir(parents=True)
    (d / "0000:02:00.1").write_text("")
    assert probe.find_device("7", str(tmp_path)) == "0000:02:00.1"
    with pytest.raises(probe.ProbeFailed) as e:
        probe.find_device("8", str(tmp_path))
    assert e.value.step == "get-device-fd"


@pytest.mark.parametrize("obj", [{"a": [1, None, True, False, "x\"\\\n\u00e9\U0001F600"], "b": {"c": -3}}, [], {}])
def test_fallback_encoder_equals_json(obj):
    assert json.loads(probe._encode(obj)) == obj


def test_probe_is_standard_library_only():
    src = open(PROBE).read()
    assert "vfiotest" not in src.split('"""', 2)[2].split("def main")[0].replace("vfio-probe", "")
    out = subprocess.run([sys.executable, "-I", "-S", PROBE, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
