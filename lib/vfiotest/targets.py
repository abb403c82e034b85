"""Turning a --target value into a Host: `virtual`, `local`, or `ssh://user@host[:port]`."""

import os

from .errors import TargetError
from .host import LocalHost

TARGET_ENV = "VFIOTEST_TARGET"
PROFILE_ENV = "VFIOTEST_PROFILE"


def target_spec(value=None):
    """The target asked for: the value given, else $VFIOTEST_TARGET, else `virtual`."""
    spec = (value or os.environ.get(TARGET_ENV) or "virtual").strip()
    if spec in ("virtual", "local") or spec.startswith("ssh://"):
        return spec
    if spec.startswith("sim:"):  # for tests: a simulated sysfs (vfiotest.simsysfs) at this path
        return spec
    raise TargetError(f"unknown target {spec!r}",
                      hint="use --target virtual, --target local, or --target ssh://user@host[:port]")


def shares_controller_fs(spec):
    """Whether the target reads this machine's files at the same paths: `local` is this
    machine, the emulated runner mounts its root over 9p, a simulated sysfs lives here.
    Anything else (ssh://) gets a copy of what the harness built."""
    spec = target_spec(spec)
    return spec in ("virtual", "local") or spec.startswith("sim:")


def default_profile(spec, value=None):
    return value or os.environ.get(PROFILE_ENV) or ("emulated" if spec == "virtual" else "seed")


def open_host(spec, progress=None, boot=True):
    """A connected Host for `spec`, and a `close()` that undoes what opening did
    (for `virtual`: stops the runner if this call booted it). boot=False attaches to the
    runner that is running, whoever keeps it, and never boots one."""
    spec = target_spec(spec)
    if spec == "local":
        host = LocalHost()
        return host, host.close
    if spec.startswith("sim:"):
        from .simsysfs import SimulatedHost

        host = SimulatedHost.open(spec[4:])
        return host, host.close
    if spec.startswith("ssh://"):
        from .sshhost import SshHost

        host = SshHost.from_target(spec)
        host.connect()
        return host, host.close
    from .runner import Runner  # the emulated runner

    runner = Runner.default()
    if not boot:
        host = runner.host()
        host.connect()
        return host, host.close
    booted = False
    if not runner.is_up():
        runner.up(progress=progress)
        booted = True
    host = runner.host()

    def close():
        host.close()
        if booted:
            runner.down()

    return host, close
