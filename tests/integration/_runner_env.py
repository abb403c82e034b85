"""What several integration tests share about an emulated runner of their own."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runner_env(state_dir, *up_args):
    """Yields the environment of a runner booted (`vfiotest runner up UP_ARGS`) in `state_dir`;
    stops it after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VFIOTEST_"))}
    env.update(VFIOTEST_STATE_DIR=str(state_dir), VFIOTEST_TARGET="virtual")
    up = subprocess.run([sys.executable, "-m", "vfiotest", "runner", "up", *up_args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stderr[-3000:]
    yield env
    subprocess.run([sys.executable, "-m", "vfiotest", "runner", "down"], cwd=ROOT, env=env,
                   capture_output=True, text=True, timeout=300)


def no_process_refers_to(state_dir):
    """No process on this machine has the runner's state directory on its command line."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    assert state_dir.encode() not in f.read(), f"pid {name} still refers to {state_dir}"
            except OSError:
                pass
