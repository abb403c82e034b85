"""The `vfiotest` command. Each area registers its own subcommands (see COMMAND_MODULES)."""

import argparse
import importlib
import sys

from . import __version__
from .errors import HarnessError

# Modules that provide `register(subparsers)`; each adds its subcommands and sets
# `func(args) -> int` on them. A module not written yet is simply absent.
COMMAND_MODULES = [
    "vfiotest.cli_devices",   # devices, bind, unbind, restore, doctor
    "vfiotest.runner.cli",    # runner up|down|status|ssh|console
    "vfiotest.kata.cli",      # kata build-initrd|inspect|config|register
    "vfiotest.podman.cli",    # image build
]

DESCRIPTION = """\
End-to-end harness for SR-IOV/VFIO passthrough into Kata Containers under podman.

The target (--target) is where devices are inspected and changed:
  virtual            the emulated SR-IOV runner (a QEMU VM with a vIOMMU, igb and
                     NVMe SR-IOV PFs), booted on demand; the default
  local              this machine (a bare-metal SR-IOV runner)
  ssh://user@host[:port]   a runner over SSH; its host key must be in known_hosts

Every change to a device is journaled on the target first; `vfiotest restore`
puts the host back after a crash. The test suites run with `pytest` (see README).
"""


def add_target_argument(p):
    p.add_argument("--target", default=None, metavar="TARGET",
                   help="virtual (default; env VFIOTEST_TARGET), local, or ssh://user@host[:port]")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="device allowlist profile: seed or emulated (default: emulated for virtual, seed otherwise; env VFIOTEST_PROFILE)")


def build_parser():
    parser = argparse.ArgumentParser(prog="vfiotest", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vfiotest {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except HarnessError as e:
        print(f"vfiotest: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vfiotest: interrupted; run `vfiotest restore` if devices were being changed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
