"""`vfiotest runner status` says what the runner booted with: its accelerator and its image store."""

import argparse

import pytest

from vfiotest.runner import cli

BASE = {"running": True, "pid": 42, "uptime_s": 12.0, "ssh_port": 2222, "ssh_ready": True, "pfs": {"nvme": "0000:02:00.0"},
        "igb": True, "persistent": True, "users": [], "rss_bytes": 2**30, "kernel": "linux-image-6.1", "cmdline": "x",
        "boots": 1, "rebooting": False, "boot_config": "/s/grub", "console_log": "/s/console.log", "qemu_log": "/s/qemu.log",
        "state_dir": "/s", "accel": "tcg", "accel_why": "TCG (a KVM guest did not start)"}


@pytest.mark.parametrize("store, said", [
    ("/c/images/p.store.ext4", "images:   the test image's read-only store /c/images/p.store.ext4, at /var/lib/vfiotest-images"),
    (None, "images:   no read-only store: sessions import the test image (VFIOTEST_RUNNER_IMAGE_STORE)"),
])
def test_status_names_the_accelerator_and_the_image_store(monkeypatch, capsys, store, said):
    class FakeRunner:
        @classmethod
        def default(cls):
            return cls()

        def status(self):
            return {**BASE, "image_store": store}

    monkeypatch.setattr(cli, "Runner", FakeRunner)
    assert cli.cmd_status(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert said in out, out
    assert "accel:    tcg (TCG (a KVM guest did not start))" in out, out
