"""One podman API service per OCI runtime on the target, and the way to reach its socket.

podman 4.x ignores the runtime asked for over the API (../shared/notes/facts.md §4), so each
runtime gets its own `podman --runtime NAME system service --time=0 unix://SOCK`,
started detached on the target (pid file, log file) and stopped by pid.

Reaching the socket:
- local target: the socket path itself.
- SSH target: a private unix socket on the controller (in a 0700 directory),
  each connection to it carried over the target's existing paramiko connection
  by a session channel that runs a small python3 relay to the remote socket.
  Chosen over podman-py's `ssh://` transport because that one starts the system
  ssh binary with `StrictHostKeyChecking no` (host keys must stay pinned), and
  over paramiko's missing streamlocal channel support. Cost: one channel (one
  exec, ~0.1-0.3 s under TCG) per HTTP connection; requests keeps connections alive.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import shlex
import socket
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from ..constants import PODMAN_SOCKET_DIR
from ..errors import ProvisionError, TargetError
from ..host import wait_for

if TYPE_CHECKING:
    import paramiko

    from ..host import Host
    from ..sshhost import SshHost

log = logging.getLogger(__name__)

SOCKET_DIR = PODMAN_SOCKET_DIR

# Runs on the target: relay stdin/stdout <-> the unix socket argv[1].
RELAY_SCRIPT = r"""
import os, select, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
src = [0, s]
while True:
    r, _, _ = select.select(src, [], [])
    if 0 in r:
        d = os.read(0, 65536)
        if d:
            s.sendall(d)
        else:
            s.shutdown(socket.SHUT_WR)
            src = [s]
    if s in r:
        d = s.recv(65536)
        if not d:
            break
        while d:
            d = d[os.write(1, d):]
"""


class PodmanService:
    """`podman --runtime RUNTIME system service` on `host`, detached; `start()`, `stop()`, `.url`."""

    def __init__(self, host: Host, runtime: str, socket_dir: str = SOCKET_DIR, podman: str = "podman",
                 start_timeout: float = 60.0) -> None:
        self.host, self.runtime, self.podman = host, runtime, podman
        token = secrets.token_hex(4)
        base = f"{socket_dir}/{runtime}-{token}"
        self.socket_dir = socket_dir
        self.socket_path, self.pid_path, self.log_path = base + ".sock", base + ".pid", base + ".log"
        self.start_timeout = start_timeout
        self.pid: int | None = None
        self._forward: SocketForward | None = None

    # -- lifecycle on the target ------------------------------------------------
    def start(self) -> PodmanService:
        inner = (f"echo $$ > {shlex.quote(self.pid_path)}; exec {shlex.quote(self.podman)} "
                 f"--runtime {shlex.quote(self.runtime)} system service --time=0 "
                 f"{shlex.quote('unix://' + self.socket_path)}")
        sock, pidf = shlex.quote(self.socket_path), shlex.quote(self.pid_path)
        cmd = (f"mkdir -p -m 0700 {shlex.quote(self.socket_dir)} && rm -f {sock} && "
               f"(nohup setsid sh -c {shlex.quote(inner)} > {shlex.quote(self.log_path)} 2>&1 < /dev/null &) && "
               # wait for the socket in the same round trip, and no longer than the service lives
               # (an unknown runtime makes podman exit at once: say so now, not after the timeout)
               f"i=0; while [ ! -S {sock} ] && [ $i -lt {int(self.start_timeout * 10)} ]; do "
               f"if [ -s {pidf} ] && ! kill -0 \"$(cat {pidf})\" 2>/dev/null; then break; fi; "
               f"sleep 0.1; i=$((i+1)); done; "
               f"cat {shlex.quote(self.pid_path)}; [ -S {sock} ]")
        res = self.host.run(cmd, timeout=self.start_timeout + 15)
        pid = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        self.pid = int(pid) if pid.isdigit() else None
        if res.rc != 0:
            tail = self.log_tail()
            self.stop()
            raise ProvisionError(
                f"the podman API service for runtime {self.runtime!r} did not open {self.socket_path} on "
                f"{self.host.name} (it exited, or {self.start_timeout:.0f} s passed): {tail or res.stderr.strip()[-300:]}",
                hint=f"run `podman --runtime {self.runtime} system service --time=0 unix:///tmp/t.sock` on the target "
                     f"and read its error (is the runtime registered in containers.conf?)")
        log.info("podman service for %s on %s: pid %s, %s", self.runtime, self.host.name, self.pid, self.socket_path)
        return self

    def log_tail(self, lines: int = 20) -> str:
        res = self.host.run(["tail", "-n", str(lines), self.log_path], timeout=15)
        return res.stdout.strip() if res.ok else ""

    def alive(self) -> bool:
        return self.pid is not None and self._is_ours()

    def _is_ours(self) -> bool:
        # the pid must still be our service (pids are reused): its argv names our socket
        res = self.host.run(["cat", f"/proc/{self.pid}/cmdline"], timeout=15)
        return res.ok and self.socket_path in res.stdout.replace("\0", " ")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the service (TERM, then KILL), close the forward, remove socket/pid/log files."""
        if self._forward is not None:
            self._forward.close()
            self._forward = None
        if self.pid is not None:
            p = int(self.pid)
            cmd = (f"grep -qF {shlex.quote(self.socket_path)} /proc/{p}/cmdline 2>/dev/null || exit 0; "
                   f"kill -TERM {p}; i=0; while kill -0 {p} 2>/dev/null && [ $i -lt {int(timeout * 10)} ]; do "
                   f"sleep 0.1; i=$((i+1)); done; kill -0 {p} 2>/dev/null && kill -KILL {p}; exit 0")
            try:
                self.host.run(cmd, timeout=timeout + 15)
            except TargetError as e:
                log.warning("stopping podman service pid %s on %s: %s", p, self.host.name, e)
            self.pid = None
        try:
            self.host.run(["rm", "-f", self.socket_path, self.pid_path, self.log_path], timeout=15)
        except TargetError as e:
            log.warning("removing podman service files on %s: %s", self.host.name, e)

    # -- how the controller reaches the socket ------------------------------------
    @property
    def url(self) -> str:
        """A base_url for podman.PodmanClient on the controller."""
        if self.host.is_local:
            return "unix://" + self.socket_path
        if self._forward is None:
            self._forward = SocketForward(self.host, self.socket_path)  # type: ignore[arg-type]  # not local: an SshHost
        return "unix://" + self._forward.path

    def __enter__(self) -> PodmanService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PodmanService {self.runtime} on {self.host.name} pid={self.pid}>"


class SocketForward:
    """A local unix socket whose connections are relayed to `remote_path` on an SshHost
    through session channels of its paramiko connection (see the module docstring)."""

    def __init__(self, host: SshHost, remote_path: str, channel_timeout: float = 30.0) -> None:
        self.host, self.remote_path, self.channel_timeout = host, remote_path, channel_timeout
        self.dir = tempfile.mkdtemp(prefix="vfiotest-podman-")  # 0700: only we reach the API
        self.path = os.path.join(self.dir, "podman.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._closed = False
        self._conns: set[tuple[socket.socket, Any]] = set()
        self._lock = threading.Lock()
        self.channels_opened = 0
        #: why the last channel could not be opened (None: none failed)
        self.last_error: str | None = None
        threading.Thread(target=self._accept_loop, name="podman-forward", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), name="podman-forward-conn", daemon=True).start()

    def _open_channel(self) -> paramiko.Channel:
        transport = self.host.connect().get_transport()
        chan = transport.open_session(timeout=self.channel_timeout)
        chan.exec_command(f"exec python3 -c {shlex.quote(RELAY_SCRIPT)} {shlex.quote(self.remote_path)}")
        self.channels_opened += 1
        return chan

    def _relay(self, conn: socket.socket) -> None:
        try:
            chan = self._open_channel()
        except Exception as e:  # noqa: BLE001 - the HTTP client gets the reason as an API error
            reason = (f"the SSH link to {self.host.name} could not carry this API call: no channel to "
                      f"{self.remote_path} ({type(e).__name__}: {e or 'no reason given'}; waited up to "
                      f"{self.channel_timeout:.0f} s)")
            log.warning("%s", reason)
            self.last_error = reason
            _answer_502(conn, reason)
            return
        with self._lock:
            self._conns.add((conn, chan))
        try:
            local_open = True
            while not self._closed:
                watch = [chan, conn] if local_open else [chan]
                r, _, _ = select.select(watch, [], [], 1.0)
                if conn in r:
                    data = conn.recv(65536)
                    if data:
                        chan.sendall(data)
                    else:
                        chan.shutdown_write()
                        local_open = False
                if chan in r or chan.recv_ready():
                    while chan.recv_stderr_ready():
                        log.debug("relay stderr: %s", chan.recv_stderr(4096))
                    if chan.recv_ready():
                        conn.sendall(chan.recv(65536))
                    elif chan.eof_received or chan.exit_status_ready():
                        break
                if chan.closed:
                    break
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard((conn, chan))
            chan.close()
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        finally:
            with self._lock:
                conns = list(self._conns)
            for conn, chan in conns:
                chan.close()
                conn.close()
            try:
                os.unlink(self.path)
                os.rmdir(self.dir)
            except OSError:
                pass


def _answer_502(conn: socket.socket, reason: str) -> None:
    """Answer the HTTP request waiting on `conn` with 502 and a podman-style error body, so
    podman-py raises an APIError that says why (not a bare "GET operation failed")."""
    body = json.dumps({"cause": "no SSH channel to the podman API", "message": reason, "response": 502}).encode()
    head = (f"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        conn.settimeout(2.0)
        got = b""
        while b"\r\n\r\n" not in got and len(got) < 65536:   # the request's head, so the answer follows it
            d = conn.recv(65536)
            if not d:
                break
            got += d
        conn.sendall(head + body)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):        # the rest of the request, until the client closes: no reset
            pass
    except OSError:
        pass
    finally:
        conn.close()


def wait_for_ping(client: Any, timeout: float = 30.0, service: PodmanService | None = None) -> bool:
    """Poll the API until it answers `ping` (the socket can exist before it serves); the error
    gives the SSH link's last failure when `service` is reached through one."""
    last = None

    def ping() -> bool:
        nonlocal last
        try:
            return client.ping()
        except Exception as e:  # noqa: BLE001 - connection errors of several kinds until it is up
            last = e
            return False

    if wait_for(ping, timeout, 0.2, "the podman API to answer ping", fail=False):
        return True
    fw = service._forward if service is not None else None
    link = f"; {fw.last_error}" if fw is not None and fw.last_error else ""
    raise ProvisionError(f"the podman API did not answer ping within {timeout:.0f} s: {last}{link}",
                         hint="read the service log on the target (PodmanService.log_tail())")


# -- undo after a crash (vfiotest.journal kinds) ------------------------------------------
def service_entry(service: PodmanService) -> dict[str, Any]:
    """The journal entry of a service about to be started: enough to stop it after a crash."""
    return {"kind": "podman-service", "runtime": service.runtime, "socket": service.socket_path,
            "pid_path": service.pid_path, "log_path": service.log_path}


def undo_service(host: Host, entry: dict[str, Any]) -> None:
    """Stop the service a crashed harness left running (if its pid still names its socket)
    and remove its files. Nothing to do when it is gone."""
    sock, pidf, logf = entry["socket"], entry["pid_path"], entry.get("log_path") or ""
    for path in (sock, pidf, logf):
        if path and not path.startswith(SOCKET_DIR + "/"):
            raise TargetError(f"the podman-service entry names {path}, outside {SOCKET_DIR}; it is refused",
                              hint="the journal was edited by hand: remove that entry")
    cmd = (f"p=$(cat {shlex.quote(pidf)} 2>/dev/null); "
           f"if [ -n \"$p\" ] && grep -qF {shlex.quote(sock)} /proc/$p/cmdline 2>/dev/null; then "
           f"kill -TERM $p; i=0; while kill -0 $p 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
           f"kill -0 $p 2>/dev/null && kill -KILL $p; fi; rm -f {shlex.quote(sock)} {shlex.quote(pidf)}"
           + (f" {shlex.quote(logf)}" if logf else "") + "; exit 0")
    host.run(cmd, timeout=60, check=True, what=f"stopping the podman service of {sock}")
