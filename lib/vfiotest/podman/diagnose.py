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
# kernel lines worth showing after a VM ended: memory, KVM/VFIO, a dead process, and a kernel
# warning's or oops's own lines (what warned, where: "WARNING: CPU: 0 PID: 889 at <file>", "RIP:",
# "BUG: soft lockup ...", "Modules linked in")
_KERNEL = re.compile(r"oom|out of memory|killed process|kvm|vfio|dmar|segfault|hung task|blocked for more"
                     r"|warning: cpu|bug:|oops|rip: |general protection|soft lockup|rcu.*stall|modules linked in",
                     re.IGNORECASE)
KERNEL_LINES = 20


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


def kernel_lines(dmesg: str, lines: int = KERNEL_LINES) -> str:
    """The last `lines` lines of `dmesg` text about memory, KVM, VFIO, killed processes, or a
    kernel warning, oops or lockup."""
    return "\n".join([ln for ln in dmesg.splitlines() if _KERNEL.search(ln)][-lines:])


def kernel_log(host: Host, lines: int = KERNEL_LINES) -> str:
    """kernel_lines of the target's kernel log (its last 5000 lines; empty when it cannot be read)."""
    res = host.run("dmesg 2>/dev/null | tail -n 5000", timeout=30)
    return kernel_lines(res.stdout, lines).strip() if res.ok else ""


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
        parts.append(f"\n--- the target's kernel log (OOM, KVM, VFIO, warning and oops lines, last {KERNEL_LINES})\n{kern}")
    return "".join(parts)


#: what a stuck Kata guest is asked over its debug console: its memory, its processes' states
#: (the guest image has cat, dmesg and dash, no ps: /proc/<pid>/stat is "pid (comm) state ...")
GUEST_VIEW_CMD = "echo =meminfo; cat /proc/meminfo; echo =stat; cat /proc/[0-9]*/stat; echo =dmesg; dmesg"
_STAT = re.compile(r"^(\d+) \((.*)\) (\S) (\d+)")


def summarize_guest_view(text: str, dmesg_lines: int = 20) -> str:
    """GUEST_VIEW_CMD's output made short: MemTotal/MemFree/MemAvailable, each process as
    `pid comm state` (kernel threads, kthreadd's children, left out), the kernel's last
    `dmesg_lines` lines."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.replace("\r", "").splitlines():
        if line in ("=meminfo", "=stat", "=dmesg"):
            current = line[1:]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    mem = [ln.split(":", 1) for ln in sections.get("meminfo", [])]
    memory = ", ".join(f"{k} {' '.join(v.split())}" for k, v in mem if k in ("MemTotal", "MemFree", "MemAvailable"))
    found = []
    for ln in sections.get("stat", []):
        m = _STAT.match(ln)
        if m and m.group(1) != "2" and m.group(4) != "2":
            found.append((int(m.group(1)), f"{m.group(1)} {m.group(2)} {m.group(3)}"))
    procs = [text for _, text in sorted(found)]
    out = [f"memory: {memory or '?'}", "processes (pid comm state): " + ("; ".join(procs) or "?")]
    out += ["kernel (last lines):"] + sections.get("dmesg", [])[-dmesg_lines:]
    return "\n".join(out)


def guest_view(host: Host, container_id: str, timeout: float = 30.0) -> str:
    """What the Kata guest of `container_id` says of itself over its debug console (see
    summarize_guest_view), or "" when the container has no Kata console on `host`.
    Raises HarnessError when the console is there but does not answer."""
    from ..kata.console import KataConsole, console_socket_path

    if not _ID.match(container_id):
        raise ValueError(f"not a container id: {container_id!r}")
    path = console_socket_path(container_id)
    if not host.exists(path):
        return ""
    _, out = KataConsole(host, container_id, timeout=timeout).run(GUEST_VIEW_CMD)
    return summarize_guest_view(out)
