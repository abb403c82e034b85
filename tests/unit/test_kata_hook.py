"""The guest hook (vfiotest.kata.hook) against the simulated sysfs: selection, binding,
the JSON log, and the bad cases (malformed state, no devices, already bound, timeout)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from vfiotest.kata import hook
from vfiotest.pci import read_inventory
from vfiotest.simsysfs import SimulatedHost

VF1, VF2 = "0000:10:10.0", "0000:10:10.1"
OTHERS = ["host-bridge", "virtio-net", "virtio-blk",
          # a virtio device and a VF-ID device sharing a group: the group must be left alone
          {"id": "8086:10ca", "class": "0x020000", "address": "0000:00:09.0", "group": "mixed"},
          {"id": "1af4:1041", "class": "0x020000", "address": "0000:00:0a.0", "group": "mixed"}]


@pytest.fixture
def sim(tmp_path):
    return SimulatedHost.build(str(tmp_path / "sim"), pfs=[{"preset": "igb", "numvfs": 2}], others=OTHERS)


@pytest.fixture
def log_path(tmp_path):
    return str(tmp_path / "tmp" / "vfio-hook.log")


def state(cid="ctr1", annotation=None):
    s = {"ociVersion": "1.0.2", "id": cid, "status": "created", "pid": 1, "bundle": "/b"}
    if annotation is not None:
        s["annotations"] = {hook.ANNOTATION: annotation}
    return json.dumps(s)


def call(sim, log_path, stdin, settings=None, spec_root="/nonexistent"):
    return hook.run("prestart", stdin, sim, settings or {}, log_path=log_path, spec_root=spec_root)


def entries(log_path):
    with open(log_path) as f:
        return [json.loads(line) for line in f]


def test_annotation_binds_each_vf_group_and_logs_it(sim, log_path):
    before = read_inventory(sim)
    assert call(sim, log_path, state(annotation=f"{VF1}")) == 0
    inv = read_inventory(sim)
    vf = inv.devices[VF1]
    assert vf.driver == "vfio-pci"
    assert inv.vfio.get(vf.iommu_group) == "char"
    assert inv.devices[VF2].driver == before.devices[VF2].driver == "igbvf"  # not asked for
    binds = [e for e in entries(log_path) if e["action"] == "bind"]
    assert len(binds) == 1
    e = binds[0]
    assert (e["device"], e["old_driver"], e["new_driver"], e["group"], e["result"]) == \
        (VF1, "igbvf", "vfio-pci", vf.iommu_group, "bound")
    assert e["container"] == "ctr1" and e["stage"] == "prestart" and e["time"].endswith("Z")
    assert [x["result"] for x in entries(log_path) if x["action"] == "verify"] == ["ok"]


def test_vendor_device_annotation_selects_all_matching_but_never_a_group_with_virtio(sim, log_path):
    assert call(sim, log_path, state(annotation="8086:10ca")) == 0
    inv = read_inventory(sim)
    assert inv.devices[VF1].driver == inv.devices[VF2].driver == "vfio-pci"
    # 0000:00:09.0 has the ID but shares its group with a virtio device: left alone, logged
    assert inv.devices["0000:00:09.0"].driver != "vfio-pci"
    assert inv.devices["0000:00:0a.0"].driver == "virtio-pci"
    errs = [e for e in entries(log_path) if e["result"] == "error"]
    assert any(e["device"] == "0000:00:0a.0" and "group" in e["error"] for e in errs)


def test_virtio_and_protected_devices_are_refused(sim, log_path):
    inv0 = read_inventory(sim)
    virtio = [a for a, d in inv0.devices.items() if d.vendor == "0x1af4"]
    assert call(sim, log_path, state(annotation=",".join(["1af4:1000", "1af4:1001"]))) == 0
    assert read_inventory(sim).diff(inv0) == []
    refused = {e["device"] for e in entries(log_path) if e["result"] == "refused"}
    assert set(virtio) - {"0000:00:0a.0"} <= refused


def test_already_bound_is_logged_and_left(sim, log_path):
    call(sim, log_path, state("a", annotation=VF1))
    after_first = read_inventory(sim)
    assert call(sim, log_path, state("b", annotation=VF1)) == 0
    assert read_inventory(sim).diff(after_first) == []
    second = [e for e in entries(log_path) if e["container"] == "b" and e["action"] == "bind"]
    assert [(e["result"], e["old_driver"], e["new_driver"]) for e in second] == [("already-bound", "vfio-pci", "vfio-pci")]


def test_empty_annotation_asks_for_nothing(sim, log_path):
    inv0 = read_inventory(sim)
    assert call(sim, log_path, state(annotation=""), settings={"allowed_ids": ["8086:10ca"]}) == 0
    assert read_inventory(sim).diff(inv0) == []
    assert [e["result"] for e in entries(log_path) if e["action"] == "select"] == ["no-devices"]


def test_no_annotation_falls_back_to_profile_ids(sim, log_path):
    assert call(sim, log_path, state(), settings={"allowed_ids": ["0x8086:0x10ca"]}) == 0
    inv = read_inventory(sim)
    assert inv.devices[VF1].driver == "vfio-pci" and inv.devices[VF2].driver == "vfio-pci"
    assert entries(log_path)[0]["source"] == "profile"


def test_annotation_from_the_agents_spec_copy(sim, log_path, tmp_path):
    spec_root = tmp_path / "libcontainer"
    (spec_root / "ctr9").mkdir(parents=True)
    (spec_root / "ctr9" / "config.json").write_text(json.dumps({"annotations": {hook.ANNOTATION: VF2}}))
    assert call(sim, log_path, state("ctr9"), spec_root=str(spec_root)) == 0
    inv = read_inventory(sim)
    assert inv.devices[VF2].driver == "vfio-pci" and inv.devices[VF1].driver == "igbvf"


def test_no_such_device_in_the_guest(sim, log_path):
    inv0 = read_inventory(sim)
    assert call(sim, log_path, state(annotation="0000:55:00.0,8086:beef")) == 0
    assert read_inventory(sim).diff(inv0) == []
    log = entries(log_path)
    assert any(e["result"] == "refused" and e["device"] == "0000:55:00.0" for e in log)
    assert any(e["action"] == "select" and e["result"] == "no-devices" for e in log)


def test_bad_annotation_token_is_logged_and_changes_nothing(sim, log_path):
    inv0 = read_inventory(sim)
    assert call(sim, log_path, state(annotation="eth0")) == 0
    assert read_inventory(sim).diff(inv0) == []
    assert entries(log_path)[-1]["action"] == "select" and "eth0" in entries(log_path)[-1]["error"]


@pytest.mark.parametrize("stdin", ["", "{not json", "[1, 2]", '{"ociVersion": "1.0.2"}', '{"id": "x", "annotations": 5}'])
def test_malformed_state_is_logged_and_exits_nonzero_fast(sim, log_path, stdin):
    inv0 = read_inventory(sim)
    t0 = time.monotonic()
    assert call(sim, log_path, stdin) == hook.EXIT_BAD_STATE
    assert time.monotonic() - t0 < 1.0
    assert read_inventory(sim).diff(inv0) == []
    (e,) = entries(log_path)
    assert e["action"] == "state" and e["result"] == "error" and e["error"]


def test_per_device_error_is_logged_and_the_hook_goes_on(tmp_path, log_path):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "igb", "numvfs": 2}],
                              vfio_loaded=False, vfio_loadable=False)
    inv0 = read_inventory(sim)
    assert call(sim, log_path, state(annotation="8086:10ca")) == 0
    assert read_inventory(sim).diff(inv0) == []          # rolled back by the device layer
    errs = [e for e in entries(log_path) if e["action"] == "bind"]
    assert {e["device"] for e in errs} == {VF1, VF2}
    assert all(e["result"] == "error" and "vfio-pci" in e["error"] and e["old_driver"] == "igbvf" for e in errs)
    assert entries(log_path)[-1]["action"] == "end" and entries(log_path)[-1]["failed_groups"] == 2


LIB = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(hook.__file__))))


def run_main_in_child(code, timeout=30):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=LIB))


def test_main_is_bounded_in_time(tmp_path, log_path):
    """A target that hangs: the hook logs a timeout and exits 3 within its budget."""
    sim_dir = str(tmp_path / "slow")
    SimulatedHost.build(sim_dir, pfs=[{"preset": "igb", "numvfs": 1}])
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"log": log_path, "timeout": 1.0}))
    t0 = time.monotonic()
    p = run_main_in_child(f"""
        import io, sys, time
        from vfiotest.simsysfs import SimulatedHost
        from vfiotest.kata import hook
        class Hung(SimulatedHost):
            def _exec(self, command, *, timeout, input):
                time.sleep(60)
        host = Hung({sim_dir!r})
        stdin = io.BytesIO({state(annotation="8086:10ca").encode()!r})
        sys.exit(hook.main(["vfio-hook", "prestart"], settings_path={str(settings)!r}, stdin=stdin, host=host))
    """)
    took = time.monotonic() - t0
    assert p.returncode == hook.EXIT_TIMEOUT, p.stderr
    assert took < 10
    assert entries(log_path)[-1]["result"] == "timeout"


def test_main_reads_stdin_and_stage_from_argv(tmp_path, log_path):
    """The agent's calling convention: argv [path, stage], state on stdin."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"log": log_path}))
    p = subprocess.run([sys.executable, "-c",
                        "import sys; from vfiotest.kata.hook import main; "
                        f"sys.exit(main(sys.argv, settings_path={str(settings)!r}))", "poststop"],
                       input="garbage", capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=LIB))
    assert p.returncode == hook.EXIT_BAD_STATE
    (e,) = entries(log_path)
    assert e["stage"] == "poststop" and e["stdin"] == "garbage"
