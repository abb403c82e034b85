"""Containers through podman-py on the kata-vfio runtime, with VFIO exercised inside.

"The node exists" is not enough: the probe opens the container and the group,
sets the IOMMU, maps and unmaps DMA, and reads the device's IDs through VFIO.
Each container is a Kata VM: the VF is hot-plugged into it, the guest hook binds it to
vfio-pci there, and the container (with the seed's `-v /dev:/dev`) sees the guest's
`/dev/vfio`, whose group number is the guest's own and is never compared with the host's.
"""

import contextlib
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import pytest

from vfiotest.fixtures.allure_report import attach_json, attach_text, attach_vfio_group
from vfiotest.kata.runtime import RUNTIME_NAME, kata_leftovers
from vfiotest.pci import read_inventory

pytestmark = [pytest.mark.mutating, pytest.mark.kata]   # `vm` at run time, by the target

ALL_STEPS = ["open-container", "api-version", "check-extension", "open-group", "group-status", "set-container",
             "set-iommu", "iommu-info", "map-dma", "unmap-dma", "get-device-fd", "device-info", "region-info",
             "read-config", "irq-info"]
SMALL_MEMLOCK = 64 * 1024


def _report(res):
    try:
        return res.json()
    except ValueError:
        pytest.fail(f"the probe printed no report: {res}")


NODES_END = "--- end of /dev/vfio ---"
STRESS_BEGIN = "--- the DMA stress ---"
STRESS_EXIT = "--- the DMA stress exited: "

#: the DMA stress a DPDK or SPDK process puts on VFIO: 256 MiB mapped one 4 KiB page per
#: VFIO_IOMMU_MAP_DMA (65,535 maps, the type1 driver's default dma_entry_limit), then unmapped
DMA_STRESS_BYTES = 256 << 20
DMA_STRESS_ROUNDS = 1
STRESS_TEST = "test_dma_stress_256mib_in_4k_pages_at_the_default_guest_memory"


def _selected(request, name):
    """Whether the test `name` of this module runs in this session (not deselected by -k or -m)."""
    return any(item.name == name and item.module is request.module for item in request.session.items)


@dataclass
class VfRun:
    vf: Any                      # the VfioGroup (vfiotest.vfio), re-read after it was put back
    res: Any                     # the container's RunResult, its output up to the DMA stress
    during: Any                  # the target's inventory while the group was bound, before the container
    leftovers: Any               # podman_client.leftovers() after the container was removed
    restore_error: Optional[BaseException] = None   # putting the group back failed
    stress: Any = None           # the DMA stress's own RunResult view (its output and exit), if it ran


def _split_stress(res):
    """(the run up to the DMA stress, the DMA stress's own view of it): one container ran both,
    each view keeps its own output and exit status (the container's is the first probe's)."""
    if STRESS_BEGIN not in res.stdout:
        return res, None
    head, tail = res.stdout.split(STRESS_BEGIN, 1)
    out, _, rest = tail.partition(STRESS_EXIT)
    word = (rest.split() or [""])[0]
    rc = int(word) if word.isdigit() else None
    return replace(res, stdout=head), replace(res, stdout=out, exit_code=rc)


@pytest.fixture(scope="module")
def vf_run(request, target_host, vf_leaser, container_factory, podman_client):
    """One container with a VF (the seed's recipe on Kata) that lists /dev/vfio, then runs the probe
    (and, when the DMA stress test is selected, the probe's DMA stress after it, in the same
    container); then the container is removed and the VF's group put back on its driver. The tests
    below read this one run instead of booting a Kata VM each (about 30-40 s apiece); each still
    checks its own thing, the last one the host's driver state after the teardown."""
    factory = container_factory(kata=True)
    stress = _selected(request, STRESS_TEST)
    with contextlib.ExitStack() as stack:
        vf = stack.enter_context(vf_leaser.vfio(request.node.nodeid))
        during = read_inventory(target_host)
        script = (f"for f in /dev/vfio/*; do stat -c '%F %n' \"$f\"; done; echo {shlex.quote(NODES_END)}; "
                  f"{shlex.join(factory.probe_command())}; rc=$?; ")
        if stress:
            # the stress's own exit status is printed: an OOM kill (137) is its verdict, not the probe's
            script += (f"echo {shlex.quote(STRESS_BEGIN)}; "
                       f"{shlex.join(factory.probe_command('--dma-stress', DMA_STRESS_BYTES, '--dma-rounds', DMA_STRESS_ROUNDS))}; "
                       f"echo {shlex.quote(STRESS_EXIT)}$?; ")
        script += "exit $rc"
        res = factory.run(["sh", "-c", script], vfio=vf, ipc_lock=True, timeout=780 if stress else 180)
        podman_client.cleanup()
        put_back = stack.pop_all()     # closed below, outside: its failure is one test's verdict
    restore_error = None
    try:
        put_back.close()
    except Exception as e:  # noqa: BLE001 -- test_host_driver_state_after_teardown_equals_start raises it
        restore_error = e
    res, stress_res = _split_stress(res)
    yield VfRun(vf, res, during, podman_client.leftovers(), restore_error, stress_res)


def test_container_runs_on_the_kata_vfio_runtime(vf_run):
    vf, res = vf_run.vf, vf_run.res
    attach_json("the container's runtime and Kata's VFIO annotation", {
        "exit_code": res.exit_code, "oci_runtime": res.oci_runtime, "vf_vendor_device": vf.vendor_device,
        "annotation": res.inspect["Config"]["Annotations"].get("io.katacontainers.x.vfio")})
    assert res.exit_code == 0, str(res)
    assert res.oci_runtime == RUNTIME_NAME, f"podman ran the container on {res.oci_runtime!r}"
    # the VF's vendor:device: the guest's PCI addresses are not the host's
    assert res.inspect["Config"]["Annotations"].get("io.katacontainers.x.vfio") == vf.vendor_device


def test_vfio_nodes_are_inside(vf_run):
    res = vf_run.res
    listing = res.stdout.split(NODES_END)[0] if NODES_END in res.stdout else ""
    attach_text("/dev/vfio in the container (stat)", listing or f"(no listing)\n{res}")
    nodes = dict(line.rsplit(" ", 1)[::-1] for line in listing.strip().splitlines() if " " in line)
    assert nodes.get("/dev/vfio/vfio") == "character special file", f"no /dev/vfio/vfio in the container: {res}"
    groups = {p: kind for p, kind in nodes.items() if p.rsplit("/", 1)[-1].isdigit()}
    assert len(groups) == 1 and set(groups.values()) == {"character special file"}, f"group nodes inside: {nodes}"


def test_probe_maps_dma_with_cap_ipc_lock(vf_run):
    vf, res = vf_run.vf, vf_run.res
    rep = _report(res)
    attach_json("the probe's report", rep)
    assert res.exit_code == 0 and rep["ok"], f"probe failed at {rep.get('step')}: {rep.get('error')}"
    assert rep["steps"] == ALL_STEPS
    assert rep["vendor_device"] == vf.vendor_device
    assert rep["pci"] and rep["num_regions"] >= 8
    assert any(r["name"] == "config" and r["size"] >= 256 for r in rep["regions"])
    assert rep["dma"]["size"] == 1 << 20


def test_dma_map_fails_without_cap_ipc_lock_and_small_memlock(container, vfio_group):
    res = container.probe(vfio_group, ipc_lock=False, ulimits={"memlock": SMALL_MEMLOCK})
    rep = _report(res)
    assert res.exit_code == 1, f"the probe should have failed at map-dma:\n{res}"
    # every step up to the IOMMU worked: it is the memory lock, not the device, that fails
    assert rep["step"] == "map-dma", f"failed at {rep['step']} ({rep.get('error')}), expected map-dma"
    assert rep["errname"] == "ENOMEM", rep
    assert rep["steps"][-1] == "iommu-info"


def test_dma_stress_256mib_in_4k_pages_at_the_default_guest_memory(vf_run):
    """A container made as the suites make them (Kata's default guest memory, no --memory) maps
    256 MiB page by page through VFIO and unmaps it; the guest must hold it (it pins it all).
    It runs in vf_run's container, after the probe there (one Kata VM fewer)."""
    res = vf_run.stress
    assert res is not None, f"the DMA stress did not run in the module's container:\n{vf_run.res}"
    rep = _report(res)
    attach_json("DMA stress inside the container", rep.get("dma_stress") or rep)
    assert res.exit_code == 0 and rep.get("ok"), (
        f"the DMA stress failed at {rep.get('step')} ({rep.get('error')}); exit code {res.exit_code} "
        f"(137: SIGKILLed, the guest's memory is too small for it)\n{res}")
    st = rep["dma_stress"]
    assert (st["bytes"], st["page"], st["rounds"]) == (65535 * 4096, 4096, DMA_STRESS_ROUNDS), st
    assert st["maps"] == 65535, st


def test_no_dev_vfio_without_device(container):
    script = f"ls -A /dev/vfio 2>/dev/null; echo {shlex.quote(NODES_END)}; exec {shlex.join(container.probe_command())}"
    res = container.run(["sh", "-c", script])
    assert NODES_END in res.stdout, str(res)
    listed = res.stdout.split(NODES_END)[0].split()
    # the guest's /dev is the container's (-v /dev:/dev): vfio loaded, no group without a device
    assert [n for n in listed if n.isdigit()] == [], f"a VFIO group in a container given no device: {listed}"
    rep = _report(res)
    assert (rep["step"], rep["errname"]) == ("open-group", "ENOENT"), rep


def _logs(ctr):
    return b"".join(x if isinstance(x, bytes) else x.encode() for x in ctr.logs(stdout=True, stderr=True)).decode("utf-8", "replace")


def _wait_for_log(ctr, text, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in _logs(ctr):
            return True
        ctr.reload()
        if ctr.status not in ("running", "created", "configured"):
            return False
        time.sleep(0.5)
    return False


HELD_TEST = "test_second_container_cannot_take_a_held_group"


@dataclass
class Scenario:
    """What one run of a shared scenario saw, step by step. A step that raised stops it: a test
    that needs a fact recorded after that step fails with the step's error (never skips)."""
    facts: dict = field(default_factory=dict)
    step: str = "leasing and binding a VF"  # the step under way
    failed: Optional[tuple] = None          # (the step, its exception)

    def need(self, key):
        if key in self.facts:
            return self.facts[key]
        if self.failed is not None:
            where, e = self.failed
            raise AssertionError(f"the module's held-then-crashed container stopped at {where}, "
                                 f"before {key}: {type(e).__name__}: {e}") from e
        raise AssertionError(f"the module's held-then-crashed container never got to {key}: {self.facts}")


@pytest.fixture(scope="module")
def held_then_crashed(request, target_host, vf_leaser, lease_pool, container_factory, podman_client):
    """One holder for the two tests below, three Kata VMs in all instead of five: a container
    holds the VF's group (the probe with --hold, a child of sh); a second container asks for the
    group (when the held-group test runs); then the holder's probe is killed by SIGSEGV; once it
    is gone a third container probes the group; the lease is released and the group put back."""
    sc = Scenario()
    sc.facts["owner"] = owner = f"{request.node.nodeid}::held_then_crashed"
    try:
        _held_then_crashed(sc, request, target_host, vf_leaser, lease_pool, container_factory(),
                           podman_client, owner)
    except Exception as e:  # noqa: BLE001 -- each test that needs what came after fails with it
        sc.failed = (sc.step, e)
    yield sc


def _held_then_crashed(sc, request, target_host, vf_leaser, lease_pool, factory, podman_client, owner):
    # leased and bound here (not by the vfio_group fixture), so the crash test checks what is
    # left once everything is given back: vf.before and vf.after are the group's inventory
    with vf_leaser.vfio(owner) as vf:
        sc.facts["vf"] = vf
        try:
            sc.step = "starting the holder"
            # the probe runs as a child of sh: PID 1 of a container ignores signals it has no handler for
            holder = factory.start(["sh", "-c", shlex.join(factory.probe_command("--hold", 600))
                                    + " & echo $! > /tmp/probe.pid; wait $!"], vfio=vf, ipc_lock=True)
            sc.facts["holder_has_group"] = _wait_for_log(holder, '"ok": true')
            sc.facts["holder_logs"] = _logs(holder)
            if not sc.facts["holder_has_group"]:
                return
            if _selected(request, HELD_TEST):
                sc.step = "the second container"
                second = factory.probe(vf)
                sc.facts["second"] = second
                sc.facts["second_kata_left"] = kata_leftovers(target_host, second.id) if second.exit_code is None else None
                holder.reload()
                sc.facts["holder_status_after_second"] = holder.status
            sc.step = "crashing the holder"
            podman_client.exec(holder, ["sh", "-c", "kill -SEGV $(cat /tmp/probe.pid)"])
            rc = holder.wait(condition=["exited", "stopped"], timeout=120)
            sc.facts["crash_exit"] = rc.get("StatusCode") if isinstance(rc, dict) else rc
            podman_client.cleanup()
            sc.facts["left_after_crash"] = [c.name for c in podman_client.leftovers()]
            # no Kata VM (QEMU), no sandbox state left in the runner
            sc.facts["kata_left_after_crash"] = kata_leftovers(target_host, holder.id)
            sc.step = "the container after the crash"
            # the crashed process holds nothing: the group opens again at once
            sc.facts["again"] = factory.probe(vf)
            sc.facts["group"] = vf.group
        finally:
            podman_client.cleanup()
        sc.step = "releasing the lease and putting the group back"
    # (another test, of this session or another, may have leased the group since: that is its own)
    sc.facts["lease_after"] = lease_pool.held().get(vf.group) or {}
    sc.facts["changes"] = vf.changes()


def test_second_container_cannot_take_a_held_group(held_then_crashed, target_host):
    """A holder keeps the group; a second container fails to start with the reason and leaves no
    Kata state; the holder keeps running; once the holder is gone (the module's crash) the group
    works again."""
    sc = held_then_crashed
    assert sc.need("holder_has_group"), f"the first container did not get the group: {sc.facts['holder_logs']}"
    vf, res = sc.need("vf"), sc.need("second")
    attach_text("the holder's output", sc.facts["holder_logs"])
    attach_text("the second container (same group)", str(res))
    assert res.exit_code != 0, f"a second container used group {vf.group} while another held it:\n{res}"
    # the second VM cannot take the group its sibling's QEMU holds; the start fails, with the reason
    assert res.exit_code is None, f"the second Kata container started:\n{res}"
    assert "vfio" in res.stderr.lower() and res.stderr.strip(), res.stderr
    assert sc.need("second_kata_left") == [], "the failed start left Kata state behind"
    assert sc.need("holder_status_after_second") == "running", "the first container was disturbed by the second"
    # once the holder is gone, the group is usable again
    again = sc.need("again")
    attach_text("the container after the holder was gone", str(again))
    assert again.exit_code == 0, f"group {vf.group} still busy after its holder was gone:\n{again}"


def test_crashing_container_leaves_no_lease_and_no_container(held_then_crashed):
    sc = held_then_crashed
    assert sc.need("holder_has_group"), f"the container did not get the group: {sc.facts['holder_logs']}"
    rc = sc.need("crash_exit")
    attach_json("after the holder's probe was killed by SIGSEGV", {
        k: sc.facts.get(k) for k in ("crash_exit", "left_after_crash", "kata_left_after_crash", "lease_after", "owner")})
    assert rc == 128 + 11, f"the container did not crash with SIGSEGV (exit {rc})"
    left = sc.need("left_after_crash")
    assert not left, f"containers left after a crash: {left}"
    assert sc.need("kata_left_after_crash") == [], "Kata left state behind after the crash"
    again, group = sc.need("again"), sc.need("group")
    attach_text("the container after the crash", str(again))
    assert again.exit_code == 0, f"group {group} unusable after the crash:\n{again}"
    held = sc.need("lease_after")
    assert (held.get("pid"), held.get("test")) != (os.getpid(), sc.facts["owner"]), \
        f"the lease on group {group} was left behind: {held}"
    attach_vfio_group(sc.need("vf"))
    assert sc.need("changes") == [], "the VF's group is not as it was before the container"


def test_host_driver_state_after_teardown_equals_start(vf_run):
    """The VF's group was on vfio-pci while the container ran; after the container is removed and
    the group put back, the host's driver state is as before (the module's one run, vf_run)."""
    vf, during = vf_run.vf, vf_run.during
    endpoints = [during.devices[a] for a in vf.before.devices if not during.devices[a].is_bridge]
    assert endpoints and all(d.driver == "vfio-pci" for d in endpoints), \
        {d.address: d.driver for d in endpoints}
    assert vf_run.res.exit_code == 0, str(vf_run.res)
    if vf_run.restore_error is not None:
        raise vf_run.restore_error
    attach_vfio_group(vf)
    assert vf.changes() == [], "the VF's group is not as it was before the container"
    assert not vf_run.leftovers
