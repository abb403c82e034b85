"""What the `vfiotest` command modules share: the --target/--profile arguments and the CLI's
journal. The command itself (the parser that gathers every area's subcommands, and `main`) is
`vfiotest.command`; it imports the command modules, which import this one, never the reverse."""

from __future__ import annotations

import argparse

from .host import Host
from .journal import Journal

PROFILE_HELP = ("device allowlist profile: seed or emulated (default: emulated for virtual, seed otherwise; "
                "env VFIOTEST_PROFILE)")


#: for the commands that take --profile (so scripts can pass it to every command) and do not use it
PROFILE_UNUSED = "accepted and not used by this command"


def add_target_argument(p: argparse.ArgumentParser, profile_help: str = PROFILE_HELP) -> None:
    """--target, and --profile with `profile_help` (what the command uses it for)."""
    p.add_argument("--target", default=None, metavar="TARGET",
                   help="virtual (default; env VFIOTEST_TARGET), local, or ssh://user@host[:port]")
    p.add_argument("--profile", default=None, metavar="NAME", help=profile_help)


#: the owner of the journal of manual binds: kept until `vfiotest unbind`/`restore`
CLI_OWNER = "cli"


def cli_journal(host: Host) -> Journal:
    """The CLI's journal on `host` (kept: sessions leave it alone; `vfiotest restore` replays it)."""
    return Journal.open(host, CLI_OWNER, keep=True, wait=30)
