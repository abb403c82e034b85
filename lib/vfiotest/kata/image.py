"""Reading an initrd: the cpio archives in it (plain, gzip, zstd, xz) and checks on what it holds.

`read_initrd(path)` returns an `InitrdListing`; `verify_guest_image()` says
whether an image holds the hook (regular file, executable, at
`<guest_hook_path>/prestart/`), python3 and the VFIO modules. dracut prints
FAILED for a missing driver and still exits 0: this is how the harness knows
what really ended up in the image.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import ProvisionError

NEWC_MAGICS = (b"070701", b"070702")
_HDR = 110


@dataclass
class CpioEntry:
    path: str            # without a leading "/" or "./"
    mode: int
    size: int
    uid: int = 0
    gid: int = 0
    target: Optional[str] = None  # symlink target
    data: Optional[bytes] = None  # regular files, kept when small or asked for

    @property
    def kind(self) -> str:
        if stat.S_ISREG(self.mode):
            return "file"
        if stat.S_ISDIR(self.mode):
            return "dir"
        if stat.S_ISLNK(self.mode):
            return "symlink"
        if stat.S_ISCHR(self.mode):
            return "char"
        if stat.S_ISBLK(self.mode):
            return "block"
        return "other"

    @property
    def perms(self) -> int:
        return stat.S_IMODE(self.mode)

    @property
    def executable(self) -> bool:
        return stat.S_ISREG(self.mode) and bool(self.mode & 0o111)


@dataclass
class InitrdListing:
    path: str
    size: int                                  # bytes on disk
    compression: List[str]                     # one per archive segment: none, gzip, zstd, xz
    entries: Dict[str, CpioEntry] = field(default_factory=dict)

    def get(self, path: str) -> CpioEntry | None:
        return self.entries.get(path.lstrip("/"))

    def resolve(self, path: str, depth: int = 0) -> CpioEntry | None:
        """The entry for `path` with symlinks followed (inside the image)."""
        parts = path.strip("/").split("/")
        cur = ""
        for i, part in enumerate(parts):
            cur = f"{cur}/{part}".lstrip("/")
            e = self.entries.get(cur)
            if e is not None and e.kind == "symlink" and e.target is not None and depth < 20:
                tgt = e.target if e.target.startswith("/") else os.path.normpath(os.path.join(os.path.dirname("/" + cur), e.target))
                return self.resolve("/".join([tgt.strip("/")] + parts[i + 1:]), depth + 1)
        return self.entries.get(cur)

    def modules(self) -> dict[str, str]:
        """Kernel module names in the image (dashes as underscores) -> path."""
        out = {}
        for p in self.entries:
            m = re.match(r"^(?:usr/)?lib/modules/[^/]+/.+/([^/]+)\.ko(?:\.(?:xz|zst|gz))?$", p)
            if m:
                out[m.group(1).replace("-", "_")] = p
        return out

    def builtin_modules(self) -> set[str]:
        names = set()
        for p, e in self.entries.items():
            if re.match(r"^(?:usr/)?lib/modules/[^/]+/modules\.builtin$", p) and e.data:
                for line in e.data.decode(errors="replace").splitlines():
                    names.add(re.sub(r"\.ko$", "", os.path.basename(line.strip())).replace("-", "_"))
        return names

    def lines(self) -> list[str]:
        """`ls -l`-like text, one entry per line."""
        out = []
        for p in sorted(self.entries):
            e = self.entries[p]
            extra = f" -> {e.target}" if e.target else ""
            out.append(f"{stat.filemode(e.mode)} {e.uid:>4} {e.gid:>4} {e.size:>10} /{p}{extra}")
        return out


def _decompress(blob: bytes, path: str) -> tuple[str, bytes]:
    if blob[:2] == b"\x1f\x8b":
        return "gzip", gzip.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return "xz", lzma.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        try:
            p = subprocess.run(["zstd", "-dcq"], input=blob, capture_output=True, timeout=120)
        except FileNotFoundError:
            raise ProvisionError(f"{path} is zstd-compressed and the zstd command is missing",
                                 hint="install the Debian package zstd (ci/setup does)") from None
        if p.returncode != 0:
            raise ProvisionError(f"{path}: zstd could not decompress it: {p.stderr.decode(errors='replace').strip()}",
                                 hint="the image may be truncated; rebuild it with `vfiotest kata build-initrd`")
        return "zstd", p.stdout
    if blob[:6] in NEWC_MAGICS:
        return "none", blob
    raise ProvisionError(f"{path}: unknown compression (first bytes {blob[:6].hex()})",
                         hint="the harness reads cpio images plain or compressed with gzip, zstd or xz")


def _parse_cpio(buf: bytes, pos: int, entries: dict[str, CpioEntry], keep_data: Callable[[str, int], bool],
                path: str) -> int:
    """Parse one newc archive starting at `pos`; returns the offset after its trailer."""
    while True:
        if buf[pos:pos + 6] not in NEWC_MAGICS:
            raise ProvisionError(f"{path}: bad cpio header at offset {pos}",
                                 hint="only the newc format is read (what dracut and the kernel use)")
        f = [int(buf[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, filesize, namesize = f[1], f[2], f[3], f[6], f[11]
        name_start = pos + _HDR
        name = buf[name_start:name_start + namesize - 1].decode("utf-8", "replace")
        data_start = (name_start + namesize + 3) & ~3
        data_end = data_start + filesize
        pos = (data_end + 3) & ~3
        if name == "TRAILER!!!":
            return pos
        clean = name[2:] if name.startswith("./") else name.lstrip("/")
        if clean in ("", "."):
            continue
        e = CpioEntry(path=clean, mode=mode, size=filesize, uid=uid, gid=gid)
        if stat.S_ISLNK(mode):
            e.target = buf[data_start:data_end].decode("utf-8", "replace")
        elif stat.S_ISREG(mode) and keep_data(clean, filesize):
            e.data = bytes(buf[data_start:data_end])
        entries[clean] = e


def read_initrd(path: str, keep_data: Callable[[str, int], bool] | None = None) -> InitrdListing:
    """List every entry of an initrd made of one or more cpio archives, each
    plain or compressed (gzip, zstd, xz), as the kernel accepts them."""
    keep_data = keep_data or (lambda name, size: size <= 256 * 1024)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ProvisionError(f"cannot read initrd {path}: {e.strerror}",
                             hint="build it first with `vfiotest kata build-initrd`") from None
    listing = InitrdListing(path=path, size=len(blob), compression=[])
    pos = 0
    while pos < len(blob):
        while pos < len(blob) and blob[pos] == 0:  # padding between segments
            pos += 1
        if pos >= len(blob):
            break
        if blob[pos:pos + 6] in NEWC_MAGICS:
            listing.compression.append("none")
            pos = _parse_cpio(blob, pos, listing.entries, keep_data, path)
            continue
        # A compressed archive runs to the end of the file (dracut and the kernel both assume so).
        kind, raw = _decompress(blob[pos:], path)
        listing.compression.append(kind)
        p = 0
        while p < len(raw):
            while p < len(raw) and raw[p] == 0:
                p += 1
            if p >= len(raw):
                break
            p = _parse_cpio(raw, p, listing.entries, keep_data, path)
        break
    if not listing.entries:
        raise ProvisionError(f"{path} holds no cpio entries", hint="rebuild it with `vfiotest kata build-initrd`")
    return listing


@dataclass
class ImageCheck:
    """What `verify_guest_image` found; `problems` is empty when the image is good."""

    hook: Optional[CpioEntry]
    modules: Dict[str, str]      # wanted module -> "file <path>" | "builtin" | "missing"
    python: Optional[str]
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_guest_image(listing: InitrdListing, *, hook_name: str = "vfio-hook",
                       guest_hook_path: str = "/usr/share/oci/hooks", modules: Iterable[str] = (),
                       needs_python: bool = True) -> ImageCheck:
    """Check that the image holds the hook where the agent looks for it and the modules asked for."""
    problems = []
    hook_path = f"{guest_hook_path.rstrip('/')}/prestart/{hook_name}"
    hook = listing.get(hook_path)
    if hook is None:
        problems.append(f"hook {hook_path} is missing")
    elif hook.kind != "file":
        problems.append(f"hook {hook_path} is a {hook.kind}, the agent runs regular files only")
    elif not hook.executable:
        problems.append(f"hook {hook_path} has mode {hook.perms:o}, not executable")
    have = listing.modules()
    builtin = listing.builtin_modules()
    found = {}
    for m in modules:
        key = m.replace("-", "_")
        if key in have:
            found[m] = f"file /{have[key]}"
        elif key in builtin:
            found[m] = "builtin"
        else:
            found[m] = "missing"
            problems.append(f"kernel module {m} is neither in the image nor built into its kernel")
    py = None
    if needs_python:
        for cand in ("usr/bin/python3", "bin/python3"):
            e = listing.resolve(cand)
            if e is not None and e.kind == "file":
                py = "/" + cand
                break
        if py is None:
            problems.append("python3 is missing (the hook runs in Python)")
        elif listing.resolve("usr/lib/python3.11/json/__init__.py") is None and \
                not any(re.match(r"usr/lib/python3\.\d+/json/__init__\.py$", p) for p in listing.entries):
            problems.append("python3's json module is missing from the image")
    return ImageCheck(hook=hook, modules=found, python=py, problems=problems)


def verify_kata_guest(listing: InitrdListing, *, init: str, agent: str, modules: Iterable[str] = ()) -> ImageCheck:
    """Check what a real Kata guest needs beyond the hook: the init given as `rdinit=`
    (an executable regular file with an interpreter the image has), the agent, and the
    modules the init loads (virtio console, vsock, 9p)."""
    problems = []
    e = listing.resolve(init)
    if e is None or e.kind != "file" or not e.executable:
        problems.append(f"init {init} is missing or not an executable file")
    elif e.data is not None and e.data.startswith(b"#!"):
        interp = e.data[2:].split(b"\n", 1)[0].split()[0].decode()
        target = listing.resolve(interp)
        if target is None or target.kind != "file" or not target.executable:
            problems.append(f"init {init} needs {interp}, which the image does not have")
    a = listing.resolve(agent)
    if a is None or a.kind != "file" or not a.executable:
        problems.append(f"the Kata agent {agent} is missing or not executable")
    have, builtin = listing.modules(), listing.builtin_modules()
    for m in modules:
        key = m.replace("-", "_")
        if key not in have and key not in builtin:
            problems.append(f"kernel module {m} (needed by the Kata agent) is not in the image")
    return ImageCheck(hook=None, modules={}, python=None, problems=problems)
