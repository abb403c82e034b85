"""Reading a real Kata 1.x guest over its debug console.

With `agent.debug_console` on the guest kernel command line (the harness's
configuration.toml sets it for Kata 1.x, vfiotest.kata.config), the Kata 1.x
agent starts a shell on the guest console, and QEMU serves that console on the
host as a unix socket: `/run/vc/vm/<sandbox-id>/console.sock` (Kata 1.x
Developer Guide, "Connect to the virtual machine using the debug console":
`socat "stdin,raw,echo=0,escape=0x11" "unix-connect:/var/run/vc/vm/${id}/console.sock"`;
the runtime's qemu.go names the socket `console.sock`). Under podman each
container is its own sandbox, so the sandbox id is the container's full id.

`KataConsole.run(cmd)` connects to that socket ON THE TARGET (a small python3
script run with `host.python`, so an SshHost works the same as a LocalHost),
types one line:

    <newline> printf '%s-%s\\n' BEGIN <nonce>; ( <cmd>
    ) </dev/null; printf '%s-%s %s\\n' END <nonce> "$?"

and reads until `END-<nonce> <rc>` or the deadline. The markers are printed
with printf from separate words, so the console's echo of the typed line (a
tty echoes) never holds `BEGIN-<nonce>` or `END-<nonce>`; `\\r` from the tty
is dropped. The command reaches the script on stdin, never through a shell on
the host; inside the guest it is typed into the console's shell as it is.
"""

from __future__ import annotations

import json
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..constants import VFIO_ANNOTATION as HOOK_ANNOTATION
from ..errors import CommandTimeout, TargetError
from ..host import wait_for
from ..pci import Inventory, PciAddress, PciDevice
from .hook import DEFAULT_LOG as HOOK_LOG

if TYPE_CHECKING:
    from ..host import Host

VC_VM_DIR = "/run/vc/vm"
CONSOLE_SOCKET = "console.sock"
DEFAULT_TIMEOUT = 30.0
MAX_LINE = 3000        # a tty's canonical line is at most 4095 bytes, the wrapper included


def console_socket_path(sandbox_id: str) -> str:
    """Where Kata 1.x's QEMU serves the guest console of `sandbox_id` on the host."""
    return f"{VC_VM_DIR}/{sandbox_id}/{CONSOLE_SOCKET}"


def wrap(cmd: str, nonce: str) -> str:
    """The line typed into the console's shell for `cmd` (see the module doc)."""
    return (f"\nprintf '%s-%s\\n' BEGIN {nonce}; ( {cmd}\n) </dev/null; "
            f"printf '%s-%s %s\\n' END {nonce} \"$?\"\n")


# A line the agent logged (logrus text format) on the console it shares with the debug shell:
# kata-agent runs with its stdout on the console, so its lines can land between a command's
# markers (seen in CI: `Waiting for stopServer signal...` inside `cat /proc/1/comm`).
AGENT_LOG_LINE = re.compile(r'^time="[^"]*" level=\w+ .*\bname=kata-agent\b.*\n?', re.M)


def parse_transcript(text: str, nonce: str) -> tuple[int | None, str | None]:
    """(rc, output) from what the console said, or (None, partial output) when the end
    marker is not there (yet). None for both when the begin marker is missing. The agent's
    own log lines are not the command's output and are left out."""
    text = AGENT_LOG_LINE.sub("", text.replace("\r", ""))
    begin = f"BEGIN-{nonce}\n"
    i = text.find(begin)
    if i < 0:
        return None, None
    rest = text[i + len(begin):]
    m = re.search(rf"END-{re.escape(nonce)} (\d+)\n", rest)
    if m is None:
        return None, rest
    return int(m.group(1)), rest[:m.start()]


# Runs on the target: argv [socket, nonce, timeout], the typed line on stdin; prints one JSON line.
CONSOLE_SCRIPT = r"""
import json, re, select, socket, sys, time
path, nonce, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
line = sys.stdin.buffer.read()
end = re.compile(("END-" + nonce + r" (\d+)\r?\n").encode())
deadline = time.monotonic() + timeout
buf = b""
def done(status, **kw):
    print(json.dumps(dict(status=status, text=buf.decode("utf-8", "replace"), **kw)))
    sys.exit(0)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(max(0.1, min(10.0, timeout)))
try:
    s.connect(path)
    s.sendall(line)
except OSError as e:
    done("connect", errno=e.errno, error=str(e))
s.setblocking(False)
status = "timeout"
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    r, _, _ = select.select([s], [], [], left)
    if not r:
        continue
    try:
        chunk = s.recv(65536)
    except BlockingIOError:
        continue
    except OSError as e:
        status = "closed"
        break
    if not chunk:
        status = "closed"
        break
    buf += chunk
    if end.search(buf):
        status = "ok"
        break
if status != "ok":
    try:
        s.setblocking(True)
        s.settimeout(1.0)
        s.sendall(b"\x03")   # a tty's shell interrupts the command; best effort
    except OSError:
        pass
s.close()
done(status)
"""


class KataConsole:
    """The debug console of the Kata 1.x sandbox `sandbox_id` on `host`."""

    def __init__(self, host: Host, sandbox_id: str, socket_path: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host, self.sandbox_id = host, sandbox_id
        self.path = socket_path or console_socket_path(sandbox_id)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"KataConsole({self.host.name}:{self.path})"

    def run(self, cmd: str, timeout: float | None = None) -> tuple[int, str]:
        """(exit code, output) of `cmd` (shell text) run by the guest's console shell.
        Raises CommandTimeout when it does not end in time, TargetError when the console
        cannot be reached or closes."""
        if len(cmd) > MAX_LINE:
            raise ValueError(f"command of {len(cmd)} characters is longer than a console line allows ({MAX_LINE})")
        timeout = self.timeout if timeout is None else timeout
        nonce = secrets.token_hex(8)
        res = self.host.python(CONSOLE_SCRIPT, [self.path, nonce, timeout], input=wrap(cmd, nonce).encode(),
                               timeout=timeout + 30, what=f"console command on {self.path}")
        try:
            reply = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TargetError(f"the console script on {self.host.name} gave no answer (exit {res.rc}): "
                              f"{res.stderr.strip()[-300:]}", hint="check that python3 is installed on the target") from None
        where = f"the Kata guest console {self.path} on {self.host.name}"
        if reply["status"] == "connect":
            raise TargetError(f"cannot connect to {where}: {reply['error']}",
                              hint="is the sandbox running (`podman ps`), and does the kata-vfio configuration.toml "
                                   "have agent.debug_console in kernel_params (`vfiotest kata config`)?")
        rc, out = parse_transcript(reply["text"], nonce)
        if rc is not None:
            return rc, out or ""
        said = reply["text"].replace("\r", "")[-500:]
        if reply["status"] == "closed":
            raise TargetError(f"{where} closed before `{cmd[:80]}` ended; it said: {said!r}",
                              hint="the sandbox may have stopped; look at the Kata runtime's log (journalctl -t kata)")
        if out is None:
            raise CommandTimeout(
                f"no answer from the shell on {where} in {timeout:.0f} s for `{cmd[:80]}` (it said: {said!r})",
                hint="the debug console shell may not be up yet, or another client (a console watcher of the "
                     "Kata proxy/runtime with debug on) holds the socket: QEMU serves one client at a time")
        raise CommandTimeout(f"`{cmd[:80]}` did not end in {timeout:.0f} s on {where}; output so far: {out[-300:]!r}",
                             hint="the command hangs in the guest; Ctrl-C was sent to the console")

    def check(self, cmd: str, timeout: float | None = None) -> str:
        """Output of `cmd`; TargetError when it exits non-zero."""
        rc, out = self.run(cmd, timeout)
        if rc != 0:
            raise TargetError(f"`{cmd[:80]}` exited {rc} in the Kata guest ({self.path}): {out.strip()[-300:]}",
                              hint="run it by hand: socat - unix-connect:" + self.path)
        return out

    def wait_ready(self, timeout: float = 120.0, interval: float = 2.0) -> None:
        """Wait until the console's shell answers (the agent starts it after boot)."""
        deadline = time.monotonic() + timeout
        last: TargetError | None = None

        def answers() -> bool:
            nonlocal last
            try:
                rc, out = self.run("true", timeout=min(10.0, max(1.0, deadline - time.monotonic())))
            except TargetError as e:      # CommandTimeout included
                last = e
                return False
            if rc != 0:
                last = TargetError(f"`true` exited {rc}: {out.strip()[-200:]}",
                                   hint="run it by hand: socat - unix-connect:" + self.path)
            return rc == 0

        if not wait_for(answers, timeout, interval, f"the Kata guest console {self.path}", fail=False):
            why = f": {last.message}" if last else ""
            raise CommandTimeout(f"the Kata guest console {self.path} did not answer in {timeout:.0f} s{why}",
                                 hint=last.hint if last else "look at the Kata VM's console log")

    def hook_log(self, path: str = HOOK_LOG) -> list[dict[str, Any]]:
        """The guest hook's JSON-lines log, parsed ([] when the file is not there)."""
        q = shlex.quote(path)
        rc, out = self.run(f"if [ -e {q} ]; then cat {q}; else echo NO-HOOK-LOG; fi")
        if rc != 0:
            raise TargetError(f"reading {path} in the Kata guest failed (exit {rc}): {out[-300:]}",
                              hint="is the guest's /tmp readable? run `cat` by hand on the console")
        if out.strip() == "NO-HOOK-LOG":
            return []
        entries = []
        for n, line in enumerate(out.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError:
                raise TargetError(f"line {n} of {path} in the Kata guest is not JSON: {line[:200]!r}",
                                  hint="kernel messages may have cut into the console output: keep `quiet` "
                                       "in kernel_params") from None
        return entries

    def dev_vfio(self) -> dict[str, str]:
        """{name: "char" | "other"} of /dev/vfio in the guest ({} when it is not there)."""
        out = self.check('for f in /dev/vfio/*; do [ -e "$f" ] || continue; '
                         'if [ -c "$f" ]; then echo "VFIO char ${f##*/}"; else echo "VFIO other ${f##*/}"; fi; done')
        res = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "VFIO":
                res[parts[2]] = parts[1]
        return res

    def pci_state(self) -> dict[str, dict[str, str | None]]:
        """{address: {vendor, device, class, driver, driver_override, iommu_group}} of the guest
        (sysfs values as read: "0x8086"; None for an empty one)."""
        out = self.check('for d in /sys/bus/pci/devices/*; do [ -e "$d" ] || continue; '
                         'drv=$(readlink "$d/driver" 2>/dev/null); grp=$(readlink "$d/iommu_group" 2>/dev/null); '
                         'echo "PCI|${d##*/}|$(cat "$d/vendor")|$(cat "$d/device")|$(cat "$d/class")|${drv##*/}|'
                         '$(cat "$d/driver_override" 2>/dev/null)|${grp##*/}"; done')
        res: dict[Any, dict[str, str | None]] = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 8 and parts[0] == "PCI":
                _, addr, vendor, device, cls, driver, override, group = (p or None for p in parts)
                res[addr] = {"vendor": vendor, "device": device, "class": cls, "driver": driver,
                             "driver_override": override, "iommu_group": group}
        return res


# The extra hook runs made by hand in a real Kata guest, after the agent's own run:
# "again" (same annotation: the device is already bound), "none" (empty annotation),
# "malformed" (a state cut short); each run's container id is vfiotest-<kind>-<n>.
EXTRA_RUNS = ("again", "none", "malformed")
MALFORMED_STATE = '{"ociVersion": "1.0.2", "id": '
KATA_BUNDLE_DIR = "/run/kata-containers/shared/containers"


def oci_state(container_id: str, annotation: str) -> dict[str, Any]:
    """The OCI state a Kata 1.x agent gives a prestart hook (see the hook's module doc)."""
    return {"ociVersion": "1.0.2", "id": container_id, "pid": 1, "status": "creating",
            "bundle": f"{KATA_BUNDLE_DIR}/{container_id}",
            "annotations": {HOOK_ANNOTATION: annotation}}


def run_hook(console: KataConsole, hook: str, stage: str, stdin_text: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run the guest hook `hook` by hand in the guest, as the agent does (argv [basename, stage],
    the state on stdin): {"argv", "rc", "seconds", "stderr"}."""
    t0 = time.monotonic()
    rc, out = console.run(f"cd {shlex.quote(posixpath.dirname(hook))} && printf %s {shlex.quote(stdin_text)} | "
                          f"./{shlex.quote(posixpath.basename(hook))} {shlex.quote(stage)} 2>&1 >/dev/null",
                          timeout=timeout)
    return {"hook": hook, "argv": [posixpath.basename(hook), stage], "rc": rc,
            "seconds": round(time.monotonic() - t0, 3), "stderr": out}


@dataclass
class GuestReport:
    """A Kata guest read over its debug console: the hook's log from the guest's /tmp (what
    the agent's run and the runs by hand recorded), /dev/vfio and the PCI state after the hook,
    and the runs made by hand ("again", "none", "malformed"). There is no state "before": the
    agent ran the hook before the console could be read."""

    data: dict[str, Any]
    #: seconds the reading took (the VM's boot is Kata's)
    read_seconds: float = 0.0
    #: the container id the agent ran the hook for (set by the guest, vfiotest.kata.guests)
    main_container: Optional[str] = None

    @classmethod
    def read(cls, console: KataConsole, container_id: str, annotation: str, hook: str, hook_log_path: str = HOOK_LOG,
             extra_runs: Sequence[str] = EXTRA_RUNS) -> GuestReport:
        """Read the guest of `container_id` over `console`, running the hook at `hook` (its
        path in the guest) by hand once per `extra_runs` with `annotation` as the agent would."""
        t0 = time.monotonic()
        data: dict[str, Any] = {"container": container_id, "vfio_after": console.dev_vfio(),
                                "pci_after": console.pci_state(), "runs": []}
        for i, kind in enumerate(extra_runs, 1):
            cid = f"vfiotest-{kind}-{i}"
            stdin = MALFORMED_STATE if kind == "malformed" else json.dumps(
                oci_state(cid, "" if kind == "none" else annotation))
            res = run_hook(console, hook, "prestart", stdin)
            data["runs"].append({"kind": kind, "container": cid, "results": [res], "vfio_after": console.dev_vfio()})
        data["hook_log"] = "\n".join(json.dumps(e) for e in console.hook_log(hook_log_path))
        return cls(data=data, read_seconds=round(time.monotonic() - t0, 2), main_container=container_id)

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data.get("runs", [])

    def run(self, kind: str) -> dict[str, Any]:
        """The run made by hand of that kind ("again", "none", "malformed")."""
        return next(r for r in self.runs if r["kind"] == kind)

    @property
    def hook_log(self) -> list[dict[str, Any]]:
        """The hook's log lines from the guest's /tmp, parsed."""
        return [json.loads(line) for line in (self.data.get("hook_log") or "").splitlines() if line.strip()]

    def log_for(self, container: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """The hook log's entries for that container and action (None: any)."""
        return [e for e in self.hook_log if (container is None or e.get("container") == container)
                and (action is None or e.get("action") == action)]

    @property
    def dev_vfio(self) -> dict[str, str]:
        """/dev/vfio in the guest after the agent's run of the hook: {name: "char" | "other"}."""
        return self.data.get("vfio_after", {})

    @property
    def pci_after(self) -> dict[str, dict[str, Any]]:
        return self.data.get("pci_after", {})

    def inventory(self) -> Inventory:
        """The guest's PCI state and /dev/vfio after the hook as the harness's one device model
        (vfiotest.pci.Inventory). Group numbers are the guest's own."""
        devices: dict[str, PciDevice] = {}
        groups: dict[str, list[str]] = {}
        for a, s in sorted(self.pci_after.items()):
            addr = PciAddress(a)
            g = s.get("iommu_group")
            devices[addr] = PciDevice(address=addr, vendor=s.get("vendor") or "", device=s.get("device") or "",
                                      pci_class=s.get("class") or "", driver=s.get("driver"),
                                      driver_override=s.get("driver_override"), iommu_group=g)
            if g:
                groups.setdefault(g, []).append(addr)
        return Inventory(devices, groups, dict(self.dev_vfio), drivers=[], protected={},
                         identity={"hostname": "guest"})
