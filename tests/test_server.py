"""The event-loop server over real sockets, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import socketserver
import sys
import threading
import time
from typing import Any

import pytest

import sockserve
from helpers import (
    AsyncUpper,
    BlockingUpper,
    StreamUpper,
    Upper,
    closed_by_server,
    connect,
    read_all,
    read_line,
    serving,
)
from sockserve import binding
from sockserve.handlers import LineHandler, StreamHandler


class Raising(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        if line.startswith(b"boom"):
            raise RuntimeError("kaboom")
        return line


HANDLERS = [Upper, AsyncUpper, StreamUpper, BlockingUpper]


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_lines_are_answered_in_order(loop: str, handler: type) -> None:
    with serving(handler, loop) as server, connect(server.address) as sock:
        sock.sendall(b"one\ntwo\nthr")
        sock.sendall(b"ee\n")
        assert read_line(sock) == b"ONE\n"
        assert read_line(sock) == b"TWO\n"
        assert read_line(sock) == b"THREE\n"


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_half_close_gets_every_reply_then_eof(loop: str, handler: type) -> None:
    with serving(handler, loop) as server, connect(server.address) as sock:
        sock.sendall(b"a\nb\nlast-without-newline")
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"A\nB\nLAST-WITHOUT-NEWLINE"


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_many_clients_at_once(loop: str, handler: type) -> None:
    with serving(handler, loop) as server:
        socks = [connect(server.address) for _ in range(50)]
        try:
            for i, sock in enumerate(socks):
                sock.sendall(b"client %d\n" % i)
            for i, sock in enumerate(socks):
                assert read_line(sock) == b"CLIENT %d\n" % i
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("handler", [Upper, AsyncUpper, StreamUpper], ids=lambda h: h.__name__)
def test_a_dripped_line_is_cut_at_the_line_timeout(
    loop: str, handler: type, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer sending one line a byte at a time is never idle; the line timeout closes it
    and so frees its slot for a client waiting in the backlog."""
    caplog.set_level(logging.INFO, "sockserve.server")
    settings = {"max_connections": 1, "line_timeout": 0.5, "idle_timeout": 0.3}
    with serving(handler, loop, **settings) as server, connect(server.address) as dripper:
        dripper.sendall(b"a\n")
        assert read_line(dripper) == b"A\n"
        stop = threading.Event()

        def drip() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.05):
                    dripper.sendall(b"x")

        thread = threading.Thread(target=drip)
        thread.start()
        try:
            started = time.monotonic()
            with connect(server.address) as waiting:
                waiting.sendall(b"hi\n")
                assert read_line(waiting) == b"HI\n"
            waited = time.monotonic() - started
        finally:
            stop.set()
            thread.join(5)
    assert 0.4 <= waited < 3
    assert "line unfinished after" in caplog.text
    assert "idle for" not in caplog.text


@pytest.mark.parametrize("handler", [Upper, AsyncUpper, StreamUpper], ids=lambda h: h.__name__)
def test_lines_each_within_the_line_timeout_are_never_cut(loop: str, handler: type) -> None:
    with serving(handler, loop, line_timeout=0.3) as server, connect(server.address) as sock:
        for i in range(4):  # 0.6 s in all, each line in 0.15 s
            sock.sendall(b"line ")
            time.sleep(0.15)
            sock.sendall(b"%d\n" % i)
            assert read_line(sock) == b"LINE %d\n" % i


def test_every_connection_is_counted_closed_once_with_its_reason(loop: str) -> None:
    settings = {"max_line": 8, "idle_timeout": 0.3, "deny": ["127.0.0.2/32"]}
    with serving(Upper, loop, **settings) as server:
        with connect(server.address) as sock:
            sock.sendall(b"ok\n")
            assert read_line(sock) == b"OK\n"
        with connect(server.address) as sock:
            sock.sendall(b"x" * 20)
            assert closed_by_server(sock)
        with connect(server.address) as sock:
            assert closed_by_server(sock)  # after the idle timeout
        with socket.socket() as sock:
            sock.settimeout(5)
            sock.bind(("127.0.0.2", 0))
            sock.connect(server.address)
            assert closed_by_server(sock)
    stats = server.server.stats
    assert stats.closed_by_reason == {"eof": 1, "line too long": 1, "idle timeout": 1, "denied": 1}
    assert stats.connections_total == 4


def test_pipelined_burst_is_answered_whole(loop: str) -> None:
    lines = b"".join(b"line %d\n" % i for i in range(20_000))
    with serving(Upper, loop) as server, connect(server.address, timeout=10) as sock:
        sender = threading.Thread(target=sock.sendall, args=(lines,))
        sender.start()
        got = bytearray()
        while len(got) < len(lines):
            chunk = sock.recv(1 << 16)
            assert chunk
            got += chunk
        sender.join(10)
        assert bytes(got) == lines.upper()


@pytest.mark.parametrize("handler", [Upper, AsyncUpper, StreamUpper], ids=lambda h: h.__name__)
def test_over_long_line_closes_only_that_connection(
    loop: str, handler: type, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer sending a 20 MB line is cut off at max_line; others are served."""
    with serving(handler, loop, max_line=1024) as server, connect(server.address) as other:
        with connect(server.address, timeout=10) as sock:
            sock.sendall(b"fine\n")
            assert read_line(sock) == b"FINE\n"
            sent = 0
            with pytest.raises(OSError):  # reset once the server closed it
                while sent < 20_000_000:
                    sock.sendall(b"x" * 65536)
                    sent += 65536
                read = sock.recv(100)
                assert read == b""
                raise ConnectionResetError
            assert sent < 20_000_000
        other.sendall(b"still here\n")
        assert read_line(other) == b"STILL HERE\n"
    assert "line longer than 1024 bytes" in caplog.text


def test_handler_exception_is_logged_and_closes_one_connection(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(Raising, loop) as server, connect(server.address) as other:
        with connect(server.address) as sock:
            sock.sendall(b"ok\nboom\nnever\n")
            assert read_all(sock) == b"ok\n"
        other.sendall(b"alive\n")
        assert read_line(other) == b"alive\n"
    record = next(r for r in caplog.records if "handler error" in r.getMessage())
    assert record.exc_info is not None
    assert "kaboom" in caplog.text
    assert "127.0.0.1" in record.getMessage()


class TutorialBlocking(socketserver.BaseRequestHandler):
    """The tutorial's handler: raw recv() calls on the request socket."""

    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data.upper())


@pytest.mark.parametrize(
    "handler", [Upper, StreamUpper, BlockingUpper, TutorialBlocking], ids=lambda h: h.__name__
)
def test_idle_peer_is_closed(loop: str, handler: type, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serving(handler, loop, idle_timeout=0.3) as server, connect(server.address) as sock:
        sock.sendall(b"first\n")
        assert read_line(sock) == b"FIRST\n"
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert 0.25 <= time.monotonic() - started < 3
    if handler is not BlockingUpper:  # rfile reads an expired timeout as the end of stream
        assert "idle" in caplog.text


def test_busy_peer_is_not_idle(loop: str) -> None:
    with serving(Upper, loop, idle_timeout=0.4) as server, connect(server.address) as sock:
        for _ in range(8):
            sock.sendall(b"x\n")
            assert read_line(sock) == b"X\n"
            time.sleep(0.1)


def test_connection_cap_pauses_accepting_and_resumes(loop: str) -> None:
    with serving(Upper, loop, max_connections=2) as server:
        a, b = connect(server.address), connect(server.address)
        for sock in (a, b):
            sock.sendall(b"x\n")
            assert read_line(sock) == b"X\n"
        c = connect(server.address)  # completes in the kernel backlog, not yet accepted
        c.sendall(b"waiting\n")
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(100)
        assert server.server.ledger.open == 2
        a.close()
        c.settimeout(5)
        assert read_line(c) == b"WAITING\n"
        for sock in (b, c):
            sock.close()


def test_peer_that_never_reads_is_not_buffered_without_bound(loop: str) -> None:
    """Backpressure: the server stops reading from a peer that does not read replies."""
    with serving(Upper, loop) as server, connect(server.address, timeout=2) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        chunk = b"y" * 1023 + b"\n"
        sent = 0
        sock.setblocking(False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sent < 200 * 1024 * 1024:
            try:
                sent += sock.send(chunk * 64)
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    sent += sock.send(chunk * 64)
                except BlockingIOError:
                    break
        # The server stopped reading: far less than what a never-reading peer could push.
        assert sent < 32 * 1024 * 1024
        conns = server.call(lambda: list(server.server.ledger.connections))
        assert len(conns) == 1
        buffered = server.call(conns[0]._transport.get_write_buffer_size)
        assert buffered < 8 * 1024 * 1024


def test_async_line_handler_slow_replies_keep_order(loop: str) -> None:
    class Slow(LineHandler):
        async def handle_line(self, line: bytes) -> bytes:
            await asyncio.sleep(0.001 * (5 - int(line)))
            return line

    with serving(Slow, loop) as server, connect(server.address) as sock:
        sock.sendall(b"1\n2\n3\n4\n")
        assert [read_line(sock) for _ in range(4)] == [b"1\n", b"2\n", b"3\n", b"4\n"]


def test_stream_handler_reads(loop: str) -> None:
    class Reads(StreamHandler):
        async def handle(self) -> None:
            header = await self.readexactly(4)
            size = int(header)
            body = await self.readexactly(size)
            self.write(b"%d:%s\n" % (size, body))
            rest = await self.read(3)
            self.write(rest + b"\n")
            try:
                await self.readexactly(100)
            except asyncio.IncompleteReadError as exc:
                self.write(b"short:" + exc.partial + b"\n")
            await self.drain()

    with serving(Reads, loop) as server, connect(server.address) as sock:
        sock.sendall(b"0005hello")
        assert read_line(sock) == b"5:hello\n"
        sock.sendall(b"abcdef")
        assert read_line(sock) == b"abc\n"
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"short:def\n"


def test_setup_and_finish_are_called(loop: str) -> None:
    events: list[str] = []

    class Hooks(StreamHandler):
        async def setup(self) -> None:
            events.append("setup")

        async def handle(self) -> None:
            events.append("handle")
            self.write(b"hi\n")

        def finish(self) -> None:
            events.append("finish")

    with serving(Hooks, loop) as server, connect(server.address) as sock:
        assert read_all(sock) == b"hi\n"
    assert events == ["setup", "handle", "finish"]


def test_client_address_and_server_attributes(loop: str) -> None:
    class Who(LineHandler):
        def handle_line(self, line: bytes) -> bytes:
            assert isinstance(self.server, sockserve.Server)
            return f"{self.client_address[0]} {self.listener}\n".encode()

    with serving(Who, loop) as server, connect(server.address) as sock:
        sock.sendall(b"?\n")
        assert read_line(sock) == f"127.0.0.1 {server.urls[0]}\n".encode()


def test_graceful_shutdown_finishes_requests_in_flight(loop: str) -> None:
    started = threading.Event()

    class Slow(LineHandler):
        async def handle_line(self, line: bytes) -> bytes:
            started.set()
            await asyncio.sleep(0.3)
            return line.upper()

    with serving(Slow, loop) as server:
        sock = connect(server.address)
        sock.sendall(b"in flight\n")
        assert started.wait(5)
        stopper = threading.Thread(target=server.stop, args=(5.0,))
        stopper.start()
        assert read_line(sock) == b"IN FLIGHT\n"
        sock.close()
        stopper.join(10)
        assert not stopper.is_alive()


def test_graceful_timeout_closes_lingering_connections(loop: str) -> None:
    with serving(Upper, loop) as server:
        sock = connect(server.address)
        started = time.monotonic()
        server.stop(timeout=0.3)
        assert sock.recv(10) == b""
        assert time.monotonic() - started < 3
        sock.close()


def test_backlog_is_served_on_shutdown(loop: str) -> None:
    """Connections waiting in the listen backlog when shutdown starts are accepted and served."""
    with serving(Upper, loop, max_connections=1) as server:
        first = connect(server.address)
        first.sendall(b"a\n")
        assert read_line(first) == b"A\n"
        queued = [connect(server.address) for _ in range(3)]
        for sock in queued:
            sock.sendall(b"queued\n")
        stopper = threading.Thread(target=server.stop, args=(5.0,))
        stopper.start()
        for sock in queued:
            assert read_line(sock) == b"QUEUED\n"
            sock.close()
        first.close()
        stopper.join(10)


@pytest.mark.skipif(sys.platform != "linux", reason="the SYN filter is Linux's")
def test_refuse_new_keeps_new_clients_out_but_the_backlog_in() -> None:
    """What stopping does before its last drain: a client already in the backlog is still
    accepted, a new one is not let in (its SYN is dropped) and is refused once closed."""
    listener = binding.bind(binding.parse_address("127.0.0.1:0"), backlog=8)[0]
    address = listener.sock.getsockname()
    with socket.create_connection(address, timeout=5) as queued:
        listener.refuse_new()
        with pytest.raises(TimeoutError):
            socket.create_connection(address, timeout=0.3)
        listener.sock.setblocking(True)
        conn, _ = listener.sock.accept()
        with conn:
            queued.sendall(b"still served\n")
            assert conn.recv(100) == b"still served\n"
    listener.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


def test_refuse_new_removes_the_socket_file_first(tmp_path: Any) -> None:
    path = str(tmp_path / "s.sock")
    listener = binding.bind(binding.parse_address(f"unix:{path}"), backlog=8)[0]
    with socket.socket(socket.AF_UNIX) as queued:
        queued.connect(path)
        listener.refuse_new()
        assert not os.path.exists(path)
        listener.sock.setblocking(True)
        listener.sock.accept()[0].close()
    listener.close()


def test_refuse_new_leaves_inherited_sockets_alone() -> None:
    """Whoever passed the socket serves it on after we stop: it must stay open to all."""
    with socket.create_server(("127.0.0.1", 0)) as original:
        listener = binding.adopt_fd(os.dup(original.fileno()), backlog=8)
        listener.refuse_new()
        listener.close()
        with socket.create_connection(original.getsockname(), timeout=0.5):
            pass


def test_blocking_handlers_stuck_reading_are_released_at_the_deadline(loop: str) -> None:
    with serving(BlockingUpper, loop, idle_timeout=0) as server:
        sock = connect(server.address)
        sock.sendall(b"x\n")
        assert read_line(sock) == b"X\n"
        started = time.monotonic()
        server.stop(timeout=0.3)
        assert time.monotonic() - started < 4
        assert sock.recv(10) == b""
        sock.close()


def test_emfile_on_accept_backs_off(loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """Out of descriptors: a few log lines, no spin; serving resumes when descriptors free."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with serving(Upper, loop) as server:
        fillers: list[int] = []
        sock = socket.socket()
        sock.settimeout(5)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            while True:
                try:
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    break
            sock.connect(server.address)  # completes in the backlog; accept() gets EMFILE
            cpu_before = time.process_time()
            time.sleep(0.6)
            cpu = time.process_time() - cpu_before
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        sock.sendall(b"back\n")
        assert read_line(sock) == b"BACK\n"
        sock.close()
    assert cpu < 0.4, f"the server spun: {cpu:.2f} s of CPU in 0.6 s"
    lines = [r for r in caplog.records if "backing off" in r.getMessage()]
    assert 1 <= len(lines) <= 3


def test_datagram_handlers(loop: str, tmp_path: Any) -> None:
    class Echo(sockserve.DatagramHandler):
        def handle_datagram(self, data: bytes, client_address: Any) -> bytes:
            return data.upper()

    class AsyncEcho(sockserve.DatagramHandler):
        async def handle_datagram(self, data: bytes, client_address: Any) -> bytes | None:
            return None if data == b"silent" else data[::-1]

    class BlockingEcho(socketserver.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read() + b"!")

    cases: list[tuple[type, bytes, bytes]] = [
        (Echo, b"abc", b"ABC"),
        (AsyncEcho, b"abc", b"cba"),
        (BlockingEcho, b"abc", b"abc!"),
        (Upper, b"line", b"LINE"),
    ]
    for handler, request, reply in cases:
        unix = str(tmp_path / f"{handler.__name__}.sock")
        with serving(handler, loop, bind=["udp://127.0.0.1:0", f"unix-dgram:{unix}"]) as server:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(5)
                udp.sendto(request, server.address)
                assert udp.recvfrom(100)[0] == reply
            client_path = str(tmp_path / "client.sock")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ux:
                ux.bind(client_path)
                ux.settimeout(5)
                ux.sendto(request, unix)
                assert ux.recv(100) == reply
            os.unlink(client_path)


def test_oversized_datagram_is_dropped_and_reported(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(Upper, loop, bind=["udp://127.0.0.1:0"], max_datagram=100) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(0.3)
            udp.sendto(b"x" * 101, server.address)
            with pytest.raises(TimeoutError):
                udp.recvfrom(1000)
            udp.settimeout(5)
            udp.sendto(b"y" * 100, server.address)
            assert udp.recvfrom(1000)[0] == b"Y" * 100
        assert server.server.stats.datagrams_oversized == 1
    assert "larger than 100 bytes" in caplog.text


def test_unix_stream_and_stale_socket_file(loop: str, tmp_path: Any) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # leaves the file behind, as a crashed server would
    with serving(Upper, loop, bind=[f"unix:{path}"], unix_mode=0o600) as server:
        assert server.urls == [f"unix:{path}"]
        assert os.stat(path).st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b"unix\n")
            assert read_line(sock) == b"UNIX\n"
        with pytest.raises(OSError, match="in use"), serving(Upper, loop, bind=[f"unix:{path}"]):
            pass
    assert not os.path.exists(path)


def test_allow_and_deny(loop: str) -> None:
    with serving(Upper, loop, deny=["127.0.0.0/8"]) as server, connect(server.address) as sock:
        assert sock.recv(10) == b""
    with serving(Upper, loop, allow=["127.0.0.1/32"]) as server, connect(server.address) as sock:
        sock.sendall(b"ok\n")
        assert read_line(sock) == b"OK\n"
    with serving(Upper, loop, allow=["10.0.0.0/8"]) as server, connect(server.address) as sock:
        assert sock.recv(10) == b""
        assert server.server.stats.rejected_by_reason["denied"] == 1


def test_a_flood_of_refused_peers_logs_a_line_a_second(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal is counted, but peers choose how often it happens: the log is limited."""
    caplog.set_level(logging.INFO, "sockserve.server")
    started = time.monotonic()
    with serving(Upper, loop, deny=["127.0.0.0/8"]) as server:
        for _ in range(200):
            with connect(server.address) as sock:
                assert sock.recv(10) == b""
        assert server.call(lambda: server.server.stats.rejected_by_reason["denied"]) == 200
    elapsed = time.monotonic() - started
    refused = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert 1 <= len(refused) <= 1 + elapsed


def test_dual_stack_and_ipv6(loop: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with serving(Upper, loop, bind=[":0"]) as server:
        port = server.address[1]
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(b"dual\n")
                assert read_line(sock) == b"DUAL\n"
    with serving(Upper, loop, bind=["[::1]:0"]) as server:
        assert server.urls[0].startswith("tcp://[::1]:")


def test_graceful_timeout_ends_streams_cleanly_even_with_unread_input(loop: str) -> None:
    """At the deadline the server sends its end of stream and drops the peer's last bytes,
    so the peer sees EOF, not a reset, although it sent more than the handler read."""

    class Stuck(StreamHandler):
        async def handle(self) -> None:
            await self.readline()
            self.write(b"got one\n")
            await asyncio.sleep(3600)

    with serving(Stuck, loop) as server:
        sock = connect(server.address)
        sock.sendall(b"first\n")
        assert read_line(sock) == b"got one\n"
        flood = threading.Thread(target=sock.sendall, args=(b"z" * (2 << 20),), daemon=True)
        flood.start()  # far past what the server reads ahead: it stops reading
        server.wait_until(
            lambda: not any(c._transport.is_reading() for c in server.server.ledger.connections)
        )
        server.stop(timeout=0.2)
        assert sock.recv(10) == b""  # a clean end of stream
        sock.close()


def test_replies_are_not_delayed_by_nagle(loop: str) -> None:
    class NoDelay(LineHandler):
        def handle_line(self, line: bytes) -> bytes:
            sock = self.get_extra_info("socket")
            return b"%d\n" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    with serving(NoDelay, loop) as server, connect(server.address) as sock:
        sock.sendall(b"?\n")
        assert read_line(sock) == b"1\n"


def test_async_line_handler_behind_a_flood_stays_bounded(loop: str) -> None:
    """A peer pipelining short lines faster than an async handler answers them: the
    server stops reading, and holds only bytes (not a queued object per line)."""

    class Slow(LineHandler):
        async def handle_line(self, line: bytes) -> bytes:
            await asyncio.sleep(0.01)
            return line

    with serving(Slow, loop) as server, connect(server.address, timeout=2) as sock:
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        chunk = b"x\n" * 32768
        while time.monotonic() < deadline and sent < 64 * 1024 * 1024:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)
        conns = server.call(lambda: list(server.server.ledger.connections))
        buffered = server.call(lambda: conns[0]._framer.buffered)
        assert buffered < 2 * 1024 * 1024  # READ_AHEAD plus one read, not the whole flood
        assert sent < 32 * 1024 * 1024  # the kernel buffers filled: the server stopped reading
        sock.setblocking(True)
        sock.settimeout(5)
        assert sock.recv(2) == b"x\n"  # and it is still answering, in order


def test_async_datagram_handlers_run_a_bounded_number_at_once(loop: str) -> None:
    """A flood of datagrams for a slow async handler: at most DATAGRAM_CONCURRENCY run,
    then reading pauses (the kernel buffer holds or drops the rest, as UDP does)."""
    from sockserve.listeners import DATAGRAM_CONCURRENCY

    class Stuck(sockserve.DatagramHandler):
        async def handle_datagram(self, data: bytes, client_address: Any) -> bytes:
            await asyncio.sleep(0.5)
            return data

    with serving(Stuck, loop, bind=["udp://127.0.0.1:0"]) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            endpoint = server.server._datagram[0]
            sent = 0  # in small batches: a blast would only overflow the kernel's buffer
            while server.call(lambda: endpoint.reading) and sent < 4 * DATAGRAM_CONCURRENCY:
                for _ in range(64):
                    udp.sendto(b"%d" % sent, server.address)
                    sent += 1
                time.sleep(0.005)
            assert server.call(lambda: endpoint.in_flight) == DATAGRAM_CONCURRENCY
            assert server.call(lambda: endpoint.reading) is False
            udp.settimeout(5)
            assert udp.recvfrom(100)[0].isdigit()  # the running ones finish and answer
        server.wait_until(lambda: endpoint.reading)  # resumes once they finish
