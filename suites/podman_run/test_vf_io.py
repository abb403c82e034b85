"""The VF does real work inside the container: NVMe blocks written and read, frames received
and sent, through userspace drivers over VFIO.

An NVMe VF (brought up by the device layer: secondary controller online, vfiotest.nvme_virt)
is passed into a container the way the other podman_run tests pass one (the seed's recipe on
Kata). Inside, the harness's userspace NVMe driver (vfiotest/podman/nvme_io.py, in the test
image) identifies the controller and namespace, writes a random pattern to a block range over
one polled I/O queue pair, reads it back and compares. After the container is gone the runner
reads the same range through the PF's namespace (the subsystem and its namespace are shared by
PF and VFs) and compares it with the pattern; the range's original bytes are put back in any case.

A NIC VF (igb's, given a MAC by its PF; the device layer brought the PF's netdev up before it
made the VFs, vfiotest.nic_vf) is passed the same way into a container of the DPDK image
(testpmd from the controller's Debian packages). testpmd runs the VF with DPDK's igbvf PMD in
macswap mode; the runner sends marker frames to the VF's MAC from the other end of the PF's wire
(the emulated runner's wire peer, docs/nic-traffic.md; elsewhere the PF's own netdev) and counts
the frames that come back, and testpmd's own forward statistics must show them received and sent.

VFIOTEST_BREAK words that make these tests fail on purpose (fixtures/layers.py reads them):
`nic-link-down` (the PF's netdev down while the runner sends, testpmd forwarding: no frame
comes back), `nvme-offline` (the VF's secondary controller put Offline before the container starts, brought
back after: the driver fails at `enable`), `corrupt-block` (the runner overwrites one block of
the range after the container wrote it: the runner-side comparison fails).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vfiotest import io_families, nic_vf, nvme_virt, wire
from vfiotest.errors import TargetError
from vfiotest.fixtures.allure_report import attach_json, step
from vfiotest.fixtures.layers import broken, layer_unavailable
from vfiotest.kata.config import guest_memory_mb
from vfiotest.pci import read_inventory
from vfiotest.runner.qemu import WIRE_PEER_MAC, WIRE_PEER_PCI

pytestmark = [pytest.mark.mutating, pytest.mark.kata]   # `vm` at run time, by the target

NVME_VF = "1b36:0010"  # QEMU's NVMe VF (the emulated runner's)
SLBA, BLOCKS = 4096, 256  # 128 KiB at 512-byte blocks: one command with a PRP list (32 pages)
IO_STEPS = ["vfio", "dma-map", "bus-master", "disable", "enable", "identify-ctrl", "identify-ns", "create-io-cq",
            "create-io-sq", "write", "read", "compare", "teardown"]


def _namespace_device(host: Any, pf: str, nsid: int) -> str:
    dev = nvme_virt.namespace_device(host, pf, nsid)
    if dev is None:
        pytest.fail(f"the PF {pf} shows no block device for namespace {nsid} on the runner (is it on the nvme driver?)")
    return dev


def _read_range(host: Any, dev: str, slba: int, blocks: int, lba: int, out: str | None = None) -> str:
    """sha256 of the range read with O_DIRECT (no page cache between the two sides)."""
    dd = ["dd", f"if={dev}", "iflag=direct", f"bs={lba}", f"skip={slba}", f"count={blocks}", "status=none"]
    if out:
        host.run([*dd, f"of={out}"], timeout=120, check=True, what=f"reading blocks {slba}+{blocks} of {dev}")
        return str(host.run(["sha256sum", out], timeout=60, check=True).stdout.split()[0])
    res = host.run(["sh", "-c", " ".join(dd) + " | sha256sum"], timeout=120, check=True,
                   what=f"reading blocks {slba}+{blocks} of {dev}")
    return str(res.stdout.split()[0])


@contextlib.contextmanager
def _offline_on_purpose(host: Any, pf: str, vf: str) -> Iterator[None]:
    """VFIOTEST_BREAK=nvme-offline: the VF's controller Offline for the block, then its
    resources given back and Online again (as the device layer left it)."""
    if not broken("nvme-offline"):
        yield
        return
    dev = nvme_virt.primary_device(host, pf)
    state = nvme_virt.vf_states(host, pf, [d.address for d in read_inventory(host).vfs_of(pf)]).get(vf)
    assert dev and state and state["online"], f"{vf} has no online secondary controller to break: {state}"
    cntlid = str(state["cntlid"])
    host.run(["nvme", "virt-mgmt", dev, "-c", cntlid, "-a", str(nvme_virt.ACT_OFFLINE)], timeout=60, check=True)
    try:
        yield
    finally:
        for rt, nr in ((nvme_virt.RT_VQ, state["nvq"]), (nvme_virt.RT_VI, state["nvi"])):
            host.run(["nvme", "virt-mgmt", dev, "-c", cntlid, "-r", str(rt), "-a", str(nvme_virt.ACT_ASSIGN), "-n", str(nr)],
                     timeout=60, check=True)
        host.run(["nvme", "virt-mgmt", dev, "-c", cntlid, "-a", str(nvme_virt.ACT_ONLINE)], timeout=60, check=True)


@pytest.mark.parametrize("vf_lease", [NVME_VF], indirect=True)
def test_nvme_vf_writes_blocks_in_the_container_that_the_runner_reads(container, vfio_group, target_host) -> None:
    vf = vfio_group
    host = target_host
    seed = random.SystemRandom().getrandbits(48)
    # namespace 1 is the one the emulated runner attaches; the driver reports what it used
    lba = 512
    dev = _namespace_device(host, vf.pf, 1)
    saved = host.run(["mktemp", "/tmp/vfiotest-nvme-range.XXXXXX"], timeout=30, check=True).stdout.strip()
    original = _read_range(host, dev, SLBA, BLOCKS, lba, out=saved)
    try:
        with _offline_on_purpose(host, vf.pf, vf.address):
            res = container.nvme_io(vf, "--slba", SLBA, "--blocks", BLOCKS, "--seed", seed, "--timeout", 60, timeout=600)
        try:
            rep = res.json()
        except ValueError:
            pytest.fail(f"the NVMe driver printed no report: {res}")
        attach_json("NVMe Identify (controller, namespace) seen inside the container",
                    {"identify": rep.get("identify"), "namespace": rep.get("namespace"),
                     "controller_regs": rep.get("controller_regs")})
        assert res.exit_code == 0 and rep.get("ok"), f"the driver failed at {rep.get('step')}: {rep.get('error')}\n{res}"
        assert rep["steps"] == IO_STEPS
        assert rep["identify"]["model"] and rep["identify"]["serial"], rep["identify"]
        assert rep["namespace"]["nsid"] == 1 and rep["namespace"]["lba_bytes"] == lba, rep["namespace"]
        io = rep["io"]
        nbytes = BLOCKS * lba
        assert (io["slba"], io["blocks"], io["bytes"], io["compared_bytes"]) == (SLBA, BLOCKS, nbytes, nbytes)
        assert io["mismatched_bytes"] == 0 and io["read_sha256"] == io["written_sha256"], io
        pattern = hashlib.sha256(random.Random(seed).randbytes(nbytes)).hexdigest()
        assert io["written_sha256"] == pattern, "the driver did not write the seed's pattern"
        if broken("corrupt-block"):
            with step("VFIOTEST_BREAK=corrupt-block: the runner zeroes one block of the range"):
                host.run(["dd", "if=/dev/zero", f"of={dev}", "oflag=direct", f"bs={lba}", f"seek={SLBA + BLOCKS // 2}",
                          "count=1", "conv=notrunc", "status=none"], timeout=60, check=True)
        with step(f"the runner reads blocks {SLBA}..{SLBA + BLOCKS - 1} of {dev} (the PF's namespace)"):
            runner_side = _read_range(host, dev, SLBA, BLOCKS, lba)
        attach_json("block range written in the container and read on the runner",
                    {"device_in_container": vf.address, "runner_device": dev, "slba": SLBA, "blocks": BLOCKS,
                     "lba_bytes": lba, "bytes": nbytes, "seed": seed, "pattern_sha256": pattern,
                     "container_read_sha256": io["read_sha256"], "runner_read_sha256": runner_side,
                     "original_sha256": original, "write_commands": io["write_commands"],
                     "read_commands": io["read_commands"]})
        assert runner_side == pattern, (f"the runner reads {runner_side} from blocks {SLBA}+{BLOCKS} of {dev}, "
                                        f"the container wrote {pattern}")
    finally:
        with step(f"the range's original bytes written back ({original[:12]})"):
            host.run(["dd", f"if={saved}", f"of={dev}", "oflag=direct", f"bs={lba}", f"seek={SLBA}", f"count={BLOCKS}",
                      "conv=notrunc", "status=none"], timeout=120, check=True, what=f"restoring blocks {SLBA}+{BLOCKS}")
            host.run(["rm", "-f", saved], timeout=30)
    assert _read_range(host, dev, SLBA, BLOCKS, lba) == original, f"blocks {SLBA}+{BLOCKS} of {dev} were not put back"


# -- NIC VF: frames in and out through DPDK's igbvf PMD in the container ------------------------
FRAMES = 64
#: inside the container: the VFIO group Kata's hook bound, its device's guest address, then
#: testpmd on it in macswap mode (every frame received is sent back with the MACs swapped) until
#: SIGINT (a stats period, one too long to print any, keeps it from waiting for a key on stdin)
TESTPMD_SCRIPT = r"""
set -e
g=$(ls /dev/vfio | grep -x '[0-9][0-9]*' | head -n1)
[ -n "$g" ] || { echo "vfiotest: no VFIO group in /dev/vfio" >&2; exit 3; }
bdf=$(ls /sys/kernel/iommu_groups/"$g"/devices | head -n1)
echo "vfiotest: VF $bdf, VFIO group $g"
grep MemTotal /proc/meminfo
exec stdbuf -oL dpdk-testpmd --log-level=pmd.net.e1000.*:info --no-huge -m 128 --lcores=0@0,1@0 -a "$bdf" --no-telemetry -- \
    --forward-mode=macswap --stats-period=86400 --total-num-mbufs=2048
"""
FORWARDING = "packet forwarding - ports="  # testpmd 22.11, once forwarding runs
TESTPMD_MEMORY_MB = 768
_STATS_RE = re.compile(r"Accumulated forward statistics for all ports.*?RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+).*?"
                       r"TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)", re.S)


def _peer(host: Any, pf: str, journal: Any) -> tuple[str, str]:
    """(interface, what it is) on the runner's side of the wire: the emulated runner's wire peer
    (a NIC of the runner on the PF's wire; brought up, journaled, if it is down), else the PF's
    own netdev (frames between a VF and its PF are switched inside the NIC, as on most SR-IOV NICs)."""
    try:
        name = wire.interface_by_mac(host, WIRE_PEER_MAC)
        nic_vf.link_up(host, WIRE_PEER_PCI, journal)
        return name, f"the wire peer ({WIRE_PEER_MAC}, {WIRE_PEER_PCI})"
    except TargetError:
        names = nic_vf.interfaces(host, pf)
        if not names:
            pytest.fail(f"the PF {pf} has no network interface on the runner and there is no wire peer: "
                        "nothing on the runner's side can count the VF's frames")
        return names[0], f"the PF's netdev ({pf})"


def _logs(c: Any) -> str:
    out = c.logs(stdout=True, stderr=True)
    return out.decode(errors="replace") if isinstance(out, (bytes, bytearray)) else "".join(
        x.decode(errors="replace") if isinstance(x, (bytes, bytearray)) else str(x) for x in out)


def _wait_for(c: Any, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        c.reload()
        logs = _logs(c)
        if text in logs:
            return logs
        if c.status not in ("running", "created") or time.monotonic() > deadline:
            state = c.attrs.get("State", {})
            pytest.fail(f"testpmd did not start forwarding in the container within {timeout:.0f} s "
                        f"(container {c.status}, exit code {state.get('ExitCode')}, OOM-killed "
                        f"{state.get('OOMKilled')}):\n{logs[-3000:]}")
        time.sleep(2)


@contextlib.contextmanager
def _link_down_on_purpose(host: Any, pf: str) -> Iterator[None]:
    """VFIOTEST_BREAK=nic-link-down: the PF's netdev down while the runner sends its frames
    (testpmd already forwarding: the PF port stops passing its VFs' frames), up again after.
    Taken down before the container starts, the VF's mailbox goes unanswered and Kata's start
    fails instead, which tests the start, not the frames."""
    names = nic_vf.interfaces(host, pf) if broken("nic-link-down") else []
    for n in names:
        host.run(["ip", "link", "set", "dev", n, "down"], timeout=30, check=True)
    try:
        yield
    finally:
        for n in names:
            host.run(["ip", "link", "set", "dev", n, "up"], timeout=30, check=True)


def test_nic_vfs_echo_frames_from_the_runner_through_dpdk_in_the_container(request, dpdk_container, vf_leaser,
                                                                          sriov_pfs, profile, target_host,
                                                                          vfiotest_session) -> None:
    """Every NIC VF family on the target's PFs that has an I/O check (vfiotest.io_families:
    its DPDK PMD in the image) echoes the runner's frames through testpmd in a Kata container;
    a family with none (mlx5: not driven over vfio-pci) is named with its reason, never passed."""
    present = sorted({profile.vf_ids[pf.vendor_device] for pf in sriov_pfs if pf.vfs and pf.vendor_device in profile.vf_ids})
    fams = [io_families.family_of(v) for v in present]
    nic = [f for f in fams if f.check == "nic"]
    unchecked = [f for f in fams if f.check is None]
    attach_json("VF families on the target and their I/O checks",
                [{"vf_id": f.vf_id, "family": f.name, "check": f.check or "none", "pmd": f.pmd, "why none": f.reason}
                 for f in fams])
    if not nic:
        if unchecked:
            pytest.skip("no NIC VF family here has an I/O check: "
                        + "; ".join(f"{f.name} ({f.vf_id}): {f.reason}" for f in unchecked))
        layer_unavailable(request, "vfio", f"no NIC VF on the target's PFs ({', '.join(present) or 'none'})")
    for fam in nic:
        with vf_leaser.vfio(request.node.nodeid, fam.vf_id) as vf:
            with step(f"{fam.name}: VF {vf.address} ({fam.vf_id}), DPDK PMD {fam.pmd}"):
                _echo_frames(dpdk_container, vf, fam, target_host, vfiotest_session)
    for f in unchecked:     # said in the result, not only in an attachment
        request.node.add_report_section("call", "VF families without an I/O check", f"{f.name} ({f.vf_id}): {f.reason}")


def _echo_frames(factory: Any, vf: Any, fam: io_families.Family, host: Any, session: Any) -> None:
    index = nic_vf.vf_index(host, vf.pf, vf.address)
    mac = nic_vf.mac_for(vf.pf, index)
    with step(f"the PF gives VF {index} ({vf.address}) the MAC {mac}"):
        nic_vf.set_vf_mac(host, vf.pf, index, mac, journal=session)
    peer, peer_what = _peer(host, vf.pf, session)
    # the container asks for memory (podman run --memory), which Kata hot-plugs into the
    # guest on top of its default_memory: testpmd (128 MiB, pinned for DMA) was SIGKILLed in
    # a 384 MiB guest without it; and this covers --memory on kata-vfio
    c = factory.start(["sh", "-c", TESTPMD_SCRIPT], vfio=vf, ipc_lock=True, mem_limit=f"{TESTPMD_MEMORY_MB}m")
    try:
        started = _wait_for(c, FORWARDING, timeout=300)
        time.sleep(3)  # the port's link comes up after forwarding starts
        with _link_down_on_purpose(host, vf.pf), \
                step(f"the runner sends {FRAMES} marker frames from {peer} to {mac} and counts those coming back"):
            ex = wire.exchange(host, peer, mac, peer, FRAMES, tag="vfnic", window=60, timeout=180)
    finally:
        c.reload()
        if c.status == "running":
            c.kill(signal="SIGINT")
        with contextlib.suppress(Exception):
            c.wait(condition=["exited", "stopped"], timeout=120)
        logs = _logs(c)
    stats = _STATS_RE.findall(logs)
    mem = re.search(r"MemTotal:\s*(\d+) kB", logs)
    attach_json("frames: runner to the VF in the container and back", {
        "family": fam.name, "vf": vf.address, "vf_index": index, "vf_mac": mac, "runner_side": f"{peer}, {peer_what}",
        "frames": FRAMES, "sent": ex.sent, "received_back": ex.received, "in_order": ex.in_order,
        "duplicates": ex.duplicates, "runner_tx_packets": ex.tx_packets, "runner_rx_packets": ex.rx_packets,
        "guest_memtotal_kb": int(mem.group(1)) if mem else None,
        "testpmd_forward_stats": dict(zip(("rx_packets", "rx_dropped", "tx_packets", "tx_dropped"), map(int, stats[-1]),
                                          strict=True)) if stats else None})
    assert "vfiotest: VF " in started, started[-2000:]
    # podman run --memory on kata-vfio: the guest has more than Kata's own default_memory
    base_kb = guest_memory_mb() * 1024
    assert mem and int(mem.group(1)) > base_kb, (
        f"the guest's MemTotal {mem.group(1) if mem else '?'} kB is not above its {base_kb} kB default: "
        f"--memory {TESTPMD_MEMORY_MB}m was not hot-plugged")
    assert f"Probe PCI driver: {fam.pmd}" in started, f"testpmd did not probe the VF with {fam.pmd}:\n{started[-2000:]}"
    assert ex.sent == FRAMES, f"the runner sent {ex.sent} of {FRAMES} frames on {peer}"
    assert ex.received == FRAMES and ex.in_order, (
        f"{ex.received} of {FRAMES} frames sent from {peer} to the VF's MAC {mac} came back through testpmd in the "
        f"container (in order: {ex.in_order}); testpmd's log:\n{logs[-3000:]}")
    assert stats, f"testpmd printed no forward statistics at SIGINT:\n{logs[-3000:]}"
    rx, rx_dropped, tx, tx_dropped = map(int, stats[-1])
    assert rx >= FRAMES and tx >= FRAMES, f"testpmd counted RX {rx}, TX {tx} (dropped {rx_dropped}/{tx_dropped})"
