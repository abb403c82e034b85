"""The guest kernel: Debian's 6.1 kernel, the same unpacked package the runner boots.

`debian_kernel()` returns a `GuestKernel` (vmlinuz, kernel version, the module
tree that dracut's `--kmoddir` reads) and tells which modules the kernel has,
so the guest image asks only for modules that exist (`vfio_virqfd` is built
into `vfio` from 6.2 on).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class GuestKernel:
    package: str      # linux-image-6.1.0-56-amd64
    kver: str         # 6.1.0-56-amd64
    root: str         # the extracted package: root/boot/vmlinuz-*, root/lib/modules/<kver>

    @property
    def vmlinuz(self) -> str:
        return os.path.join(self.root, "boot", f"vmlinuz-{self.kver}")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "boot", f"config-{self.kver}")

    @property
    def moddir(self) -> str:
        return os.path.join(self.root, "lib", "modules", self.kver)

    def has_module(self, name: str) -> bool:
        """True when the kernel has module `name` (as a .ko file or built in)."""
        want = name.replace("-", "_")
        for listing in ("modules.builtin", "modules.order"):
            path = os.path.join(self.moddir, listing)
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        base = os.path.basename(line.strip())
                        base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")
                        if base == want:
                            return True
        return False

    def module_is_builtin(self, name: str) -> bool:
        want = name.replace("-", "_")
        path = os.path.join(self.moddir, "modules.builtin")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            return any(re.sub(r"\.ko$", "", os.path.basename(line.strip())).replace("-", "_") == want for line in f)


def debian_kernel(progress: Callable[[str], None] | None = None) -> GuestKernel:
    """The extracted Debian guest kernel: the runner's kernel asset (one download
    shared by the runner and the guest image, see vfiotest.runner.assets).
    Resolved once per process (asking apt costs seconds)."""
    global _RESOLVED
    if _RESOLVED is None or not os.path.exists(_RESOLVED.vmlinuz):
        from ..runner.assets import ensure_kernel

        k = ensure_kernel(progress=progress)
        _RESOLVED = GuestKernel(package=k.package, kver=k.kver, root=k.root)
    return _RESOLVED


_RESOLVED: GuestKernel | None = None
