"""Run a sockserve Server in a background thread for tests that talk to it with sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from sockserve.runner import new_event_loop
from sockserve.server import Server

LOOPS = ["asyncio", "uvloop"]


class ThreadedServer:
    """A started Server whose loop runs in a thread; ``stop()`` shuts it down gracefully."""

    def __init__(self, handler: type, loop: str = "asyncio", **settings: Any) -> None:
        settings.setdefault("bind", ["127.0.0.1:0"])
        self.loop = new_event_loop(loop)
        self.server = Server(handler, loop=loop, **settings)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self.loop.close()
            self._started.set()
            return
        self._started.set()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()

    @property
    def urls(self) -> list[str]:
        return self.server.urls

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.listeners[0].sock.getsockname()[:2]
        return host, port

    def call(self, func: Any, *args: Any) -> Any:
        """Run ``func(*args)`` in the server's loop and return its result."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            box.append(func(*args))
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(5)
        return box[0]

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.server.shutdown(timeout), self.loop)
            with contextlib.suppress(Exception):
                future.result(timeout + 10)
            self._thread.join(10)


@contextlib.contextmanager
def serving(handler: type, loop: str = "asyncio", **settings: Any) -> Iterator[ThreadedServer]:
    server = ThreadedServer(handler, loop, **settings)
    try:
        yield server
    finally:
        server.stop()


def connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    return sock


def read_line(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read up to and including the next newline (or to end of stream)."""
    data = bytearray()
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection without sending anything (FIN or RST)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
