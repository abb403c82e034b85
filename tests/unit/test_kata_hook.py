"""The guest hook (vfiotest.kata.hook) against the simulated sysfs: selection, binding,
the JSON log, the exit codes and stderr lines that fail the container (a failed bind, a
device asked for and absent or refused, a malformed annotation), the bounded wait for
hot-plugged devices, the spec from the state's bundle, and the bad cases (malformed
state, no devices, already bound, timeout)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from vfiotest.kata import hook
from vfiotest.pci import read_inventory
from vfiotest.testing.simsysfs import SimulatedHost

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
    settings = {"device_wait": 0.3, **(settings or {})}     # keep the waits of the absent cases short
    return hook.run("prestart", stdin, sim, settings, log_path=log_path, spec_root=spec_root)


def stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line]


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
    # 0000:00:09.0 has the ID but shares its group with a virtio device: refused, left alone, logged;
    # the ID still got devices, so the container starts (exit 0)
    assert inv.devices["0000:00:09.0"].driver != "vfio-pci"
    assert inv.devices["0000:00:0a.0"].driver == "virtio-pci"
    refused = [e for e in entries(log_path) if e["result"] == "refused"]
    assert [e["device"] for e in refused] == ["0000:00:09.0"]
    assert "group" in refused[0]["error"] and "0000:00:0a.0" in refused[0]["error"]
    assert entries(log_path)[-1]["action"] == "end" and entries(log_path)[-1]["result"] == "ok"


def test_virtio_and_protected_devices_asked_for_are_refused_and_fail_the_container(sim, log_path, capsys):
    inv0 = read_inventory(sim)
    virtio = [a for a, d in inv0.devices.items() if d.vendor == "0x1af4"]
    assert call(sim, log_path, state(annotation=",".join(["1af4:1000", "1af4:1001"]))) == hook.EXIT_BIND_FAILED
    assert read_inventory(sim).diff(inv0) == []
    refused = {e["device"] for e in entries(log_path) if e["result"] == "refused"}
    assert set(virtio) - {"0000:00:0a.0"} <= refused
    err = stderr_lines(capsys)
    assert len(err) == 2 and all(line.startswith("vfio-hook: ") for line in err)
    assert "1af4:1000" in err[0] and "virtio" in err[0] and "1af4:1001" in err[1]
    assert entries(log_path)[-1]["action"] == "end" and entries(log_path)[-1]["result"] == "error"


@pytest.mark.parametrize("what", ["0000:00:01.0", "0000:00:00.0"])   # virtio-net (default route), host bridge
def test_a_refused_address_asked_for_fails_the_container(sim, log_path, capsys, what):
    inv0 = read_inventory(sim)
    assert call(sim, log_path, state(annotation=what)) == hook.EXIT_BIND_FAILED
    assert read_inventory(sim).diff(inv0) == []
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"vfio-hook: {what} (") and "refused" in line


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


def state_with_bundle(cid, bundle):
    return json.dumps({"ociVersion": "1.0.2", "id": cid, "status": "creating", "pid": 1, "bundle": str(bundle),
                       "annotations": {}})


def write_spec(d, annotation):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {hook.ANNOTATION: annotation}}))


def test_annotation_from_the_spec_in_the_states_bundle(sim, log_path, tmp_path):
    """Kata 1.x: bundle /run/kata-containers/shared/containers/<id> holds the spec; /run/libcontainer has none."""
    bundle = tmp_path / "shared" / "containers" / "ctr7"
    write_spec(bundle, VF1)
    write_spec(tmp_path / "libcontainer" / "ctr7", VF2)        # the bundle's spec wins
    assert call(sim, log_path, state_with_bundle("ctr7", bundle), spec_root=str(tmp_path / "libcontainer")) == 0
    inv = read_inventory(sim)
    assert inv.devices[VF1].driver == "vfio-pci" and inv.devices[VF2].driver == "igbvf"
    assert entries(log_path)[0]["source"] == "annotation" and entries(log_path)[0]["annotation"] == VF1


def test_bundle_without_a_spec_falls_back_to_the_agents_copy(sim, log_path, tmp_path):
    bundle = tmp_path / "shared" / "containers" / "ctr8"
    bundle.mkdir(parents=True)
    write_spec(tmp_path / "libcontainer" / "ctr8", VF2)
    assert call(sim, log_path, state_with_bundle("ctr8", bundle), spec_root=str(tmp_path / "libcontainer")) == 0
    inv = read_inventory(sim)
    assert inv.devices[VF2].driver == "vfio-pci" and inv.devices[VF1].driver == "igbvf"


def test_annotation_from_the_agents_spec_copy(sim, log_path, tmp_path):
    spec_root = tmp_path / "libcontainer"
    (spec_root / "ctr9").mkdir(parents=True)
    (spec_root / "ctr9" / "config.json").write_text(json.dumps({"annotations": {hook.ANNOTATION: VF2}}))
    assert call(sim, log_path, state("ctr9"), spec_root=str(spec_root)) == 0
    inv = read_inventory(sim)
    assert inv.devices[VF2].driver == "vfio-pci" and inv.devices[VF1].driver == "igbvf"


def test_no_such_device_in_the_guest_fails_the_container_after_the_wait(sim, log_path, capsys):
    inv0 = read_inventory(sim)
    t0 = time.monotonic()
    rc = call(sim, log_path, state(annotation="0000:55:00.0,8086:beef"), settings={"device_wait": 0.6})
    took = time.monotonic() - t0
    assert rc == hook.EXIT_BIND_FAILED
    assert 0.6 <= took < 5
    assert read_inventory(sim).diff(inv0) == []
    log = entries(log_path)
    assert any(e["result"] == "refused" and e["device"] == "0000:55:00.0" for e in log)
    assert any(e["result"] == "refused" and e["vendor_device"] == "8086:beef" for e in log)
    assert any(e["action"] == "select" and e["result"] == "no-devices" for e in log)
    assert log[-1]["action"] == "end" and log[-1]["result"] == "error"
    err = stderr_lines(capsys)
    assert len(err) == 2
    assert err[0].startswith("vfio-hook: 0000:55:00.0 ") and err[1].startswith("vfio-hook: 8086:beef ")
    for line in err:      # what was asked, and what the guest has
        assert "0000:55:00.0,8086:beef" in line and f"{VF1} 8086:10ca (igbvf)" in line


def test_an_absent_address_next_to_a_good_one_binds_the_good_one_and_fails(sim, log_path, capsys):
    assert call(sim, log_path, state(annotation=f"{VF1} 0000:55:00.0")) == hook.EXIT_BIND_FAILED
    assert read_inventory(sim).devices[VF1].driver == "vfio-pci"
    (line,) = stderr_lines(capsys)
    assert line.startswith("vfio-hook: 0000:55:00.0 ") and "no such device" in line


def test_bad_annotation_token_fails_with_bad_request_and_changes_nothing(sim, log_path, capsys):
    inv0 = read_inventory(sim)
    assert call(sim, log_path, state(annotation=f"{VF1},eth0")) == hook.EXIT_BAD_REQUEST
    assert read_inventory(sim).diff(inv0) == []
    sel = [e for e in entries(log_path) if e["action"] == "select"]
    assert sel[-1]["result"] == "error" and "eth0" in sel[-1]["error"]
    assert entries(log_path)[-1]["action"] == "end" and entries(log_path)[-1]["result"] == "error"
    (line,) = stderr_lines(capsys)
    assert line.startswith("vfio-hook: ") and "'eth0'" in line and hook.ANNOTATION in line


def test_profile_ids_matching_nothing_is_fine_and_does_not_wait(sim, log_path, capsys):
    t0 = time.monotonic()
    assert call(sim, log_path, state(), settings={"allowed_ids": ["dead:beef"], "device_wait": 5.0}) == 0
    assert time.monotonic() - t0 < 4
    assert [e["result"] for e in entries(log_path) if e["action"] == "select"] == ["no-devices"]
    assert entries(log_path)[-1]["result"] == "ok" and stderr_lines(capsys) == []


def hotplug_after(monkeypatch, sim, reads, numvfs=2):
    """The PF's VFs appear (as a hot-plug would) just before the `reads`-th inventory read."""
    import vfiotest.pci

    real, count = vfiotest.pci.read_inventory, []

    def read(host, timeout=30):
        count.append(1)
        if len(count) == reads:
            sim.write_text("/sys/bus/pci/devices/0000:10:00.0/sriov_numvfs", str(numvfs))
        return real(host, timeout)
    monkeypatch.setattr(vfiotest.pci, "read_inventory", read)
    return count


@pytest.mark.parametrize("annotation", [VF1, "8086:10ca"])
def test_a_device_asked_for_is_waited_for_until_it_is_hot_plugged(tmp_path, log_path, monkeypatch, annotation):
    sim = SimulatedHost.build(str(tmp_path / "hp"), pfs=[{"preset": "igb", "numvfs": 0}])
    reads = hotplug_after(monkeypatch, sim, reads=3)
    assert call(sim, log_path, state(annotation=annotation), settings={"device_wait": 10.0}) == 0
    assert len(reads) >= 3
    assert read_inventory(sim).devices[VF1].driver == "vfio-pci"
    (w,) = [e for e in entries(log_path) if e["action"] == "wait"]
    assert w["result"] == "ok" and w["ms"] >= 200          # polled, not spun
    assert entries(log_path)[-1]["result"] == "ok"


def test_the_device_wait_stays_within_the_hook_timeout(sim, log_path, capsys):
    t0 = time.monotonic()
    rc = call(sim, log_path, state(annotation="0000:55:00.0"), settings={"device_wait": 30.0, "timeout": 2.0})
    assert rc == hook.EXIT_BIND_FAILED
    assert time.monotonic() - t0 < 2.0
    assert "0000:55:00.0" in capsys.readouterr().err


@pytest.mark.parametrize("stdin", ["", "{not json", "[1, 2]", '{"ociVersion": "1.0.2"}', '{"id": "x", "annotations": 5}'])
def test_malformed_state_is_logged_and_exits_nonzero_fast(sim, log_path, stdin):
    inv0 = read_inventory(sim)
    t0 = time.monotonic()
    assert call(sim, log_path, stdin) == hook.EXIT_BAD_STATE
    assert time.monotonic() - t0 < 1.0
    assert read_inventory(sim).diff(inv0) == []
    (e,) = entries(log_path)
    assert e["action"] == "state" and e["result"] == "error" and e["error"]


@pytest.mark.parametrize("annotation", ["8086:10ca", None])     # asked for, or the profile's IDs
def test_per_device_error_is_logged_the_hook_goes_on_and_fails_the_container(tmp_path, log_path, capsys, annotation):
    sim = SimulatedHost.build(str(tmp_path / "s"), pfs=[{"preset": "igb", "numvfs": 2}],
                              vfio_loaded=False, vfio_loadable=False)
    inv0 = read_inventory(sim)
    t0 = time.monotonic()
    rc = call(sim, log_path, state(annotation=annotation), settings={"allowed_ids": ["8086:10ca"]})
    assert rc == hook.EXIT_BIND_FAILED
    assert time.monotonic() - t0 < hook.VFIO_NODE_WAIT   # no wait for a /dev/vfio node that cannot come
    assert [e["result"] for e in entries(log_path) if e["action"] == "verify"] == ["error", "error"]
    assert read_inventory(sim).diff(inv0) == []          # rolled back by the device layer
    errs = [e for e in entries(log_path) if e["action"] == "bind"]
    assert {e["device"] for e in errs} == {VF1, VF2}
    assert all(e["result"] == "error" and "vfio-pci" in e["error"] and e["old_driver"] == "igbvf" for e in errs)
    end = entries(log_path)[-1]
    assert end["action"] == "end" and end["result"] == "error" and end["failed_groups"] == 2 and end["error"]
    err = stderr_lines(capsys)
    assert [line.split(":", 1)[0] for line in err] == ["vfio-hook"] * 2
    assert err[0].startswith(f"vfio-hook: {VF1} (8086:10ca) could not be bound to vfio-pci: ")
    assert err[1].startswith(f"vfio-hook: {VF2} (8086:10ca) could not be bound to vfio-pci: ")


def test_a_missing_dev_vfio_node_fails_the_container(sim, log_path, capsys, monkeypatch):
    monkeypatch.setattr(hook, "VFIO_NODE_WAIT", 0.2)
    real_exists = sim.exists
    monkeypatch.setattr(sim, "exists", lambda path: False if path.startswith("/dev/vfio/") else real_exists(path))
    assert call(sim, log_path, state(annotation=VF1)) == hook.EXIT_BIND_FAILED
    assert [e["result"] for e in entries(log_path) if e["action"] == "verify"] == ["error"]
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"vfio-hook: {VF1} (8086:10ca) could not be bound to vfio-pci: /dev/vfio/")


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
        from vfiotest.testing.simsysfs import SimulatedHost
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


@pytest.mark.parametrize("argv", [["vfio-hook", "prestart"], ["vfio-hook"], []])
def test_main_takes_the_stage_from_argv1_and_assumes_prestart(tmp_path, log_path, argv):
    """Kata 1.12.1's agent passes the hook's basename as argv[0] and the stage as argv[1]."""
    sim_dir = str(tmp_path / "sim")
    SimulatedHost.build(sim_dir, pfs=[{"preset": "igb", "numvfs": 1}])
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"log": log_path}))
    p = run_main_in_child(f"""
        import io, sys
        from vfiotest.testing.simsysfs import SimulatedHost
        from vfiotest.kata import hook
        stdin = io.BytesIO({state(annotation=VF1).encode()!r})
        sys.exit(hook.main({argv!r}, settings_path={str(settings)!r}, stdin=stdin, host=SimulatedHost({sim_dir!r})))
    """)
    assert p.returncode == 0, p.stderr
    assert {e["stage"] for e in entries(log_path)} == {"prestart"}
    assert read_inventory(SimulatedHost(sim_dir)).devices[VF1].driver == "vfio-pci"
    # what the agent passed is in the log, for the guest_hook suite to compare with Kata's
    start = next(e for e in entries(log_path) if e["action"] == "start")
    assert start["argv"] == argv
    assert set(start["state"]) == {"id", "pid", "status", "bundle"}
    assert start["state"]["id"] == json.loads(state(annotation=VF1))["id"]


def test_main_exits_5_with_one_stderr_line_per_failure(tmp_path, log_path):
    """What the agent sees of a failed bind: the exit code and stderr (the runtime's error shows it)."""
    sim_dir = str(tmp_path / "novfio")
    SimulatedHost.build(sim_dir, pfs=[{"preset": "igb", "numvfs": 1}], vfio_loaded=False, vfio_loadable=False)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"log": log_path}))
    p = run_main_in_child(f"""
        import io, sys
        from vfiotest.testing.simsysfs import SimulatedHost
        from vfiotest.kata import hook
        stdin = io.BytesIO({state(annotation="8086:10ca").encode()!r})
        sys.exit(hook.main(["vfio-hook", "prestart"], settings_path={str(settings)!r}, stdin=stdin,
                           host=SimulatedHost({sim_dir!r})))
    """)
    assert p.returncode == hook.EXIT_BIND_FAILED == 5
    assert p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith(f"vfio-hook: {VF1} (8086:10ca) could not be bound to vfio-pci: ") and "vfio-pci" in line
    assert entries(log_path)[-1]["action"] == "end" and entries(log_path)[-1]["result"] == "error"


def test_main_bounds_the_device_wait_by_its_budget(tmp_path, log_path):
    """A device asked for never appears and device_wait exceeds the budget: exit 5 (not 3), within the budget."""
    sim_dir = str(tmp_path / "sim")
    SimulatedHost.build(sim_dir, pfs=[{"preset": "igb", "numvfs": 0}])
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"log": log_path, "timeout": 2.0, "device_wait": 60}))
    p = run_main_in_child(f"""
        import io, sys, time
        from vfiotest.testing.simsysfs import SimulatedHost
        from vfiotest.kata import hook
        stdin = io.BytesIO({state(annotation="8086:10ca").encode()!r})
        t0 = time.monotonic()
        rc = hook.main(["vfio-hook", "prestart"], settings_path={str(settings)!r}, stdin=stdin,
                       host=SimulatedHost({sim_dir!r}))
        print(time.monotonic() - t0)
        sys.exit(rc)
    """)
    assert p.returncode == hook.EXIT_BIND_FAILED, p.stderr
    assert float(p.stdout) < 2.0
    assert "8086:10ca" in p.stderr and entries(log_path)[-1]["result"] == "error"


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
