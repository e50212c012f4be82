"""Goodbye-first ending over real sockets: shutdown, --close-spread, --max-connection-age."""

from __future__ import annotations

import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from goodbye_handlers import GOODBYE, Blocking, Line, Message, Stream, SyncLine
from helpers import LOOPS, ServerProcess, address_of, read_line, serving

HANDLERS = [Line, SyncLine, Stream, Blocking]
TESTS = str(Path(__file__).parent)


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def open_idle(address: tuple[str, int], count: int, into: list[socket.socket]) -> None:
    """``count`` clients, each answered once (so accepted and served), then idle."""
    for _ in range(count):
        sock = socket.create_connection(address, timeout=10)
        into.append(sock)
        sock.sendall(b"hi\n")
    for sock in into[-count:]:
        assert read_line(sock) == b"HI\n"


def read_to_eof(socks: list[socket.socket], timeout: float) -> tuple[list[bytes], list[float]]:
    """What each socket receives until its end of stream, and when (monotonic) that came;
    each is closed at its end of stream, as a client does."""
    received = [bytearray() for _ in socks]
    ended = [float("inf")] * len(socks)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
        left = len(socks)
        while left and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                i = key.data
                chunk = socks[i].recv(65536)  # a reset raises: never expected here
                if chunk:
                    received[i] += chunk
                    continue
                ended[i] = time.monotonic()
                selector.unregister(socks[i])
                socks[i].close()
                left -= 1
    return [bytes(r) for r in received], ended


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_sigterm_says_goodbye_to_idle_clients_at_once_and_lets_the_busy_one_finish(
    start_server: object, handler: type, clients: list[socket.socket]
) -> None:
    server: ServerProcess = start_server(  # type: ignore[operator]
        [
            "run",
            f"goodbye_handlers:{handler.__name__}",
            "--bind",
            "127.0.0.1:0",
            "--graceful-timeout",
            "30",
            "--threads",
            "400",
        ],
        cwd=TESTS,
    )
    address = address_of(server.urls[0])
    open_idle(address, 300, clients)
    busy = socket.create_connection(address, timeout=10)
    clients.append(busy)
    if handler is not SyncLine:  # a sync handler is never in the middle of a request
        busy.sendall(b"slow\n")
        server.read_until("slow request started")
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    idle = clients[:300]
    received, ended = read_to_eof(idle, timeout=10)
    assert received == [GOODBYE] * 300
    slowest = max(ended) - signalled
    assert slowest < 1.0, f"the last idle client got its goodbye after {slowest:.2f} s"
    busy_received, _ = read_to_eof([busy], timeout=10)
    assert busy_received == [b"SLOW\n" + GOODBYE if handler is not SyncLine else GOODBYE]
    assert server.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 5


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_max_connection_age_says_goodbye_about_then(
    loop: str, handler: type, clients: list[socket.socket]
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with serving(handler, loop, max_connection_age=1) as server:
        started = time.monotonic()
        open_idle(server.address, 1, clients)
        received, ended = read_to_eof(clients, timeout=10)
        assert received == [GOODBYE]
        # 1 s with its jitter of 10%, plus the sweep's tenth of a second.
        assert 0.9 <= ended[0] - started < 2.0
    assert server.server.stats.closed_by_reason["max connection age"] == 1


def test_max_connection_age_waits_for_the_request_in_flight(
    clients: list[socket.socket],
) -> None:
    with serving(Line, max_connection_age=0.3) as server:
        sock = socket.create_connection(server.address, timeout=10)
        clients.append(sock)
        sock.sendall(b"slow\n")
        received, _ = read_to_eof(clients, timeout=10)
        assert received == [b"SLOW\n" + GOODBYE]


@pytest.mark.parametrize("handler", [SyncLine, Stream, Blocking], ids=lambda h: h.__name__)
def test_close_spread_spreads_the_goodbyes(handler: type, clients: list[socket.socket]) -> None:
    with serving(handler, close_spread=1.0) as server:
        open_idle(server.address, 20, clients)
        stopper = threading.Thread(target=server.stop, args=(10.0,))
        stopper.start()
        try:
            received, ended = read_to_eof(clients, timeout=10)
        finally:
            stopper.join(15)
    assert received == [GOODBYE] * 20
    assert max(ended) - min(ended) >= 0.6  # 19/20 of a second apart, first to last
    assert max(ended) - min(ended) < 3.0


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("handler", [SyncLine, Stream, Blocking], ids=lambda h: h.__name__)
def test_a_request_racing_the_goodbye_is_answered_or_told_goodbye_never_reset(
    loop: str, handler: type, clients: list[socket.socket]
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with serving(handler, loop, threads=200) as server:
        open_idle(server.address, 100, clients)
        stopper = threading.Thread(target=server.stop, args=(10.0,))
        stopper.start()
        try:
            for sock in clients:
                try:
                    sock.sendall(b"race\n")
                except BrokenPipeError:
                    pass  # already told goodbye and closed: it will read that below
            received, _ = read_to_eof(clients, timeout=10)
        finally:
            stopper.join(15)
    assert set(received) <= {GOODBYE, b"RACE\n" + GOODBYE}


def test_a_message_handler_goodbye_is_framed_like_a_reply(clients: list[socket.socket]) -> None:
    with serving(Message, max_connection_age=0.5) as server:
        sock = socket.create_connection(server.address, timeout=10)
        clients.append(sock)
        sock.sendall(struct.pack("!I", 2) + b"hi")
        received, _ = read_to_eof(clients, timeout=10)
    assert received == [struct.pack("!I", 2) + b"HI" + struct.pack("!I", 7) + b"goodbye"]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_told_goodbye_is_left_out_of_broadcasts(
    loop: str, clients: list[socket.socket]
) -> None:
    """After the goodbye our end of stream is sent: nothing more may be written to it,
    though the peer has not closed yet (the server drops what it still sends)."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with serving(SyncLine, loop, max_connection_age=0.3) as server:
        ended = socket.create_connection(server.address, timeout=10)
        clients.append(ended)
        ended.sendall(b"hi\n")
        assert read_line(ended) == b"HI\n"
        assert read_line(ended) == GOODBYE
        assert ended.recv(10) == b""  # kept open: the server lingers on it
        assert server.call(lambda: server.server.broadcast(b"news\n")) == 0
        ended.sendall(b"late\n")  # dropped, not answered, no reset


@pytest.mark.parametrize("handler", [SyncLine, Stream, Blocking], ids=lambda h: h.__name__)
def test_a_client_still_in_the_backlog_at_the_stop_is_answered_before_its_goodbye(
    handler: type, clients: list[socket.socket]
) -> None:
    """Its client connected before the stop: it gets FIRST_REQUEST_WAIT to send its
    request."""
    with serving(handler, max_connections=1, threads=1) as server:
        open_idle(server.address, 1, clients)
        queued = socket.create_connection(server.address, timeout=10)  # in the backlog
        clients.append(queued)
        stopper = threading.Thread(target=server.stop, args=(10.0,))
        stopper.start()
        try:
            # The backlog is taken in before the goodbyes go out: once the first client
            # has its goodbye, the queued one is accepted, and only now sends.
            first, _ = read_to_eof(clients[:1], timeout=10)
            assert first == [GOODBYE]
            queued.sendall(b"late\n")
            received, _ = read_to_eof([queued], timeout=10)
        finally:
            stopper.join(15)
    assert received == [b"LATE\n" + GOODBYE]
