"""Runner bookkeeping without booting: QEMU capability probes, the command line, users and orphans."""

import json
import os
import subprocess
import sys

import pytest

from vfiotest.errors import ProvisionError, TargetError
from vfiotest.runner import Runner, free_port, qemu
from vfiotest.runner import runner as runner_mod


def fake_qemu(tmp_path, version, devices):
    p = tmp_path / f"qemu-{version}"
    names = "".join(f"    echo 'name \"{d}\", bus PCI'\n" for d in devices)
    p.write_text('#!/bin/sh\ncase "$*" in\n'
                 f'  --version) echo "QEMU emulator version {version} (fake)" ;;\n'
                 f'  *"-device help"*)\n{names}    ;;\nesac\n')
    p.chmod(0o755)
    return str(p)


@pytest.mark.parametrize("version,devices,expected", [
    ("7.2.0", ["nvme", "igb"], False),            # too old, whatever it lists
    ("8.0.0", ["nvme", "igb"], True),
    ("10.0.2", ["nvme", "igb"], True),
    ("9.2.0", ["nvme"], False),                   # built without igb
])
def test_igb_needs_qemu_8(tmp_path, version, devices, expected):
    assert qemu.has_igb(fake_qemu(tmp_path, version, devices)) is expected


def test_runner_reports_no_igb_for_old_qemu(tmp_path):
    r = Runner(str(tmp_path / "r"), qemu_path=fake_qemu(tmp_path, "7.2.0", ["nvme"]))
    assert r.qemu_has_igb is False


def test_missing_qemu_is_a_provision_error(monkeypatch):
    monkeypatch.delenv(qemu.QEMU_ENV, raising=False)
    monkeypatch.setattr(qemu.shutil, "which", lambda name: None)
    with pytest.raises(ProvisionError, match="qemu-system-x86_64 is not installed"):
        qemu.find_qemu()


def _args(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_command_line():
    argv = qemu.command("/usr/bin/qemu-system-x86_64", kernel="/k", initrd="/i", append="console=ttyS0",
                        port=40022, console_log="/s/console.log", pidfile="/s/qemu.pid", nvme_image="/s/n.img")
    devices = _args(argv, "-device")
    assert devices[0].startswith("intel-iommu,") and "intremap=on" in devices[0] and "caching-mode=on" in devices[0]
    assert "q35,kernel-irqchip=split" in _args(argv, "-machine")
    assert _args(argv, "-accel")[0].startswith("tcg") and _args(argv, "-cpu") == ["max"]
    assert any("hostfwd=tcp:127.0.0.1:40022-:22" in n for n in _args(argv, "-netdev"))
    assert _args(argv, "-serial") == ["file:/s/console.log"] and _args(argv, "-pidfile") == ["/s/qemu.pid"]
    virtfs = _args(argv, "-virtfs")[0]
    assert "readonly=on" in virtfs and "multidevs=remap" in virtfs and "path=/," in virtfs
    nvme = [d for d in devices if d.startswith("nvme,")][0]
    assert "sriov_max_vfs=4" in nvme and "bus=rp2" in nvme
    assert any(d.startswith("igb,") and "bus=rp1" in d for d in devices)
    no_igb = qemu.command("/q", kernel="/k", initrd="/i", append="", port=1, console_log="/c", pidfile="/p",
                          nvme_image="/n", igb=False)
    assert not any(d.startswith("igb") for d in _args(no_igb, "-device"))
    assert not any("wirepeer" in d for d in _args(no_igb, "-device") + _args(no_igb, "-netdev"))


def _opts(arg: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in arg.split(",")[1:] if "=" in kv)


def test_igb_wire_is_a_hub_with_the_runners_wire_peer() -> None:
    """The igb PF's netdev is one port of a QEMU hub whose other port is a virtio NIC of the runner
    (the wire peer, at a fixed PCI address and MAC), not user networking: frames the PF port sends
    out can be counted in the runner and frames can be sent to it (docs/nic-traffic.md)."""
    argv = qemu.command("/q", kernel="/k", initrd="/i", append="", port=1, console_log="/c", pidfile="/p",
                        nvme_image="/n", wire=True)
    netdevs = {_opts(n)["id"]: n for n in _args(argv, "-netdev")}
    devices = _args(argv, "-device")
    igb = [d for d in devices if d.startswith("igb,")]
    assert len(igb) == 1 and _opts(igb[0])["netdev"] == "igbnet" and _opts(igb[0])["bus"] == "rp1"
    peer = [d for d in devices if d.startswith("virtio-net-pci,") and _opts(d)["netdev"] == "wirepeer"]
    assert len(peer) == 1
    assert _opts(peer[0])["mac"] == qemu.WIRE_PEER_MAC
    assert qemu.WIRE_PEER_PCI == f"0000:00:{int(_opts(peer[0])['addr'], 16):02x}.0" == "0000:00:06.0"
    assert netdevs["igbnet"].startswith("hubport,") and netdevs["wirepeer"].startswith("hubport,")
    assert _opts(netdevs["igbnet"])["hubid"] == _opts(netdevs["wirepeer"])["hubid"]
    # the management NIC keeps slot 3 (the runner's eth0) and no two devices share a slot
    addrs = [_opts(d)["addr"] for d in devices if "addr" in _opts(d)]
    assert len(addrs) == len(set(int(a, 16) for a in addrs))
    assert any(d.startswith("virtio-net-pci,netdev=mgmt") and _opts(d)["addr"] == "0x3" for d in devices)


def test_the_wire_runner_keeps_its_ram_below_4g_for_the_igb_vf_bars(monkeypatch) -> None:
    """With RAM above 4 GiB SeaBIOS puts the 64-bit windows above 4 GiB and QEMU 10.0 maps the igb
    VF BARs at the low 32 bits of their address (docs/nic-traffic.md): the wire runner, the
    default, stays below the q35 PCI hole (0xb0000000); VFIOTEST_RUNNER_WIRE=0 boots the former
    runner with its 3072 MiB and user networking."""
    assert qemu.VF_BARS_BELOW_4G_MAX_MB < 0xB0000000 >> 20
    monkeypatch.delenv(qemu.WIRE_ENV, raising=False)
    wired = Runner("/nonexistent/r")
    assert wired.wire and wired.memory_mb == qemu.VF_BARS_BELOW_4G_MAX_MB
    monkeypatch.setenv(qemu.WIRE_ENV, "1")
    assert Runner("/nonexistent/r").wire
    monkeypatch.setenv(qemu.WIRE_ENV, "0")
    plain = Runner("/nonexistent/r")
    assert not plain.wire and plain.memory_mb == qemu.DEFAULT_MEMORY_MB
    argv = qemu.command("/q", kernel="/k", initrd="/i", append="", port=1, console_log="/c", pidfile="/p",
                        nvme_image="/n")
    assert [n for n in _args(argv, "-netdev") if n.startswith("user,id=igbnet")], _args(argv, "-netdev")


def test_free_port_is_bindable():
    import socket

    p = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


def write_state(r, **st):
    os.makedirs(r.state_dir, exist_ok=True)
    with open(r.state_file, "w") as f:
        json.dump(st, f)


def test_users_and_orphans(tmp_path):
    r = Runner(str(tmp_path / "r"))
    write_state(r, port=1, persistent=False)
    assert r._orphaned(r._read_state())
    r._add_user()
    assert r._users() == [runner_mod._me()] and not r._orphaned(r._read_state())
    # a user that died (a killed session) is pruned
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_ident = (dead.pid, runner_mod._proc_start(dead.pid))
    dead.wait()
    r._add_user(dead_ident)
    assert r._users() == [runner_mod._me()]
    assert not os.path.exists(os.path.join(r.users_dir, f"{dead_ident[0]}-{dead_ident[1]}"))
    # a reused PID with another start time is not the same user
    r._add_user((os.getpid(), 1))
    assert r._users() == [runner_mod._me()]
    r._drop_user()
    assert r._orphaned(r._read_state())
    write_state(r, port=1, persistent=True)
    assert not r._orphaned(r._read_state())


def test_not_running(tmp_path):
    r = Runner(str(tmp_path / "r"))
    assert r.qemu_pids() == [] and not r.is_up()
    st = r.status()
    assert st["running"] is False and st["pid"] is None and st["console_log"] == r.console_log
    with pytest.raises(TargetError, match="is not running"):
        r.host()
    with pytest.raises(TargetError, match="not running"):
        r.ssh_argv()
    assert r.down() is False
    assert r.console_tail() == []


def test_qemu_pids_match_only_this_state_dir(tmp_path):
    """A process is this runner's QEMU only if it is a qemu-system binary naming this runner's pidfile."""
    r = Runner(str(tmp_path / "r"))
    sleeper = subprocess.Popen(["sleep", "30", r.pidfile])  # names the pidfile, but is not QEMU
    try:
        assert r.qemu_pids() == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_default_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(runner_mod.STATE_ENV, str(tmp_path))
    assert Runner.default().state_dir == str(tmp_path / "runner")
    monkeypatch.delenv(runner_mod.STATE_ENV)
    assert Runner.default().state_dir == "/var/lib/vfiotest/runner"


def test_cli_registers_runner_commands():
    from vfiotest.command import build_parser

    p = build_parser()
    for action in ("up", "down", "status", "ssh", "console"):
        args = p.parse_args(["runner", action])
        assert callable(args.func)


def test_console_tail_is_the_last_40_lines(tmp_path):
    r = Runner(str(tmp_path / "r"))
    os.makedirs(r.state_dir)
    with open(r.console_log, "w") as f:
        f.write("".join(f"line {i}\n" for i in range(100)))
    assert r.console_tail() == [f"line {i}" for i in range(60, 100)]
