"""Paths and names the harness shares across layers, defined once (standard library only:
the guest hook ships this module).

Two kinds of directory:
  on the controller (where pytest runs), overridable from the environment:
    cache_dir()  $VFIOTEST_CACHE_DIR or /var/cache/vfiotest   built artefacts (images, initrds, runner assets)
    state_dir()  $VFIOTEST_STATE_DIR or /var/lib/vfiotest     the runner's state, session records
  on the target, fixed paths:
    TARGET_STATE_DIR /var/lib/vfiotest (journal/, kata/), RUN_DIR /run/vfiotest (leases/, podman/)
"""

from __future__ import annotations

import os

CACHE_ENV = "VFIOTEST_CACHE_DIR"
DEFAULT_CACHE_DIR = "/var/cache/vfiotest"
STATE_ENV = "VFIOTEST_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/vfiotest"

# On the target.
TARGET_STATE_DIR = "/var/lib/vfiotest"
JOURNAL_DIR = f"{TARGET_STATE_DIR}/journal"        # the device journal (vfiotest.journal)
KATA_STATE_DIR = f"{TARGET_STATE_DIR}/kata"        # the kata layer: config, wrapper, bundles, guest image
RUN_DIR = "/run/vfiotest"                          # volatile: gone at reboot
LEASE_DIR = f"{RUN_DIR}/leases"                    # IOMMU group leases (vfiotest.lease)
PODMAN_SOCKET_DIR = f"{RUN_DIR}/podman"            # the podman services' sockets

# The OCI annotation naming the devices a container asks for (read by the guest hook).
VFIO_ANNOTATION = "io.katacontainers.x.vfio"


def _join(base: str, sub: str | None) -> str:
    return os.path.join(base, sub) if sub else base


def cache_dir(sub: str | None = None) -> str:
    """The controller's cache ($VFIOTEST_CACHE_DIR, else /var/cache/vfiotest), or `sub` in it."""
    return _join(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR, sub)


def state_dir(sub: str | None = None) -> str:
    """The controller's state directory ($VFIOTEST_STATE_DIR, else /var/lib/vfiotest), or `sub` in it."""
    return _join(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR, sub)
