"""paramiko's own SSH server on 127.0.0.1, in the test process: the base of the unit tests that
need a real SSH peer (tests/unit/test_ssh_login_retry.py, test_podman_forward.py)."""

from __future__ import annotations

import socket
import threading

import paramiko


def key_pair() -> tuple[paramiko.PKey, paramiko.PKey]:
    """(host key, client key)."""
    return paramiko.RSAKey.generate(2048), paramiko.RSAKey.generate(2048)


class InProcessSshd:
    """Accepts on 127.0.0.1 (`port`); each connection is given to `handle()`, which by default
    serves SSH with `host_key` and the ServerInterface of `interface()`."""

    def __init__(self, host_key: paramiko.PKey) -> None:
        self.host_key = host_key
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.transports: list[paramiko.Transport] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def interface(self) -> paramiko.ServerInterface:
        raise NotImplementedError

    def handle(self, conn: socket.socket) -> None:
        t = paramiko.Transport(conn)
        t.add_server_key(self.host_key)
        t.start_server(server=self.interface())
        self.transports.append(t)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.handle(conn)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self.transports:
            t.close()
