"""Adding kernel arguments on a bare-metal runner (--allow-reboot): grubby, else GRUB defaults.

Only for ssh:// targets: the harness must survive the reboot to wait for the host.
The arguments stay after the session (taking them out needs another reboot); the
session log prints the command that removes them.
"""

import re
import shlex
import time

from .errors import ProvisionError, TargetError

_ARG_RE = re.compile(r"^[A-Za-z0-9_.-]+(=[A-Za-z0-9_.,:-]+)?$")


def validate_args(args):
    for a in args:
        if not _ARG_RE.match(a):
            raise ProvisionError(f"refusing kernel argument {a!r}: only name or name=value of [A-Za-z0-9_.,:-]",
                                 hint="pass plain kernel arguments such as intel_iommu=on")
    return list(args)


def add_to_grub_default(text, args):
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


def apply(host, args, progress=print):
    """Add `args` for every installed kernel; returns the command that takes them out again."""
    validate_args(args)
    joined = " ".join(args)
    if host.run(["sh", "-c", "command -v grubby"]).ok:
        progress(f"adding kernel arguments with grubby: {joined}")
        host.run(["grubby", "--update-kernel=ALL", f"--args={joined}"], timeout=120, check=True)
        return f"grubby --update-kernel=ALL --remove-args={shlex.quote(joined)}"
    if host.exists("/etc/default/grub"):
        progress(f"adding kernel arguments to GRUB_CMDLINE_LINUX in /etc/default/grub: {joined}")
        before = host.read_text("/etc/default/grub")
        host.write_atomic("/etc/default/grub.vfiotest-orig", before, mode=0o644)
        host.write_atomic("/etc/default/grub", add_to_grub_default(before, args), mode=0o644)
        for cmd in (["update-grub"], ["grub2-mkconfig", "-o", "/boot/grub2/grub.cfg"], ["grub-mkconfig", "-o", "/boot/grub/grub.cfg"]):
            if host.run(["sh", "-c", f"command -v {cmd[0]}"]).ok:
                host.run(cmd, timeout=300, check=True)
                return "mv /etc/default/grub.vfiotest-orig /etc/default/grub && " + shlex.join(cmd)
        raise ProvisionError("no update-grub or grub2-mkconfig on the target to regenerate the GRUB config",
                             hint="regenerate it by hand, then reboot")
    raise ProvisionError("the target has neither grubby nor /etc/default/grub",
                         hint=f"add {joined} to the kernel command line with your boot loader's tool and reboot")


def reboot_and_wait(host, timeout=900, progress=print):
    """Reboot an SSH target and wait until it is back with a new boot id."""
    if host.is_local:
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
