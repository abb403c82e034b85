"""The emulated runner's boot configuration, as a bare-metal runner has it: GRUB defaults.

The runner's kernel command line is what the runner itself needs to boot (`RUNNER_ARGS`:
console, panic, the vfiotest.* parameters its init reads) followed by GRUB_CMDLINE_LINUX and
GRUB_CMDLINE_LINUX_DEFAULT of its `/etc/default/grub`. That file lives on the controller in
`<state>/etc-default/` (kept across runner reboots and `runner down`/`up`), shared into the
runner read-write over 9p and mounted over its `/etc/default`. It is read again at every
(re)boot: editing it and rebooting the runner changes `/proc/cmdline`, as on bare metal.

Pure functions only: no process is started here.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping

from ..errors import ProvisionError

#: what the runner's GRUB_CMDLINE_LINUX starts with (the arguments the seed asks for)
DEFAULT_KERNEL_ARGS = ("intel_iommu=on", "systemd.unified_cgroup_hierarchy=0")
GRUB_FILE = "grub"

_ARG_RE = re.compile(r"^[A-Za-z0-9_.-]+(=[A-Za-z0-9_.,:/-]+)?$")
_VAR_RE = re.compile(r"^\s*(GRUB_CMDLINE_LINUX(?:_DEFAULT)?)=(.*)$")

GRUB_TEMPLATE = """\
# GRUB defaults of the vfiotest emulated runner (docs/runner.md).
# Its kernel command line is the arguments the runner needs to boot (console, panic,
# vfiotest.*) followed by GRUB_CMDLINE_LINUX and GRUB_CMDLINE_LINUX_DEFAULT below.
# Kept across reboots; `vfiotest runner reboot` (or `reboot` in the runner) applies an edit.
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{args}"
"""


def arg_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def validate(args: Iterable[str], where: str = "the kernel arguments") -> list[str]:
    """`args` as a list; ProvisionError for anything that is not a plain name or name=value
    (it reaches QEMU's -append and the GRUB file), or that is one of the runner's own."""
    out = []
    for a in args:
        if not _ARG_RE.match(a):
            raise ProvisionError(f"refusing kernel argument {a!r} in {where}: only name or name=value "
                                 "of letters, digits and _ . , : / -",
                                 hint="use plain kernel arguments such as intel_iommu=on")
        if a.startswith("vfiotest.") or arg_name(a) in RUNNER_ARG_NAMES:
            raise ProvisionError(f"refusing kernel argument {a!r} in {where}: the runner sets {arg_name(a)} itself",
                                 hint="leave console, panic and vfiotest.* out of GRUB_CMDLINE_LINUX")
        out.append(a)
    return out


RUNNER_ARG_NAMES = frozenset({"console", "panic", "rdinit", "init", "root"})


#: GODEBUG for the Go programs run over SSH in a runner under TCG (podman, and what it starts):
#: Go's AVX and SHA-NI code paths off, which TCG emulates slowly. Measured 2026-12-07 in the
#: runner: `podman import` of the 87 MB image 63-71 s, 50-53 s with them off (docs/runner.md); the
#: podman_run suite's first setup 35-45 s shorter and no test slower (docs/measurements.md).
TCG_GODEBUG = "cpu.all=off"
#: what a GODEBUG value may hold where it reaches a kernel line or a shell
GODEBUG_VALUE = re.compile(r"[A-Za-z0-9_.,=]+")
#: the runner's GODEBUG instead of the default (TCG_GODEBUG under TCG, none under KVM); "none": none
GODEBUG_ENV = "VFIOTEST_RUNNER_GODEBUG"


def runner_godebug(accel: str, env: Mapping[str, str] | None = None) -> str | None:
    """GODEBUG for the runner's SSH sessions: GODEBUG_ENV when set ("none" or empty: none),
    else TCG_GODEBUG under TCG and none under KVM. ProvisionError names the setting when its
    value could not reach the kernel line safely."""
    env = os.environ if env is None else env
    raw = env.get(GODEBUG_ENV)
    if raw is None:
        return TCG_GODEBUG if accel == "tcg" else None
    value = raw.strip()
    if value in ("", "none"):
        return None
    if not GODEBUG_VALUE.fullmatch(value):
        raise ProvisionError(f"{GODEBUG_ENV}={raw!r} is not a GODEBUG value the runner can take",
                             hint=f"letters, digits and _ . , = only (e.g. {TCG_GODEBUG}), or none; unset it for the default")
    return value


def runner_args(state_dir: str, modules_dir: str, root_tag: str, godebug: str | None = None,
                image_store: str | None = None) -> list[str]:
    """What the runner itself needs on its command line to boot (not the boot configuration).
    `godebug`: GODEBUG for its SSH sessions (vfiotest.godebug=, read by its init), or None.
    `image_store`: where the init mounts the read-only disk holding the test image's store
    (podman.image.ensure_store; IMAGE_STORE_MOUNT) and which the runner's storage.conf
    (`<state_dir>/storage.conf`, storage_conf) names, or None."""
    args = ["console=ttyS0", "panic=-1", "loglevel=4", "random.trust_cpu=on",
            f"vfiotest.tag={root_tag}", f"vfiotest.state={state_dir}", f"vfiotest.modules={modules_dir}"]
    if godebug:
        if not GODEBUG_VALUE.fullmatch(godebug):
            raise ValueError(f"GODEBUG value {godebug!r}: letters, digits and _ . , = only")
        args.append(f"vfiotest.godebug={godebug}")
    if image_store:
        if not STORE_PATH.fullmatch(image_store):
            raise ValueError(f"image store path {image_store!r}: an absolute path of letters, digits and _ . - / only")
        args.append(f"vfiotest.images={image_store}")
    return args


#: where the runner mounts the test image's store (its disk)
IMAGE_STORE_MOUNT = "/var/lib/vfiotest-images"
#: what an image store's path may hold where it reaches the kernel line and the init's shell
STORE_PATH = re.compile(r"/[A-Za-z0-9_./-]+")
#: "0" (or false/no/off) boots the runner without the read-only image store
IMAGE_STORE_ENV = "VFIOTEST_RUNNER_IMAGE_STORE"
#: where podman looks for its storage configuration, on the controller and so in the runner
STORAGE_CONF_PATHS = ("/etc/containers/storage.conf", "/usr/share/containers/storage.conf")


def image_store_wanted(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(IMAGE_STORE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def storage_conf(store: str, existing: str | None = None) -> str:
    """The runner's /etc/containers/storage.conf: `existing` (the controller's, which the runner
    would otherwise read; comments kept) or podman's defaults, with `store` added to
    `additionalimagestores`. The driver is named ("overlay" unless one is set): containers/storage
    hands an additional store to the driver as `<driver>.imagestore=`, which needs the name."""
    import tomlkit

    doc = tomlkit.parse(existing) if existing else tomlkit.document()
    storage = doc.setdefault("storage", tomlkit.table())
    if not storage.get("driver"):
        storage["driver"] = "overlay"
    storage.setdefault("runroot", "/run/containers/storage")
    storage.setdefault("graphroot", "/var/lib/containers/storage")
    options = storage.setdefault("options", tomlkit.table())
    stores = options.setdefault("additionalimagestores", tomlkit.array())
    if store not in [str(x) for x in stores]:
        stores.append(store)
    return tomlkit.dumps(doc)


def default_grub(args: Iterable[str] = DEFAULT_KERNEL_ARGS) -> str:
    return GRUB_TEMPLATE.format(args=" ".join(validate(args)))


def _value(raw: str, path: str, var: str) -> list[str]:
    try:
        words = shlex.split(raw, comments=True)
    except ValueError as e:
        raise ProvisionError(f"{path}: {var} cannot be read as a shell value ({e})",
                             hint=f'write it as {var}="arg1 arg2"') from None
    if len(words) > 1:
        raise ProvisionError(f"{path}: {var} has words outside its quotes: {raw.strip()!r}",
                             hint=f'write it as {var}="arg1 arg2"')
    return words[0].split() if words else []


def grub_args(text: str, path: str = "/etc/default/grub") -> list[str]:
    """The kernel arguments GRUB would add from GRUB defaults: GRUB_CMDLINE_LINUX, then
    GRUB_CMDLINE_LINUX_DEFAULT (the last assignment of each wins, as in the shell)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _VAR_RE.match(line)
        if m:
            found[m.group(1)] = _value(m.group(2), path, m.group(1))
    args = found.get("GRUB_CMDLINE_LINUX", []) + found.get("GRUB_CMDLINE_LINUX_DEFAULT", [])
    return validate(args, where=path)


def set_grub_args(text: str, args: Iterable[str]) -> str:
    """GRUB defaults with GRUB_CMDLINE_LINUX set to `args` (everything else kept)."""
    args = validate(args)
    new = f'GRUB_CMDLINE_LINUX="{" ".join(args)}"'
    lines = text.splitlines(keepends=True)
    idx = [i for i, line in enumerate(lines) if re.match(r"^\s*GRUB_CMDLINE_LINUX=", line)]
    if not idx:
        return text + ("" if text.endswith("\n") or not text else "\n") + new + "\n"
    for i in idx[:-1]:
        lines[i] = ""
    lines[idx[-1]] = new + "\n"
    return "".join(lines)


def linux_args(text: str) -> list[str]:
    """GRUB_CMDLINE_LINUX alone (what `edit` changes)."""
    found: list[str] = []
    for line in text.splitlines():
        m = _VAR_RE.match(line)
        if m and m.group(1) == "GRUB_CMDLINE_LINUX":
            found = _value(m.group(2), "GRUB defaults", m.group(1))
    return validate(found)


def edit(text: str, without: Iterable[str] = (), with_: Iterable[str] = ()) -> str:
    """GRUB defaults with GRUB_CMDLINE_LINUX changed: each of `without` removed (an exact
    argument, or a bare name: every argument of that name), each of `with_` added, replacing
    any argument of the same name."""
    without, with_ = list(without), validate(with_)
    for w in without:
        if not _ARG_RE.match(w):
            raise ProvisionError(f"refusing kernel argument {w!r}: only name or name=value",
                                 hint="e.g. --without intel_iommu=on")
    args = linux_args(text)
    args = [a for a in args if a not in without and arg_name(a) not in {w for w in without if "=" not in w}]
    names = {arg_name(a) for a in with_}
    args = [a for a in args if arg_name(a) not in names] + with_
    return set_grub_args(text, args)


CGROUP_ARGS = {"v1": "systemd.unified_cgroup_hierarchy=0", "v2": "systemd.unified_cgroup_hierarchy=1"}


def append(base: Iterable[str], grub_text: str, path: str = "/etc/default/grub") -> str:
    """QEMU's -append: the runner's own arguments, then those of its GRUB defaults."""
    return " ".join([*base, *grub_args(grub_text, path)])


def last_reboot(console_text: str) -> str | None:
    """How the kernel whose console this is went down: "restart" (`reboot`), "power-off", "halt",
    or None (still running, killed, or it panicked): the last "reboot: ..." kernel line decides."""
    kind = None
    for line in console_text.splitlines():
        if "reboot: Restarting system" in line:
            kind = "restart"
        elif "reboot: Power down" in line:
            kind = "power-off"
        elif "reboot: System halted" in line:
            kind = "halt"
    return kind


__all__ = ["CGROUP_ARGS", "DEFAULT_KERNEL_ARGS", "GRUB_FILE", "append", "default_grub",
           "edit", "grub_args", "last_reboot", "linux_args", "runner_args", "set_grub_args", "validate",
           "IMAGE_STORE_ENV", "IMAGE_STORE_MOUNT", "STORAGE_CONF_PATHS", "image_store_wanted", "storage_conf"]
