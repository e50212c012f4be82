"""A stopped server leaves no thread behind: its blocking handlers' threads are joined."""

from __future__ import annotations

import socket
import socketserver
import threading

from helpers import BlockingUpper, connect, read_line, serving


class BlockingDatagramUpper(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


def handler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sockserve-")]


def test_blocking_datagram_threads_are_gone_when_the_server_stops(loop: str) -> None:
    # One stop in two used to return while a thread of the pool was still ending.
    for _ in range(10):
        with serving(BlockingDatagramUpper, loop, bind=["udp://127.0.0.1:0"]) as server:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(b"x", server.address)
                assert client.recv(10) == b"X"
        assert handler_threads() == []


def test_blocking_stream_threads_are_gone_when_the_server_stops(loop: str) -> None:
    for _ in range(10):
        with serving(BlockingUpper, loop) as server, connect(server.address) as sock:
            sock.sendall(b"x\n")
            assert read_line(sock) == b"X\n"
        assert handler_threads() == []
