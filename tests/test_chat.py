"""The chat example under ``sockserve run``: a relay to many readers with one that never reads."""

from __future__ import annotations

import selectors
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from helpers import ServerProcess, address_of
from sockserve.testing import serve

LINES = 2000
LINE_SIZE = 8 * 1024
READERS = 10
# Lines the sender may be ahead of the slowest reader: 512 KiB, under the 1 MiB default
# max_write_buffer, so only a client that does not read at all can pass the bound.
WINDOW = 64
DEADLINE = 120.0


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def payload(i: int) -> bytes:
    head = b"%06d " % i
    return head + b"m" * (LINE_SIZE - len(head) - 1) + b"\n"


class Reader:
    """One receiving client: checks that every relayed line arrives, in order."""

    def __init__(self, sock: socket.socket, sender: bytes) -> None:
        self.sock = sock
        self.prefix = sender + b": "
        self.buffer = bytearray()
        self.received = 0

    def on_readable(self) -> None:
        chunk = self.sock.recv(1 << 20)
        assert chunk, "the server closed a reader"
        self.buffer += chunk
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[: end + 1])
            del self.buffer[: end + 1]
            if line.startswith(b"* "):  # someone joined
                continue
            assert line == self.prefix + payload(self.received), (
                self.received,
                line[:30],
                len(line),
            )
            self.received += 1


def connect(address: tuple[str, int], rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def test_chat_relays_in_order_and_cuts_a_client_that_does_not_read(
    start_server: Callable[..., ServerProcess],
) -> None:
    args = ["--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    server = start_server(["run", "sockserve.examples.chat:Chat", *args])
    address = address_of(server.urls[0])
    metrics = server.read_until(r"metrics listening on (http://\S+)").group(1)
    pid = server.proc.pid
    sockets: list[socket.socket] = []
    try:
        sender = connect(address)
        sockets.append(sender)
        name = b"%s:%d" % (sender.getsockname()[0].encode(), sender.getsockname()[1])
        # Never reads; a small receive buffer keeps the kernel from absorbing much.
        silent = connect(address, rcvbuf=4096)
        sockets.append(silent)
        readers = []
        for _ in range(READERS):
            sock = connect(address)
            sockets.append(sock)
            readers.append(Reader(sock, name))
        # Each client is in the room once the sender has seen it join.
        expected = {
            b"* %s:%d joined\n" % (host.encode(), port)
            for host, port in (s.getsockname()[:2] for s in [silent] + [r.sock for r in readers])
        }
        with sender.makefile("rb") as lines:
            while expected:
                expected.remove(lines.readline())
        rss_before = status_kib(pid, "VmRSS")

        with selectors.DefaultSelector() as sel:
            for reader in readers:
                reader.sock.setblocking(False)
                sel.register(reader.sock, selectors.EVENT_READ, reader)
            sender.setblocking(False)
            sent, pending = 0, b""
            deadline = time.monotonic() + DEADLINE
            while min(r.received for r in readers) < LINES:
                assert time.monotonic() < deadline, [r.received for r in readers]
                slowest = min(r.received for r in readers)
                if not pending and sent < LINES and sent - slowest < WINDOW:
                    pending = payload(sent)
                    sent += 1
                if pending:
                    try:
                        pending = pending[sender.send(pending) :]
                    except BlockingIOError:
                        pass
                timeout = 0 if pending or (sent < LINES and sent - slowest < WINDOW) else 1.0
                for key, _ in sel.select(timeout):
                    reader_of: Any = key.data
                    reader_of.on_readable()
        assert [r.received for r in readers] == [LINES] * READERS

        # 16 MiB were sent to the silent client: it was cut, the others were not.
        server.read_until(r"slow consumer, \d+ bytes queued for it \(max_write_buffer 1048576\)")
        with urllib.request.urlopen(metrics, timeout=10) as response:
            scraped = response.read().decode()
        assert 'sockserve_closed_connections_total{reason="slow consumer"} 1.0' in scraped
        peak_growth = status_kib(pid, "VmHWM") - rss_before
        print(f"\nFIGURES chat relay: server VmHWM - VmRSS before = {peak_growth} KiB")
        assert peak_growth < 32 * 1024
        for reader in readers:
            reader.sock.setblocking(True)
        sender.setblocking(True)
        sender.sendall(b"still here\n")
        for reader in readers:
            reader.sock.settimeout(10)
            line = b""
            while not line.endswith(b"\n"):
                line += reader.sock.recv(1)
            assert line == name + b": still here\n"
    finally:
        for sock in sockets:
            sock.close()


def test_chat_announces_joins_and_leaves() -> None:
    from sockserve.examples.chat import Chat

    with serve(Chat) as server:
        with server.connect() as alice:
            with server.connect() as bob:
                bob_name = b"%s:%d" % (
                    bob.sock.getsockname()[0].encode(),
                    bob.sock.getsockname()[1],
                )
                assert alice.readline() == b"* " + bob_name + b" joined\n"
                bob.send(b"hi alice\n")
                assert alice.readline() == bob_name + b": hi alice\n"
                bob.send(b"no newline at the end")
                bob.shutdown_write()
                assert alice.readline() == bob_name + b": no newline at the end\n"
            assert alice.readline() == b"* " + bob_name + b" left\n"
