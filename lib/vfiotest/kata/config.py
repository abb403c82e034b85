"""configuration.toml for the kata-vfio runtime, derived from the installed Kata config.

`derive_config(base_text, settings)` edits Kata's own file with tomlkit, so
every comment and the layout of the original survive; only these change in
`[hypervisor.qemu]`: `machine_type = "q35"`, `kernel`/`initrd` (the guest
image just built; `image` is commented out, Kata refuses both), `kernel_params`
(merged: `systemd.unified_cgroup_hierarchy=0`, the debug console for 1.x),
`enable_iommu = true`, `guest_hook_path`, `enable_debug`; for Kata 2.x and
later the debug console is `[agent.kata] debug_console_enabled = true`.

For the Kata 1.x guest image the harness builds (agent as PID 1 behind its own
init, `rdinit=`), `KataVfioSettings.for_kata_guest()` adds what a VF hot-plugged
into that guest needs (measured with Kata 1.12.1 in the emulated runner):
`hotplug_vfio_on_root_bus = true` and `pcie_root_port` (q35 hot-plugs a PCIe
device on a root port), `use_vsock = true`, `disable_block_device_use = true`
(the rootfs goes over 9p), a small `default_memory` (a VF pins all guest RAM),
the QEMU binary (also in `valid_hypervisor_paths`), the shim and proxy of the
Kata in use, and `[runtime] internetworking_model = "none"`.

The result is written to the harness's own path (`KATA_VFIO_CONFIG`); the
system's configuration is read, never written.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Tuple

import tomlkit

from ..constants import KATA_STATE_DIR
from ..errors import ProvisionError

if TYPE_CHECKING:
    from ..host import Host

# Where Kata packages put their configuration, most specific first.
INSTALLED_CONFIGS = (
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration-qemu.toml",
    "/opt/kata/share/defaults/kata-containers/configuration.toml",
    "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml",
)
BUNDLED_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "data", "kata", "configuration-qemu-1.x.toml")
STATE_DIR = KATA_STATE_DIR
KATA_VFIO_CONFIG = f"{STATE_DIR}/configuration.toml"
MARKER = "vfiotest: derived for the kata-vfio runtime"
# A VF pins all guest RAM. 384 MiB ran the probe and halved the Kata VM's RSS (facts section 8),
# but a 256 MiB DMA stress in 4 KiB pages is SIGKILLed there; 640 MiB holds it (measured,
# docs/measurements.md "Kata guest memory").
KATA_GUEST_MEMORY_MB = 640
#: the Kata guest's memory in MiB for kata-vfio (default_memory); `vfiotest kata config/register --memory` too
GUEST_MEMORY_ENV = "VFIOTEST_KATA_MEMORY"
GUEST_MEMORY_MIN_MB = 128


def guest_memory_mb(value: str | int | None = None) -> int:
    """The Kata guest's memory in MiB: `value`, else VFIOTEST_KATA_MEMORY, else KATA_GUEST_MEMORY_MB.
    A ProvisionError naming the setting when it is not a whole number of at least 128 MiB."""
    where = "--memory" if value is not None else GUEST_MEMORY_ENV
    raw = value if value is not None else os.environ.get(GUEST_MEMORY_ENV)
    if raw is None or raw == "":
        return KATA_GUEST_MEMORY_MB
    text = str(raw).strip()
    if not text.isdigit() or int(text) < GUEST_MEMORY_MIN_MB:
        raise ProvisionError(f"{where}={raw!r} is not a Kata guest memory size",
                          hint=f"give MiB as a whole number of at least {GUEST_MEMORY_MIN_MB}, e.g. 1024 "
                               f"(default {KATA_GUEST_MEMORY_MB}; a VF pins all of it in the runner's RAM)")
    return int(text)


@dataclass
class KataVfioSettings:
    kernel: str
    initrd: str
    guest_hook_path: str = "/usr/share/oci/hooks"
    machine_type: str = "q35"
    kernel_params: Tuple[str, ...] = ("systemd.unified_cgroup_hierarchy=0",)
    enable_iommu: bool = True
    enable_debug: bool = True
    debug_console: bool = True
    kata_major: int = 1
    # set by for_kata_guest(); None/empty leaves Kata's own value
    init: Optional[str] = None                 # rdinit= of the guest image
    hypervisor_path: Optional[str] = None
    shim_path: Optional[str] = None
    proxy_path: Optional[str] = None
    default_memory: Optional[int] = None
    hypervisor_extra: Tuple[Tuple[str, object], ...] = ()
    runtime_extra: Tuple[Tuple[str, object], ...] = ()

    @classmethod
    def for_kata_guest(cls, *, kernel: str, initrd: str, init: str | None, hypervisor_path: str | None = None,
                       shim_path: str | None = None, proxy_path: str | None = None,
                       default_memory: int | None = None, **kw: Any) -> KataVfioSettings:
        """Settings for the harness's Kata 1.x guest image with a VF hot-plugged (see module doc);
        the guest's memory `default_memory` MiB, else guest_memory_mb()."""
        return cls(kernel=kernel, initrd=initrd, init=init, hypervisor_path=hypervisor_path, shim_path=shim_path,
                   proxy_path=proxy_path, default_memory=default_memory or guest_memory_mb(),
                   hypervisor_extra=(("hotplug_vfio_on_root_bus", True), ("pcie_root_port", 2),
                                     ("use_vsock", True), ("disable_block_device_use", True)),
                   runtime_extra=(("internetworking_model", "none"),), **kw)


def find_installed_config(host: Host | None = None) -> str | None:
    """The path of the installed Kata configuration (on `host`, else here), or None."""
    for p in INSTALLED_CONFIGS:
        if (host.exists(p) if host is not None else os.path.exists(p)):
            return p
    return None


def merge_params(current: str | None, add: Iterable[str]) -> str:
    """`current` kernel params with each of `add` set: a `key=value` replaces the
    same key, a bare flag is added once. Order of the original is kept."""
    words = shlex.split(current or "")
    for a in add:
        key = a.split("=", 1)[0]
        for i, w in enumerate(words):
            if w.split("=", 1)[0] == key:
                words[i] = a
                break
        else:
            words.append(a)
    return " ".join(words)


def _set(table: Any, key: str, value: object) -> None:
    """Set `key`, keeping the item's trailing comment when it already exists."""
    if key in table:
        item = table[key]
        comment = getattr(item.trivia, "comment", "") if hasattr(item, "trivia") else ""
        table[key] = value
        if comment:
            table[key].comment(comment.lstrip("# "))
    else:
        table.add(key, value)


def derive_config(base_text: str, settings: KataVfioSettings, source: str = "(text)") -> str:
    """The kata-vfio configuration.toml as text, derived from `base_text` with comments kept."""
    # a file derived before: drop our header, derive again from the rest
    base_text = "".join(line for line in base_text.splitlines(True) if not line.startswith(f"# {MARKER} from "))
    try:
        doc = tomlkit.parse(base_text)
    except Exception as e:
        raise ProvisionError(f"the Kata configuration {source} is not valid TOML: {e}",
                             hint="fix or reinstall Kata's configuration.toml") from None
    hv = doc.get("hypervisor", {}).get("qemu")
    if hv is None:
        raise ProvisionError(f"{source} has no [hypervisor.qemu] table",
                             hint="kata-vfio needs Kata's QEMU hypervisor: use configuration-qemu.toml")
    keys_before = len(hv)
    _set(hv, "machine_type", settings.machine_type)
    _set(hv, "kernel", settings.kernel)
    if "image" in hv:
        old = hv["image"]
        del hv["image"]
        hv.add(tomlkit.comment(f'image = "{old}"  ({MARKER}: the initrd replaces the image; Kata takes one of them)'))
    _set(hv, "initrd", settings.initrd)
    params = list(settings.kernel_params)
    if settings.debug_console and settings.kata_major < 2:
        params.append("agent.debug_console")
    if settings.init:
        params.append(f"rdinit={settings.init}")
    _set(hv, "kernel_params", merge_params(str(hv.get("kernel_params", "")), params))
    _set(hv, "enable_iommu", bool(settings.enable_iommu))
    _set(hv, "guest_hook_path", settings.guest_hook_path)
    if settings.enable_debug:
        _set(hv, "enable_debug", True)
    if settings.hypervisor_path:
        _set(hv, "path", settings.hypervisor_path)
        valid = [str(v) for v in hv.get("valid_hypervisor_paths", [])]
        if settings.hypervisor_path not in valid:
            _set(hv, "valid_hypervisor_paths", valid + [settings.hypervisor_path])
    if settings.default_memory:
        _set(hv, "default_memory", int(settings.default_memory))
    for key, value in settings.hypervisor_extra:
        _set(hv, key, value)
    if len(hv) > keys_before:
        hv.add(tomlkit.nl())  # keep the blank line before the next table
    for table, path in (("shim", settings.shim_path), ("proxy", settings.proxy_path)):
        if path:
            section = doc.setdefault(table, tomlkit.table(is_super_table=True))
            _set(section.setdefault("kata", tomlkit.table()), "path", path)
    if settings.runtime_extra:
        rt = doc.setdefault("runtime", tomlkit.table())
        for key, value in settings.runtime_extra:
            _set(rt, key, value)
    if settings.debug_console and settings.kata_major >= 2:
        agent = doc.setdefault("agent", tomlkit.table(is_super_table=True))
        kata = agent.setdefault("kata", tomlkit.table())
        _set(kata, "debug_console_enabled", True)
    text = tomlkit.dumps(doc)
    header = f"# {MARKER} from {source}; regenerate with `vfiotest kata config`.\n"
    return header + text


def read_config(text: str) -> dict[str, Any]:
    """The settings of a configuration.toml as plain data."""
    return tomlkit.parse(text).unwrap()


@dataclass
class WrittenConfig:
    path: str
    source: str
    text: str
    bundled: bool = False   # derived from the harness's bundled Kata 1.x sample (no Kata installed)
    notes: list = field(default_factory=list)


def write_kata_vfio_config(host: Host, settings: KataVfioSettings, base_path: str | None = None,
                           dest: str = KATA_VFIO_CONFIG) -> WrittenConfig:
    """Derive the config from the installed one on `host` (or `base_path`, or the bundled
    Kata 1.x sample when none is installed) and write it to `dest` on `host`."""
    bundled = False
    source = base_path or find_installed_config(host)
    if source is not None:
        try:
            base = host.read_text(source)
        except OSError as e:
            raise ProvisionError(f"cannot read the Kata configuration {source} on {host.name}: {e.strerror}",
                                 hint="check that Kata is installed completely") from None
    else:
        bundled = True
        source = BUNDLED_CONFIG
        with open(BUNDLED_CONFIG) as f:
            base = f.read()
    text = derive_config(base, settings, source=source)
    host.run(["mkdir", "-p", os.path.dirname(dest)], check=True, timeout=15, what=f"creating {os.path.dirname(dest)}")
    host.write_atomic(dest, text, mode=0o644)
    notes = ["no Kata configuration installed: derived from the bundled Kata 1.x sample"] if bundled else []
    return WrittenConfig(path=dest, source=source, text=text, bundled=bundled, notes=notes)
