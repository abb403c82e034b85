"""The podman layer for real on this machine's podman (runc, no devices): API service per
runtime, container lifecycle and cleanup. The same over the SSH socket relay, in the emulated
runner, is in test_runner.py (its runner)."""

import shutil

import pytest
from _runner_env import exercise_podman

from vfiotest.host import LocalHost

pytestmark = [pytest.mark.skipif(shutil.which("podman") is None or shutil.which("mmdebstrap") is None,
                                 reason="podman and mmdebstrap needed"),
              pytest.mark.duration(15)]


def test_local_service_and_cleanup():
    exercise_podman(LocalHost())
