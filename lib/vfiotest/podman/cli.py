"""`vfiotest image build|show` and `vfiotest probe`: the test image and the in-container probe by hand."""

from __future__ import annotations

import argparse
import json
import sys


def _say(text: str) -> None:
    print(f"[vfiotest] {text}", file=sys.stderr, flush=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import PROFILE_UNUSED, add_target_argument

    img = subparsers.add_parser("image", help="the podman test image (mmdebstrap rootfs + VFIO probe and NVMe driver; DPDK's testpmd too when this machine has it)")
    isub = img.add_subparsers(dest="image_command", metavar="ACTION")
    b = isub.add_parser("build", help="build the rootfs tarball (cached by its inputs) and import it on the target")
    add_target_argument(b, PROFILE_UNUSED)
    b.add_argument("--rebuild", action="store_true", help="build and import again even if cached")
    b.add_argument("--no-import", action="store_true", help="only build the tarball on this machine")
    b.set_defaults(func=cmd_image_build)
    s = isub.add_parser("show", help="the image reference and tarball for the current inputs")
    s.set_defaults(func=cmd_image_show)
    img.set_defaults(func=lambda a: (img.print_help(), 2)[1])

    p = subparsers.add_parser("probe", help="run the VFIO probe in a container on the target for a group already on "
                                             "vfio-pci (on a Kata runtime with the seed's recipe: -v /dev:/dev, "
                                             "--device /dev/vfio/N, the vendor:device annotation)")
    add_target_argument(p, PROFILE_UNUSED)
    p.add_argument("--group", required=True, help="IOMMU group number on the target (/dev/vfio/N)")
    p.add_argument("--device", help="PCI address in the group (default: the probe finds it in sysfs)")
    p.add_argument("--runtime", default="kata-vfio", help="OCI runtime (default kata-vfio; must be registered)")
    p.add_argument("--image", help="use this image instead of ours (needs python3)")
    p.add_argument("--no-ipc-lock", action="store_true", help="drop CAP_IPC_LOCK (and set --memlock)")
    p.add_argument("--memlock", type=int, help="RLIMIT_MEMLOCK in bytes for the container")
    p.add_argument("--no-base-settings", action="store_true", help="do not write podman's containers.conf drop-in")
    p.set_defaults(func=cmd_probe)


def cmd_image_show(args: argparse.Namespace) -> int:
    from .image import default_recipe

    r = default_recipe()
    print(json.dumps({"ref": r.ref, "tarball": str(r.tarball()), "cached": r.tarball().exists(), "inputs": r.inputs()},
                     indent=2))
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from .. import targets
    from .image import build_tarball, ensure_image

    if args.no_import:
        path, secs = build_tarball(rebuild=args.rebuild, progress=_say)
        print(json.dumps({"tarball": str(path), "build_s": round(secs, 1)}))
        return 0
    host, close = targets.open_host(args.target, progress=_say)
    try:
        img = ensure_image(host, rebuild=args.rebuild, progress=_say)
    finally:
        close()
    print(json.dumps({"ref": img.ref, "tarball": img.tarball, **{k: round(v, 1) for k, v in img.timings.items()}}))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .. import targets
    from ..journal import Journal
    from ..pci import read_inventory
    from .client import RuntimeClient, runtime_is_kata, vfio_recipe
    from .conf import PodmanBaseSettings, dropin_record
    from .image import ensure_image

    host, close = targets.open_host(args.target, progress=_say)
    journal = None
    try:
        # this process's journal: each change recorded before it is made (the drop-in, the API
        # service, the container); the end of the command replays it, and after a kill it is an
        # orphan that `vfiotest restore` (or the next session) replays
        journal = Journal.open(host)
        if not args.no_base_settings:
            settings = PodmanBaseSettings(host)
            settings.snapshot()
            journal.record(dropin_record(settings))
            settings.apply()
        img = ensure_image(host, image=args.image, progress=_say)
        cmd = img.probe_command + (["--device", args.device] if args.device else [])
        # Kata: the seed's recipe, the group's first device's vendor:device as the annotation
        kata = runtime_is_kata(host, args.runtime)
        members = sorted((d for d in read_inventory(host).devices.values()
                          if d.iommu_group == str(args.group) and not d.is_bridge), key=lambda d: str(d.address))
        vendor_device = members[0].vendor_device if members else None
        with RuntimeClient.open(host, args.runtime, recorder=journal) as client:
            res = client.run(img.ref, cmd, **vfio_recipe(kata, f"/dev/vfio/{args.group}", vendor_device),
                             cap_add=[] if args.no_ipc_lock else ["CAP_IPC_LOCK"],
                             cap_drop=["CAP_IPC_LOCK"] if args.no_ipc_lock else [],
                             ulimits={"memlock": args.memlock} if args.memlock else None)
        print(res.stdout.strip() or json.dumps({"ok": False, "start_error": res.stderr.strip()}))
        _say(f"container ran on {res.oci_runtime} in {res.seconds:.1f} s, exit {res.exit_code}")
        return 0 if res.exit_code == 0 else 1
    finally:
        try:
            if journal is not None:
                journal.restore_all()
                journal.close()
        finally:
            close()
