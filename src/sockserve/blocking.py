"""Blocking socketserver-style handlers under the event-loop server.

Each stream connection gets a real blocking socket and a thread of its own, up to
``--max-connections``, and the handler class is called exactly as socketserver calls it:
``Handler(request, client_address, server)``. Threads have a small stack
(``--thread-stack-size``); a thread that starts its handler has nothing else to itself.

A thousand threads each blocked in ``recv`` would all wake at once when their clients
answer and fight over the interpreter lock, and that fight is unfair: some clients wait
for seconds. So a handler's socket never waits in the kernel for input. When a read
finds nothing, the thread parks on its own lock and a ``ReadyQueue`` (``ready_queue.py``)
wakes it once its socket is readable, in the order the sockets became readable, with at
most ``RUN_SLOTS`` handler threads running Python at once. A handler that blocks on
anything else (a sleep, a database, a slow client's send) gives its slot up after
``HOLD`` seconds, so it never stalls the others. The sockets handlers get are in
``handler_sockets.py``. TLS handshakes run in the event loop; the thread gets a
connection ready to read.

Datagram handlers run on a bounded pool (``--threads``): at the bound, reading pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sockserve.handler_sockets import (
    BlockingDatagramSocket,
    HandlerSocket,
    HandlerSSLSocket,
    set_kernel_timeouts,
)
from sockserve.lifecycle import LINGER_TIMEOUT, age_jitter
from sockserve.observability import format_peer
from sockserve.ready_queue import HAVE_EPOLL, HOLD, RUN_SLOTS, Idle, ReadyQueue

if TYPE_CHECKING:
    from sockserve.binding import Listener
    from sockserve.lifecycle import ConnectionLedger
    from sockserve.proxy_protocol import ProxyHeader
    from sockserve.settings import Settings

__all__ = ["HOLD", "RUN_SLOTS", "BlockingPool", "ReadyQueue", "is_blocking_handler"]

# At shutdown, how long handler threads still running may take to return.
CLOSE_TIMEOUT = 5.0

logger = logging.getLogger("sockserve.blocking")

_SOCKETSERVER_MODULES = frozenset({"socketserver", "sockserve.socketserver"})


def is_blocking_handler(cls: type) -> bool:
    """True for subclasses of BaseRequestHandler, from the stdlib or sockserve.socketserver."""
    return any(
        base.__name__ == "BaseRequestHandler" and base.__module__ in _SOCKETSERVER_MODULES
        for base in cls.__mro__
    )


class _HandlerThread(threading.Thread):
    """One stream connection's thread. ``run`` calls the handler directly: every frame
    between the thread's start and the handler is C stack a parked thread keeps."""

    def __init__(self, pool: BlockingPool, args: tuple[Any, ...]) -> None:
        super().__init__(name="sockserve-handler", daemon=True)
        self._pool = pool
        self._work = args

    def run(self) -> None:
        work, self._work = self._work, ()
        self._pool._run_stream(*work)


class BlockingPool:
    """Runs blocking handlers: a thread per stream connection, a bounded pool for datagrams.

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
        self.stack_size = settings.thread_stack_size
        self.busy = 0  # datagram handlers running; touched only in the event loop thread
        self.streams = 0  # stream handler threads alive; likewise
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="sockserve-datagram")
        self.queue: ReadyQueue | None = None  # made on the first connection, in the loop
        self._active: dict[socket.socket, float] = {}  # socket: when it was accepted
        self._ended: dict[socket.socket, str] = {}  # told to end goodbye-first: why
        self._draining = False  # the server is stopping: every connection ends
        self._lock = threading.Lock()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._threads: set[threading.Thread] = set()  # stream threads, some maybe ended
        self._all_done: asyncio.Future[None] | None = None
        self._idle_timeout = settings.idle_timeout or None

    @property
    def full(self) -> bool:
        """Every datagram thread is busy (stream connections are bounded by the server)."""
        return self.busy >= self.threads

    @property
    def waiting(self) -> int:
        """Clients with input ready, waiting for their turn to run."""
        return self.queue.waiting if self.queue is not None else 0

    # -- stream connections ------------------------------------------------------------

    def submit_stream(
        self,
        accepted: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        context: ssl.SSLContext | None,
        handshake_timeout: float | None = None,
    ) -> None:
        """Serve ``conn`` on a thread of its own; TLS first, in the event loop."""
        started = time.monotonic()
        if self.queue is None and HAVE_EPOLL:
            self.queue = ReadyQueue(self.ledger.loop)
        # Handlers get a full socket.socket (makefile and all).
        conn = socket.socket(accepted.family, accepted.type, accepted.proto, accepted.detach())
        if context is None:
            self._start(conn, address, listener, proxy, started)
            return
        timeout = handshake_timeout or self.settings.handshake_timeout
        task = self.ledger.loop.create_task(
            self._handshake(conn, address, listener, proxy, context, timeout, started)
        )
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(
        self,
        conn: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        context: ssl.SSLContext,
        timeout: float,
        started: float,
    ) -> None:
        conn.setblocking(False)
        context.sslsocket_class = HandlerSSLSocket
        try:
            tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            self._refused(address, listener, started, exc)
            return
        # _create set the handler-visible timeout; the descriptor itself stays
        # non-blocking for good (see HandlerSSLSocket).
        socket.socket.settimeout(tls, 0.0)
        tls._user_timeout = None  # type: ignore[attr-defined]
        try:
            await asyncio.wait_for(self._do_handshake(tls), timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            tls.close()
            self._refused(address, listener, started, str(exc) or "timeout")
            return
        except asyncio.CancelledError:
            tls.close()
            self._account(address, listener, started, None, "server shutdown")
            raise
        self._start(tls, address, listener, proxy, started)

    async def _do_handshake(self, tls: ssl.SSLSocket) -> None:
        loop = self.ledger.loop
        fd = tls.fileno()
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                await _ready(loop, fd, loop.add_reader, loop.remove_reader)
            except ssl.SSLWantWriteError:
                await _ready(loop, fd, loop.add_writer, loop.remove_writer)

    def _refused(self, address: Any, listener: Listener, started: float, exc: object) -> None:
        self.ledger.rejected("tls")
        self.ledger.reject_log("TLS handshake failed for %s: %s", address, exc)
        self._account(address, listener, started, None, "TLS handshake failed")

    def _start(
        self,
        conn: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        started: float,
    ) -> None:
        """Wrap ``conn`` as the handler's socket and start its thread (event loop)."""
        if isinstance(conn, HandlerSSLSocket):
            request: Any = conn
        else:
            request = HandlerSocket(conn.family, conn.type, conn.proto, fileno=conn.detach())
            request.bytes_in = request.bytes_out = 0
            request.setblocking(True)
            if self._idle_timeout:
                set_kernel_timeouts(request, self._idle_timeout)
        try:
            request._idle = Idle(self.queue, request.fileno(), self._idle_timeout)
        except OSError as exc:
            request.close()
            self._account(address, listener, started, None, f"error: {exc}")
            return
        thread = _HandlerThread(self, (request, address, listener, proxy, started))
        old = threading.stack_size(self.stack_size)
        try:
            thread.start()
        except RuntimeError as exc:  # out of threads: threads-max, ulimit -u, memory
            request._idle.release()
            request.close()
            self.ledger.stats.limit_reached("threads")
            self.ledger.overload_log(
                "cannot start a handler thread (%s) with %d running: closing %s; see"
                " docs/deployment.md (threads-max, ulimit -u, --thread-stack-size)",
                exc,
                self.streams,
                address,
            )
            self._account(address, listener, started, None, "no thread")
            return
        finally:
            threading.stack_size(old)
        self.streams += 1
        threads = self._threads
        threads.add(thread)
        if len(threads) > 2 * self.streams + 64:  # forget the ended ones now and then
            self._threads = {t for t in threads if t.is_alive()}

    def _run_stream(
        self,
        request: Any,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        started: float,
    ) -> None:
        ledger = self.ledger
        idle: Idle = request._idle
        reason = "eof"
        with self._lock:
            self._active[request] = started
        try:
            if idle.waiter is not None and idle.queue is not None:
                idle.queue.enter(idle.waiter)
            cls = self.handler_class
            handler = cls.__new__(cls)
            handler.proxy = proxy  # before __init__, which runs setup/handle/finish
            handler.listener = listener.url
            if self._draining:  # accepted from the backlog while stopping
                self._call(self._end_unless_fresh, request, "server shutdown")
            handler.__init__(request, address, self.server)
            with self._lock:
                ended = self._ended.pop(request, None)
            if ended is not None:
                reason = ended
                self._goodbye(handler, request)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO expired
            reason = "idle timeout"
            ledger.idle_log("closing %s: idle for %.1f s", address, idle.idle_timeout or 0)
        except OSError as exc:
            if idle.expired:
                reason = "idle timeout"
                ledger.idle_log("closing %s: idle for %.1f s", address, idle.idle_timeout or 0)
            else:
                reason = f"error: {exc}"
                logger.debug("connection from %s ended: %s", format_peer(address), exc)
        except Exception as exc:
            reason = "handler error"
            self._call(ledger.handler_failed, address, exc)
        finally:
            with self._lock:
                self._active.pop(request, None)
                self._ended.pop(request, None)
            idle.release()
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_WR)  # as socketserver's shutdown_request
            request.close()
            moved = (request.bytes_in, request.bytes_out)
            self._call(self._stream_done, address, listener, started, moved, reason)

    def _call(self, callback: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self.ledger.call_from_thread(callback, *args)

    def _stream_done(
        self,
        address: Any,
        listener: Listener,
        started: float,
        moved: tuple[int, int],
        reason: str,
    ) -> None:
        self.streams -= 1
        self._account(address, listener, started, moved, reason)

    def _account(
        self,
        address: Any,
        listener: Listener,
        started: float,
        moved: tuple[int, int] | None,
        reason: str,
    ) -> None:
        bytes_in, bytes_out = moved or (0, 0)
        duration = time.monotonic() - started
        self.ledger.closed(address, listener.url, duration, bytes_in, bytes_out, reason)
        self._check_all_done()

    # -- datagrams ---------------------------------------------------------------------

    def submit_datagram(self, data: bytes, address: Any, sock: socket.socket) -> None:
        self.busy += 1
        old = threading.stack_size(self.stack_size)
        try:
            self.executor.submit(self._run_datagram, data, address, sock)
        finally:
            threading.stack_size(old)
        if self.full:
            self.ledger.stats.limit_reached("threads")
            self.ledger.overload_log(
                "all %d --threads busy with datagram handlers: reading waits (raise --threads)",
                self.threads,
            )

    def _run_datagram(self, data: bytes, address: Any, sock: socket.socket) -> None:
        ledger = self.ledger
        try:
            self.handler_class((data, BlockingDatagramSocket(sock)), address, self.server)
        except Exception as exc:
            self._call(ledger.handler_failed, address, exc)
        finally:
            self._call(self._datagram_done)

    def _datagram_done(self) -> None:
        was_full = self.full
        self.busy -= 1
        self._check_all_done()
        if was_full:
            self.ledger.capacity_changed()

    # -- stopping ----------------------------------------------------------------------

    def _check_all_done(self) -> None:
        done = self._all_done
        if done is not None and not done.done() and not self.streams and not self.busy:
            done.set_result(None)

    def _goodbye(self, handler: Any, request: socket.socket) -> None:
        """After a handler ended by the server returns: its ``handle_shutdown`` (what it
        returns is sent), our end of stream, then the peer's last bytes read and dropped so
        that closing sends no reset."""
        hook = getattr(handler, "handle_shutdown", None)
        result = hook() if hook is not None else None
        if isinstance(result, (bytes, bytearray, memoryview)):
            request.sendall(result)
        socket.socket.shutdown(request, socket.SHUT_WR)
        request.settimeout(LINGER_TIMEOUT)
        deadline = time.monotonic() + LINGER_TIMEOUT
        with contextlib.suppress(OSError):
            while request.recv(65536) and time.monotonic() < deadline:
                pass

    def _end(self, conn: socket.socket, reason: str) -> None:
        """End a connection goodbye-first: a handler waiting to read with nothing unread
        sees end of input at once, a busy one once it has read what was sent."""
        with self._lock:
            if conn not in self._active or conn in self._ended:
                return
            self._ended[conn] = reason
        with contextlib.suppress(OSError):
            socket.socket.shutdown(conn, socket.SHUT_RD)  # under TLS too: no SSL state

    def _end_unless_fresh(self, conn: socket.socket, reason: str) -> None:
        """``_end`` now, or, for a client yet to send its first request, once the
        connection is the ledger's first_request_wait old: it is about to send."""
        with self._lock:
            started = self._active.get(conn)
        if started is None:
            return
        request: Any = conn
        wait = 0.0
        if not request.bytes_in:
            # Ended when its thread next waits for input once it has read something: set
            # before bytes_in is read again, so a request read meanwhile is not missed.
            request._idle.on_wait = lambda: self._end_if_heard(request, reason)
            if not request.bytes_in:
                wait = started + self.ledger.first_request_wait - time.monotonic()
        if wait > 0:
            self.ledger.loop.call_later(wait, self._end, conn, reason)
        else:
            self._end(conn, reason)

    def _end_if_heard(self, request: Any, reason: str) -> None:
        """In a handler's thread about to wait for input: end the connection if its
        client has sent something (its first request is answered by now)."""
        if request.bytes_in:
            request._idle.on_wait = None
            self._end(request, reason)

    def drain(self, spread: float) -> None:
        """The server is stopping: end every connection goodbye-first (spread evenly over
        ``spread`` seconds), and every one accepted from now on."""
        self._draining = True
        with self._lock:
            conns = list(self._active)
        loop = self.ledger.loop
        for i, conn in enumerate(conns):
            if spread and i:
                delay = spread * i / len(conns)
                loop.call_later(delay, self._end_unless_fresh, conn, "server shutdown")
            else:
                self._end_unless_fresh(conn, "server shutdown")

    def end_aged(self, now: float, age: float) -> None:
        """End goodbye-first the connections older than ``age`` (with their jitter)."""
        with self._lock:
            aged = [c for c, t in self._active.items() if now - t >= age * age_jitter(id(c))]
        for conn in aged:
            self._end(conn, "max connection age")

    def _join(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the threads of handlers that have returned."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(deadline - time.monotonic(), 0.0))
        self.executor.shutdown(wait=True)

    def release_all(self) -> None:
        """Unblock handlers waiting to read: their sockets see end of stream (shutdown)."""
        with self._lock:
            for conn in self._active:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(conn, socket.SHUT_RDWR)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait (bounded) for running handlers to return."""
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
        self._all_done = asyncio.get_running_loop().create_future()
        self._check_all_done()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._all_done), timeout)
        except asyncio.TimeoutError:
            logger.warning("%d handler thread(s) still running at exit", self.streams + self.busy)
            self.executor.shutdown(wait=False)
        else:
            # Every handler has returned and reported; let the threads end too, so that
            # none outlives the server.
            left = max(deadline - loop.time(), 0.1)
            joining = loop.run_in_executor(None, self._join, left)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(joining, left + 1.0)
        if self.queue is not None and not self.streams:
            self.queue.close()


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, add: Any, remove: Any) -> None:
    """Wait in ``loop`` until ``fd`` is ready (``add``/``remove``: the reader or writer pair)."""
    future: asyncio.Future[None] = loop.create_future()
    add(fd, future.set_result, None)
    try:
        await future
    finally:
        remove(fd)
