"""sockserve.socketserver over real sockets: every class and hook, and the fixed flaws."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import socket
import socketserver as stdlib_socketserver
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import sockserve.socketserver as ss

HOST = "127.0.0.1"
TIMEOUT = 10.0
# Forking while other threads run is deprecated on 3.12+; these tests do it on purpose.
fork_ok = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


class UpperStream(ss.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


class UpperDatagram(ss.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


if hasattr(os, "fork"):

    class ForkingUnixStream(ss.ForkingMixIn, ss.UnixStreamServer):
        pass

    class ForkingUnixDatagram(ss.ForkingMixIn, ss.UnixDatagramServer):
        pass


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short directory for Unix socket paths (they are limited to about 100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ss-", dir="/tmp") as path:
        yield path


@contextlib.contextmanager
def serving(server: ss.BaseServer, poll_interval: float = 0.5) -> Iterator[threading.Thread]:
    """Run serve_forever() in a thread; shut down, join and close on exit."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,))
    thread.start()
    try:
        yield thread
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
        assert not thread.is_alive()


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def stream_roundtrip(family: int, address: Any, data: bytes = b"hello\n") -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(TIMEOUT)
        client.connect(address)
        client.sendall(data)
        return read_to_eof(client)


def dgram_roundtrip(family: int, address: Any, sock_dir: str, data: bytes = b"hello") -> bytes:
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        if family == socket.AF_UNIX:
            client.bind(os.path.join(sock_dir, "client"))
        client.sendto(data, address)
        return client.recv(65536)


# --- names and defaults ------------------------------------------------------------


def test_all_matches_the_stdlib() -> None:
    assert ss.__all__ == stdlib_socketserver.__all__
    ours = {
        name
        for name in dir(ss)
        if not name.startswith("_")
        and getattr(getattr(ss, name), "__module__", None) == ss.__name__
    }
    assert ours == set(ss.__all__)


def test_defaults() -> None:
    assert ss.TCPServer.request_queue_size == socket.SOMAXCONN
    assert ss.TCPServer.allow_reuse_address is False
    assert ss.TCPServer.allow_reuse_port is False
    assert ss.UDPServer.max_packet_size == 8192
    assert ss.BaseServer.timeout is None
    assert ss.ThreadingMixIn.daemon_threads is False
    assert ss.ThreadingMixIn.block_on_close is True
    assert ss.ThreadingMixIn.max_threads is None
    assert ss.StreamRequestHandler.rbufsize == -1
    assert ss.StreamRequestHandler.wbufsize == 0
    assert ss.StreamRequestHandler.timeout is None
    assert ss.StreamRequestHandler.disable_nagle_algorithm is False
    if hasattr(os, "fork"):
        assert ss.ForkingMixIn.timeout == 300
        assert ss.ForkingMixIn.max_children == 40
        assert ss.ForkingMixIn.active_children is None
        assert ss.ForkingMixIn.block_on_close is True


def test_reuse_options_and_backlog() -> None:
    class Server(ss.TCPServer):
        allow_reuse_address = True
        allow_reuse_port = True

    with Server((HOST, 0), UpperStream) as server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        if hasattr(socket, "SO_REUSEPORT"):
            assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert server.server_address == server.socket.getsockname()


def test_bind_and_activate_false() -> None:
    server = ss.TCPServer((HOST, 0), UpperStream, bind_and_activate=False)
    with server:
        server.server_bind()
        server.server_activate()
        with serving(server):
            assert stream_roundtrip(socket.AF_INET, server.server_address) == b"HELLO\n"


def test_context_manager_and_fileno() -> None:
    with ss.TCPServer((HOST, 0), UpperStream) as server:
        assert server.fileno() == server.socket.fileno()
    assert server.socket.fileno() == -1


# --- every server class -------------------------------------------------------------

STREAM_CLASSES: list[type[ss.TCPServer]] = [ss.TCPServer, ss.ThreadingTCPServer]
DGRAM_CLASSES: list[type[ss.TCPServer]] = [ss.UDPServer, ss.ThreadingUDPServer]
if hasattr(socket, "AF_UNIX"):
    STREAM_CLASSES += [ss.UnixStreamServer, ss.ThreadingUnixStreamServer]
    DGRAM_CLASSES += [ss.UnixDatagramServer, ss.ThreadingUnixDatagramServer]
if hasattr(os, "fork"):
    STREAM_CLASSES += [ss.ForkingTCPServer, ForkingUnixStream]
    DGRAM_CLASSES += [ss.ForkingUDPServer, ForkingUnixDatagram]


def address_for(cls: type[ss.TCPServer], sock_dir: str) -> Any:
    if cls.address_family == socket.AF_UNIX:
        return os.path.join(sock_dir, "server")
    return (HOST, 0)


@fork_ok
@pytest.mark.parametrize("cls", STREAM_CLASSES, ids=lambda c: c.__name__)
def test_stream_servers(cls: type[ss.TCPServer], sock_dir: str) -> None:
    server = cls(address_for(cls, sock_dir), UpperStream)
    with serving(server, poll_interval=0.01):
        for n in range(3):
            data = b"line %d\n" % n
            assert stream_roundtrip(cls.address_family, server.server_address, data) == data.upper()
    if hasattr(os, "fork") and isinstance(server, ss.ForkingMixIn):
        assert not server.active_children


@fork_ok
@pytest.mark.parametrize("cls", DGRAM_CLASSES, ids=lambda c: c.__name__)
def test_datagram_servers(cls: type[ss.TCPServer], sock_dir: str) -> None:
    server = cls(address_for(cls, sock_dir), UpperDatagram)
    with serving(server, poll_interval=0.01):
        assert dgram_roundtrip(cls.address_family, server.server_address, sock_dir) == b"HELLO"


# --- hooks --------------------------------------------------------------------------


class Recording(ss.TCPServer):
    """Records every hook in the order the server calls it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[str] = []
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.calls.append("server_bind")
        super().server_bind()

    def server_activate(self) -> None:
        self.calls.append("server_activate")
        super().server_activate()

    def get_request(self) -> tuple[Any, Any]:
        self.calls.append("get_request")
        return super().get_request()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.calls.append("verify_request")
        return super().verify_request(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.calls.append("process_request")
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.calls.append("finish_request")
        super().finish_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.calls.append("shutdown_request")
        super().shutdown_request(request)

    def close_request(self, request: Any) -> None:
        self.calls.append("close_request")
        super().close_request(request)

    def service_actions(self) -> None:
        if "service_actions" not in self.calls:  # it also runs on idle polls
            self.calls.append("service_actions")
        super().service_actions()

    def handle_timeout(self) -> None:
        self.calls.append("handle_timeout")

    def server_close(self) -> None:
        self.calls.append("server_close")
        super().server_close()


class RecordingHandler(ss.StreamRequestHandler):
    def setup(self) -> None:
        self.recorder().append("setup")
        super().setup()

    def handle(self) -> None:
        self.recorder().append("handle")
        self.wfile.write(self.rfile.readline().upper())

    def finish(self) -> None:
        self.recorder().append("finish")
        super().finish()

    def recorder(self) -> list[str]:
        assert isinstance(self.server, Recording)
        return self.server.calls


REQUEST_HOOKS = [
    "get_request",
    "verify_request",
    "process_request",
    "finish_request",
    "setup",
    "handle",
    "finish",
    "shutdown_request",
    "close_request",
]


def test_hook_order_handle_request() -> None:
    server = Recording((HOST, 0), RecordingHandler)
    assert server.calls == ["server_bind", "server_activate"]
    with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
        client.sendall(b"abc\n")
        server.handle_request()
        assert read_to_eof(client) == b"ABC\n"
    server.server_close()
    assert server.calls == ["server_bind", "server_activate", *REQUEST_HOOKS, "server_close"]


def test_hook_order_serve_forever() -> None:
    server = Recording((HOST, 0), RecordingHandler)
    with serving(server):
        assert stream_roundtrip(socket.AF_INET, server.server_address) == b"HELLO\n"
    calls = server.calls
    assert calls[:2] == ["server_bind", "server_activate"]
    assert calls[2:11] == REQUEST_HOOKS
    assert calls[11] == "service_actions"
    assert calls[-1] == "server_close"


def test_threading_hook_order() -> None:
    class Server(ss.ThreadingMixIn, Recording):
        def process_request_thread(self, request: Any, client_address: Any) -> None:
            self.calls.append("process_request_thread")
            super().process_request_thread(request, client_address)

    server = Server((HOST, 0), RecordingHandler)
    with serving(server):
        assert stream_roundtrip(socket.AF_INET, server.server_address) == b"HELLO\n"
    # server_close is recorded as it is entered; the handler thread may still be ending
    # then, but server_close joins it before returning, so its last hooks are in by now.
    hooks = [c for c in server.calls if c not in ("service_actions", "server_close")]
    assert server.calls.count("server_close") == 1
    assert hooks[2:4] == ["get_request", "verify_request"]
    # ThreadingMixIn.process_request comes first in the MRO and starts the thread.
    assert hooks[4:7] == ["process_request_thread", "finish_request", "setup"]
    assert hooks[-2:] == ["shutdown_request", "close_request"]


def test_verify_request_false_closes_without_handling() -> None:
    class Server(Recording):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            super().verify_request(request, client_address)
            return False

    server = Server((HOST, 0), RecordingHandler)
    with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
        server.handle_request()
        assert read_to_eof(client) == b""
    server.server_close()
    expected = ["get_request", "verify_request", "shutdown_request", "close_request"]
    assert server.calls[2:6] == expected


def test_handle_request_timeout_calls_handle_timeout() -> None:
    server = Recording((HOST, 0), RecordingHandler)
    server.timeout = 0.05
    with server:
        started = time.monotonic()
        server.handle_request()
        elapsed = time.monotonic() - started
    assert 0.04 <= elapsed < 2
    assert server.calls[2:] == ["handle_timeout", "server_close"]


# --- handle_error -------------------------------------------------------------------


class Failing(ss.BaseRequestHandler):
    def handle(self) -> None:
        raise ValueError("handler failed on purpose")


@pytest.mark.parametrize("cls", [ss.TCPServer, ss.ThreadingTCPServer], ids=lambda c: c.__name__)
def test_handle_error_logs_traceback(
    cls: type[ss.TCPServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sockserve.socketserver")
    server = cls((HOST, 0), Failing)
    with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
        server.handle_request()
        assert read_to_eof(client) == b""  # the connection is closed, the server goes on
        port = client.getsockname()[1]
    server.server_close()  # joins the handler thread
    [record] = [r for r in caplog.records if r.name == "sockserve.socketserver"]
    assert record.levelno == logging.ERROR
    assert str(port) in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is ValueError
    assert "handler failed on purpose" in caplog.text
    assert "Traceback" in caplog.text


def test_handle_error_is_overridable() -> None:
    seen: list[Any] = []

    class Server(ss.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            seen.append(client_address)

    with (
        Server((HOST, 0), Failing) as server,
        socket.create_connection(server.server_address, timeout=TIMEOUT) as client,
    ):
        server.handle_request()
        assert seen == [client.getsockname()]


# --- shutdown -----------------------------------------------------------------------


def test_shutdown_is_fast() -> None:
    server = ss.TCPServer((HOST, 0), UpperStream)
    thread = threading.Thread(target=server.serve_forever)  # the default 0.5 s poll
    thread.start()
    try:
        # One round trip proves the loop is running and waiting in select.
        assert stream_roundtrip(socket.AF_INET, server.server_address) == b"HELLO\n"
        started = time.perf_counter()
        server.shutdown()
        elapsed = time.perf_counter() - started
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert elapsed < 0.05, f"shutdown took {elapsed * 1000:.1f} ms"
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()


def test_shutdown_from_a_handler_does_not_deadlock() -> None:
    class Stopper(ss.BaseRequestHandler):
        def handle(self) -> None:
            self.server.shutdown()
            self.request.sendall(b"stopping")

    server = ss.TCPServer((HOST, 0), Stopper)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
            assert read_to_eof(client) == b"stopping"
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()


def test_shutdown_before_serve_forever() -> None:
    with ss.TCPServer((HOST, 0), UpperStream) as server:
        started = time.perf_counter()
        server.shutdown()  # nothing is serving: must not block
        server.serve_forever()  # the pending request makes it return at once
        assert time.perf_counter() - started < 1
        for _ in range(2):  # and serving works again, more than once
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            try:
                assert stream_roundtrip(socket.AF_INET, server.server_address) == b"HELLO\n"
            finally:
                server.shutdown()
                thread.join(TIMEOUT)
            assert not thread.is_alive()


def test_service_actions_still_run_every_poll_interval() -> None:
    ticks = threading.Semaphore(0)

    class Server(ss.TCPServer):
        def service_actions(self) -> None:
            ticks.release()

    server = Server((HOST, 0), UpperStream)
    with serving(server, poll_interval=0.01):
        for _ in range(3):
            assert ticks.acquire(timeout=TIMEOUT)


# --- threads ------------------------------------------------------------------------


class Gate:
    """Counts handlers running at once; they wait for ``release`` before finishing."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = 0
        self.peak = 0
        self.started = 0
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []

    def wait_started(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.started >= count, timeout)

    def join_all(self) -> None:
        for thread in self.threads:
            thread.join(TIMEOUT)

    def handler(self) -> type[ss.BaseRequestHandler]:
        gate = self

        class Handler(ss.BaseRequestHandler):
            def handle(self) -> None:
                with gate.cond:
                    gate.running += 1
                    gate.started += 1
                    gate.peak = max(gate.peak, gate.running)
                    gate.threads.append(threading.current_thread())
                    gate.cond.notify_all()
                gate.release.wait(TIMEOUT)
                self.request.sendall(self.request.recv(100).upper())
                with gate.cond:
                    gate.running -= 1

        return Handler


def test_max_threads_bounds_concurrent_handlers() -> None:
    gate = Gate()

    class Server(ss.ThreadingTCPServer):
        max_threads = 2

    server = Server((HOST, 0), gate.handler())
    with serving(server), contextlib.ExitStack() as stack:
        clients = []
        for n in range(4):
            client = stack.enter_context(
                socket.create_connection(server.server_address, timeout=TIMEOUT)
            )
            client.sendall(b"client %d" % n)
            clients.append(client)
        assert gate.wait_started(2, TIMEOUT)
        assert not gate.wait_started(3, 0.3), "a third handler ran while two were busy"
        gate.release.set()
        replies = [read_to_eof(client) for client in clients]
    assert replies == [b"CLIENT %d" % n for n in range(4)]
    assert gate.peak == 2
    assert gate.started == 4


def test_finished_threads_are_not_kept() -> None:
    gate = Gate()
    gate.release.set()
    server = ss.ThreadingTCPServer((HOST, 0), gate.handler())
    with serving(server):
        for n in range(5):
            with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
                client.sendall(b"x%d" % n)
                assert read_to_eof(client) == b"X%d" % n
        gate.join_all()
        assert len(server._threads) == 0
    refs = [weakref.ref(thread) for thread in gate.threads]
    gate.threads.clear()
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_handle_request_waits_for_a_free_thread() -> None:
    gate = Gate()
    accepted = threading.Semaphore(0)

    class Server(ss.ThreadingTCPServer):
        max_threads = 1

        def get_request(self) -> tuple[Any, Any]:
            accepted.release()
            return super().get_request()

    server = Server((HOST, 0), gate.handler())
    with contextlib.ExitStack() as stack:
        stack.callback(server.server_close)
        first = stack.enter_context(socket.create_connection(server.server_address))
        second = stack.enter_context(socket.create_connection(server.server_address))
        first.sendall(b"one")
        second.sendall(b"two")
        server.handle_request()
        assert accepted.acquire(timeout=TIMEOUT)
        waiter = threading.Thread(target=server.handle_request)
        waiter.start()
        stack.callback(waiter.join, TIMEOUT)
        stack.callback(gate.release.set)
        assert not accepted.acquire(timeout=0.3), "accepted past max_threads"
        gate.release.set()
        assert accepted.acquire(timeout=TIMEOUT)
        waiter.join(TIMEOUT)
        assert read_to_eof(first) == b"ONE"
        assert read_to_eof(second) == b"TWO"


@pytest.mark.parametrize("block_on_close", [True, False])
def test_server_close_joins_threads_when_block_on_close(block_on_close: bool) -> None:
    gate = Gate()

    class Server(ss.ThreadingTCPServer):
        pass

    Server.block_on_close = block_on_close
    server = Server((HOST, 0), gate.handler())
    with socket.create_connection(server.server_address, timeout=TIMEOUT) as client:
        client.sendall(b"late")
        server.handle_request()
        assert gate.wait_started(1, TIMEOUT)
        closer = threading.Thread(target=server.server_close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive() is block_on_close
        gate.release.set()
        closer.join(TIMEOUT)
        assert not closer.is_alive()
        assert read_to_eof(client) == b"LATE"
        gate.join_all()


def test_daemon_threads() -> None:
    gate = Gate()
    gate.release.set()

    class Server(ss.ThreadingTCPServer):
        daemon_threads = True

    server = Server((HOST, 0), gate.handler())
    with serving(server), socket.create_connection(server.server_address) as client:
        client.sendall(b"d")
        assert read_to_eof(client) == b"D"
    assert all(thread.daemon for thread in gate.threads)
    gate.join_all()


# --- forking ------------------------------------------------------------------------


@needs_fork
@fork_ok
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_forking_reaps_children_as_they_exit(pidfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    reaped = threading.Event()

    class Server(ss.ForkingTCPServer):
        forked = 0

        def process_request(self, request: Any, client_address: Any) -> None:
            super().process_request(request, client_address)
            self.forked += 1  # only the parent gets here

        def service_actions(self) -> None:
            super().service_actions()
            if self.forked == 3 and not self.active_children:
                reaped.set()

    server = Server((HOST, 0), UpperStream)
    with serving(server):
        for _ in range(3):
            assert stream_roundtrip(socket.AF_INET, server.server_address) == b"HELLO\n"
        assert reaped.wait(TIMEOUT)
        assert not server.active_children


@needs_fork
@fork_ok
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_forking_max_children_pauses_accepting_without_blocking(
    pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    accepted = threading.Semaphore(0)

    class EchoUntilBye(ss.StreamRequestHandler):
        timeout = TIMEOUT

        def handle(self) -> None:
            for line in self.rfile:
                if line == b"bye\n":
                    break
                self.wfile.write(line.upper())

    class Server(ss.ForkingTCPServer):
        max_children = 1

        def get_request(self) -> tuple[Any, Any]:
            accepted.release()
            return super().get_request()

    server = Server((HOST, 0), EchoUntilBye)
    with serving(server), contextlib.ExitStack() as stack:
        first = stack.enter_context(socket.create_connection(server.server_address, TIMEOUT))
        first.sendall(b"a\n")
        assert first.recv(10) == b"A\n"  # the first child is alive and busy
        second = stack.enter_context(socket.create_connection(server.server_address, TIMEOUT))
        second.sendall(b"b\n")
        assert accepted.acquire(timeout=TIMEOUT)
        assert not accepted.acquire(timeout=0.3), "accepted past max_children"
        first.sendall(b"bye\n")  # the first child exits, is reaped, and accepting resumes
        assert accepted.acquire(timeout=TIMEOUT)
        assert second.recv(10) == b"B\n"
        second.sendall(b"bye\n")
    assert not server.active_children


@needs_fork
@fork_ok
def test_forking_shutdown_is_fast_at_capacity() -> None:
    class Hold(ss.StreamRequestHandler):
        timeout = TIMEOUT

        def handle(self) -> None:
            self.wfile.write(b"hi\n")
            self.rfile.readline()

    class Server(ss.ForkingTCPServer):
        max_children = 1

    server = Server((HOST, 0), Hold)
    # The stdlib would take up to poll_interval to see the shutdown.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 30})
    thread.start()
    with socket.create_connection(server.server_address, TIMEOUT) as client:
        try:
            assert client.recv(10) == b"hi\n"
            started = time.perf_counter()
            server.shutdown()
            assert time.perf_counter() - started < 5
        finally:
            server.shutdown()
            thread.join(TIMEOUT)
            client.sendall(b"bye\n")
    server.server_close()  # waits for the child
    assert not server.active_children


# --- accept errors ------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_accept_overload_backs_off_and_logs_once(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    class Server(ss.TCPServer):
        def get_request(self) -> tuple[Any, Any]:
            nonlocal calls
            calls += 1
            raise OSError(code, os.strerror(code))

    caplog.set_level(logging.WARNING, logger="sockserve.socketserver")
    server = Server((HOST, 0), UpperStream)
    # A pending connection keeps the listening socket readable the whole time.
    with socket.create_connection(server.server_address, timeout=TIMEOUT):
        # The stdlib would take up to poll_interval to see the shutdown.
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 30})
        thread.start()
        try:
            threading.Event().wait(0.5)
            seen = calls
            started = time.perf_counter()
            server.shutdown()
            assert time.perf_counter() - started < 5
        finally:
            server.shutdown()
            thread.join(TIMEOUT)
            server.server_close()
    assert 1 <= seen <= 10, f"get_request called {seen} times in 0.5 s"
    warnings = [r for r in caplog.records if r.name == "sockserve.socketserver"]
    assert len(warnings) == 1
    assert os.strerror(code) in warnings[0].getMessage()


def test_other_accept_errors_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    class Server(ss.TCPServer):
        fail = True

        def get_request(self) -> tuple[Any, Any]:
            if self.fail:
                self.fail = False
                raise ConnectionAbortedError(errno.ECONNABORTED, "aborted")
            return super().get_request()

    caplog.set_level(logging.DEBUG, logger="sockserve.socketserver")
    with (
        Server((HOST, 0), UpperStream) as server,
        socket.create_connection(server.server_address, timeout=TIMEOUT) as client,
    ):
        client.sendall(b"x\n")
        server.handle_request()  # swallowed, like the stdlib
        server.handle_request()
        assert read_to_eof(client) == b"X\n"
    assert not caplog.records


# --- request handlers ---------------------------------------------------------------


def test_stream_handler_options() -> None:
    seen: dict[str, Any] = {}

    class Handler(ss.StreamRequestHandler):
        timeout = 7.0
        disable_nagle_algorithm = True
        wbufsize = 8192

        def handle(self) -> None:
            seen["timeout"] = self.connection.gettimeout()
            seen["nodelay"] = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            self.wfile.write(b"buffered until finish\n")

    with (
        ss.TCPServer((HOST, 0), Handler) as server,
        socket.create_connection(server.server_address, timeout=TIMEOUT) as client,
    ):
        server.handle_request()
        assert read_to_eof(client) == b"buffered until finish\n"
    assert seen == {"timeout": 7.0, "nodelay": 1}


def test_unbuffered_writer_sends_at_once() -> None:
    seen: dict[str, Any] = {}

    class Handler(ss.StreamRequestHandler):
        def handle(self) -> None:
            seen["written"] = self.wfile.write(b"now\n")
            seen["fileno"] = self.wfile.fileno() == self.request.fileno()
            seen["writable"] = self.wfile.writable()
            seen["answer"] = self.rfile.readline()  # the client answers only after "now"

    with (
        ss.TCPServer((HOST, 0), Handler) as server,
        socket.create_connection(server.server_address, timeout=TIMEOUT) as client,
    ):

        def answer() -> None:
            assert client.recv(4) == b"now\n"
            client.sendall(b"ok\n")

        helper = threading.Thread(target=answer)
        helper.start()
        server.handle_request()
        helper.join(TIMEOUT)
    assert seen == {"written": 4, "fileno": True, "writable": True, "answer": b"ok\n"}
