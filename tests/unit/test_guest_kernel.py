"""The Kata guest kernel (vfiotest.kata.kernel): the choice, the fragment check, the cache key,
and the init a kernel with everything built in gets. The build itself runs for real in the
integration tests' guest image (and `vfiotest kata build-kernel`)."""

import os

import pytest

from vfiotest.errors import ProvisionError
from vfiotest.kata import initrd
from vfiotest.kata import kernel as k


def test_the_choice_defaults_to_the_kata_kernel_and_names_a_bad_value(monkeypatch):
    monkeypatch.delenv(k.GUEST_KERNEL_ENV, raising=False)
    assert k.guest_kernel_choice() == "kata"
    monkeypatch.setenv(k.GUEST_KERNEL_ENV, "debian")
    assert k.guest_kernel_choice() == "debian"
    monkeypatch.setenv(k.GUEST_KERNEL_ENV, "fedora")
    with pytest.raises(ProvisionError, match="VFIOTEST_GUEST_KERNEL='fedora' is not a guest kernel") as e:
        k.guest_kernel_choice()
    assert "kata" in e.value.hint and "debian" in e.value.hint


def test_the_fragment_asks_for_what_the_agent_the_hook_and_the_vfs_need():
    want = k.fragment_lines()
    for opt in ("CONFIG_VIRTIO_CONSOLE", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_9P_FS", "CONFIG_OVERLAY_FS",
                "CONFIG_VFIO_PCI", "CONFIG_INTEL_IOMMU", "CONFIG_HOTPLUG_PCI_PCIE", "CONFIG_MEMORY_HOTPLUG",
                "CONFIG_ACPI_HOTPLUG_MEMORY", "CONFIG_MEMCG", "CONFIG_CGROUP_DEVICE", "CONFIG_IGBVF",
                "CONFIG_BLK_DEV_NVME", "CONFIG_RD_ZSTD", "CONFIG_DEVTMPFS"):
        assert want.get(opt) == "y", opt
    assert want["CONFIG_LOCALVERSION_AUTO"] == "n"


def test_a_setting_kconfig_dropped_is_named():
    want = {"CONFIG_VFIO_PCI": "y", "CONFIG_IGBVF": "y", "CONFIG_LOCALVERSION_AUTO": "n"}
    config = "CONFIG_VFIO_PCI=y\n# CONFIG_IGBVF is not set\n# CONFIG_LOCALVERSION_AUTO is not set\n"
    assert k.config_mismatches(want, config) == ["CONFIG_IGBVF=y (got n)"]
    assert k.config_mismatches({"CONFIG_X": "y"}, "") == ["CONFIG_X=y (got nothing)"]
    assert k.config_mismatches(want, config.replace("# CONFIG_IGBVF is not set", "CONFIG_IGBVF=y")) == []


def test_the_cache_key_follows_the_source_version_and_the_fragment(tmp_path):
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_VFIO=y\n")
    a = k.kata_kernel_key("6.1.192-3", str(frag))
    assert a == k.kata_kernel_key("6.1.192-3", str(frag))
    assert a != k.kata_kernel_key("6.1.193-1", str(frag))
    frag.write_text("CONFIG_VFIO=y\nCONFIG_IGBVF=y\n")
    assert a != k.kata_kernel_key("6.1.192-3", str(frag))


def test_a_built_kernel_in_the_cache_is_taken_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("VFIOTEST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(k, "source_version", lambda: "6.1.192-3")
    root = tmp_path / "guest-kernel" / k.kata_kernel_key("6.1.192-3")
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1.192-vfiotest-kata").write_bytes(b"MZ")
    (root / ".complete").write_text("linux-source-6.1_6.1.192-3+vfiotest-x 6.1.192-vfiotest-kata\n")
    monkeypatch.setattr(k, "_build_kata_kernel", lambda *a, **kw: pytest.fail("built although cached"))
    got = k.kata_kernel()
    assert got.kver == "6.1.192-vfiotest-kata" and os.path.exists(got.vmlinuz)


def test_a_missing_build_tool_is_named_before_anything_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("VFIOTEST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(k, "source_version", lambda: "6.1.192-3")
    monkeypatch.setattr(k.shutil, "which", lambda t: None if t == "flex" else "/usr/bin/" + t)
    monkeypatch.setattr(k, "_build_kata_kernel", lambda *a, **kw: pytest.fail("started without flex"))
    with pytest.raises(ProvisionError, match="needs flex") as e:
        k.kata_kernel()
    assert "ci/setup" in e.value.hint and "VFIOTEST_GUEST_KERNEL=debian" in e.value.hint


def test_an_init_for_a_kernel_with_everything_built_in_loads_nothing():
    init = initrd.KATA_INIT.format(load=initrd.NO_MODULES, agent="/usr/bin/kata-agent")
    assert "modprobe" not in init and init.rstrip().endswith("exec /usr/bin/kata-agent")
    loading = initrd.KATA_INIT.format(load=initrd.LOAD_MODULES.format(modules="vsock 9p"), agent="/a")
    assert "modprobe -a -q vsock 9p" in loading
