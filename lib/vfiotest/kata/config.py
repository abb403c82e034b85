"""configuration.toml for the kata-vfio runtime, derived from the installed Kata config.

`derive_config(base_text, settings)` edits Kata's own file with tomlkit, so
every comment and the layout of the original survive; only these change in
`[hypervisor.qemu]`: `machine_type = "q35"`, `kernel`/`initrd` (the guest
image just built; `image` is commented out, Kata refuses both), `kernel_params`
(merged: `systemd.unified_cgroup_hierarchy=0`, the debug console for 1.x),
`enable_iommu = true`, `guest_hook_path`, `enable_debug`; for Kata 2.x and
later the debug console is `[agent.kata] debug_console_enabled = true`.

The result is written to the harness's own path (`KATA_VFIO_CONFIG`); the
system's configuration is read, never written.
"""

import os
import shlex
from dataclasses import dataclass, field
from typing import Optional, Tuple

import tomlkit

from ..errors import ProvisionError

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
STATE_DIR = "/var/lib/vfiotest/kata"
KATA_VFIO_CONFIG = f"{STATE_DIR}/configuration.toml"
MARKER = "vfiotest: derived for the kata-vfio runtime"


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


def find_installed_config(host=None):
    """The path of the installed Kata configuration (on `host`, else here), or None."""
    for p in INSTALLED_CONFIGS:
        if (host.exists(p) if host is not None else os.path.exists(p)):
            return p
    return None


def merge_params(current, add):
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


def _set(table, key, value):
    """Set `key`, keeping the item's trailing comment when it already exists."""
    if key in table:
        item = table[key]
        comment = getattr(item.trivia, "comment", "") if hasattr(item, "trivia") else ""
        table[key] = value
        if comment:
            table[key].comment(comment.lstrip("# "))
    else:
        table.add(key, value)


def derive_config(base_text, settings, source="(text)"):
    """The kata-vfio configuration.toml as text, derived from `base_text` with comments kept."""
    # a file derived before: drop our header, derive again from the rest
    base_text = "".join(l for l in base_text.splitlines(True) if not l.startswith(f"# {MARKER} from "))
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
    _set(hv, "kernel_params", merge_params(str(hv.get("kernel_params", "")), params))
    _set(hv, "enable_iommu", bool(settings.enable_iommu))
    _set(hv, "guest_hook_path", settings.guest_hook_path)
    if settings.enable_debug:
        _set(hv, "enable_debug", True)
    if len(hv) > keys_before:
        hv.add(tomlkit.nl())  # keep the blank line before the next table
    if settings.debug_console and settings.kata_major >= 2:
        agent = doc.setdefault("agent", tomlkit.table(is_super_table=True))
        kata = agent.setdefault("kata", tomlkit.table())
        _set(kata, "debug_console_enabled", True)
    text = tomlkit.dumps(doc)
    header = f"# {MARKER} from {source}; regenerate with `vfiotest kata config`.\n"
    return header + text


def read_config(text):
    """The settings of a configuration.toml as plain data."""
    return tomlkit.parse(text).unwrap()


@dataclass
class WrittenConfig:
    path: str
    source: str
    text: str
    bundled: bool = False   # derived from the harness's bundled Kata 1.x sample (no Kata installed)
    notes: list = field(default_factory=list)


def write_kata_vfio_config(host, settings, base_path=None, dest=KATA_VFIO_CONFIG):
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
