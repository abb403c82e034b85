"""The `vfiotest` command. Each area registers its own subcommands (see build_parser); what the
command modules share (--target/--profile, the CLI's journal) is `vfiotest.cli`."""

from __future__ import annotations

import argparse
import sys

from . import (
    __version__,
    cli_devices,  # devices, bind, unbind, restore, doctor
    report,  # report (summary, summary.md, HTML; --merge)
)
from .errors import EXIT_CODES, HarnessError
from .kata import cli as kata_cli  # kata build-initrd|inspect|config|register
from .podman import cli as podman_cli  # image build, probe
from .runner import cli as runner_cli  # runner up|down|status|ssh|console

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



def build_parser() -> argparse.ArgumentParser:
    # Each module provides `register(subparsers)`: it adds its subcommands and sets
    # `func(args) -> int` on them.
    epilog = "exit status:\n" + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items())
    parser = argparse.ArgumentParser(prog="vfiotest", description=DESCRIPTION, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vfiotest {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in (cli_devices, runner_cli, kata_cli, podman_cli, report):
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
