"""Options, markers and the fixture layers (fixtures/*.py) for the suites and the harness's own tests.

Every option can also come from the environment (for CI): VFIOTEST_TARGET,
VFIOTEST_PROFILE, VFIOTEST_PF (comma-separated), VFIOTEST_NUMVFS, VFIOTEST_STRICT=1,
VFIOTEST_ALLOW_REBOOT=1, VFIOTEST_IMAGE, VFIOTEST_KEEP_RUNNER=1.
"""

import os
import uuid

# --strict is pytest's own flag (it also makes markers and config strict); the layers
# read it too: with it (or VFIOTEST_STRICT=1) a missing prerequisite or layer fails
# the tests above it instead of skipping them.

pytest_plugins = [
    "fixtures.target",
    "fixtures.prereqs",
    "fixtures.sriov",
    "fixtures.vfio",
    "fixtures.kata",
    "fixtures.guest",
    "fixtures.podman",
    "fixtures.container",
]
# A layer whose module is not written yet is left out instead of breaking collection.
pytest_plugins = [p for p in pytest_plugins
                  if os.path.exists(os.path.join(os.path.dirname(__file__), *p.split(".")) + ".py")]


def _env_flag(name):
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def pytest_addoption(parser):
    g = parser.getgroup("vfiotest", "SR-IOV/VFIO harness")
    g.addoption("--target", default=os.environ.get("VFIOTEST_TARGET", "virtual"),
                help="where the devices are: virtual (the emulated SR-IOV runner, default), local, "
                     "or ssh://user@host[:port] (host key must be in known_hosts) [env VFIOTEST_TARGET]")
    g.addoption("--profile", default=os.environ.get("VFIOTEST_PROFILE"),
                help="device allowlist profile: seed or emulated (default: emulated for virtual, seed otherwise) [env VFIOTEST_PROFILE]")
    g.addoption("--pf", action="append", default=None, metavar="BDF",
                help="PF to create VFs on; repeatable; replaces VFIOTEST_PF (default: every PF of the profile "
                     "found) [env VFIOTEST_PF, comma-separated]")
    g.addoption("--numvfs", type=_vf_count, default=None, metavar="N",
                help="VFs to create on each PF (default 4) [env VFIOTEST_NUMVFS]")
    g.addoption("--allow-reboot", action="store_true", default=_env_flag("VFIOTEST_ALLOW_REBOOT"),
                help="on an ssh:// bare-metal runner, add missing kernel arguments with grubby or GRUB defaults "
                     "and reboot and wait [env VFIOTEST_ALLOW_REBOOT=1]")
    g.addoption("--image", default=os.environ.get("VFIOTEST_IMAGE"),
                help="container image for podman_run (default: built locally with mmdebstrap) [env VFIOTEST_IMAGE]")
    g.addoption("--keep-runner", action="store_true", default=_env_flag("VFIOTEST_KEEP_RUNNER"),
                help="leave an emulated runner this session booted running at the end [env VFIOTEST_KEEP_RUNNER=1]")


def _vf_count(text):
    """--numvfs / VFIOTEST_NUMVFS: a whole number of VFs, 0 or more."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of VFs (VFIOTEST_NUMVFS or --numvfs)") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the number of VFs cannot be negative")
    return n


def pytest_configure(config):
    import pytest

    from vfiotest import targets
    from vfiotest.errors import HarnessError

    if config.option.help:          # `pytest --help` works whatever the environment says
        return
    # a bad VFIOTEST_NUMVFS is a usage error naming it, like a bad --numvfs
    if config.option.numvfs is None:
        try:
            config.option.numvfs = _vf_count(os.environ.get("VFIOTEST_NUMVFS", "4"))
        except Exception as e:  # argparse.ArgumentTypeError
            raise pytest.UsageError(f"--numvfs: {e}") from None
    # --pf given: it replaces VFIOTEST_PF; else the environment's list
    if config.option.pf is None:
        config.option.pf = [p.strip() for p in os.environ.get("VFIOTEST_PF", "").split(",") if p.strip()]
    # a target that cannot be is refused before anything starts, not at the first fixture
    try:
        targets.target_spec(config.getoption("--target"))
    except HarnessError as e:
        raise pytest.UsageError(f"--target: {e}") from None
    # One id for the whole session, shared with xdist workers through the environment.
    if not hasattr(config, "workerinput"):
        os.environ.setdefault("VFIOTEST_SESSION", uuid.uuid4().hex[:12])
