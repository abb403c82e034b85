"""SshTransport.connect against a real SSH server (paramiko's, in this process) whose first
connections stall before the banner, as a busy or throttling sshd does: the login is tried
again and succeeds; a server that never answers is reported with the attempts made; a wrong
key and a refused login are not retried."""

from __future__ import annotations

import socket
import threading
import time

import paramiko
import pytest
from inprocess_sshd import InProcessSshd, key_pair

from vfiotest.errors import TargetError
from vfiotest.sshhost import SshTransport


class _Server(paramiko.ServerInterface):
    def __init__(self, allowed: paramiko.PKey) -> None:
        self.allowed = allowed

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "root" and key.get_base64() == self.allowed.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED


class StallingSshd(InProcessSshd):
    """The first `stall` connections get no banner (held open, then closed), the rest a real SSH
    server that takes `client_key`."""

    def __init__(self, host_key: paramiko.PKey, client_key: paramiko.PKey, stall: int) -> None:
        self.client_key, self.stall = client_key, stall
        super().__init__(host_key)

    def interface(self) -> paramiko.ServerInterface:
        return _Server(self.client_key)

    def handle(self, conn: socket.socket) -> None:
        if self.accepted <= self.stall:
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()
        else:
            super().handle(conn)

    def _hold(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            conn.recv(1024)        # the client's banner; ours never comes
            conn.recv(1024)        # until the client gives up and closes
        except OSError:
            pass
        conn.close()


@pytest.fixture(scope="module")
def keys():
    return key_pair()


def _transport(tmp_path, keys, port: int, login_retry: float, pinned=None) -> SshTransport:
    host_key, client_key = keys
    kh = tmp_path / "known_hosts"
    pin = pinned or host_key
    kh.write_text(f"[127.0.0.1]:{port} {pin.get_name()} {pin.get_base64()}\n")
    key_file = tmp_path / "id_rsa"
    client_key.write_private_key_file(str(key_file))
    return SshTransport("127.0.0.1", port, "root", key_filename=str(key_file), known_hosts=str(kh),
                        connect_timeout=1.0, name="stalling", login_retry=login_retry)


def test_login_is_tried_again_after_a_stalled_banner(tmp_path, keys, monkeypatch):
    monkeypatch.setattr("vfiotest.sshhost.LOGIN_PAUSE", 0.2)
    srv = StallingSshd(*keys, stall=2)
    t = _transport(tmp_path, keys, srv.port, login_retry=20)
    try:
        client = t.connect()
        assert client.get_transport().is_active()
        assert client.get_transport().is_authenticated()
        assert srv.accepted == 3          # two stalled, the third logged in
    finally:
        t.close()
        srv.close()


def test_a_server_that_never_answers_is_reported_with_the_attempts(tmp_path, keys, monkeypatch):
    monkeypatch.setattr("vfiotest.sshhost.LOGIN_PAUSE", 0.2)
    srv = StallingSshd(*keys, stall=1000)
    t = _transport(tmp_path, keys, srv.port, login_retry=3)
    t0 = time.monotonic()
    try:
        with pytest.raises(TargetError) as e:
            t.connect()
    finally:
        srv.close()
    took = time.monotonic() - t0
    assert "cannot log in to stalling" in str(e.value)
    assert "attempt(s)" in str(e.value) and srv.accepted >= 2
    assert "banner" in str(e.value).lower()
    assert took < 3 + 1 + 5          # the retry budget, one more attempt, slack


def test_a_key_that_differs_is_not_tried_again(tmp_path, keys):
    srv = StallingSshd(*keys, stall=0)
    other = paramiko.RSAKey.generate(1024)
    t = _transport(tmp_path, keys, srv.port, login_retry=20, pinned=other)
    try:
        with pytest.raises(TargetError, match="differs from the one pinned"):
            t.connect()
    finally:
        srv.close()
    assert srv.accepted == 1


def test_a_refused_login_is_not_tried_again(tmp_path, keys):
    host_key, _ = keys
    srv = StallingSshd(host_key, paramiko.RSAKey.generate(1024), stall=0)   # takes another key
    t = _transport(tmp_path, keys, srv.port, login_retry=20)
    try:
        with pytest.raises(TargetError, match="cannot log in to stalling") as e:
            t.connect()
    finally:
        srv.close()
    assert srv.accepted == 1
    assert "attempt" not in str(e.value)


def test_no_paramiko_traceback_on_stderr_when_nothing_is_configured(tmp_path, keys):
    """The CLI configures no logging: a failed login is our one error, not paramiko's traceback too."""
    import subprocess
    import sys

    srv = StallingSshd(*keys, stall=1000)
    t = _transport(tmp_path, keys, srv.port, login_retry=0)
    script = (
        "import sys; from vfiotest.sshhost import SshTransport\n"
        f"t = SshTransport('127.0.0.1', {srv.port}, 'root', key_filename={t.key_filename!r}, "
        f"known_hosts={t.known_hosts!r}, connect_timeout=1.0, name='stalling', login_retry=0)\n"
        "try:\n    t.connect()\nexcept Exception as e:\n    print('ERROR', e, file=sys.stderr)\n"
    )
    try:
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert "ERROR cannot log in to stalling: no SSH banner within 1 s" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr
