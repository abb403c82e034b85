"""LinkWatch: an SSH link that stops answering is closed after its silence, so that what waits on
it fails then; a link that answers stays open. Against a real paramiko SSH server in this
process, reached through a TCP relay that can drop every byte (what `iptables -j DROP` on the
runner's port 22 does in the campaign's ssh-cut row)."""

import socket
import threading
import time

import paramiko

from vfiotest.sshhost import LinkWatch


class _Server(paramiko.ServerInterface):
    pass        # refuses every global request: a refusal is an answer all the same, as sshd's


def _serve(sock, key):
    t = paramiko.Transport(sock)
    t.add_server_key(key)
    t.start_server(server=_Server())
    return t


class _Relay:
    """client <-> relay <-> server; `cut` drops whatever comes, in both directions."""

    def __init__(self, server_port):
        self.cut = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.server_port = server_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.server_port))
        for src, dst in ((a, b), (b, a)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not self.cut:
                dst.sendall(data)


def _link():
    key = paramiko.RSAKey.generate(2048)
    server_sock = socket.create_server(("127.0.0.1", 0))
    servers = []
    threading.Thread(target=lambda: servers.append(_serve(server_sock.accept()[0], key)), daemon=True).start()
    relay = _Relay(server_sock.getsockname()[1])
    client = paramiko.Transport(("127.0.0.1", relay.port))
    client.start_client(timeout=10)
    return client, relay, servers


def test_a_link_that_answers_stays_open():
    client, relay, _ = _link()
    watch = LinkWatch(client, "test", every=0.1, silence=1.0)
    time.sleep(2.0)              # about 15 keepalives, each answered
    assert client.is_active() and watch.reason is None
    watch.stop()
    client.close()


def test_a_cut_link_is_closed_after_its_silence_and_says_why():
    client, relay, _ = _link()
    watch = LinkWatch(client, "runner", every=0.1, silence=1.0)
    time.sleep(0.5)
    assert client.is_active()
    relay.cut = True
    t0 = time.monotonic()
    while client.is_active() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert not client.is_active(), "the cut link was never closed"
    assert 0.9 <= took <= 8.0, took      # not before its silence (1 s); then soon (TCP would take minutes)
    assert watch.reason == "lost the connection to runner: no answer to an SSH keepalive in 1 s"
