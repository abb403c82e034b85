"""The initrd inspector: cpio archives made with GNU cpio, plain and compressed (gzip, zstd,
xz), an early uncompressed archive in front, and the checks on the hook and the modules."""

import os
import subprocess

import pytest

from vfiotest.errors import ProvisionError
from vfiotest.kata.image import read_initrd, verify_guest_image

HOOK = "usr/share/oci/hooks/prestart/vfio-hook"
MODS = "usr/lib/modules/6.1.0-x/kernel/drivers/vfio"


def make_tree(root, hook_mode=0o755, hook_symlink=False, modules=("vfio", "vfio_iommu_type1", "vfio-pci"), builtin=()):
    os.makedirs(os.path.join(root, os.path.dirname(HOOK)))
    os.makedirs(os.path.join(root, MODS, "pci"))
    os.makedirs(os.path.join(root, "usr/bin"))
    os.makedirs(os.path.join(root, "usr/lib/python3.11/json"))
    with open(os.path.join(root, "usr/bin/python3.11"), "w") as f:
        f.write("\x7fELF fake")
    os.chmod(os.path.join(root, "usr/bin/python3.11"), 0o755)
    os.symlink("python3.11", os.path.join(root, "usr/bin/python3"))
    open(os.path.join(root, "usr/lib/python3.11/json/__init__.py"), "w").close()
    if hook_symlink:
        with open(os.path.join(root, "usr/bin/real-hook"), "w") as f:
            f.write("#!/bin/sh\n")
        os.symlink("/usr/bin/real-hook", os.path.join(root, HOOK))
    else:
        with open(os.path.join(root, HOOK), "w") as f:
            f.write("#!/usr/bin/python3\nprint('hook')\n")
        os.chmod(os.path.join(root, HOOK), hook_mode)
    for m in modules:
        sub = "pci/" if m.startswith("vfio-pci") else ""
        open(os.path.join(root, MODS, f"{sub}{m}.ko"), "w").close()
    with open(os.path.join(root, "usr/lib/modules/6.1.0-x/modules.builtin"), "w") as f:
        f.writelines(f"kernel/drivers/vfio/{b}.ko\n" for b in builtin)


def cpio(root, out, compress=None):
    files = subprocess.run("find . | LC_ALL=C sort", shell=True, cwd=root, capture_output=True, check=True).stdout
    data = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], input=files, cwd=root,
                          capture_output=True, check=True).stdout
    if compress:
        data = subprocess.run(compress, input=data, capture_output=True, check=True).stdout
    with open(out, "ab") as f:
        f.write(data)
    return out


@pytest.mark.parametrize("compress,name", [(None, "none"), (["gzip", "-c"], "gzip"), (["zstd", "-c", "-q"], "zstd"),
                                           (["xz", "-c", "--check=crc32"], "xz")])
def test_reads_every_compression(tmp_path, compress, name):
    make_tree(str(tmp_path / "t"))
    img = cpio(str(tmp_path / "t"), str(tmp_path / "initrd.img"), compress)
    listing = read_initrd(img)
    assert listing.compression == [name]
    hook = listing.get("/" + HOOK)
    assert hook.kind == "file" and hook.perms == 0o755 and hook.data.startswith(b"#!/usr/bin/python3")
    assert listing.get("usr/bin/python3").target == "python3.11"
    assert verify_guest_image(listing, modules=["vfio", "vfio_iommu_type1", "vfio-pci"]).ok


def test_early_plain_archive_then_compressed_main(tmp_path):
    early = tmp_path / "early"
    os.makedirs(early / "kernel/x86/microcode")
    (early / "kernel/x86/microcode/GenuineIntel.bin").write_bytes(b"\0" * 100)
    img = str(tmp_path / "initrd.img")
    cpio(str(early), img)
    make_tree(str(tmp_path / "t"))
    cpio(str(tmp_path / "t"), img, ["zstd", "-c", "-q"])
    listing = read_initrd(img)
    assert listing.compression == ["none", "zstd"]
    assert listing.get("kernel/x86/microcode/GenuineIntel.bin").size == 100
    assert listing.get(HOOK) is not None


def test_problems_are_named(tmp_path):
    make_tree(str(tmp_path / "a"), hook_mode=0o644, modules=("vfio",))
    check = verify_guest_image(read_initrd(cpio(str(tmp_path / "a"), str(tmp_path / "a.img"))),
                               modules=["vfio", "vfio-pci"])
    assert not check.ok
    assert any("mode 644" in p for p in check.problems)
    assert any("vfio-pci" in p for p in check.problems)
    make_tree(str(tmp_path / "b"), hook_symlink=True)
    check = verify_guest_image(read_initrd(cpio(str(tmp_path / "b"), str(tmp_path / "b.img"))), modules=["vfio"])
    assert any("symlink" in p for p in check.problems)


def test_builtin_module_counts_as_present(tmp_path):
    make_tree(str(tmp_path / "t"), modules=("vfio", "vfio-pci"), builtin=("vfio_virqfd",))
    check = verify_guest_image(read_initrd(cpio(str(tmp_path / "t"), str(tmp_path / "i.img"))),
                               modules=["vfio", "vfio_virqfd", "vfio-pci"])
    assert check.ok and check.modules["vfio_virqfd"] == "builtin"


def test_not_an_initrd(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"hello world, not a cpio")
    with pytest.raises(ProvisionError, match="unknown compression"):
        read_initrd(str(p))
    with pytest.raises(ProvisionError, match="build it first"):
        read_initrd(str(tmp_path / "missing"))


def _kata_guest(root, init_text="#!/bin/sh\nexec /usr/bin/kata-agent\n", agent=True, shell=True,
                modules=("virtio_console", "vsock")):
    make_tree(root)
    os.makedirs(os.path.join(root, "usr/sbin"))
    with open(os.path.join(root, "usr/sbin/vfiotest-kata-init"), "w") as f:
        f.write(init_text)
    os.chmod(os.path.join(root, "usr/sbin/vfiotest-kata-init"), 0o755)
    if agent:
        with open(os.path.join(root, "usr/bin/kata-agent"), "w") as f:
            f.write("\x7fELF agent")
        os.chmod(os.path.join(root, "usr/bin/kata-agent"), 0o755)
    if shell:
        os.makedirs(os.path.join(root, "bin"))
        with open(os.path.join(root, "bin/dash"), "w") as f:
            f.write("\x7fELF dash")
        os.chmod(os.path.join(root, "bin/dash"), 0o755)
        os.symlink("dash", os.path.join(root, "bin/sh"))
    for m in modules:
        open(os.path.join(root, MODS, f"{m}.ko"), "w").close()


@pytest.mark.parametrize("case, problem", [
    ("good", None),
    ("no-agent", "kata-agent is missing"),
    ("no-shell", "needs /bin/sh"),
    ("no-vsock", "module vsock"),
])
def test_kata_guest_check_finds_the_init_its_shell_the_agent_and_modules(tmp_path, case, problem):
    from vfiotest.kata.image import verify_kata_guest

    root = str(tmp_path / "root")
    _kata_guest(root, agent=case != "no-agent", shell=case != "no-shell",
                modules=("virtio_console",) if case == "no-vsock" else ("virtio_console", "vsock"))
    listing = read_initrd(cpio(root, str(tmp_path / "i.img"), ["zstd", "-q"]))
    check = verify_kata_guest(listing, init="/usr/sbin/vfiotest-kata-init", agent="/usr/bin/kata-agent",
                              modules=("virtio_console", "vsock"))
    if problem is None:
        assert check.ok, check.problems
    else:
        assert len(check.problems) == 1 and problem in check.problems[0], check.problems
