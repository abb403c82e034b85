"""The containers.conf drop-in editor and the client's option mapping (no podman needed)."""

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
    assert any(c.startswith("--customize-hook=upload ") and c.endswith("/usr/local/bin/vfio-probe") for c in cmd)
