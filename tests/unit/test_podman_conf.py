"""The containers.conf drop-in editor and the client's option mapping (no podman needed)."""

import subprocess
import sys

import pytest

from vfiotest.host import LocalHost
from vfiotest.podman import conf
from vfiotest.podman.client import BASE_ULIMITS, RunResult, ulimit_list, vfio_devices
from vfiotest.podman.image import ImageRecipe


class DirHost(LocalHost):
    """A LocalHost whose paths live under a temporary directory."""

    def __init__(self, root):
        super().__init__("tmp")
        self.sysroot = str(root)

    def run(self, cmd, **kw):
        if cmd[0] == "rmdir":
            cmd = [*cmd[:-1], self.sysroot + cmd[-1]]
        return super().run(cmd, **kw)


def test_render_has_the_measured_settings():
    text = conf.render()
    assert text.startswith(conf.MARKER)
    s = conf.parse(text)
    assert s["containers"]["default_ulimits"] == ["nofile=20000:20000", "nproc=32768:32768"]
    assert s["engine"] == {"runtime": "runc", "cgroup_manager": "cgroupfs", "events_logger": "file"}


def test_apply_then_restore_removes_what_it_created(tmp_path):
    h = DirHost(tmp_path)
    s = conf.PodmanBaseSettings(h)
    s.apply()
    assert (tmp_path / conf.DROPIN_PATH.lstrip("/")).read_text().startswith(conf.MARKER)
    s.restore()
    assert not (tmp_path / conf.DROPIN_PATH.lstrip("/")).exists()
    assert not (tmp_path / conf.DROPIN_DIR.lstrip("/")).exists()
    s.restore()  # twice is harmless


def test_restore_puts_back_a_users_file(tmp_path):
    h = DirHost(tmp_path)
    p = tmp_path / conf.DROPIN_PATH.lstrip("/")
    p.parent.mkdir(parents=True)
    p.write_text("[engine]\nruntime = \"crun\"\n")
    with conf.PodmanBaseSettings(h):
        assert conf.parse(p.read_text())["engine"]["runtime"] == "runc"
    assert p.read_text() == "[engine]\nruntime = \"crun\"\n"


def test_our_stale_file_is_removed_not_restored(tmp_path):
    h = DirHost(tmp_path)
    p = tmp_path / conf.DROPIN_PATH.lstrip("/")
    p.parent.mkdir(parents=True)
    p.write_text(conf.render({"engine": {"runtime": "old"}}))
    with conf.PodmanBaseSettings(h):
        pass
    assert not p.exists()


def test_ulimits_always_carry_the_base_limits():
    got = {u["Name"]: (u["Soft"], u["Hard"]) for u in ulimit_list({"RLIMIT_MEMLOCK": 65536})}
    assert got == {**BASE_ULIMITS, "memlock": (65536, 65536)}
    assert {u["Name"] for u in ulimit_list(None)} == set(BASE_ULIMITS)
    assert {u["Name"]: u["Soft"] for u in ulimit_list({"nofile": (10, 20)})}["nofile"] == 10


def test_vfio_devices_and_run_result_json():
    assert vfio_devices("/dev/vfio/12") == ["/dev/vfio/vfio", "/dev/vfio/12"]
    r = RunResult("id", "n", 0, 'noise\n{"ok": true}\n', "", "kata-vfio")
    assert r.json() == {"ok": True} and r.ok
    with pytest.raises(ValueError):
        RunResult("id", "n", 1, "", "boom", "runc").json()


def test_image_key_follows_its_inputs():
    a, b = ImageRecipe(), ImageRecipe(include=("python3-minimal", "busybox"))
    assert a.key() == ImageRecipe().key() and a.key() != b.key()
    assert a.ref.startswith("localhost/vfiotest-probe:") and a.tag in str(a.tarball("/x"))
    cmd = a.mmdebstrap_command("/tmp/out.tar")
    assert cmd[0] == "mmdebstrap" and "--variant=essential" in cmd and cmd[-1] == "/tmp/out.tar"
    assert any(c.startswith("--customize-hook=upload ") and c.endswith("/usr/local/lib/vfiotest/probe.py") for c in cmd)
    # the launcher is written to /usr/local/bin/vfio-probe and made executable after the probe is byte-compiled
    hooks = [c for c in cmd if c.startswith("--customize-hook=")]
    compiled = next(i for i, c in enumerate(hooks) if "compileall" in c)
    launcher = next(i for i, c in enumerate(hooks) if c.endswith('> "$1/usr/local/bin/vfio-probe"'))
    assert compiled < launcher and 'chmod 0755 "$1/usr/local/bin/vfio-probe"' in hooks[launcher + 1]


def test_the_image_launcher_runs_the_probe_from_its_library_without_site(tmp_path):
    """PROBE_LAUNCHER as the image has it, its library directory pointed at the probe's source."""
    from vfiotest.podman.image import LIB_IN_IMAGE, PROBE_LAUNCHER, PROBE_SOURCE

    assert PROBE_LAUNCHER.startswith("#!/usr/bin/python3 -IS\n")
    launcher = tmp_path / "vfio-probe"
    launcher.write_text(PROBE_LAUNCHER.replace(repr(LIB_IN_IMAGE), repr(str(PROBE_SOURCE.parent))))
    p = subprocess.run([sys.executable, "-I", "-S", str(launcher), "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.startswith("usage: vfio-probe"), p
    p = subprocess.run([sys.executable, "-I", "-S", str(launcher), "--vfio-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and '"step": "open-container"' in p.stdout, p
    p = subprocess.run([sys.executable, "-I", "-S", str(launcher), "--dma-rounds", "two"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--dma-rounds" in p.stderr, p
