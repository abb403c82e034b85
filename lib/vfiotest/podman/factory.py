"""Containers for one user (a test, a module, a benchmark) on a RuntimeClient, with the recipe
of vfiotest.podman.client.vfio_recipe (the seed's recipe on Kata, the host's nodes on runc):

    factory = ContainerFactory(client, image, kata=True)
    res = factory.probe(vf)                              # the VFIO probe, CAP_IPC_LOCK
    res = factory.nvme_io(vf, "--blocks", 64)            # the userspace NVMe driver, CAP_IPC_LOCK
    res = factory.run(["ls", "/dev/vfio"], vfio=vf)
    c = factory.start(["sleep", "60"])                   # running until removed

`breaks` breaks the subject on purpose, to show that tests fail for the right reason:
`withhold-device` (no --device), `no-dev-mount` (no `-v /dev:/dev` on Kata), `no-ipc-lock`
(CAP_IPC_LOCK dropped, memlock 64 KiB), `hook-fails` (the guest hook is asked, through the
annotation, for a device no guest has: it exits non-zero and the Kata agent refuses the
start). The pytest plugin passes VFIOTEST_BREAK's words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..constants import VFIO_ANNOTATION
from .client import RunResult, RuntimeClient, vfio_recipe

if TYPE_CHECKING:
    from ..vfio import VfioGroup
    from .image import Image

SMALL_MEMLOCK = 64 * 1024
UNMATCHED_ID = "ffff:fffe"   # hook-fails: a vendor:device no guest device has (the hook exits 5)


class ContainerFactory:
    """Containers for one test, on the session's RuntimeClient, with the session's image."""

    def __init__(self, client: RuntimeClient, image: Image, kata: bool = False, breaks: Iterable[str] = frozenset()) -> None:
        self.client, self.image, self.kata, self.breaks = client, image, kata, frozenset(breaks)
        self.results: list[RunResult] = []

    def _broken(self, what: str) -> bool:
        return what in self.breaks

    @property
    def runtime(self) -> str:
        return self.client.runtime

    def _options(self, vfio: VfioGroup | None = None, devices: Iterable[str] = (), cap_add: Iterable[str] = (),
                 cap_drop: Iterable[str] = (), ulimits: Mapping[str, int] | None = None,
                 annotations: Mapping[str, str] | None = None, ipc_lock: bool | None = None) -> dict[str, Any]:
        recipe = vfio_recipe(self.kata, vfio.dev_path if vfio is not None else None,
                             vfio.vendor_device if vfio is not None else None,
                             dev_mount=not self._broken("no-dev-mount"), device=not self._broken("withhold-device"))
        devices, cap_add, cap_drop = recipe.pop("devices") + list(devices), list(cap_add), list(cap_drop)
        annotations = {**recipe.pop("annotations"), **(annotations or {})}
        if self._broken("hook-fails") and VFIO_ANNOTATION in annotations:
            annotations[VFIO_ANNOTATION] = UNMATCHED_ID
        extra = recipe
        if ipc_lock is True and not self._broken("no-ipc-lock"):
            cap_add.append("CAP_IPC_LOCK")
        elif ipc_lock is False or (ipc_lock is True and self._broken("no-ipc-lock")):
            cap_drop.append("CAP_IPC_LOCK")
            if self._broken("no-ipc-lock"):
                ulimits = dict(ulimits or {}, memlock=SMALL_MEMLOCK)
        return dict(devices=devices, cap_add=cap_add, cap_drop=cap_drop, ulimits=ulimits, annotations=annotations,
                    **extra)

    def run(self, command: Iterable[str], *, vfio: VfioGroup | None = None, devices: Iterable[str] = (),
            cap_add: Iterable[str] = (), cap_drop: Iterable[str] = (), ulimits: Mapping[str, int] | None = None,
            annotations: Mapping[str, str] | None = None, ipc_lock: bool | None = None, timeout: float = 180.0,
            **extra: Any) -> RunResult:
        """Run to completion; a vfiotest.podman.RunResult (exit code, stdout, stderr, oci_runtime)."""
        res = self.client.run(self.image.ref, command, timeout=timeout,
                              **self._options(vfio, devices, cap_add, cap_drop, ulimits, annotations, ipc_lock), **extra)
        self.results.append(res)
        return res

    def start(self, command: Iterable[str], *, vfio: VfioGroup | None = None, devices: Iterable[str] = (),
              cap_add: Iterable[str] = (), cap_drop: Iterable[str] = (), ulimits: Mapping[str, int] | None = None,
              annotations: Mapping[str, str] | None = None, ipc_lock: bool | None = None, **extra: Any) -> Any:
        """Create and start; the podman-py Container keeps running until the test ends."""
        return self.client.start(self.image.ref, command,
                                 **self._options(vfio, devices, cap_add, cap_drop, ulimits, annotations, ipc_lock), **extra)

    def probe_command(self, *args: object) -> list[str]:
        return [*self.image.probe_command, *map(str, args)]

    def probe(self, vfio: VfioGroup | None, *args: object, ipc_lock: bool | None = True,
              ulimits: Mapping[str, int] | None = None, **kw: Any) -> RunResult:
        """The VFIO probe on `vfio` (a VfioGroup). With ipc_lock=False and a small memlock
        limit, the DMA map is expected to fail."""
        return self.run(self.probe_command(*args), vfio=vfio, ipc_lock=ipc_lock, ulimits=ulimits, **kw)

    def nvme_command(self, *args: object) -> list[str]:
        return [*self.image.nvme_command, *map(str, args)]

    def nvme_io(self, vfio: VfioGroup, *args: object, ulimits: Mapping[str, int] | None = None,
                **kw: Any) -> RunResult:
        """The userspace NVMe driver (podman/nvme_io.py) on `vfio`, CAP_IPC_LOCK (it pins its
        DMA buffer)."""
        return self.run(self.nvme_command(*args), vfio=vfio, ipc_lock=True, ulimits=ulimits, **kw)


__all__ = ["ContainerFactory", "SMALL_MEMLOCK"]
