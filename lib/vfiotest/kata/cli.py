"""`vfiotest kata ...`: build and inspect the guest image, derive configuration.toml,
register the kata-vfio runtime."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import HarnessError
from . import config as kata_config
from . import image, initrd, runtime
from . import kernel as kernel_mod

if TYPE_CHECKING:
    from ..host import Host


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _open(args: argparse.Namespace) -> tuple[Host, Callable[[], None]]:
    from ..targets import open_host

    return open_host(args.target, progress=_say)


HOOK_PROFILE_HELP = ("the IDs the guest hook binds without an annotation: seed or emulated (default emulated, "
                     "whatever the target; VFIOTEST_PROFILE is not read)")


def _profile_ids(name: str | None) -> tuple[str, ...]:
    from ..profiles import get_profile

    p = get_profile(name or "emulated")
    return tuple(sorted(set(p.ids) | set(p.vf_ids.values())))


def _agent(path: str | None) -> str:
    """`path`, else the kata-agent of the Kata 1.x bundle (vfiotest.kata.bundle.find_bundle)."""
    from . import bundle

    if path:
        return path
    found = bundle.find_bundle(progress=_say)
    if found is None:
        raise runtime.ProvisionError("the Kata guest image needs a kata-agent: no --agent given and no Kata 1.x "
                                     "bundle found",
                                     hint=f"set {bundle.BUNDLE_ENV} to a Kata 1.x bundle (build one with "
                                          f"{bundle.BUILD_SCRIPT}, see its README.md), or give --agent")
    return found.agent


def _memory(text: str) -> int:
    """--memory: MiB for the Kata guest (an argparse type: a bad one is a usage error, exit 2)."""
    try:
        return kata_config.guest_memory_mb(text)
    except HarnessError as e:
        raise argparse.ArgumentTypeError(f"{e} ({e.hint})") from None


def cmd_build(args: argparse.Namespace) -> int:
    spec = initrd.InitrdSpec(guest_hook_path=args.hook_path, allowed_ids=_profile_ids(args.profile),
                             agent=_agent(args.agent), compress=args.compress)
    built = initrd.build_initrd(spec, force=args.force, progress=_say)
    if args.json:
        print(json.dumps(built.manifest(), indent=1))
    else:
        print(f"initrd:  {built.path}{' (cached)' if built.cached else ''}\n"
              f"kernel:  {built.kernel}\nsize:    {built.size / 1e6:.1f} MB\n"
              f"built:   {built.build_seconds:.1f} s\nhook:    {built.hook_path}\n"
              f"modules: {' '.join(built.modules)}")
    return 0


def cmd_build_kernel(args: argparse.Namespace) -> int:
    k = kernel_mod.kata_kernel(progress=_say)
    if args.json:
        print(json.dumps({"kver": k.kver, "vmlinuz": k.vmlinuz, "config": k.config, "package": k.package}, indent=1))
    else:
        print(f"kernel:  {k.vmlinuz}\nrelease: {k.kver}\nconfig:  {k.config}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    listing = image.read_initrd(args.image)
    if args.list:
        print("\n".join(listing.lines()))
    modules = args.module or ["vfio", "vfio_iommu_type1", "vfio-pci"]
    check = image.verify_guest_image(listing, hook_name=args.hook_name, guest_hook_path=args.hook_path,
                                     modules=modules, needs_python=not args.no_python)
    # A Kata guest image (the agent or our init in it): the init, its interpreter, the agent and
    # the modules the agent needs are checked too; `--kata` asks for that on any image.
    kata = args.kata or any(listing.get(p) for p in (initrd.KATA_INIT_PATH, initrd.GUEST_AGENT_PATH))
    if kata:
        check.problems += image.verify_kata_guest(listing, init=initrd.KATA_INIT_PATH, agent=initrd.GUEST_AGENT_PATH,
                                                  modules=initrd.KATA_GUEST_MODULES).problems
    if args.json:
        print(json.dumps({"image": args.image, "size": listing.size, "compression": listing.compression,
                          "entries": len(listing.entries),
                          "hook": {"path": f"/{check.hook.path}", "mode": f"{check.hook.perms:o}", "kind": check.hook.kind}
                          if check.hook else None,
                          "kata_guest": {"init": initrd.KATA_INIT_PATH, "agent": initrd.GUEST_AGENT_PATH} if kata else None,
                          "modules": check.modules, "python": check.python, "problems": check.problems}, indent=1))
    elif not args.list:
        print(f"{args.image}: {listing.size / 1e6:.1f} MB, {'+'.join(listing.compression)}, {len(listing.entries)} entries")
        h = check.hook
        print(f"hook:    {'/' + h.path + ' ' + h.kind + ' mode ' + format(h.perms, 'o') if h else 'MISSING'}")
        print(f"python:  {check.python or 'MISSING'}")
        if kata:
            for what, path in (("init", initrd.KATA_INIT_PATH), ("agent", initrd.GUEST_AGENT_PATH)):
                e = listing.resolve(path)
                print(f"{what + ':':8} {path + ' mode ' + format(e.perms, 'o') if e else 'MISSING'}")
        for m, where in check.modules.items():
            print(f"module:  {m:18} {where}")
        for p in check.problems:
            print(f"PROBLEM: {p}")
    return 0 if check.ok else 1


def cmd_config(args: argparse.Namespace) -> int:
    base_path = args.base or kata_config.find_installed_config() or kata_config.BUNDLED_CONFIG
    with open(base_path) as f:
        base = f.read()
    kernel, initrd_path = args.kernel, args.initrd
    if not (kernel and initrd_path):
        built = initrd.build_initrd(initrd.InitrdSpec(allowed_ids=_profile_ids(args.profile), agent=_agent(None)),
                                    progress=_say)
        kernel, initrd_path = kernel or built.kernel, initrd_path or built.path
    settings = kata_config.KataVfioSettings(kernel=kernel, initrd=initrd_path, guest_hook_path=args.hook_path,
                                            kata_major=args.kata_major,
                                            default_memory=kata_config.guest_memory_mb(args.memory))
    text = kata_config.derive_config(base, settings, source=base_path)
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        _say(f"wrote {args.out} (derived from {base_path})")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from ..targets import shares_controller_fs, target_spec
    from . import bundle

    spec = target_spec(args.target)
    # local, and the emulated runner (the controller's root over 9p, read-only), see the
    # controller's bundle unpack at the same path; ssh:// targets get a copy
    shares = shares_controller_fs(spec)
    bundle.bundle_source()  # a bad VFIOTEST_KATA_BUNDLE fails before a runner is booted
    host, close = _open(args)
    try:
        choice = bundle.choose_kata(host, progress=_say, shares_controller_fs=shares)
    finally:
        close()
    if args.json:
        print(json.dumps({"target": spec, **choice.as_dict()}, indent=1))
    else:
        print(f"kind:      {choice.kind}\nversion:   {choice.version or '-'}\n"
              f"runtime:   {choice.runtime_path or '-'}\nsource:    {choice.source or '-'}")
        if choice.bundle:
            print(f"sha256:    {choice.bundle.sha256}\nunpacked:  {choice.bundle.root}")
        print(f"supported: {'yes' if choice.supported else 'no'}: {choice.reason}")
    return 1 if choice.refused else 0


def cmd_register(args: argparse.Namespace) -> int:
    from ..cli_devices import cli_journal
    from ..targets import shares_controller_fs
    from . import bundle, provision

    shares = shares_controller_fs(args.target)
    host, close = _open(args)
    try:
        choice = bundle.choose_kata(host, progress=_say, shares_controller_fs=shares)
        if choice.refused:
            raise runtime.ProvisionError(choice.reason, hint="give a Kata 1.x bundle: VFIOTEST_KATA_BUNDLE")
        built = provision.guest_image(choice, _profile_ids(args.profile), host=host,
                                      shares_controller_fs=shares, progress=_say)
        # what the registration replaces is recorded in the CLI's journal before anything is
        # written: `vfiotest kata unregister` (or `vfiotest restore`) puts it back, after a crash too
        with cli_journal(host) as journal:
            info = provision.register_kata_vfio(host, choice, built, recorder=journal, progress=_say,
                                                memory_mb=args.memory)
        said = runtime.RuntimeRegistration(host, kata=provision.runtime_install(choice)).verify(image=args.image)
        print(info.describe())
        print(f"podman: {said}")
        return 0
    finally:
        close()


def cmd_unregister(args: argparse.Namespace) -> int:
    from ..cli_devices import cli_journal
    from ..journal import undo_entries

    host, close = _open(args)
    try:
        # a registration `vfiotest kata register` journaled: put back what it replaced
        with cli_journal(host) as journal:
            entries = [e for e in journal.entries() if e.get("kind") == "registration"]
            if entries:
                undo_entries(host, journal, entries)
                print("put back what `vfiotest kata register` replaced: "
                      + ", ".join(f"{p} ({'restored' if old is not None else 'removed'})"
                                  for e in entries for p, old in e["previous"].items())
                      + ("" if not any(e.get("config") for e in entries) else f"; removed {kata_config.KATA_VFIO_CONFIG}"))
                return 0
        # else (registered by a session that crashed, or by hand with our files): files that carry our marker
        removed = []
        for path, marker in ((runtime.DROPIN_PATH, runtime.MARKER), (runtime.WRAPPER_PATH, runtime.MARKER),
                             (kata_config.KATA_VFIO_CONFIG, kata_config.MARKER)):
            try:
                text = host.read_text(path)
            except OSError:
                continue
            if marker in text:
                host.remove(path)
                removed.append(path)
            else:
                _say(f"{path} was not written by vfiotest: left alone")
        print("removed: " + (", ".join(removed) or "nothing"))
        return 0
    finally:
        close()


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    kp = sub.add_parser("kata", help="guest image, configuration.toml and the kata-vfio runtime",
                        formatter_class=fmt, description=__doc__ + "\nSee docs/kata.md.")
    ks = kp.add_subparsers(dest="kata_command", metavar="STEP")
    kp.set_defaults(func=lambda a: (kp.print_help(), 2)[1])

    from ..cli import PROFILE_UNUSED, add_target_argument

    p = ks.add_parser("build-kernel", help="build the Kata guest kernel (Debian's linux-source-6.1), cached by inputs",
                      formatter_class=fmt,
                      description="Build the guest kernel the Kata VMs boot (the default, $VFIOTEST_GUEST_KERNEL=kata):\n"
                                  "Debian's linux-source-6.1 configured by allnoconfig and the fragment\n"
                                  f"{kernel_mod.FRAGMENT}\n"
                                  "(everything built in, no modules to load at boot). Cached under\n"
                                  "$VFIOTEST_CACHE_DIR/guest-kernel by the source's version and the fragment; the first\n"
                                  "build takes about 5 min on 2 cores. The guest image builds it when it is missing;\n"
                                  "this command builds it ahead, with progress, and prints where it is.\n"
                                  "VFIOTEST_GUEST_KERNEL=debian boots Debian's generic kernel instead.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_build_kernel)

    p = ks.add_parser("build-initrd", help="build the guest initrd (dracut, for the guest kernel), cached by inputs",
                      formatter_class=fmt,
                      description="Build the guest initrd: VFIO modules the guest kernel has, python3 and the stdlib\n"
                                  "files the hook imports, the hook at <hook-path>/prestart/vfio-hook (0755), the\n"
                                  "device layer it shares, and kata-agent as PID 1 behind the harness's init\n"
                                  "(--agent, else the Kata 1.x bundle's). Checked by listing it.")
    p.add_argument("--profile", default=None, help="IDs the hook binds without an annotation (default emulated)")
    p.add_argument("--hook-path", default=initrd.DEFAULT_HOOK_PATH, help="guest_hook_path (default %(default)s)")
    p.add_argument("--agent", default=None, metavar="PATH",
                   help="a kata-agent binary to include and run as init (default: the Kata 1.x bundle's)")
    p.add_argument("--compress", choices=("zstd", "gzip", "xz"), default="zstd", help="initrd compression (default %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache has it")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_build)

    p = ks.add_parser("inspect", help="list an initrd and check the hook, its mode and the modules",
                      formatter_class=fmt, description="Read an initrd (cpio: plain, gzip, zstd, xz, concatenated)\n"
                                                       "and check the hook and modules. Exit 1 when something is missing.")
    p.add_argument("image", metavar="IMAGE", help="initrd file (cpio; plain, gzip, zstd or xz)")
    p.add_argument("--list", action="store_true", help="print every entry, ls -l style")
    p.add_argument("--hook-path", default=initrd.DEFAULT_HOOK_PATH, help="guest_hook_path (default %(default)s)")
    p.add_argument("--hook-name", default=initrd.HOOK_NAME, help="hook file name under <hook-path>/prestart (default %(default)s)")
    p.add_argument("--module", action="append", help="a module that must be there (repeatable; default the VFIO set)")
    p.add_argument("--no-python", action="store_true", help="do not require python3 (a Go hook, say)")
    p.add_argument("--kata", action="store_true",
                   help=f"require a Kata guest: the init {initrd.KATA_INIT_PATH} (rdinit=), kata-agent at "
                        f"{initrd.GUEST_AGENT_PATH}, the virtio console/vsock/9p modules (checked anyway when "
                        "the image has the init or the agent)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = ks.add_parser("config", help="derive configuration.toml for kata-vfio (comments kept)", formatter_class=fmt,
                      description="Derive the kata-vfio configuration from the installed Kata configuration (or\n"
                                  "--base; or the bundled Kata 1.x sample when none is installed): q35,\n"
                                  "guest_hook_path, kernel_params with systemd.unified_cgroup_hierarchy=0,\n"
                                  "enable_iommu, the debug console, the kernel and initrd. Never edits the system's file.")
    p.add_argument("--base", metavar="FILE", help="configuration.toml to start from (default: the installed Kata one, else a bundled 1.x sample)")
    p.add_argument("--kernel", metavar="FILE", help="guest kernel for [hypervisor.qemu] kernel")
    p.add_argument("--initrd", metavar="FILE", help="guest initrd for [hypervisor.qemu] initrd (from build-initrd)")
    p.add_argument("--hook-path", default=initrd.DEFAULT_HOOK_PATH, help="guest_hook_path (default %(default)s)")
    p.add_argument("--kata-major", type=int, default=1, help="1: debug console as agent.debug_console; 2+: debug_console_enabled")
    p.add_argument("--profile", default=None, help="IDs the hook binds without an annotation (default emulated)")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--memory", type=_memory, metavar="MIB",
                   help=f"the guest's memory, default_memory (default: ${kata_config.GUEST_MEMORY_ENV}, else "
                        f"{kata_config.KATA_GUEST_MEMORY_MB}; a VF pins all of it)")
    p.set_defaults(func=cmd_config)

    p = ks.add_parser("detect", help="which Kata (bundle or installed), version, where from", formatter_class=fmt,
                      description="Which Kata the target would use, in this order: the bundle named by\n"
                                  "VFIOTEST_KATA_BUNDLE, a Kata 1.x installed on the target, the shared bundle\n"
                                  "beside the checkout (../shared/kata). A bundle is verified against its\n"
                                  "SHA256SUMS and unpacked into the asset cache (copied to an ssh:// target).\n"
                                  "Exit 1 when the target has only Kata 2.x/3.x (no OCI CLI) and there is no bundle.")
    add_target_argument(p, PROFILE_UNUSED)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_detect)

    p = ks.add_parser("register", help="register kata-vfio for podman on the target (drop-in + wrapper)",
                      formatter_class=fmt,
                      description="Kata 1.x: a wrapper passing --kata-config with the derived configuration.\n"
                                  "No Kata 1.x (no bundle, none installed): refused, saying how to get a bundle.\n"
                                  "Kata 2.x/3.x: refused, they have no OCI CLI for podman. Verified with podman. What the files\n"
                                  "replace is recorded in the CLI's journal first: `vfiotest kata unregister` (or,\n"
                                  "after a crash, `vfiotest restore`) puts it back.")
    add_target_argument(p, HOOK_PROFILE_HELP)
    p.add_argument("--memory", type=_memory, metavar="MIB",
                   help=f"the guest's memory (default: ${kata_config.GUEST_MEMORY_ENV}, else {kata_config.KATA_GUEST_MEMORY_MB})")
    p.add_argument("--image", help="also create (not start) a container with it and check inspect's OCIRuntime")
    p.set_defaults(func=cmd_register)

    p = ks.add_parser("unregister", help="put back what `kata register` replaced (its journal), else remove the "
                                         "kata-vfio drop-in, wrapper and derived configuration.toml vfiotest wrote")
    add_target_argument(p, PROFILE_UNUSED)
    p.set_defaults(func=cmd_unregister)
