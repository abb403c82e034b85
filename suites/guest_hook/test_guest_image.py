"""The guest image holds the hook where the agent looks for it, and the VFIO modules its kernel has."""

import os

from vfiotest.fixtures.allure_report import attach_json
from vfiotest.kata import initrd
from vfiotest.kata.image import read_initrd, verify_guest_image
from vfiotest.kata.kernel import guest_kernel


def test_hook_is_a_regular_executable_file_under_guest_hook_path(guest_image):
    listing = read_initrd(guest_image.path)
    hook = listing.get(guest_image.hook_path)
    attach_json("the hook's entry in the guest image", {
        "image": guest_image.path, "hook_path": guest_image.hook_path,
        "entry": None if hook is None else {"kind": hook.kind, "perms": oct(hook.perms),
                                            "first_line": hook.data.split(b"\n", 1)[0].decode(errors="replace")}})
    assert guest_image.hook_path == "/usr/share/oci/hooks/prestart/vfio-hook"
    assert hook is not None, f"{guest_image.hook_path} missing from {guest_image.path}"
    assert hook.kind == "file"                      # the agent skips symlinks
    assert hook.perms == 0o755
    assert hook.data.startswith(b"#!/usr/bin/python3 -IS\n")  # no site, no environment: one option cluster


def test_hook_ships_with_the_device_layer_it_shares(guest_image):
    listing = read_initrd(guest_image.path)
    attach_json("the hook's library in the guest image", {
        m: listing.get(f"/usr/share/oci/hooks/lib/vfiotest/{m}.py") is not None for m in ("bind", "host", "pci", "errors")})
    for mod in ("bind", "host", "pci", "errors"):
        assert listing.get(f"/usr/share/oci/hooks/lib/vfiotest/{mod}.py") is not None, mod
    py = listing.resolve("/usr/bin/python3")
    assert py is not None and py.executable


def test_image_has_the_vfio_modules_its_kernel_has(guest_image):
    kernel = guest_kernel()
    wanted = initrd.vfio_modules_for(kernel)
    assert {"vfio", "vfio_iommu_type1", "vfio-pci"} <= set(wanted)
    # vfio_virqfd is asked for only where the kernel has it (a module before 6.2)
    assert ("vfio_virqfd" in wanted) == kernel.has_module("vfio_virqfd")
    check = verify_guest_image(read_initrd(guest_image.path), modules=wanted)
    attach_json("the VFIO modules: asked for and found in the image",
                {"kernel": str(kernel), "wanted": list(wanted), "found": check.modules, "problems": check.problems})
    assert check.ok, check.problems
    assert all(v.startswith("file ") or v == "builtin" for v in check.modules.values())


def test_image_is_cached_by_its_inputs(guest_image):
    again = initrd.build_initrd(initrd.InitrdSpec(**{**guest_image.spec, "allowed_ids": tuple(guest_image.spec["allowed_ids"]),
                                                     "extra_drivers": tuple(guest_image.spec["extra_drivers"])}))
    attach_json("the image built again from the same inputs",
                {"inputs": guest_image.spec, "first": [guest_image.path, guest_image.size],
                 "again": [again.path, os.path.getsize(again.path), "cached" if again.cached else "rebuilt"]})
    assert again.cached and again.path == guest_image.path
    assert os.path.getsize(again.path) == guest_image.size
