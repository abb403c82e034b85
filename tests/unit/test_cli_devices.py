"""`vfiotest devices|bind|unbind|restore|doctor` as a user runs them (subprocess), on a simulated host."""

import json
import os
import subprocess
import sys

import pytest

from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

OTHERS = ["host-bridge", "virtio-net", "virtio-blk",
          {"id": "1b36:0010", "class": "0x010802", "address": "0000:00:07.0", "group": "h"},
          {"id": "8086:10d3", "class": "0x020000", "address": "0000:00:08.0", "group": "h"}]


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}], others=OTHERS)


def vfiotest(sim, *args, profile="emulated"):
    env = dict(os.environ, VFIOTEST_TARGET=f"sim:{sim.sysroot}")
    cmd = [sys.executable, "-m", "vfiotest", *args] + (["--profile", profile] if profile else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_devices_table_and_json(sim):
    res = vfiotest(sim, "devices")
    assert res.returncode == 0, res.stderr
    assert "0000:10:10.0" in res.stdout and "protected: carries the default route" in res.stdout
    data = json.loads(vfiotest(sim, "devices", "--json").stdout)
    pf = next(d for d in data["devices"] if d["address"] == "0000:10:00.0")
    assert pf["sriov"] == {"numvfs": 2, "totalvfs": 7, "drivers_autoprobe": True} and pf["allowed"]


def test_bind_unbind_roundtrip(sim):
    first = read_inventory(sim)
    res = vfiotest(sim, "bind", "10:10.1")
    assert res.returncode == 0, res.stderr
    assert "0000:10:10.1 is on vfio-pci" in res.stdout and "(char)" in res.stdout
    assert read_inventory(sim).devices["0000:10:10.1"].driver == "vfio-pci"
    res = vfiotest(sim, "unbind", "0000:10:10.1")
    assert res.returncode == 0, res.stderr
    assert "now on igbvf" in res.stdout
    assert first.diff(read_inventory(sim)) == []


def test_restore_replays_everything(sim):
    first = read_inventory(sim)
    assert vfiotest(sim, "bind", "10:10.0").returncode == 0
    assert vfiotest(sim, "bind", "10:10.1").returncode == 0
    res = vfiotest(sim, "restore")
    assert res.returncode == 0 and "journal cli: 2 change(s) undone" in res.stdout
    assert first.diff(read_inventory(sim)) == []


@pytest.mark.parametrize("args, profile, text, code", [
    (["bind", "0000:00:1x.0"], "emulated", "is not a PCI address", 2),
    (["bind", "00:1f.0"], "emulated", "no PCI device 0000:00:1f.0", 4),
    (["bind", "10:10.0"], "seed", "not in the seed profile's allowlist", 3),
    (["bind", "00:01.0"], "emulated", "carries the default route", 3),
    (["bind", "--group", "00:07.0"], "emulated", "also holds 0000:00:08.0", 3),
    (["bind", "00:07.0"], "emulated", "also holds 0000:00:08.0", 3),
    (["unbind", "01:00"], "emulated", "is not a PCI address", 2),
    (["devices"], "nosuch", "unknown device profile 'nosuch'", 2),
    (["bind", "10:00.0"], "emulated", "SR-IOV PF with 2 VFs enabled", 3),
    (["devices", "--target", "ssh://root@127.0.0.1:1"], "emulated", "127.0.0.1", 5),
    (["devices", "--target", "telnet://runner"], "emulated", "unknown target 'telnet://runner'", 2),
])
def test_bad_input_clear_error_nonzero_no_change(sim, args, profile, text, code):
    """Each kind of bad input has its own exit status (vfiotest --help lists them)."""
    first = read_inventory(sim)
    res = vfiotest(sim, *args, profile=profile)
    assert res.returncode == code, res.stderr
    assert text in res.stderr and "next step:" in res.stderr and "Traceback" not in res.stderr
    assert first.diff(read_inventory(sim)) == []


def test_vfio_not_loadable(tmp_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "igb", "numvfs": 1}], vfio_loaded=False,
                              vfio_loadable=False)
    res = vfiotest(sim, "bind", "10:10.0")
    assert res.returncode != 0 and "modprobe vfio-pci` failed" in res.stderr


def test_corrupt_and_foreign_journals(sim):
    root = sim.sysroot + "/var/lib/vfiotest/journal"
    os.makedirs(root)
    open(root + "/bad.json", "w").write("{")
    res = vfiotest(sim, "restore")
    assert res.returncode == 6 and "corrupt" in res.stderr and "mv /var/lib/vfiotest/journal/bad.json" in res.stderr
    os.remove(root + "/bad.json")
    assert vfiotest(sim, "bind", "10:10.0").returncode == 0
    doc = json.load(open(root + "/cli.json"))
    doc["identity"].update(hostname="other", machine_id="f" * 32)
    open(root + "/cli.json", "w").write(json.dumps(doc))
    res = vfiotest(sim, "restore")
    assert res.returncode != 0 and "written on other" in res.stderr
    assert read_inventory(sim).devices["0000:10:10.0"].driver == "vfio-pci"


def test_bad_target():
    res = subprocess.run([sys.executable, "-m", "vfiotest", "devices", "--target", "sim:/nonexistent"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "not a simulated sysroot" in res.stderr


def test_doctor(sim):
    res = vfiotest(sim, "doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "IOMMU" in res.stdout and "0000:10:00.0 8086:10c9 (2/7 VFs" in res.stdout
    checks = {c["check"]: c for c in json.loads(vfiotest(sim, "doctor", "--json").stdout)}
    assert checks["cgroup mode"]["detail"].startswith("hybrid")
    res = vfiotest(sim, "doctor", profile="seed")  # no PF of the seed's IDs: missing, exit 1
    assert res.returncode == 1 and "[missing] supported SR-IOV PF found" in res.stdout


def test_help_explains(sim):
    for cmd in ("devices", "bind", "unbind", "restore", "doctor"):
        res = subprocess.run([sys.executable, "-m", "vfiotest", cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "--target" in res.stdout and len(res.stdout) > 400


def test_restore_undoes_what_a_crashed_session_recorded(sim, tmp_path):
    """A test session killed with -9 leaves its records (here a file it wrote) and no live
    holder: `vfiotest restore` puts the file back and drops the session."""
    from vfiotest.session import Session
    from vfiotest.undo_files import file_entry

    state = tmp_path / "state"
    s = Session("crashed1", f"sim:{sim.sysroot}", str(state / "sessions" / "crashed1"))
    s.hold()
    path = "/etc/containers/containers.conf.d/zz-crash.conf"
    s.record(file_entry(sim, path))
    sim.write_atomic(path, "left behind\n", mode=0o644)
    os.close(s._alive_fd)          # the controlling process dies: its lock goes with it
    env = dict(os.environ, VFIOTEST_TARGET=f"sim:{sim.sysroot}", VFIOTEST_STATE_DIR=str(state))
    res = subprocess.run([sys.executable, "-m", "vfiotest", "restore"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert "crashed session crashed1: 1 recorded change(s) undone" in res.stdout
    assert not sim.exists(path) and not (state / "sessions" / "crashed1").exists()
    again = subprocess.run([sys.executable, "-m", "vfiotest", "restore"], capture_output=True, text=True,
                           timeout=60, env=env)
    assert "nothing to restore" in again.stdout


@pytest.mark.parametrize("lease", ["group", "pf"])
def test_a_device_a_test_holds_is_refused_busy(sim, lease):
    """A VF that a running test has leased and bound stays with it: `vfiotest unbind` (and `bind`)
    exit 7 naming the holder; the same while its PF's VF count is being changed (the PF's lease)."""
    from vfiotest.lease import LeasePool
    from vfiotest.sriov import pf_lease_name

    vf = "0000:10:10.1"
    assert vfiotest(sim, "bind", vf).returncode == 0            # the test's VF, on vfio-pci
    inv = read_inventory(sim)
    name = inv.devices[vf].iommu_group if lease == "group" else pf_lease_name(str(inv.devices[vf].physfn))
    held = LeasePool(sim).acquire(name, test_id="suites/rebind::test_x")
    try:
        for cmd in ("unbind", "bind"):
            res = vfiotest(sim, cmd, vf)
            assert res.returncode == 7, (cmd, res.stdout, res.stderr)
            assert f"is leased by pid {os.getpid()}" in res.stderr and "test_x" in res.stderr, res.stderr
            assert "next step:" in res.stderr
            assert read_inventory(sim).devices[vf].driver == "vfio-pci"
    finally:
        held.release()
    res = vfiotest(sim, "unbind", vf)                            # once it is let go
    assert res.returncode == 0, res.stderr
    assert read_inventory(sim).devices[vf].driver == "igbvf"


def test_a_refusal_is_said_before_busy(sim):
    """A PF with VFs is refused (exit 3) even while a test holds it (suites/rebind checks the CLI
    so, holding the PF): what can never be done is said before who holds it."""
    from vfiotest.lease import LeasePool
    from vfiotest.sriov import pf_lease_name

    pf = "0000:10:00.0"
    held = LeasePool(sim).acquire(pf_lease_name(pf), test_id="suites/rebind::test_pf")
    try:
        res = vfiotest(sim, "bind", pf)
    finally:
        held.release()
    assert res.returncode == 3 and "2 VFs enabled" in res.stderr, res.stderr


def test_bind_on_an_emulated_runner_that_is_not_up_is_refused(tmp_path):
    """A runner booted for one `vfiotest bind` would be stopped at its end, the bind with it:
    refused before anything boots, naming the step (no QEMU is started here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIOTEST_")}
    env["VFIOTEST_STATE_DIR"] = str(tmp_path / "state")
    res = subprocess.run([sys.executable, "-m", "vfiotest", "bind", "--target", "virtual", "0000:01:10.0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 5, res.stderr
    assert "the emulated runner is not up" in res.stderr and "vfiotest runner up" in res.stderr, res.stderr
    assert not (tmp_path / "state" / "runner").exists() or not os.listdir(tmp_path / "state" / "runner")


def test_devices_shows_who_holds_a_vf_and_a_pf_count_not_a_reused_group_number(sim):
    """`vfiotest devices` says which devices are leased: a lease that names its VF shows on it;
    a lease on a group number that now belongs to another device's group does not; the PF's
    lease shows as its VF count being held."""
    from vfiotest.lease import LeasePool
    from vfiotest.sriov import pf_lease_name

    def notes(res):
        return {d["address"]: d["notes"] for d in json.loads(res.stdout)["devices"]}

    inv = read_inventory(sim)
    a, b = "0000:10:10.0", "0000:10:10.1"
    pool = LeasePool(sim)
    with pool.acquire(inv.devices[a].iommu_group, test_id="t::a", devices=[a]), \
            pool.acquire(inv.devices[b].iommu_group, test_id="t::stale", devices=["0000:99:00.0"]), \
            pool.acquire(pf_lease_name("0000:10:00.0"), test_id="t::pf"):
        got = notes(vfiotest(sim, "devices", "--json"))
    me = f"pid {os.getpid()}"
    assert f"leased by {me}" in got[a]
    assert not any("leased" in n for n in got[b]), got[b]
    assert f"VF count held by {me}" in got["0000:10:00.0"]
