#!/usr/bin/python3
"""In-container VFIO probe: prove that a passed-through device is usable, not just present.

Runs inside the test container (standard library only, no vfiotest imports: the
file is copied into the image on its own). Steps, in order, each named in the
output:

  open-container   open /dev/vfio/vfio
  api-version      VFIO_GET_API_VERSION == 0
  check-extension  VFIO_CHECK_EXTENSION(TYPE1v2)
  open-group       open /dev/vfio/<group>
  group-status     VFIO_GROUP_GET_STATUS: the group is viable (all its devices on vfio-pci)
  set-container    VFIO_GROUP_SET_CONTAINER
  set-iommu        VFIO_SET_IOMMU(TYPE1v2)
  iommu-info       VFIO_IOMMU_GET_INFO (IOVA page sizes)
  map-dma          VFIO_IOMMU_MAP_DMA of an anonymous, page-aligned buffer
                   (pins memory: needs CAP_IPC_LOCK or enough RLIMIT_MEMLOCK)
  unmap-dma        VFIO_IOMMU_UNMAP_DMA, all bytes back
  dma-stress       (with --dma-stress SIZE) SIZE mapped one page per VFIO_IOMMU_MAP_DMA
                   (at most 65535 mappings, vfio_iommu_type1's default dma_entry_limit),
                   then unmapped in one call, --dma-rounds times: the pinned memory and
                   the IOMMU's mapping count under load
  get-device-fd    VFIO_GROUP_GET_DEVICE_FD
  device-info      VFIO_DEVICE_GET_INFO (flags, regions, irqs, reset)
  region-info      VFIO_DEVICE_GET_REGION_INFO for every region
  read-config      vendor:device read from the PCI config region
  irq-info         VFIO_DEVICE_GET_IRQ_INFO for every irq index

Output: one JSON object on stdout. Exit 0 when every step passed; exit 1 with
{"ok": false, "step": ..., "errno": ..., "error": ...} naming the failing step;
exit 2 on bad arguments.
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import getopt
import os
import struct
import sys

# The probe starts in every container the suites run, where each module imported is a file
# read over the container's 9p rootfs under nested emulation: argparse (with re, enum,
# gettext...) and typing cost about 2 s there (measured: `--help` 4.2 s with them; docs/
# measurements.md). getopt imports only os (gettext is absent from python3-minimal), and the
# annotations below are never evaluated (mypy reads a TYPE_CHECKING guard by its name).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Optional

try:
    import json
except ImportError:  # python3-minimal has no json package: a small encoder is enough
    json = None  # type: ignore[assignment]

# <linux/vfio.h>: every VFIO ioctl is _IO(VFIO_TYPE, VFIO_BASE + n), no size encoded.
VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _IO(type_: int, nr: int) -> int:
    # _IOC(dir=NONE(0), type, nr, size=0): dir<<30 | size<<16 | type<<8 | nr
    return (0 << 30) | (0 << 16) | (type_ << 8) | nr


VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

VFIO_PCI_CONFIG_REGION_INDEX = 7
PCI_REGION_NAMES = ["bar0", "bar1", "bar2", "bar3", "bar4", "bar5", "rom", "config", "vga"]
PCI_IRQ_NAMES = ["intx", "msi", "msix", "err", "req"]

# struct layouts (native little-endian x86_64, no padding surprises: all naturally aligned)
GROUP_STATUS = struct.Struct("=II")            # argsz, flags
DEVICE_INFO = struct.Struct("=IIII")           # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("=IIIIQQ")         # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("=IIII")              # argsz, flags, index, count
DMA_MAP = struct.Struct("=IIQQQ")              # argsz, flags, vaddr, iova, size
DMA_UNMAP = struct.Struct("=IIQQ")             # argsz, flags, iova, size
IOMMU_INFO = struct.Struct("=IIQ")             # argsz, flags, iova_pgsizes

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ProbeFailed(Exception):
    def __init__(self, step: str, message: str, err: Optional[int] = None) -> None:
        super().__init__(message)
        self.step, self.message, self.errno = step, message, err


def encode_group_status() -> bytearray:
    return bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))


def encode_dma_map(vaddr: int, iova: int, size: int) -> bytearray:
    return bytearray(DMA_MAP.pack(DMA_MAP.size, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE, vaddr, iova, size))


def encode_dma_unmap(iova: int, size: int) -> bytearray:
    return bytearray(DMA_UNMAP.pack(DMA_UNMAP.size, 0, iova, size))


def encode_region_info(index: int) -> bytearray:
    return bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))


def encode_irq_info(index: int) -> bytearray:
    return bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))


DMA_ENTRY_LIMIT = 65535   # vfio_iommu_type1's default dma_entry_limit (mappings per container)


def dma_stress(cfd: int, size: int, rounds: int = 1, page: int = PAGE_SIZE, iova: int = 1 << 32) -> dict[str, Any]:
    """Map `size` bytes one page per VFIO_IOMMU_MAP_DMA (at most DMA_ENTRY_LIMIT mappings), then
    unmap the whole range in one call; `rounds` times. Returns what was done. ProbeFailed
    ("dma-stress") names the round and the page; what was mapped is unmapped first."""
    import time

    if rounds < 1:
        raise ValueError(f"--dma-rounds {rounds} must be at least 1")
    maps = min(size // page, DMA_ENTRY_LIMIT)
    buf, vaddr = aligned_buffer(maps * page, page)
    t0 = time.monotonic()
    for rnd in range(rounds):
        i = 0
        try:
            for i in range(maps):
                _ioctl("dma-stress", cfd, VFIO_IOMMU_MAP_DMA, encode_dma_map(vaddr + i * page, iova + i * page, page))
        except ProbeFailed as e:
            if i:
                fcntl.ioctl(cfd, VFIO_IOMMU_UNMAP_DMA, encode_dma_unmap(iova, i * page))
            raise ProbeFailed("dma-stress", f"dma-stress: round {rnd + 1}, mapping {i + 1} of {maps}: {e.message}",
                              e.errno) from None
        um = encode_dma_unmap(iova, maps * page)
        _ioctl("dma-stress", cfd, VFIO_IOMMU_UNMAP_DMA, um)
        if DMA_UNMAP.unpack(um)[3] != maps * page:
            raise ProbeFailed("dma-stress", f"dma-stress: round {rnd + 1}: {DMA_UNMAP.unpack(um)[3]} bytes unmapped, "
                                            f"{maps * page} were mapped")
    del buf
    return {"bytes": maps * page, "page": page, "maps": maps, "rounds": rounds,
            "seconds": round(time.monotonic() - t0, 2)}


def aligned_buffer(size: int, page: int = PAGE_SIZE) -> tuple[Any, int]:
    """A zero-filled, page-aligned buffer of `size` bytes and its address.

    array's storage comes from malloc, which serves a request this large with an
    anonymous mmap; over-allocating one page lets us align the start. The array
    must stay referenced while the mapping is in use. Returns (array, aligned address).
    Made by repeating one zero byte: one allocation of the size (array("B", bytes(n)) held
    two, and a 256 MiB stress needed 512 MiB for a moment: MemoryError in a 384 MiB guest).
    """
    import array

    if size <= 0 or size % page:
        raise ValueError(f"DMA size {size} must be a positive multiple of the page size {page}")
    buf = array.array("B", b"\0") * (size + page)
    addr = buf.buffer_info()[0]
    return buf, (addr + page - 1) & ~(page - 1)


def _ioctl(step: str, fd: int, request: int, arg: Any = 0) -> Any:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise ProbeFailed(step, f"{step}: {e.strerror} (errno {e.errno} {errno_mod.errorcode.get(e.errno or 0, '?')})", e.errno) from None


def _open(step: str, path: str, flags: int = os.O_RDWR) -> int:
    try:
        return os.open(path, flags)
    except OSError as e:
        raise ProbeFailed(step, f"{step}: cannot open {path}: {e.strerror} (errno {e.errno} {errno_mod.errorcode.get(e.errno or 0, '?')})", e.errno) from None


def find_group(vfio_dir: str) -> str:
    """The single numeric group node under `vfio_dir` (e.g. /dev/vfio/12)."""
    try:
        groups = sorted(n for n in os.listdir(vfio_dir) if n.isdigit())
    except OSError as e:
        raise ProbeFailed("open-group", f"open-group: cannot list {vfio_dir}: {e.strerror}", e.errno) from None
    if len(groups) != 1:
        raise ProbeFailed("open-group", f"open-group: expected exactly one group node in {vfio_dir}, found {groups or 'none'}; pass --group",
                          errno_mod.ENOENT if not groups else None)
    return groups[0]


def find_device(group: str, sysfs: str = "/sys") -> str:
    """The first device of `group` listed in sysfs (the container sees the kernel's view)."""
    d = f"{sysfs}/kernel/iommu_groups/{group}/devices"
    try:
        devs = sorted(os.listdir(d))
    except OSError as e:
        raise ProbeFailed("get-device-fd", f"get-device-fd: cannot list {d} ({e.strerror}); pass --device BDF", e.errno) from None
    if not devs:
        raise ProbeFailed("get-device-fd", f"get-device-fd: group {group} lists no devices in {d}; pass --device BDF")
    return devs[0]


def probe(vfio_dir: str = "/dev/vfio", group: Optional[str] = None, device: Optional[str] = None, dma_size: int = 1 << 20,
          iova: int = 0x10000000, sysfs: str = "/sys", report: Optional[dict[str, Any]] = None,
          before_close: Optional[Callable[[dict[str, Any]], None]] = None, stress_size: int = 0,
          stress_rounds: int = 1) -> dict[str, Any]:
    """Run every step (dma-stress only with `stress_size`); returns the report dict. Raises
    ProbeFailed naming the step.
    `report` (a dict) is filled as steps pass, so a failure still shows what came before.
    `before_close(report)` runs after the last step with the group and device still open."""
    import time

    r = report if report is not None else {}
    r["steps"] = steps = []
    r["step_seconds"] = timings = {}       # each step's own time: where a slow probe spends it
    fds = []
    last = [time.monotonic()]

    def done(step: str) -> None:
        now = time.monotonic()
        steps.append(step)
        timings[step] = round(now - last[0], 4)
        last[0] = now

    try:
        cfd = _open("open-container", f"{vfio_dir}/vfio")
        fds.append(cfd)
        done("open-container")

        version = _ioctl("api-version", cfd, VFIO_GET_API_VERSION)
        r["api_version"] = version
        if version != VFIO_API_VERSION:
            raise ProbeFailed("api-version", f"api-version: kernel reports VFIO API {version}, expected {VFIO_API_VERSION}")
        done("api-version")

        if _ioctl("check-extension", cfd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1:
            raise ProbeFailed("check-extension", "check-extension: the kernel does not offer the TYPE1v2 IOMMU (vfio_iommu_type1 not loaded?)")
        r["type1v2"] = True
        done("check-extension")

        group = str(group) if group is not None else find_group(vfio_dir)
        r["group"] = group
        gfd = _open("open-group", f"{vfio_dir}/{group}")
        fds.append(gfd)
        done("open-group")

        st = encode_group_status()
        _ioctl("group-status", gfd, VFIO_GROUP_GET_STATUS, st)
        flags = GROUP_STATUS.unpack(st)[1]
        r["group_viable"] = bool(flags & VFIO_GROUP_FLAGS_VIABLE)
        if not flags & VFIO_GROUP_FLAGS_VIABLE:
            raise ProbeFailed("group-status", f"group-status: group {group} is not viable: a device in it is not bound to vfio-pci")
        done("group-status")

        _ioctl("set-container", gfd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", cfd)))
        done("set-container")
        _ioctl("set-iommu", cfd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        done("set-iommu")

        info = bytearray(IOMMU_INFO.pack(IOMMU_INFO.size, 0, 0))
        _ioctl("iommu-info", cfd, VFIO_IOMMU_GET_INFO, info)
        r["iova_pgsizes"] = IOMMU_INFO.unpack(info)[2]
        done("iommu-info")

        buf, vaddr = aligned_buffer(dma_size)
        _ioctl("map-dma", cfd, VFIO_IOMMU_MAP_DMA, encode_dma_map(vaddr, iova, dma_size))
        r["dma"] = {"iova": iova, "size": dma_size}
        done("map-dma")
        um = encode_dma_unmap(iova, dma_size)
        _ioctl("unmap-dma", cfd, VFIO_IOMMU_UNMAP_DMA, um)
        unmapped = DMA_UNMAP.unpack(um)[3]
        if unmapped != dma_size:
            raise ProbeFailed("unmap-dma", f"unmap-dma: {unmapped} bytes unmapped, {dma_size} were mapped")
        del buf
        done("unmap-dma")

        if stress_size:
            r["dma_stress"] = dma_stress(cfd, stress_size, stress_rounds)
            done("dma-stress")

        device = device or find_device(group, sysfs)
        r["device"] = device
        dfd = _ioctl("get-device-fd", gfd, VFIO_GROUP_GET_DEVICE_FD, bytearray(device.encode() + b"\0"))
        fds.append(dfd)
        done("get-device-fd")

        di = bytearray(DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0))
        _ioctl("device-info", dfd, VFIO_DEVICE_GET_INFO, di)
        _, dflags, nregions, nirqs = DEVICE_INFO.unpack(di)
        r["device_flags"] = dflags
        r["pci"] = bool(dflags & VFIO_DEVICE_FLAGS_PCI)
        r["reset"] = bool(dflags & VFIO_DEVICE_FLAGS_RESET)
        r["num_regions"], r["num_irqs"] = nregions, nirqs
        done("device-info")

        regions: list[dict[str, Any]] = []
        for i in range(nregions):
            ri = encode_region_info(i)
            name = PCI_REGION_NAMES[i] if r["pci"] and i < len(PCI_REGION_NAMES) else str(i)
            try:
                _ioctl("region-info", dfd, VFIO_DEVICE_GET_REGION_INFO, ri)
            except ProbeFailed as e:
                if e.errno != errno_mod.EINVAL:
                    raise
                # vfio-pci answers EINVAL for a region the device does not have (VGA on a non-VGA device)
                regions.append({"index": i, "name": name,
                                "absent": True, "size": 0, "offset": 0, "flags": 0, "read": False, "write": False, "mmap": False})
                continue
            _, rflags, _, _, size, offset = REGION_INFO.unpack(ri)
            regions.append({"index": i, "name": name,
                            "absent": False, "size": size, "offset": offset, "flags": rflags,
                            "read": bool(rflags & VFIO_REGION_INFO_FLAG_READ),
                            "write": bool(rflags & VFIO_REGION_INFO_FLAG_WRITE),
                            "mmap": bool(rflags & VFIO_REGION_INFO_FLAG_MMAP)})
        r["regions"] = regions
        done("region-info")

        cfg = [x for x in regions if x["index"] == VFIO_PCI_CONFIG_REGION_INDEX]
        if not r["pci"] or not cfg or cfg[0]["size"] < 4:
            raise ProbeFailed("read-config", "read-config: the device has no PCI config region")
        try:
            raw = os.pread(dfd, 4, cfg[0]["offset"])
        except OSError as e:
            raise ProbeFailed("read-config", f"read-config: pread of the config region failed: {e.strerror}", e.errno) from None
        vendor, dev_id = struct.unpack("<HH", raw)
        r["vendor"], r["device_id"] = f"{vendor:04x}", f"{dev_id:04x}"
        r["vendor_device"] = f"{vendor:04x}:{dev_id:04x}"
        if vendor in (0xFFFF, 0x0000):
            raise ProbeFailed("read-config", f"read-config: vendor ID {vendor:#06x} means the device did not answer")
        done("read-config")

        irqs = []
        for i in range(nirqs):
            ii = encode_irq_info(i)
            try:
                _ioctl("irq-info", dfd, VFIO_DEVICE_GET_IRQ_INFO, ii)
            except ProbeFailed as e:
                if e.errno != errno_mod.EINVAL:
                    raise
                continue  # an index the device does not implement
            _, iflags, _, count = IRQ_INFO.unpack(ii)
            irqs.append({"index": i, "name": PCI_IRQ_NAMES[i] if r["pci"] and i < len(PCI_IRQ_NAMES) else str(i),
                         "count": count, "flags": iflags})
        r["irqs"] = irqs
        done("irq-info")
        r["ok"] = True
        if before_close is not None:
            before_close(r)
        return r
    finally:
        t_close = time.monotonic()
        for fd in reversed(fds):
            try:
                os.close(fd)
            except OSError:
                pass
        # closing the device resets it (vfio-pci): its time, apart from the steps'
        r["close_seconds"] = round(time.monotonic() - t_close, 4)


def to_json(obj: Any) -> str:
    """json.dumps when available, else a minimal encoder (dict, list, str, int, float, bool, None)."""
    if json is not None:
        return json.dumps(obj, sort_keys=True)
    return _encode(obj)


def _encode(o: Any) -> str:
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, int):
        return str(o)
    if isinstance(o, float):
        return repr(o)
    if isinstance(o, str):
        out = ['"']
        for ch in o:
            c = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif c < 0x20 or c > 0x7E:
                out.append("\\u%04x" % c if c < 0x10000 else "\\u%04x\\u%04x" % (0xD800 + ((c - 0x10000) >> 10), 0xDC00 + ((c - 0x10000) & 0x3FF)))
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(o, (list, tuple)):
        return "[" + ", ".join(_encode(x) for x in o) + "]"
    if isinstance(o, dict):
        return "{" + ", ".join(_encode(str(k)) + ": " + _encode(o[k]) for k in sorted(o)) + "}"
    raise TypeError(f"cannot encode {type(o).__name__}")


USAGE = """usage: vfio-probe [--vfio-dir DIR] [--group N] [--device ADDR] [--dma-size BYTES] [--iova ADDR]
                  [--dma-stress BYTES] [--dma-rounds N] [--hold SECONDS]

Exercise a VFIO group from inside a container; JSON on stdout.

  --vfio-dir DIR       where the VFIO nodes are (default /dev/vfio)
  --group N            group number (default: the only numeric node in --vfio-dir)
  --device ADDR        PCI address to open (default: first device of the group in /sys)
  --dma-size BYTES     bytes to map (page multiple; default 1 MiB; 0x.. accepted)
  --iova ADDR          IO virtual address to map at (default 0x10000000)
  --dma-stress BYTES   also map BYTES one page per mapping (at most 65535), then unmap
                       them (default: off)
  --dma-rounds N       rounds of --dma-stress (default 1)
  --hold SECONDS       after the steps, print the report and keep the group open this
                       long (to test exclusivity)
  -h, --help           this text

Exit status: 0 every step passed, 1 a step failed (named in the JSON), 2 bad arguments.
"""
#: option -> (attribute, conversion, default); --sysfs is for tests (a simulated /sys)
OPTIONS: dict[str, tuple[str, Callable[[str], Any], Any]] = {
    "--vfio-dir": ("vfio_dir", str, "/dev/vfio"),
    "--group": ("group", str, None),
    "--device": ("device", str, None),
    "--dma-size": ("dma_size", lambda s: int(s, 0), 1 << 20),
    "--iova": ("iova", lambda s: int(s, 0), 0x10000000),
    "--dma-stress": ("dma_stress", lambda s: int(s, 0), 0),
    "--dma-rounds": ("dma_rounds", int, 1),
    "--hold": ("hold", float, 0.0),
    "--sysfs": ("sysfs", str, "/sys"),
}


class Args:
    vfio_dir: str
    group: Optional[str]
    device: Optional[str]
    dma_size: int
    iova: int
    dma_stress: int
    dma_rounds: int
    hold: float
    sysfs: str


def parse_options(argv: list[str], options: dict[str, tuple[str, Callable[[str], Any], Any]], into: Any,
                  flags: dict[str, str] | None = None) -> Any:
    """`argv` parsed with getopt (long options, unambiguous prefixes) into `into`: each of
    `options` (option -> (attribute, conversion, default)) takes a value, each of `flags`
    (option -> attribute) sets its attribute True. None after -h/--help; ValueError names a bad
    option or value. Shared with the NVMe driver (nvme_io.py), which must start as cheaply."""
    flags = flags or {}
    try:
        opts, rest = getopt.gnu_getopt(argv, "h", ["help"] + [o[2:] + "=" for o in options] + [f[2:] for f in flags])
    except getopt.GetoptError as e:
        raise ValueError(str(e)) from None
    if rest:
        raise ValueError(f"unexpected argument {rest[0]!r}")
    for attr, _conv, default in options.values():
        setattr(into, attr, default)
    for attr in flags.values():
        setattr(into, attr, False)
    for opt, value in opts:
        if opt in ("-h", "--help"):
            return None
        if opt in flags:
            setattr(into, flags[opt], True)
            continue
        attr, conv, _default = options[opt]
        try:
            setattr(into, attr, conv(value))
        except ValueError:
            raise ValueError(f"option {opt}: invalid value {value!r}") from None
    return into


def parse_args(argv: list[str]) -> Optional[Args]:
    """The probe's options of `argv`; None after --help. ValueError names a bad option or value."""
    parsed: Optional[Args] = parse_options(argv, OPTIONS, Args())
    return parsed


def main(argv: Optional[list[str]] = None) -> int:
    try:
        parsed = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"vfio-probe: {e}\n{USAGE.splitlines()[0]}\n(--help for more)", file=sys.stderr)
        return 2
    if parsed is None:
        print(USAGE, end="")
        return 0
    a = parsed
    report: dict[str, Any] = {"ok": False}
    held: list[bool] = []

    def hold(r: dict[str, Any]) -> None:
        print(to_json(r), flush=True)
        held.append(True)
        import time
        time.sleep(a.hold)

    try:
        probe(a.vfio_dir, a.group, a.device, a.dma_size, a.iova, a.sysfs, report=report,
              before_close=hold if a.hold > 0 else None, stress_size=a.dma_stress, stress_rounds=a.dma_rounds)
    except ProbeFailed as e:
        report.update(ok=False, step=e.step, error=e.message, errno=e.errno,
                      errname=errno_mod.errorcode.get(e.errno) if e.errno else None)
        print(to_json(report))
        print(f"vfio-probe: FAILED at step {e.step}: {e.message}", file=sys.stderr)
        return 1
    except ValueError as e:
        report.update(ok=False, step="arguments", error=str(e), errno=None, errname=None)
        print(to_json(report))
        return 2
    if not held:
        print(to_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
