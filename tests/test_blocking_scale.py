"""Blocking handlers at scale: a thread per connection, the ReadyQueue, bounds, idle and TLS."""

from __future__ import annotations

import logging
import resource
import selectors
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from helpers import closed_by_server, connect, read_line, serving
from sockserve import blocking, ready_queue
from sockserve.handlers import LineHandler, StreamHandler
from sockserve.proxy_protocol import encode_v1


class BlockingUpper(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


class TutorialBlocking(socketserver.BaseRequestHandler):
    """The tutorial's handler: recv on the socket itself."""

    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data.upper())


class Upper(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


class StreamUpper(StreamHandler):
    async def handle(self) -> None:
        while line := await self.readline():
            self.write(line.upper())


class SleepOrEcho(socketserver.StreamRequestHandler):
    """``sleep`` blocks the thread in time.sleep for a second; anything else is echoed.
    Each sleeper releases ``asleep`` as it starts."""

    asleep = threading.Semaphore(0)

    def handle(self) -> None:
        for line in self.rfile:
            if line == b"sleep\n":
                self.asleep.release()
                time.sleep(1.0)
            self.wfile.write(line.upper())


@pytest.fixture
def open_files() -> Iterator[None]:
    """Room for 1000 clients and their 1000 server sides in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2600
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs an open-file hard limit of {need} (ulimit -Hn is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def threads_of(server: Any) -> int:
    streams: int = server.server.kind.pool.streams
    return streams


def exchange_all(socks: list[socket.socket], rounds: int, deadline: float) -> int:
    """Every socket sends a line and reads its answer, ``rounds`` times, all at once;
    returns how many sockets got every answer."""
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, list[Any]] = {}
    try:
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            pending[sock] = [rounds, b"client %d\n" % i, b""]
            sock.send(pending[sock][1])
        finished = 0
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj  # type: ignore[assignment]
                state = pending[sock]
                state[2] += sock.recv(4096)
                if state[2] == state[1].upper():
                    state[0] -= 1
                    state[2] = b""
                    if state[0]:
                        sock.send(state[1])
                    else:
                        selector.unregister(sock)
                        del pending[sock]
                        finished += 1
        return finished
    finally:
        selector.close()


def test_a_thousand_blocking_clients_are_all_answered(loop: str, open_files: None) -> None:
    """1000 long-lived clients at once, each with its own handler thread: all served."""
    with serving(BlockingUpper, loop) as server:
        socks: list[socket.socket] = []
        try:
            for _ in range(1000):
                socks.append(connect(server.address, timeout=30))
            finished = exchange_all(socks, rounds=3, deadline=time.monotonic() + 60)
            assert finished == 1000
            assert server.call(lambda: threads_of(server)) == 1000
        finally:
            for sock in socks:
                sock.close()


def test_max_connections_reached_is_logged_and_counted(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At --max-connections the others wait in the backlog, and the server says so."""
    caplog.set_level(logging.WARNING, "sockserve.server")
    with serving(BlockingUpper, loop, max_connections=2) as server:
        first, second = connect(server.address), connect(server.address)
        for sock in (first, second):
            sock.sendall(b"in\n")
            assert read_line(sock) == b"IN\n"
        third = connect(server.address, timeout=0.5)
        third.sendall(b"waiting\n")
        with pytest.raises(TimeoutError):
            third.recv(10)  # held in the backlog
        assert "max_connections (2) reached" in caplog.text
        assert server.server.stats.limits_reached["max_connections"] >= 1
        first.close()
        third.settimeout(5)
        assert read_line(third) == b"WAITING\n"
        for sock in (second, third):
            sock.close()


@pytest.fixture
def through_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read waits through the ReadyQueue, however few the connections."""
    monkeypatch.setattr(ready_queue, "DIRECT_WAIT_MAX", 0)


def test_a_handler_blocked_elsewhere_does_not_stall_the_others(
    loop: str, through_the_queue: None
) -> None:
    """More sleeping handlers than run slots: an echo still comes back at once."""
    with serving(SleepOrEcho, loop) as server:
        sleepers = [connect(server.address) for _ in range(6)]
        echo = connect(server.address)
        try:
            for sock in sleepers:
                sock.sendall(b"sleep\n")
            for _ in sleepers:
                assert SleepOrEcho.asleep.acquire(timeout=10), "a sleeper never started"
            started = time.monotonic()
            echo.sendall(b"hello\n")
            assert read_line(echo) == b"HELLO\n"
            assert time.monotonic() - started < 0.5
            for sock in sleepers:
                assert read_line(sock) == b"SLEEP\n"
        finally:
            for sock in [*sleepers, echo]:
                sock.close()


# -- idle timeout, with and without TLS ---------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1")
    paths = {"cert": directory / "server.pem", "key": directory / "server.key"}
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return {name: str(path) for name, path in paths.items()}


def tls_connect(ca: trustme.CA, address: tuple[str, int]) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    sock = socket.create_connection(address, timeout=5)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize(
    "handler",
    [Upper, StreamUpper, BlockingUpper, TutorialBlocking],
    ids=lambda h: h.__name__,
)
def test_the_idle_timeout_closes_every_kind_of_connection(
    loop: str, handler: type, tls: bool, ca: trustme.CA, certs: dict[str, str]
) -> None:
    settings: dict[str, Any] = {"idle_timeout": 0.5}
    if tls:
        settings.update(tls_cert=certs["cert"], tls_key=certs["key"])
    with serving(handler, loop, **settings) as server:
        sock: socket.socket = tls_connect(ca, server.address) if tls else connect(server.address)
        with sock:
            started = time.monotonic()  # the server's idle clock starts after this
            sock.sendall(b"hi\n")
            assert read_line(sock) == b"HI\n"
            assert read_line(sock) == b""  # closed by the server, idle
            assert 0.45 < time.monotonic() - started < 4
        stats = server.server.stats
        deadline = time.monotonic() + 5
        while not stats.closed_by_reason["idle timeout"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stats.closed_by_reason["idle timeout"] == 1


@pytest.mark.parametrize("handler", [BlockingUpper, TutorialBlocking], ids=lambda h: h.__name__)
def test_the_idle_timeout_closes_blocking_connections_waiting_in_the_queue(
    loop: str, handler: type, through_the_queue: None
) -> None:
    with serving(handler, loop, idle_timeout=0.5) as server, connect(server.address) as sock:
        started = time.monotonic()  # the server's idle clock starts after this
        sock.sendall(b"hi\n")
        assert read_line(sock) == b"HI\n"
        assert read_line(sock) == b""
        assert 0.45 < time.monotonic() - started < 4


# -- TLS handshakes in the event loop -----------------------------------------------------


def test_silent_tls_peers_hold_no_handler_thread(
    loop: str, ca: trustme.CA, certs: dict[str, str]
) -> None:
    """Peers that never send a ClientHello wait in the event loop, not on a thread; a
    real client behind them is answered at once."""
    # --threads once bounded these handshakes too: 40 silent peers held every thread.
    settings = {
        "tls_cert": certs["cert"],
        "tls_key": certs["key"],
        "handshake_timeout": 30,
        "threads": 40,
    }
    with serving(BlockingUpper, loop, **settings) as server:
        silent = [connect(server.address) for _ in range(50)]
        try:
            started = time.monotonic()
            with tls_connect(ca, server.address) as client:
                client.sendall(b"hello\n")
                assert read_line(client) == b"HELLO\n"
                assert time.monotonic() - started < 2
                assert server.call(lambda: threads_of(server)) == 1
        finally:
            for sock in silent:
                sock.close()


def test_after_a_proxy_header_the_tls_handshake_gets_what_is_left_of_its_timeout(
    loop: str, certs: dict[str, str]
) -> None:
    settings = {
        "tls_cert": certs["cert"],
        "tls_key": certs["key"],
        "proxy_protocol": "v1",
        "handshake_timeout": 1.0,
    }
    with serving(BlockingUpper, loop, **settings) as server:
        sock = connect(server.address)
        started = time.monotonic()
        with sock:
            time.sleep(0.6)
            sock.sendall(encode_v1(("203.0.113.7", 4000), ("127.0.0.1", 443)))
            sock.settimeout(5)
            assert closed_by_server(sock)  # no ClientHello follows
            assert time.monotonic() - started < 1.5  # not 0.6 + a fresh 1.0


def test_blocking_handler_threads_are_counted(loop: str) -> None:
    release = threading.Event()

    class Held(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"in\n")
            release.wait(10)

    with serving(Held, loop) as server:
        socks = [connect(server.address) for _ in range(3)]
        try:
            for sock in socks:
                assert read_line(sock) == b"in\n"
            server.call(server.server._update_gauges)
            assert server.server.stats.handler_threads == 3
            assert server.server.stats.handler_waiting == 0
        finally:
            release.set()
            for sock in socks:
                sock.close()


def test_no_handler_thread_outlives_the_server(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the server has stopped, every handler thread has ended, not just returned:
    here each is descheduled for a moment right after it reported its connection closed."""
    report = blocking.BlockingPool._call

    def report_then_stall(pool: blocking.BlockingPool, callback: Any, *args: Any) -> None:
        report(pool, callback, *args)
        if getattr(callback, "__name__", "") == "_stream_done":
            time.sleep(0.3)

    monkeypatch.setattr(blocking.BlockingPool, "_call", report_then_stall)
    with serving(BlockingUpper, loop) as server:
        socks = [connect(server.address) for _ in range(200)]
        try:
            assert exchange_all(socks, rounds=1, deadline=time.monotonic() + 30) == 200
        finally:
            for sock in socks:
                sock.close()
    assert [t.name for t in threading.enumerate() if t.name.startswith("sockserve-")] == []
