"""Adding kernel arguments (--allow-reboot): grubby, else GRUB defaults + update-grub; on the
emulated runner its /etc/default/grub alone (vfiotest.runner.bootcfg).

For ssh:// targets and the emulated runner (`virtual`): the harness must survive the reboot
to wait for the host. Every file is recorded in the session (the `file` journal kind) before
it changes, on the controller (the target's /var may not survive the reboot: the emulated
runner's is tmpfs), so the session's end, or `vfiotest restore` after a crash, puts the boot
configuration back. The running kernel keeps the arguments until the target's next reboot.
"""

import re
import shlex
import time
from collections.abc import Callable, Iterable

from .errors import ProvisionError, TargetError
from .host import Host
from .undo_files import Records

_ARG_RE = re.compile(r"^[A-Za-z0-9_.-]+(=[A-Za-z0-9_.,:-]+)?$")


def validate_args(args: Iterable[str]) -> list[str]:
    for a in args:
        if not _ARG_RE.match(a):
            raise ProvisionError(f"refusing kernel argument {a!r}: only name or name=value of [A-Za-z0-9_.,:-]",
                                 hint="pass plain kernel arguments such as intel_iommu=on")
    return list(args)


def add_to_grub_default(text: str, args: Iterable[str]) -> str:
    """GRUB defaults (/etc/default/grub) with `args` added to GRUB_CMDLINE_LINUX; keeps everything else."""
    validate_args(args)
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = re.match(r'^(GRUB_CMDLINE_LINUX=)(["\']?)(.*?)\2\s*$', line)
        if m:
            words = m.group(3).split()
            names = {w.split("=", 1)[0] for w in args}
            words = [w for w in words if w.split("=", 1)[0] not in names] + list(args)
            lines[i] = f'{m.group(1)}"{" ".join(words)}"\n'
            return "".join(lines)
    return "".join(lines) + ("" if text.endswith("\n") or not text else "\n") + f'GRUB_CMDLINE_LINUX="{" ".join(args)}"\n'


GRUB_DEFAULTS = "/etc/default/grub"
GRUB_CONFIGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg")
BLS_DIR = "/boot/loader/entries"


def fix_command(args: Iterable[str], emulated: bool = False, grub_path: str = "<state>/runner/etc-default/grub") -> str:
    """What a user runs to add `args` by hand (the layer's skip and fail messages name it);
    `grub_path`: the emulated runner's GRUB defaults as this machine sees them."""
    joined = " ".join(validate_args(args))
    if emulated:
        return (f"add them to GRUB_CMDLINE_LINUX in the runner's /etc/default/grub ({grub_path} on this "
                "machine), then `vfiotest runner reboot`; or let pytest do it: --allow-reboot")
    return (f"on the runner: grubby --update-kernel=ALL --args={shlex.quote(joined)} (or add them to "
            "GRUB_CMDLINE_LINUX in /etc/default/grub and run update-grub), then reboot; "
            "or from a controller: pytest --target ssh://... --allow-reboot")


def _record(host: Host, recorder: Records, paths: Iterable[str], progress: Callable[[str], None]) -> None:
    """Record each existing file of `paths` (text, before any change) in `recorder`."""
    from .undo_files import record_file

    for p in paths:
        if host.exists(p):
            record_file(host, recorder, p)
            progress(f"recorded {p} before changing it (`vfiotest restore` puts it back after a crash)")


def apply(host: Host, args: Iterable[str], recorder: Records, emulated: bool = False,
          progress: Callable[[str], None] = print) -> str:
    """Add `args` to the boot configuration of `host` for every kernel, each file recorded in
    `recorder` (a session: Session.record, the `file` journal kind) before it changes. The
    emulated runner: its /etc/default/grub alone (the runner composes its command line from it
    at boot). Elsewhere grubby, else GRUB defaults + update-grub (or grub2-mkconfig).
    Returns what was done, one line."""
    validate_args(args)
    joined = " ".join(args)
    if emulated:
        _record(host, recorder, [GRUB_DEFAULTS], progress)
        before = host.read_text(GRUB_DEFAULTS) if host.exists(GRUB_DEFAULTS) else ""
        _write(host, GRUB_DEFAULTS, add_to_grub_default(before, args))
        return f"added {joined} to GRUB_CMDLINE_LINUX in the emulated runner's {GRUB_DEFAULTS}"
    if host.run(["sh", "-c", "command -v grubby"], timeout=30).ok:
        entries = host.run(["sh", "-c", 'for f in "$1"/*.conf; do [ -f "$f" ] && echo "$f"; done', "sh", BLS_DIR],
                           timeout=30).stdout.split()
        _record(host, recorder, [*entries, GRUB_DEFAULTS, "/etc/kernel/cmdline", *GRUB_CONFIGS], progress)
        progress(f"adding kernel arguments with grubby: {joined}")
        host.run(["grubby", "--update-kernel=ALL", f"--args={joined}"], timeout=120, check=True,
                 what="grubby --update-kernel=ALL --args")
        return f"added {joined} with grubby --update-kernel=ALL"
    if host.exists(GRUB_DEFAULTS):
        for cmd in (["update-grub"], ["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"],
                    ["grub-mkconfig", "-o", "/boot/grub/grub.cfg"]):
            if host.run(["sh", "-c", 'command -v "$1"', "sh", cmd[0]], timeout=30).ok:
                break
        else:
            raise ProvisionError(f"the target has {GRUB_DEFAULTS} but no update-grub or grub2-mkconfig to "
                                 "regenerate the GRUB configuration; nothing was changed",
                                 hint=f"add {joined} with your boot loader's tool and reboot")
        _record(host, recorder, [GRUB_DEFAULTS, *GRUB_CONFIGS], progress)
        progress(f"adding kernel arguments to GRUB_CMDLINE_LINUX in {GRUB_DEFAULTS}: {joined}")
        _write(host, GRUB_DEFAULTS, add_to_grub_default(host.read_text(GRUB_DEFAULTS), args))
        host.run(cmd, timeout=300, check=True, what=" ".join(cmd))
        return f"added {joined} to GRUB_CMDLINE_LINUX in {GRUB_DEFAULTS}, then {' '.join(cmd)}"
    raise ProvisionError("the target has neither grubby nor /etc/default/grub; nothing was changed",
                         hint=f"add {joined} to the kernel command line with your boot loader's tool and reboot")


def _write(host: Host, path: str, text: str) -> None:
    from .undo_files import _chmod

    host.write_atomic(path, text, mode=0o644)
    _chmod(host, path, 0o644)


def reboot_and_wait(host: Host, timeout: float = 900, progress: Callable[[str], None] = print) -> None:
    """Reboot an SSH target and wait until it is back with a new boot id."""
    from .sshhost import SshHost

    if host.is_local or not isinstance(host, SshHost):
        raise ProvisionError("cannot reboot the machine the harness runs on and wait for it",
                             hint="run the harness from another machine with --target ssh://..., or reboot by hand")
    old = host.read_text("/proc/sys/kernel/random/boot_id").strip()
    progress(f"rebooting {host.name}")
    host.run("nohup sh -c 'sleep 1; systemctl reboot || reboot' >/dev/null 2>&1 &", timeout=30)
    host.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(10)
        try:
            host.connect()
            if host.read_text("/proc/sys/kernel/random/boot_id").strip() != old:
                progress(f"{host.name} is back")
                return
        except (TargetError, OSError):
            host.close()
    raise TargetError(f"{host.name} did not come back within {timeout} s after the reboot",
                      hint="look at the runner's console (BMC/IPMI)")
