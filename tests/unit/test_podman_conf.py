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
    # each launcher is written to /usr/local/bin and made executable after the library is byte-compiled
    hooks = [c for c in cmd if c.startswith("--customize-hook=")]
    compiled = next(i for i, c in enumerate(hooks) if "compileall" in c)
    for name in ("vfio-probe", "vfio-nvme"):
        launcher = next(i for i, c in enumerate(hooks) if c.endswith(f'> "$1/usr/local/bin/{name}"'))
        assert compiled < launcher and f'chmod 0755 "$1/usr/local/bin/{name}"' in hooks[launcher + 1]


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


def test_the_image_launcher_runs_the_nvme_driver_from_its_library_without_site(tmp_path):
    """NVME_LAUNCHER as the image has it: --help, a bad value (exit 2, naming the option), and the
    driver failing at its first step on a directory with no VFIO nodes (exit 1, JSON naming it);
    nothing beyond the standard library's small modules imported (no argparse, no typing)."""
    from vfiotest.podman.image import LIB_IN_IMAGE, NVME_IO_SOURCE, NVME_LAUNCHER

    assert NVME_LAUNCHER.startswith("#!/usr/bin/python3 -IS\n") and "from nvme_io import main" in NVME_LAUNCHER
    launcher = tmp_path / "vfio-nvme"
    launcher.write_text(NVME_LAUNCHER.replace(repr(LIB_IN_IMAGE), repr(str(NVME_IO_SOURCE.parent))))
    py = [sys.executable, "-I", "-S"]
    p = subprocess.run([*py, str(launcher), "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.startswith("usage: vfio-nvme") and "--read-only" in p.stdout, p
    p = subprocess.run([*py, str(launcher), "--read-only", "--vfio-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and '"step": "vfio"' in p.stdout, p
    p = subprocess.run([*py, str(launcher), "--blocks", "many"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--blocks" in p.stderr, p
    p = subprocess.run([*py, "-c", f"import sys; sys.path.insert(0, {str(NVME_IO_SOURCE.parent)!r}); import nvme_io;"
                        "print(sorted({'argparse', 'typing'} & set(sys.modules)))"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p
