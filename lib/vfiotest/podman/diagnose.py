"""What the target logged when a container did not start: the OCI runtime's own lines
about that container (Kata's kata-runtime logs to syslog: journald on a bare-metal
runner, busybox syslogd's ring, read with `logread`, in the emulated runner) and the
kernel's last lines (an OOM kill or a KVM error ends a Kata VM without a word from Kata).

podman's API answers a failed start with one line ("Failed to check if grpc server is
working: ... transport is closing"); these lines say what happened before it.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..host import Host

_ID = re.compile(r"^[0-9a-f]{12,64}$")
# kernel lines worth showing after a VM ended: memory, KVM/VFIO, a dead process
_KERNEL = r"oom|out of memory|killed process|kvm|vfio|dmar|segfault|hung task|blocked for more"


def runtime_log(host: Host, container_id: str, lines: int = 40) -> str:
    """The last `lines` syslog lines that name `container_id` (empty when there are none,
    or when the target keeps no syslog this user can read)."""
    if not _ID.match(container_id):
        raise ValueError(f"not a container id: {container_id!r}")
    q = shlex.quote(container_id)
    cmd = ("{ if logread >/dev/null 2>&1; then logread; "
           "elif [ -S /run/systemd/journal/socket ]; "
           "then journalctl -q --no-pager -o short-precise --since '-15min'; "
           "elif [ -r /var/log/syslog ]; then tail -n 20000 /var/log/syslog; fi; } 2>/dev/null "
           f"| grep -F -- {q} | tail -n {int(lines)} | cut -c1-400")
    res = host.run(cmd, timeout=30)
    return res.stdout.strip() if res.ok else ""


def kernel_log(host: Host, lines: int = 15) -> str:
    """The kernel's last `lines` lines about memory, KVM, VFIO or killed processes."""
    res = host.run(f"dmesg 2>/dev/null | grep -iE {shlex.quote(_KERNEL)} | tail -n {int(lines)}", timeout=30)
    return res.stdout.strip() if res.ok else ""


def start_failure_details(host: Host, container_id: str) -> str:
    """Text to append to a start failure: the runtime's lines, then the kernel's (each
    section only when it has lines)."""
    parts = []
    try:
        rt = runtime_log(host, container_id)
        kern = kernel_log(host)
    except Exception as e:  # noqa: BLE001 - the details must not hide the failure they explain
        return f"\n--- (the target's logs could not be read: {e})"
    if rt:
        parts.append(f"\n--- the runtime's log lines for {container_id[:12]} (syslog, last 40)\n{rt}")
    if kern:
        parts.append(f"\n--- the target's kernel log (OOM, KVM, VFIO lines, last 15)\n{kern}")
    return "".join(parts)
