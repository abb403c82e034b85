"""`vfiotest kata register` records what it replaces in the CLI's journal before it writes:
`vfiotest kata unregister` puts the user's own files back (not only removes ours), and after a
register killed half-way `vfiotest restore` does. On a simulated target, with a Kata 1.x taken as
installed there (the guest image build and podman's own check left out: no dracut run, no podman
there; the derived configuration is written as a marked file)."""

import os
import subprocess
import sys
import textwrap

import pytest

from vfiotest.kata.config import KATA_VFIO_CONFIG
from vfiotest.kata.runtime import DROPIN_PATH, MARKER, WRAPPER_PATH
from vfiotest.testing.simsysfs import SimulatedHost

CHILD = textwrap.dedent("""
    import os, sys
    from vfiotest.kata import bundle, config, provision, runtime
    KATA = runtime.KataInstall("/opt/kata/bin/kata-runtime", "1.12.1", 1)
    bundle.choose_kata = lambda host, **kw: bundle.KataChoice("installed", "1.12.1", KATA.path, None, KATA,
                                                              "test: Kata 1.12.1 installed")
    provision.guest_image = lambda choice, ids, **kw: None
    def write_config(host, choice, image, memory_mb=None):
        host.write_atomic(config.KATA_VFIO_CONFIG, "# " + config.MARKER + "\\n", mode=0o644)
        return config.WrittenConfig(config.KATA_VFIO_CONFIG, "test", "")
    provision.write_config = write_config
    runtime.RuntimeRegistration.verify = lambda self, image=None, timeout=60: {"name": "kata-vfio"}
    spec, command, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
    if kill:
        real = runtime.RuntimeRegistration.register
        def killed(self):
            real(self)
            os._exit(137)          # kill -9 after the files are written: no finally
        runtime.RuntimeRegistration.register = killed
    from vfiotest.command import main
    sys.exit(main(["kata", command, "--target", spec]))
""")

USERS = "# the user's own kata-vfio drop-in\n"


@pytest.fixture
def sim(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 0}])
    dropin = tmp_path / "sim" / DROPIN_PATH.lstrip("/")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(USERS)
    return sim


def run(tmp_path, sim, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}
    env["VFIOTEST_STATE_DIR"] = str(tmp_path / "state")
    if args[0] == "restore":
        cmd = [sys.executable, "-m", "vfiotest", "restore", "--target", f"sim:{sim.sysroot}"]
    else:
        cmd = [sys.executable, "-c", CHILD, f"sim:{sim.sysroot}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def files(tmp_path):
    """(drop-in, wrapper) texts on the simulated target (None: absent)."""
    root = tmp_path / "sim"
    d, w = root / DROPIN_PATH.lstrip("/"), root / WRAPPER_PATH.lstrip("/")
    return (d.read_text() if d.exists() else None), (w.read_text() if w.exists() else None)


def config_exists(tmp_path):
    return (tmp_path / "sim" / KATA_VFIO_CONFIG.lstrip("/")).exists()


def test_unregister_puts_back_what_register_replaced(tmp_path, sim):
    p = run(tmp_path, sim, "register", "-")
    assert p.returncode == 0, p.stdout + p.stderr
    dropin, wrapper = files(tmp_path)
    assert MARKER in dropin and wrapper is not None and MARKER in wrapper
    assert "exec /opt/kata/bin/kata-runtime --kata-config " in wrapper and config_exists(tmp_path)
    p = run(tmp_path, sim, "unregister", "-")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "put back what `vfiotest kata register` replaced" in p.stdout, p.stdout
    assert files(tmp_path) == (USERS, None) and not config_exists(tmp_path)
    p = run(tmp_path, sim, "restore")                 # nothing left to put back
    assert p.returncode == 0 and files(tmp_path) == (USERS, None), p.stdout + p.stderr


def test_a_register_killed_half_way_is_put_back_by_restore(tmp_path, sim):
    p = run(tmp_path, sim, "register", "kill")
    assert p.returncode == 137, p.stdout + p.stderr
    assert MARKER in files(tmp_path)[0]
    p = run(tmp_path, sim, "restore")
    assert p.returncode == 0, p.stdout + p.stderr
    assert files(tmp_path) == (USERS, None) and not config_exists(tmp_path)
