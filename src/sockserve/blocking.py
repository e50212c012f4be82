"""Blocking socketserver-style handlers under the event-loop server, on a bounded pool.

Each connection gets a real blocking socket and a thread from the pool for its lifetime,
and the handler class is called exactly as socketserver calls it:
``Handler(request, client_address, server)``. When every thread is busy the server stops
accepting, so clients wait in the kernel backlog rather than in an unbounded queue.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sockserve.lifecycle import age_jitter
from sockserve.observability import format_peer

if TYPE_CHECKING:
    from sockserve.binding import Listener
    from sockserve.lifecycle import ConnectionLedger
    from sockserve.proxy_protocol import ProxyHeader
    from sockserve.settings import Settings

__all__ = ["BlockingPool", "is_blocking_handler"]

# At shutdown, how long handler threads still running may take to return.
CLOSE_TIMEOUT = 5.0
# A blocking datagram handler's sendto waits for room in slices this long.
SEND_WAIT = 1.0
# A handler ended goodbye-first reads and drops its peer's last bytes this long at most.
LINGER_TIMEOUT = 5.0

logger = logging.getLogger("sockserve.blocking")

_SOCKETSERVER_MODULES = frozenset({"socketserver", "sockserve.socketserver"})


def is_blocking_handler(cls: type) -> bool:
    """True for subclasses of BaseRequestHandler, from the stdlib or sockserve.socketserver."""
    return any(
        base.__name__ == "BaseRequestHandler" and base.__module__ in _SOCKETSERVER_MODULES
        for base in cls.__mro__
    )


class CountingSocket(socket.socket):
    """A socket that counts the bytes it moves, for the access log and metrics."""

    bytes_in = 0
    bytes_out = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.bytes_in += len(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        self.bytes_in += n
        return n

    def send(self, data: Any, flags: int = 0) -> int:
        n = super().send(data, flags)
        self.bytes_out += n
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        super().sendall(data, flags)
        self.bytes_out += memoryview(data).nbytes


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Idle timeout for a blocking socket, kept by the kernel (SO_RCVTIMEO/SO_SNDTIMEO).

    ``settimeout`` would make Python poll() before every recv and send, doubling the
    system calls of a blocking handler; these cost nothing until they expire. Then a
    read fails with EAGAIN: ``rfile`` sees the end of the stream, ``recv`` raises.
    """
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class BlockingDatagramSocket:
    """The listener socket as a blocking DatagramRequestHandler expects it.

    The real socket is non-blocking (the event loop reads it); ``sendto`` waits for room
    instead of raising BlockingIOError. Everything else is the socket's own.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendto(self, data: Any, *args: Any) -> int:
        while True:
            try:
                return self._sock.sendto(data, *args)
            except BlockingIOError:
                select.select([], [self._sock], [], SEND_WAIT)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BlockingPool:
    """Runs blocking handlers on at most ``threads`` threads.

    Handler threads report through the ledger: its logs directly (they are thread-safe),
    everything else by ``ledger.call_from_thread``.
    """

    def __init__(
        self, server: Any, settings: Settings, ledger: ConnectionLedger, threads: int
    ) -> None:
        self.server = server  # what handlers get as ``self.server``
        self.handler_class: Any = server.handler_class
        self.settings = settings
        self.ledger = ledger
        self.threads = threads
        self.busy = 0  # touched only in the event loop thread
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="sockserve-handler")
        self._active: dict[socket.socket, float] = {}  # socket: when it was accepted
        self._ended: dict[socket.socket, str] = {}  # told to end goodbye-first: why
        self._draining = False  # the server is stopping: every connection ends
        self._lock = threading.Lock()
        self._count = settings.access_log or settings.metrics is not None

    @property
    def full(self) -> bool:
        return self.busy >= self.threads

    def submit_stream(
        self,
        accepted: _socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        context: ssl.SSLContext | None,
    ) -> None:
        self.busy += 1
        # Handlers get a full socket.socket (makefile and all), counting when it must.
        kind = CountingSocket if self._count else socket.socket
        conn = kind(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        self.executor.submit(self._run_stream, conn, address, listener, proxy, context)

    def _run_stream(
        self,
        conn: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        context: ssl.SSLContext | None,
    ) -> None:
        ledger = self.ledger
        settings = self.settings
        started = time.monotonic()
        reason = "eof"
        request: socket.socket = conn
        with self._lock:
            self._active[conn] = started
        try:
            conn.setblocking(True)
            if context is not None:
                conn.settimeout(settings.handshake_timeout)
                try:
                    request = context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    reason = "TLS handshake failed"
                    ledger.call_from_thread(ledger.rejected, "tls")
                    ledger.reject_log("TLS handshake failed for %s: %s", address, exc)
                    return
            request.settimeout(None)
            if settings.idle_timeout:
                set_kernel_timeouts(request, settings.idle_timeout)
            cls = self.handler_class
            handler = cls.__new__(cls)
            handler.proxy = proxy  # before __init__, which runs setup/handle/finish
            handler.listener = listener.url
            if self._draining:  # accepted from the backlog while stopping
                self._end(conn, "server shutdown")
            handler.__init__(request, address, self.server)
            with self._lock:
                ended = self._ended.pop(conn, None)
            if ended is not None:
                reason = ended
                self._goodbye(handler, request)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            reason = "idle timeout"
            ledger.idle_log("closing %s: idle for %.1f s", address, settings.idle_timeout)
        except OSError as exc:
            reason = f"error: {exc}"
            logger.debug("connection from %s ended: %s", format_peer(address), exc)
        except Exception as exc:
            reason = "handler error"
            ledger.call_from_thread(ledger.handler_failed, address, exc)
        finally:
            with self._lock:
                self._active.pop(conn, None)
                self._ended.pop(conn, None)
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_WR)  # as socketserver's shutdown_request
            request.close()
            counted = conn if isinstance(conn, CountingSocket) else None
            ledger.call_from_thread(self._stream_done, address, listener, started, counted, reason)

    def _stream_done(
        self,
        address: Any,
        listener: Listener,
        started: float,
        counted: CountingSocket | None,
        reason: str,
    ) -> None:
        was_full = self.full
        self.busy -= 1
        bytes_in = counted.bytes_in if counted else 0
        bytes_out = counted.bytes_out if counted else 0
        duration = time.monotonic() - started
        self.ledger.closed(address, listener.url, duration, bytes_in, bytes_out, reason)
        if was_full:
            self.ledger.capacity_changed()

    def submit_datagram(self, data: bytes, address: Any, sock: socket.socket) -> None:
        self.busy += 1
        self.executor.submit(self._run_datagram, data, address, sock)

    def _run_datagram(self, data: bytes, address: Any, sock: socket.socket) -> None:
        ledger = self.ledger
        try:
            self.handler_class((data, BlockingDatagramSocket(sock)), address, self.server)
        except Exception as exc:
            ledger.call_from_thread(ledger.handler_failed, address, exc)
        finally:
            ledger.call_from_thread(self._datagram_done)

    def _datagram_done(self) -> None:
        was_full = self.full
        self.busy -= 1
        if was_full:
            self.ledger.capacity_changed()

    def _goodbye(self, handler: Any, request: socket.socket) -> None:
        """After a handler ended by the server returns: its ``handle_shutdown`` (what it
        returns is sent), our end of stream, then the peer's last bytes read and dropped so
        that closing sends no reset."""
        hook = getattr(handler, "handle_shutdown", None)
        result = hook() if hook is not None else None
        if isinstance(result, (bytes, bytearray, memoryview)):
            request.sendall(result)
        request.shutdown(socket.SHUT_WR)
        request.settimeout(LINGER_TIMEOUT)
        deadline = time.monotonic() + LINGER_TIMEOUT
        with contextlib.suppress(OSError):
            while request.recv(65536) and time.monotonic() < deadline:
                pass

    def _end(self, conn: socket.socket, reason: str) -> None:
        """End a connection goodbye-first: a handler waiting in recv with nothing unread
        sees end of input at once, a busy one once it has read what was sent."""
        with self._lock:
            if conn not in self._active or conn in self._ended:
                return
            self._ended[conn] = reason
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RD)

    def drain(self, spread: float) -> None:
        """The server is stopping: end every connection goodbye-first (spread evenly over
        ``spread`` seconds), and every one accepted from now on."""
        self._draining = True
        with self._lock:
            conns = list(self._active)
        loop = self.ledger.loop
        for i, conn in enumerate(conns):
            if spread and i:
                loop.call_later(spread * i / len(conns), self._end, conn, "server shutdown")
            else:
                self._end(conn, "server shutdown")

    def end_aged(self, now: float, age: float) -> None:
        """End goodbye-first the connections older than ``age`` (with their jitter)."""
        with self._lock:
            aged = [c for c, t in self._active.items() if now - t >= age * age_jitter(id(c))]
        for conn in aged:
            self._end(conn, "max connection age")

    def release_all(self) -> None:
        """Unblock handlers stuck reading: their sockets see end of stream (shutdown time)."""
        with self._lock:
            for conn in self._active:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait (bounded) for running handlers to return."""
        done = asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            logger.warning("%d handler thread(s) still running at exit", self.busy)
