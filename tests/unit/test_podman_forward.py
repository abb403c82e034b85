"""SocketForward (how the controller reaches a target's podman API socket over SSH) against a
real SSH server (paramiko's, in this process) that runs its exec requests with sh, and an HTTP
server on a unix socket in place of the podman service's socket.

- through the forward, podman-py gets the service's own answers (a 404 for a missing container);
- when the SSH link cannot open a channel (refused, or not answered in time: a cut link), the
  API call fails with an error that names the link, the target and the cause, not podman-py's
  bare "GET operation failed"."""

from __future__ import annotations

import http.server
import json
import os
import socketserver
import subprocess
import threading
import time

import paramiko
import pytest
from inprocess_sshd import InProcessSshd, key_pair

from vfiotest.podman.service import SocketForward
from vfiotest.sshhost import SshHost


class _ApiHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.endswith("/_ping"):
            status, body = 200, b"OK"
        else:
            status = 404
            body = json.dumps({"cause": "no such container", "response": 404,
                               "message": f"no container found at {self.path}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - podman-py's ping
        self.send_response(200 if self.path.endswith("/_ping") else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *args: object) -> None:
        pass


class _UnixHttp(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Server(paramiko.ServerInterface):
    def __init__(self, sshd: ExecSshd) -> None:
        self.sshd = sshd

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = key.get_base64() == self.sshd.client_key.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if self.sshd.channels == "stall":
            time.sleep(3)          # a cut link: the open is never confirmed in time
        if self.sshd.channels != "open":
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=_run, args=(channel, command.decode()), daemon=True).start()
        return True


def _run(chan: paramiko.Channel, command: str) -> None:
    """An exec request: `sh -c command`, stdin and stdout carried by the channel."""
    p = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    out = p.stdout

    def pump_out() -> None:
        while d := os.read(out.fileno(), 65536):
            chan.sendall(d)

    t = threading.Thread(target=pump_out, daemon=True)
    t.start()
    try:
        while d := chan.recv(65536):
            p.stdin.write(d)
            p.stdin.flush()
        p.stdin.close()
    except OSError:
        pass
    t.join(10)
    chan.send_exit_status(p.wait(10))
    chan.close()


class ExecSshd(InProcessSshd):
    """An SSH server that takes `client_key`; `channels`: "open" (exec with sh), "refuse" (every
    channel refused), "stall" (channel opens answered after 3 s, refused)."""

    def __init__(self, host_key: paramiko.PKey, client_key: paramiko.PKey) -> None:
        self.client_key, self.channels = client_key, "open"
        super().__init__(host_key)

    def interface(self) -> paramiko.ServerInterface:
        return _Server(self)


@pytest.fixture(scope="module")
def keys():
    return key_pair()


@pytest.fixture
def api(tmp_path):
    """A fake of the podman service's socket on the target."""
    path = str(tmp_path / "podman.sock")
    srv = _UnixHttp(path, _ApiHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield path
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def link(tmp_path, keys, api):
    """(sshd, forward, podman-py client through the forward)."""
    import podman

    host_key, client_key = keys
    sshd = ExecSshd(host_key, client_key)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {host_key.get_name()} {host_key.get_base64()}\n")
    key_file = tmp_path / "id_rsa"
    client_key.write_private_key_file(str(key_file))
    host = SshHost("127.0.0.1", sshd.port, key_filename=str(key_file), known_hosts=str(kh),
                   connect_timeout=5.0, name="runner-x")
    fw = SocketForward(host, api, channel_timeout=1.0)
    client = podman.PodmanClient(base_url="unix://" + fw.path, timeout=20)
    yield sshd, fw, client
    client.close()
    fw.close()
    host.transport.close()
    sshd.close()


def test_api_calls_reach_the_service_through_the_forward(link):
    from podman.errors import NotFound

    sshd, fw, client = link
    assert client.ping() is True
    with pytest.raises(NotFound, match="no container found at .*/containers/nope/json"):
        client.containers.get("nope")
    assert fw.channels_opened >= 1 and fw.last_error is None


@pytest.mark.parametrize("channels, cause", [("refuse", "ChannelException"), ("stall", "Timeout opening channel")])
def test_a_link_that_cannot_open_a_channel_is_named_in_the_api_error(link, channels, cause):
    from podman.errors import APIError, NotFound

    sshd, fw, client = link
    assert client.ping() is True           # the link works, then stops carrying channels
    client.api.close()                     # no kept-alive connection: the next call needs a channel
    sshd.channels = channels
    t0 = time.monotonic()
    with pytest.raises(APIError) as e:
        client.containers.get("nope")
    assert not isinstance(e.value, NotFound)
    msg = str(e.value)
    assert "502" in msg, msg
    assert "the SSH link to runner-x" in msg and "podman.sock" in msg and cause in msg, msg
    assert time.monotonic() - t0 < 15
    assert fw.last_error is not None and cause in fw.last_error


def test_ping_that_never_answers_says_what_the_link_said(link):
    from types import SimpleNamespace

    from vfiotest.errors import ProvisionError
    from vfiotest.podman.service import wait_for_ping

    sshd, fw, client = link
    sshd.channels = "refuse"
    with pytest.raises(ProvisionError) as e:
        wait_for_ping(client, 2.0, SimpleNamespace(_forward=fw))    # type: ignore[arg-type]
    assert "did not answer ping within 2 s" in str(e.value)
    assert "the SSH link to runner-x" in str(e.value) and "Administratively prohibited" in str(e.value)
