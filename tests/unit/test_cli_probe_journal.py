"""`vfiotest probe` writes podman's drop-in on the target: recorded in its journal before the
write, so a probe killed half-way leaves a record from which `vfiotest restore` puts the target
back. On a simulated target; the kill is the process ending at once (os._exit) right after the
drop-in is written, where the image would be imported."""

import os
import subprocess
import sys
import textwrap

from vfiotest.podman.conf import DROPIN_PATH
from vfiotest.testing.simsysfs import SimulatedHost

KILLED = textwrap.dedent("""
    import os, sys
    import vfiotest.podman.image as image
    def killed(*a, **k):
        os._exit(137)          # kill -9: no finally, no cleanup
    image.ensure_image = killed
    from vfiotest.command import main
    sys.exit(main(["probe", "--target", sys.argv[1], "--group", "1", "--runtime", "runc"]))
""")


def test_a_killed_probe_is_put_back_by_restore(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 0}])
    dropin = tmp_path / "sim" / DROPIN_PATH.lstrip("/")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIOTEST_", "PYTEST_"))}
    env["VFIOTEST_STATE_DIR"] = str(tmp_path / "state")
    spec = f"sim:{sim.sysroot}"
    p = subprocess.run([sys.executable, "-c", KILLED, spec], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 137, p.stdout + p.stderr
    assert dropin.exists(), "the probe wrote its drop-in before it was killed"
    r = subprocess.run([sys.executable, "-m", "vfiotest", "restore", "--target", spec], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 change(s) undone" in r.stdout, r.stdout
    assert not dropin.exists(), "restore removes the drop-in the killed probe left"
    journals = tmp_path / "sim" / "var" / "lib" / "vfiotest" / "journal"
    assert journals.is_dir() and [f for f in os.listdir(journals) if f.endswith(".json")] == []
