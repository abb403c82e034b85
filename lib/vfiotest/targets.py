"""Turning a --target value into a Host: `virtual`, `local`, or `ssh://user@host[:port]`.

Each kind of target is one `TargetKind` in `KINDS`: how its spec is recognised, how a
host is opened for it, whether it reads the controller's files at the same paths and
which profile it defaults to. The module-level functions are the public API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import TargetError

if TYPE_CHECKING:
    from .host import Host

TARGET_ENV = "VFIOTEST_TARGET"
PROFILE_ENV = "VFIOTEST_PROFILE"
DEFAULT_TARGET = "virtual"

Close = Callable[[], None]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TargetKind:
    """One kind of target.

    matches: whether a (stripped) spec names this kind.
    opener: (spec, progress, boot) -> (connected host, close()).
    shares_controller_fs: the target reads this machine's files at the same paths.
    default_profile: the profile used when none is asked for.
    """

    name: str
    matches: Callable[[str], bool]
    opener: Callable[[str, Progress | None, bool], tuple[Host, Close]]
    shares_controller_fs: bool
    default_profile: str = "seed"

    def open(self, spec: str, progress: Progress | None = None, boot: bool = True) -> tuple[Host, Close]:
        return self.opener(spec, progress, boot)


def _open_local(spec: str, progress: Progress | None, boot: bool) -> tuple[Host, Close]:
    from .host import LocalHost

    host = LocalHost()
    return host, host.close


def _open_sim(spec: str, progress: Progress | None, boot: bool) -> tuple[Host, Close]:
    from .testing.simsysfs import (
        SimulatedHost,  # for tests: a simulated sysfs at the path after `sim:`
    )

    host = SimulatedHost.open(spec[len("sim:"):])
    return host, host.close


def _open_ssh(spec: str, progress: Progress | None, boot: bool) -> tuple[Host, Close]:
    from .sshhost import SshHost

    host = SshHost.from_target(spec)
    host.connect()
    return host, host.close


def _open_virtual(spec: str, progress: Progress | None, boot: bool) -> tuple[Host, Close]:
    """The emulated runner. boot=False attaches to the runner that is running and never
    boots one; otherwise close() stops the runner if this call booted it."""
    from .runner import Runner

    runner = Runner.default()
    if not boot:
        host = runner.host()
        host.connect()
        return host, host.close
    booted = False
    if not runner.is_up():
        runner.up(progress=progress)
        booted = runner.booted_now      # up() may have found it up after all: then it is not ours to stop
    host = runner.host()

    def close() -> None:
        host.close()
        if booted:
            runner.down()

    return host, close


# Order matters only for specs two kinds could match; none can today.
KINDS: tuple[TargetKind, ...] = (
    TargetKind("virtual", lambda s: s == "virtual", _open_virtual, shares_controller_fs=True,
               default_profile="emulated"),  # the runner mounts the controller's root over 9p
    TargetKind("local", lambda s: s == "local", _open_local, shares_controller_fs=True),
    TargetKind("ssh", lambda s: s.startswith("ssh://"), _open_ssh, shares_controller_fs=False),
    TargetKind("sim", lambda s: s.startswith("sim:"), _open_sim, shares_controller_fs=True),
)


def _find_kind(spec: str) -> TargetKind | None:
    return next((k for k in KINDS if k.matches(spec)), None)


def target_kind(spec: str | None = None) -> TargetKind:
    """The kind of the target asked for (see target_spec); TargetError if none matches."""
    return _kind_of(target_spec(spec))


def _kind_of(spec: str) -> TargetKind:
    kind = _find_kind(spec)
    if kind is None:
        err = TargetError(f"unknown target {spec!r}",
                          hint="use --target virtual, --target local, or --target ssh://user@host[:port]")
        err.exit_code = 2   # a usage error, not an unreachable target
        raise err
    return kind


def target_spec(value: str | None = None) -> str:
    """The target asked for: the value given, else $VFIOTEST_TARGET, else `virtual`."""
    spec = (value or os.environ.get(TARGET_ENV) or DEFAULT_TARGET).strip()
    _kind_of(spec)
    return spec


def shares_controller_fs(spec: str | None) -> bool:
    """Whether the target reads this machine's files at the same paths: `local` is this
    machine, the emulated runner mounts its root over 9p, a simulated sysfs lives here.
    Anything else (ssh://) gets a copy of what the harness built."""
    return target_kind(spec).shares_controller_fs


def default_profile(spec: str | None, value: str | None = None) -> str:
    """The profile asked for, else $VFIOTEST_PROFILE, else the target kind's default."""
    if value or os.environ.get(PROFILE_ENV):
        return value or os.environ[PROFILE_ENV]
    kind = _find_kind((spec or "").strip())
    return kind.default_profile if kind is not None else "seed"


def open_host(spec: str | None, progress: Progress | None = None, boot: bool = True) -> tuple[Host, Close]:
    """A connected Host for `spec`, and a `close()` that undoes what opening did
    (for `virtual`: stops the runner if this call booted it). boot=False attaches to the
    runner that is running, whoever keeps it, and never boots one."""
    spec = target_spec(spec)
    return _kind_of(spec).open(spec, progress, boot)
