"""Runner assets without booting: the cpio writer, module ordering, kernel choice, content keys, keys."""

import gzip
import os
import subprocess

import pytest

from vfiotest.errors import ProvisionError
from vfiotest.runner import assets, guestinit


def test_cpio_is_read_back_by_cpio(tmp_path):
    path = tmp_path / "x.cpio"
    with open(path, "wb") as f:
        w = assets.CpioWriter(f)
        w.dir("bin")
        w.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
        w.symlink("bin/sh", "tool")
        w.chardev("console", 5, 1)
        w.file("odd", b"x" * 5)
        w.close()
    listing = subprocess.run(["cpio", "-itv", "--quiet", "-F", str(path)], capture_output=True, text=True, check=True).stdout
    lines = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in listing.splitlines()}
    assert set(lines) == {"bin", "bin/tool", "bin/sh", "console", "odd"}
    assert lines["bin/tool"].startswith("-rwxr-xr-x") and " root " in lines["bin/tool"]
    assert lines["console"].startswith("crw-------") and "5," in lines["console"]
    assert "bin/sh -> tool" in lines["bin/sh"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(path), "bin/tool", "odd"], cwd=out, check=True)
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "odd").read_bytes() == b"xxxxx"


def fake_kernel(root, deps, builtin=()):
    """A kernel cache entry: boot/vmlinuz-KVER and lib/modules/KVER with modules.dep."""
    kver = "6.1.0-99-amd64"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{kver}").write_bytes(b"kernel")
    mods = root / "lib" / "modules" / kver
    lines = []
    for name, needs in deps.items():
        rel = f"kernel/{name}.ko"
        (mods / "kernel").mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(f"module {name}".encode())
        lines.append(f"{rel}: " + " ".join(f"kernel/{n}.ko" for n in needs))
    (mods / "modules.dep").write_text("\n".join(lines) + "\n")
    (mods / "modules.builtin").write_text("".join(f"kernel/{b}.ko\n" for b in builtin))
    return assets.Kernel(str(root))


def test_module_paths_put_dependencies_first(tmp_path):
    k = fake_kernel(tmp_path / "k", {
        "9p": ["9pnet", "netfs"], "9pnet": [], "netfs": [], "9pnet_virtio": ["9pnet", "virtio_ring"],
        "virtio_ring": [], "virtio_net": ["net_failover", "failover"], "net_failover": ["failover"], "failover": [],
    }, builtin=["virtio_pci"])
    order = [os.path.basename(p)[:-3] for p in k.module_paths(["virtio_pci", "9pnet-virtio", "9p", "virtio_net"])]
    assert sorted(order) == sorted(set(order)), "each module once"
    assert "virtio_pci" not in order  # built in
    for mod, dep in [("9p", "9pnet"), ("9p", "netfs"), ("9pnet_virtio", "virtio_ring"),
                     ("virtio_net", "net_failover"), ("net_failover", "failover")]:
        assert order.index(dep) < order.index(mod), (dep, mod, order)
    with pytest.raises(ProvisionError, match="module vfio_pci is not in kernel 6.1.0-99-amd64"):
        k.module_paths(["vfio_pci"])


APT_SHOW = """\
Package: linux-image-amd64
Version: 6.12.95-1~bpo12+1
Depends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)

Package: linux-image-amd64
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)

Package: linux-image-amd64
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-amd64 (= 6.1.176-1)
"""


def test_kernel_choice_is_the_newest_6_1(monkeypatch):
    calls = []

    def fake_run(cmd, what, timeout=600, cwd=None):
        calls.append(cmd)
        if cmd[:2] == ["apt-cache", "show"]:
            return APT_SHOW
        return "linux-image-6.1.0-56-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n"

    monkeypatch.setattr(assets, "_run", fake_run)
    monkeypatch.delenv(assets.KERNEL_PKG_ENV, raising=False)
    assert assets.resolve_kernel_package() == ("linux-image-6.1.0-56-amd64", "6.1.192-2")
    monkeypatch.setenv(assets.KERNEL_PKG_ENV, "linux-image-6.1.0-50-amd64")
    assert assets.resolve_kernel_package()[0] == "linux-image-6.1.0-50-amd64"


def test_initramfs_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    deps = {n: [] for n in guestinit.INITRAMFS_MODULES}
    k = fake_kernel(tmp_path / "k", deps)
    first = assets.ensure_initramfs(k)
    assert os.path.dirname(first) == assets.cache_root()
    mtime = os.stat(first).st_mtime_ns
    assert assets.ensure_initramfs(k) == first and os.stat(first).st_mtime_ns == mtime, "rebuilt without a change"
    data = gzip.decompress(open(first, "rb").read())
    assert b"vfiotest-init" in data and b"TRAILER!!!" in data
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True).stdout.decode()
    assert {"init", "bin/busybox", "dev/console", "etc/vfiotest-modules", "lib/modules/9p.ko"} <= set(listing.split())
    monkeypatch.setattr(guestinit, "INIT", guestinit.INIT + "\n# changed\n")
    second = assets.ensure_initramfs(k)
    assert second != first and os.path.exists(second)
    assert not os.path.exists(first), "the stale build is removed"


def test_keys_are_made_once(tmp_path):
    keys = assets.ensure_keys(str(tmp_path / "ssh"))
    assert oct(os.stat(tmp_path / "ssh").st_mode & 0o777) == "0o700"
    pub = assets.public_key(keys["host"])
    assert pub.startswith("ssh-ed25519 ")
    again = assets.ensure_keys(str(tmp_path / "ssh"))
    assert again == keys and assets.public_key(again["host"]) == pub
    assert assets.public_key(keys["client"]) != pub
