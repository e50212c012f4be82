"""Per-client admission and accept pacing over real sockets."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import time
from collections.abc import Callable, Iterator

import pytest

import sockserve
from helpers import ThreadedServer, closed_by_server, read_line, serving
from sockserve import admission


class Upper(sockserve.LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


class BlockingUpper(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


@pytest.fixture
def clients() -> Iterator[Callable[..., socket.socket]]:
    opened: list[socket.socket] = []

    def connect(address: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket()
        opened.append(sock)
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(address)
        return sock

    yield connect
    for sock in opened:
        sock.close()


def served(sock: socket.socket) -> bool:
    sock.sendall(b"hi\n")
    try:
        return read_line(sock) == b"HI\n"
    except ConnectionResetError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.parametrize("handler", [Upper, BlockingUpper], ids=lambda h: h.__name__)
def test_fourth_connection_from_one_client_is_refused_and_a_close_frees_a_slot(
    loop: str, handler: type, clients: Callable[..., socket.socket]
) -> None:
    with serving(handler, loop, max_connections_per_ip=3) as server:
        first = [clients(server.address) for _ in range(3)]
        assert all(served(sock) for sock in first)
        fourth = clients(server.address)
        assert closed_by_server(fourth)
        other = clients(server.address, "127.0.0.2")
        assert served(other)
        stats = server.server.stats
        assert stats.rejected_by_reason["too many connections from client"] == 1
        first[0].close()
        wait_for(lambda: server.server.ledger.open == 3)
        again = clients(server.address)
        assert served(again)
        assert closed_by_server(clients(server.address))
        assert all(served(sock) for sock in first[1:])


def test_refusals_are_logged_and_access_logged(
    clients: Callable[..., socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with serving(Upper, max_connections_per_ip=1, access_log=True) as server:
        kept = clients(server.address)
        assert served(kept)
        assert closed_by_server(clients(server.address))
        wait_for(
            lambda: server.server.stats.closed_by_reason["too many connections from client"] > 0
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused" in m and "too many connections from client" in m for m in messages)
    access = [r for r in caplog.records if r.name == "sockserve.access"]
    assert any("too many connections from client" in r.getMessage() for r in access)


def test_connection_rate_per_client_refuses_the_excess(
    loop: str, clients: Callable[..., socket.socket]
) -> None:
    with serving(Upper, loop, connection_rate_per_ip=5) as server:
        results = []
        for _ in range(8):
            sock = clients(server.address)
            results.append(served(sock))
            sock.close()
        assert results.count(True) >= 5  # the allowance refills a little while we connect
        assert results.count(False) >= 1
        assert served(clients(server.address, "127.0.0.2"))
        rejected = server.server.stats.rejected_by_reason["client connection rate"]
        assert rejected == results.count(False)


def test_connection_rate_paces_a_crowd_without_refusing_anyone(loop: str) -> None:
    count, rate = 150, 50
    with serving(Upper, loop, connection_rate=rate) as server:
        crowd = []
        try:
            for _ in range(count):
                sock = socket.create_connection(server.address, timeout=10)
                crowd.append(sock)
                sock.sendall(b"hi\n")  # waits in the backlog until its turn
            started = time.monotonic()
            replies = [read_line(sock) for sock in crowd]
            elapsed = time.monotonic() - started
        finally:
            for sock in crowd:
                sock.close()
        assert replies == [b"HI\n"] * count
        assert not server.server.stats.rejected_by_reason
        # 150 at 50/s with a tenth of a second's burst: about 2.9 s; slower under load.
        assert elapsed >= 2.5
        assert elapsed < 20


def test_admission_table_stays_bounded_with_proxy_supplied_ipv6_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound, sources = 200, 2000
    monkeypatch.setattr(admission, "MAX_RATE_CLIENTS", bound)
    server = ThreadedServer(
        Upper, proxy_protocol="v1", connection_rate_per_ip=1, max_connections_per_ip=1
    )
    try:
        table = server.server.ledger.admission
        assert isinstance(table, admission.Admission)
        largest = 0
        for i in range(sources):
            with contextlib.closing(socket.create_connection(server.address, 5)) as sock:
                source = f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1"
                sock.sendall(f"PROXY TCP6 {source} ::1 4000 80\r\nhi\n".encode())
                assert read_line(sock) == b"HI\n"
            largest = max(largest, len(table))
        assert largest <= bound + 2  # the histories, plus the connections still open
    finally:
        server.stop()
    assert not server.server.stats.rejected_by_reason
