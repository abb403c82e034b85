#!/usr/bin/python3
"""A small userspace NVMe driver over VFIO: Identify, one polled I/O queue pair, a block range
written with a random pattern and read back.

Runs inside the test container or on a target (standard library only; python3-minimal is
enough: no ctypes, mmap or json needed). The VFIO side (ioctl numbers, struct layouts, the
page-aligned DMA buffer) is the probe's (probe.py, shipped next to this file). BAR0 is
reached with pread/pwrite on the VFIO device fd at the region's offset; nothing is
memory-mapped. No interrupts: every completion is polled, each poll loop with a deadline.

Steps, each named in the output (`step` on failure):

  vfio          container, group, IOMMU, device fd (as the probe does)
  dma-map       one DMA buffer: admin and I/O queues, Identify page, PRP list, data
  bus-master    PCI command register: memory space and bus master on
  disable       CC.EN = 0, wait CSTS.RDY = 0
  enable        admin queue registers, CC.EN = 1, wait CSTS.RDY = 1 (CSTS.CFS is a failure:
                e.g. an NVMe VF whose secondary controller is offline)
  identify-ctrl Identify Controller: model, serial, firmware, MDTS
  identify-ns   active namespace list, Identify Namespace: size, LBA format
  create-io-cq  I/O completion queue 1 (physically contiguous, interrupts off)
  create-io-sq  I/O submission queue 1
  write         the range written with the pattern (PRP lists for multi-page commands)
  read          the range read into a zeroed buffer
  compare       byte for byte
  teardown      I/O queues deleted, controller disabled

Output: one JSON object on stdout; exit 0 when every step passed (with --read-only: the range
read and its sha256 reported), 1 naming the failing step, 2 on bad arguments.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import sys
import time

# started in a Kata container, where every module is read over 9p: getopt (the probe's
# parse_options), not argparse, and typing only for mypy (as in probe.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

try:
    from . import probe as vfio  # as part of the vfiotest package
except ImportError:  # run as a script: probe.py sits next to this file
    import probe as vfio  # type: ignore[no-redef]

PAGE = 4096
QDEPTH = 64
SQE = 64
CQE = 16
MAX_XFER = 128 * 1024  # bytes per command at most (one PRP list page covers it)
BAR0 = 0

# controller registers
REG_CAP, REG_VS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30
DOORBELLS = 0x1000
CC_EN = 1
CSTS_RDY, CSTS_CFS = 1, 2

# opcodes
ADM_DELETE_SQ, ADM_CREATE_SQ, ADM_DELETE_CQ, ADM_CREATE_CQ, ADM_IDENTIFY = 0x00, 0x01, 0x04, 0x05, 0x06
NVM_WRITE, NVM_READ = 0x01, 0x02

# DMA layout, in pages from the start of the buffer
PG_ASQ, PG_ACQ, PG_IOSQ, PG_IOCQ, PG_IDENT, PG_PRP, PG_DATA = 0, 1, 2, 3, 4, 5, 6


class NvmeFailed(Exception):
    def __init__(self, step: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.step, self.message, self.status = step, message, status


class Dma:
    """One page-aligned buffer mapped for the device at `iova` (pinned until unmapped)."""

    def __init__(self, cfd: int, size: int, iova: int) -> None:
        self.buf, self.vaddr = vfio.aligned_buffer(size)
        self.start = self.vaddr - self.buf.buffer_info()[0]
        self.size, self.iova, self.cfd = size, iova, cfd
        self.mem = memoryview(self.buf).cast("B")[self.start:self.start + size]
        vfio._ioctl("dma-map", cfd, vfio.VFIO_IOMMU_MAP_DMA, vfio.encode_dma_map(self.vaddr, iova, size))

    def addr(self, off: int) -> int:
        return self.iova + off

    def read(self, off: int, n: int) -> bytes:
        return self.mem[off:off + n].tobytes()

    def write(self, off: int, data: bytes) -> None:
        self.mem[off:off + len(data)] = data

    def zero(self, off: int, n: int) -> None:
        self.mem[off:off + n] = bytes(n)

    def unmap(self) -> None:
        vfio._ioctl("teardown", self.cfd, vfio.VFIO_IOMMU_UNMAP_DMA, vfio.encode_dma_unmap(self.iova, self.size))


class Queue:
    """A submission queue and its completion queue (admin: qid 0)."""

    def __init__(self, ctrl: Controller, qid: int, sq_off: int, cq_off: int, depth: int) -> None:
        self.c, self.qid, self.sq_off, self.cq_off, self.depth = ctrl, qid, sq_off, cq_off, depth
        self.tail = self.head = 0
        self.phase = 1
        self.cid = 0

    def submit(self, step: str, opcode: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
               cdw: tuple[int, ...] = (), timeout: float | None = None) -> tuple[int, int]:
        """Post one command, ring the doorbell, poll its completion. Returns (dw0, status)."""
        c = self.c
        self.cid = (self.cid + 1) & 0xFFFF
        words = list(cdw) + [0] * (6 - len(cdw))
        sqe = struct.pack("<BBHI8x8xQQ6I", opcode, 0, self.cid, nsid, prp1, prp2, *words)
        c.dma.write(self.sq_off + self.tail * SQE, sqe)
        self.tail = (self.tail + 1) % self.depth
        c.w32(DOORBELLS + (2 * self.qid) * c.stride, self.tail)
        deadline = time.monotonic() + (timeout if timeout is not None else c.timeout)
        while True:
            dw0, _, sqhd_sqid, cid_status = struct.unpack("<IIII", c.dma.read(self.cq_off + self.head * CQE, CQE))
            status = cid_status >> 16
            if status & 1 == self.phase:
                break
            if time.monotonic() >= deadline:
                csts = c.r32(REG_CSTS)
                raise NvmeFailed(step, f"{step}: no completion for opcode {opcode:#04x} on queue {self.qid} within "
                                       f"{timeout if timeout is not None else c.timeout:.0f} s (CSTS={csts:#x})")
            time.sleep(0.0002)
        self.head = (self.head + 1) % self.depth
        if self.head == 0:
            self.phase ^= 1
        c.w32(DOORBELLS + (2 * self.qid + 1) * c.stride, self.head)
        if cid_status & 0xFFFF != self.cid:
            raise NvmeFailed(step, f"{step}: completion for command {cid_status & 0xFFFF}, expected {self.cid}")
        sc = (status >> 1) & 0x7FFF
        if sc:
            raise NvmeFailed(step, f"{step}: opcode {opcode:#04x} failed with status {sc:#x} "
                                   f"(type {(sc >> 8) & 7}, code {sc & 0xFF:#x})", sc)
        return dw0, sc


class Controller:
    """An NVMe controller behind an open VFIO device fd."""

    def __init__(self, dfd: int, bar_offset: int, config_offset: int, dma: Dma, timeout: float) -> None:
        self.dfd, self.bar, self.cfg, self.dma, self.timeout = dfd, bar_offset, config_offset, dma, timeout
        self.stride = 4
        self.ready_timeout = timeout

    def r32(self, off: int) -> int:
        return int(struct.unpack("<I", os.pread(self.dfd, 4, self.bar + off))[0])

    def w32(self, off: int, value: int) -> None:
        os.pwrite(self.dfd, struct.pack("<I", value & 0xFFFFFFFF), self.bar + off)

    def r64(self, off: int) -> int:
        return self.r32(off) | (self.r32(off + 4) << 32)

    def w64(self, off: int, value: int) -> None:
        self.w32(off, value & 0xFFFFFFFF)
        self.w32(off + 4, value >> 32)

    def bus_master(self) -> None:
        cmd = struct.unpack("<H", os.pread(self.dfd, 2, self.cfg + 4))[0]
        os.pwrite(self.dfd, struct.pack("<H", cmd | 0x6), self.cfg + 4)  # memory space, bus master

    def wait_ready(self, step: str, want: int) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            csts = self.r32(REG_CSTS)
            if csts == 0xFFFFFFFF:
                raise NvmeFailed(step, f"{step}: CSTS reads all ones: the device does not answer")
            if want and csts & CSTS_CFS:
                raise NvmeFailed(step, f"{step}: controller fatal status (CSTS={csts:#x}); an NVMe VF whose secondary "
                                       "controller is offline or has no resources answers so")
            if csts & CSTS_RDY == want:
                return
            if time.monotonic() >= deadline:
                raise NvmeFailed(step, f"{step}: CSTS.RDY did not become {want} within {self.ready_timeout:.0f} s "
                                       f"(CSTS={csts:#x})")
            time.sleep(0.001)


def _cstr(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def run(vfio_dir: str = "/dev/vfio", group: str | None = None, device: str | None = None, nsid: int | None = None,
        slba: int = 2048, blocks: int = 64, seed: int | None = None, read_only: bool = False,
        iova: int = 0x10000000, timeout: float = 30.0, sysfs: str = "/sys",
        report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every step; returns the report. Raises NvmeFailed (or the probe's ProbeFailed) naming the step."""
    r: dict[str, Any] = report if report is not None else {}
    r["steps"] = steps = []
    fds: list[int] = []
    dma: Dma | None = None
    ctrl: Controller | None = None
    io: Queue | None = None
    admin: Queue | None = None
    t_start = time.monotonic()
    try:
        cfd = vfio._open("vfio", f"{vfio_dir}/vfio")
        fds.append(cfd)
        if vfio._ioctl("vfio", cfd, vfio.VFIO_CHECK_EXTENSION, vfio.VFIO_TYPE1v2_IOMMU) != 1:
            raise NvmeFailed("vfio", "vfio: the kernel does not offer the TYPE1v2 IOMMU")
        group = str(group) if group is not None else vfio.find_group(vfio_dir)
        gfd = vfio._open("vfio", f"{vfio_dir}/{group}")
        fds.append(gfd)
        st = vfio.encode_group_status()
        vfio._ioctl("vfio", gfd, vfio.VFIO_GROUP_GET_STATUS, st)
        if not vfio.GROUP_STATUS.unpack(st)[1] & vfio.VFIO_GROUP_FLAGS_VIABLE:
            raise NvmeFailed("vfio", f"vfio: group {group} is not viable (a device in it is not on vfio-pci)")
        vfio._ioctl("vfio", gfd, vfio.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", cfd)))
        vfio._ioctl("vfio", cfd, vfio.VFIO_SET_IOMMU, vfio.VFIO_TYPE1v2_IOMMU)
        device = device or vfio.find_device(group, sysfs)
        dfd = vfio._ioctl("vfio", gfd, vfio.VFIO_GROUP_GET_DEVICE_FD, bytearray(device.encode() + b"\0"))
        fds.append(dfd)
        regions = {}
        for index in (BAR0, vfio.VFIO_PCI_CONFIG_REGION_INDEX):
            ri = vfio.encode_region_info(index)
            vfio._ioctl("vfio", dfd, vfio.VFIO_DEVICE_GET_REGION_INFO, ri)
            _, _, _, _, size, offset = vfio.REGION_INFO.unpack(ri)
            regions[index] = (size, offset)
        r.update(group=group, device=device, bar0_size=regions[BAR0][0])
        steps.append("vfio")

        nbytes_max = blocks * 4096  # room for the range at any LBA size up to 4 KiB
        data_pages = -(-nbytes_max // PAGE)
        size = (PG_DATA + 2 * data_pages) * PAGE
        dma = Dma(cfd, size, iova)
        r["dma"] = {"iova": iova, "size": size}
        steps.append("dma-map")

        ctrl = Controller(dfd, regions[BAR0][1], regions[vfio.VFIO_PCI_CONFIG_REGION_INDEX][1], dma, timeout)
        ctrl.bus_master()
        steps.append("bus-master")

        cap = ctrl.r64(REG_CAP)
        mqes = (cap & 0xFFFF) + 1
        ctrl.stride = 4 << ((cap >> 32) & 0xF)
        to_s = ((cap >> 24) & 0xFF) * 0.5
        ctrl.ready_timeout = max(timeout, to_s)
        mpsmin = 1 << (12 + ((cap >> 48) & 0xF))
        if mpsmin > PAGE:
            raise NvmeFailed("disable", f"disable: the controller's smallest page is {mpsmin} bytes; this driver uses 4 KiB")
        vs = ctrl.r32(REG_VS)
        r["controller_regs"] = {"mqes": mqes, "doorbell_stride": ctrl.stride, "timeout_s": to_s,
                                "version": f"{vs >> 16}.{(vs >> 8) & 0xFF}.{vs & 0xFF}"}
        ctrl.w32(REG_CC, ctrl.r32(REG_CC) & ~CC_EN)
        ctrl.wait_ready("disable", 0)
        steps.append("disable")

        depth = min(QDEPTH, mqes)
        dma.zero(0, PG_DATA * PAGE)
        ctrl.w32(REG_AQA, ((depth - 1) << 16) | (depth - 1))
        ctrl.w64(REG_ASQ, dma.addr(PG_ASQ * PAGE))
        ctrl.w64(REG_ACQ, dma.addr(PG_ACQ * PAGE))
        # IOCQES 4 (16 B), IOSQES 6 (64 B), MPS 0 (4 KiB), CSS 0 (NVM), EN
        ctrl.w32(REG_CC, (4 << 20) | (6 << 16) | CC_EN)
        ctrl.wait_ready("enable", 1)
        admin = Queue(ctrl, 0, PG_ASQ * PAGE, PG_ACQ * PAGE, depth)
        steps.append("enable")

        ident = PG_IDENT * PAGE
        dma.zero(ident, PAGE)
        admin.submit("identify-ctrl", ADM_IDENTIFY, prp1=dma.addr(ident), cdw=(1,))
        idc = dma.read(ident, PAGE)
        mdts = idc[77]
        r["identify"] = {"vid": f"{struct.unpack_from('<H', idc, 0)[0]:04x}", "serial": _cstr(idc[4:24]),
                         "model": _cstr(idc[24:64]), "firmware": _cstr(idc[64:72]), "mdts": mdts,
                         "cntlid": struct.unpack_from("<H", idc, 78)[0],
                         "namespaces": struct.unpack_from("<I", idc, 516)[0]}
        steps.append("identify-ctrl")

        if nsid is None:
            dma.zero(ident, PAGE)
            admin.submit("identify-ns", ADM_IDENTIFY, prp1=dma.addr(ident), cdw=(2,))
            active = [n for n in struct.unpack("<1024I", dma.read(ident, PAGE)) if n]
            if not active:
                raise NvmeFailed("identify-ns", "identify-ns: the controller has no active namespace (attach one to it)")
            nsid = active[0]
        dma.zero(ident, PAGE)
        admin.submit("identify-ns", ADM_IDENTIFY, nsid=nsid, prp1=dma.addr(ident), cdw=(0,))
        idn = dma.read(ident, PAGE)
        nsze = struct.unpack_from("<Q", idn, 0)[0]
        flbas = idn[26]
        lbaf_index = (flbas & 0xF) | (((flbas >> 5) & 3) << 4)
        ms, lbads, rp = struct.unpack_from("<HBB", idn, 128 + 4 * lbaf_index)
        lba = 1 << lbads
        if nsze == 0 or lba < 512 or lba > 4096:
            raise NvmeFailed("identify-ns", f"identify-ns: namespace {nsid} reports {nsze} blocks of {lba} bytes")
        r["namespace"] = {"nsid": nsid, "blocks": nsze, "lba_bytes": lba, "metadata_bytes": ms, "lbaf": lbaf_index,
                          "bytes": nsze * lba}
        steps.append("identify-ns")
        if ms:
            raise NvmeFailed("identify-ns", f"identify-ns: LBA format {lbaf_index} carries {ms} metadata bytes; "
                                            "this driver only handles formats without metadata")
        if blocks <= 0 or slba < 0 or slba + blocks > nsze:
            raise NvmeFailed("identify-ns", f"identify-ns: blocks {slba}..{slba + blocks - 1} are not inside namespace "
                                            f"{nsid} (0..{nsze - 1})")

        io_depth = min(QDEPTH, mqes)
        dma.zero(PG_IOSQ * PAGE, 2 * PAGE)
        admin.submit("create-io-cq", ADM_CREATE_CQ, prp1=dma.addr(PG_IOCQ * PAGE), cdw=(((io_depth - 1) << 16) | 1, 1))
        steps.append("create-io-cq")
        admin.submit("create-io-sq", ADM_CREATE_SQ, prp1=dma.addr(PG_IOSQ * PAGE),
                     cdw=(((io_depth - 1) << 16) | 1, (1 << 16) | 1))
        io = Queue(ctrl, 1, PG_IOSQ * PAGE, PG_IOCQ * PAGE, io_depth)
        steps.append("create-io-sq")

        nbytes = blocks * lba
        per_cmd = MAX_XFER
        if mdts:
            per_cmd = min(per_cmd, (1 << mdts) * mpsmin)
        per_blocks = max(per_cmd // lba, 1)
        w_off, r_off = PG_DATA * PAGE, (PG_DATA + data_pages) * PAGE

        def transfer(step: str, opcode: int, buf_off: int) -> int:
            commands = 0
            done = 0
            while done < blocks:
                n = min(per_blocks, blocks - done)
                off = buf_off + done * lba
                length = n * lba
                pages = -(-length // PAGE)
                prp1, prp2 = dma.addr(off), 0
                if pages == 2:
                    prp2 = dma.addr(off + PAGE)
                elif pages > 2:
                    entries = [dma.addr(off + i * PAGE) for i in range(1, pages)]
                    dma.write(PG_PRP * PAGE, struct.pack(f"<{len(entries)}Q", *entries))
                    prp2 = dma.addr(PG_PRP * PAGE)
                s = slba + done
                assert io is not None
                io.submit(step, opcode, nsid=nsid or 0, prp1=prp1, prp2=prp2, cdw=(s & 0xFFFFFFFF, s >> 32, n - 1))
                done += n
                commands += 1
            return commands

        if read_only:
            dma.zero(r_off, nbytes)
            t0 = time.monotonic()
            cmds = transfer("read", NVM_READ, r_off)
            data = dma.read(r_off, nbytes)
            r["io"] = {"slba": slba, "blocks": blocks, "bytes": nbytes, "read_commands": cmds,
                       "read_sha256": hashlib.sha256(data).hexdigest(), "read_s": round(time.monotonic() - t0, 4)}
            steps.append("read")
        else:
            seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
            pattern = random.Random(seed).randbytes(nbytes)
            dma.write(w_off, pattern)
            t0 = time.monotonic()
            wcmds = transfer("write", NVM_WRITE, w_off)
            t_write = time.monotonic() - t0
            steps.append("write")
            dma.zero(r_off, nbytes)
            t0 = time.monotonic()
            rcmds = transfer("read", NVM_READ, r_off)
            t_read = time.monotonic() - t0
            steps.append("read")
            back = dma.read(r_off, nbytes)
            mismatches, first = 0, None
            if back != pattern:  # counted only when they differ (byte loops are slow under TCG)
                mismatches = sum(1 for a, b in zip(pattern, back, strict=True) if a != b)
                first = next((i for i, (a, b) in enumerate(zip(pattern, back, strict=True)) if a != b), None)
            r["io"] = {"slba": slba, "blocks": blocks, "lba_bytes": lba, "bytes": nbytes, "seed": seed,
                       "write_commands": wcmds, "read_commands": rcmds,
                       "written_sha256": hashlib.sha256(pattern).hexdigest(),
                       "read_sha256": hashlib.sha256(back).hexdigest(),
                       "compared_bytes": nbytes, "mismatched_bytes": mismatches, "first_mismatch": first,
                       "write_s": round(t_write, 4), "read_s": round(t_read, 4)}
            if mismatches:
                raise NvmeFailed("compare", f"compare: {mismatches} of {nbytes} bytes read back differ from the pattern "
                                            f"written (first at byte {first})")
            steps.append("compare")
        r["ok"] = True
        return r
    finally:
        r["elapsed_s"] = round(time.monotonic() - t_start, 3)
        try:
            if admin is not None and io is not None:
                admin.submit("teardown", ADM_DELETE_SQ, cdw=(1,), timeout=5)
                admin.submit("teardown", ADM_DELETE_CQ, cdw=(1,), timeout=5)
            if ctrl is not None and "enable" in r["steps"]:
                ctrl.w32(REG_CC, ctrl.r32(REG_CC) & ~CC_EN)
                ctrl.wait_ready("teardown", 0)
            if dma is not None:
                dma.unmap()
            if r.get("ok"):
                r["steps"].append("teardown")
        except (NvmeFailed, vfio.ProbeFailed, OSError) as e:
            r.setdefault("teardown_error", str(e))
        for fd in reversed(fds):
            try:
                os.close(fd)
            except OSError:
                pass


USAGE = """usage: vfio-nvme [--vfio-dir DIR] [--group N] [--device ADDR] [--nsid N] [--slba LBA] [--blocks N]
                 [--seed N] [--read-only] [--timeout SECONDS] [--iova ADDR]

Userspace NVMe I/O through VFIO (polled): a block range written with a pattern and read back;
JSON on stdout.

  --vfio-dir DIR       where the VFIO nodes are (default /dev/vfio)
  --group N            group number (default: the only numeric node in --vfio-dir)
  --device ADDR        PCI address of the NVMe function (default: first device of the group in /sys)
  --nsid N             namespace (default: the first active one)
  --slba LBA           first block of the range (default 2048)
  --blocks N           blocks in the range (default 64)
  --seed N             seed of the pattern (random.Random(seed).randbytes; default: random)
  --read-only          only read the range and print its sha256
  --timeout SECONDS    seconds any one command or state change may take (default 30)
  --iova ADDR          IO virtual address of the DMA buffer (default 0x10000000; 0x.. accepted)
  -h, --help           this text

Exit status: 0 every step passed, 1 a step failed (named in the JSON), 2 bad arguments.
"""
#: option -> (attribute, conversion, default); --sysfs is for tests (a simulated /sys)
OPTIONS: dict[str, tuple[str, Callable[[str], Any], Any]] = {
    "--vfio-dir": ("vfio_dir", str, "/dev/vfio"),
    "--group": ("group", str, None),
    "--device": ("device", str, None),
    "--nsid": ("nsid", int, None),
    "--slba": ("slba", int, 2048),
    "--blocks": ("blocks", int, 64),
    "--seed": ("seed", int, None),
    "--timeout": ("timeout", float, 30.0),
    "--iova": ("iova", lambda s: int(s, 0), 0x10000000),
    "--sysfs": ("sysfs", str, "/sys"),
}
FLAGS = {"--read-only": "read_only"}


class Args:
    vfio_dir: str
    group: str | None
    device: str | None
    nsid: int | None
    slba: int
    blocks: int
    seed: int | None
    read_only: bool
    timeout: float
    iova: int
    sysfs: str


def main(argv: list[str] | None = None) -> int:
    try:
        a: Args | None = vfio.parse_options(sys.argv[1:] if argv is None else argv, OPTIONS, Args(), FLAGS)
    except ValueError as e:
        print(f"vfio-nvme: {e}\n{USAGE.splitlines()[0]}\n(--help for more)", file=sys.stderr)
        return 2
    if a is None:
        print(USAGE, end="")
        return 0
    report: dict[str, Any] = {"ok": False}
    try:
        run(a.vfio_dir, a.group, a.device, a.nsid, a.slba, a.blocks, a.seed, a.read_only, a.iova, a.timeout, a.sysfs,
            report=report)
    except (NvmeFailed, vfio.ProbeFailed) as e:
        report.update(ok=False, step=e.step, error=e.message)
        print(vfio.to_json(report))
        print(f"vfio-nvme: FAILED at step {e.step}: {e.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        report.update(ok=False, step=report["steps"][-1] if report.get("steps") else "arguments", error=str(e))
        print(vfio.to_json(report))
        return 1
    print(vfio.to_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
