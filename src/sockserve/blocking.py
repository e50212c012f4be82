"""Blocking socketserver-style handlers under the event-loop server.

Each stream connection gets a real blocking socket and a thread of its own, up to
``--max-connections``, and the handler class is called exactly as socketserver calls it:
``Handler(request, client_address, server)``. Threads have a small stack
(``--thread-stack-size``); a thread that starts its handler has nothing else to itself.

A thousand threads each blocked in ``recv`` would all wake at once when their clients
answer and fight over the interpreter lock, and that fight is unfair: some clients wait
for seconds. So a handler's socket never waits in the kernel for input. When a read
finds nothing, the thread parks on its own lock and a ``ReadyQueue`` wakes it once its
socket is readable, in the order the sockets became readable, with at most
``RUN_SLOTS`` handler threads running Python at once. A handler that blocks on anything
else (a sleep, a database, a slow client's send) gives its slot up after ``HOLD``
seconds, so it never stalls the others. TLS handshakes run in the event loop; the
thread gets a connection ready to read.

Datagram handlers run on a bounded pool (``--threads``): at the bound, reading pauses.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sockserve.lifecycle import age_jitter
from sockserve.observability import format_peer

if TYPE_CHECKING:
    from sockserve.binding import Listener
    from sockserve.lifecycle import ConnectionLedger
    from sockserve.proxy_protocol import ProxyHeader
    from sockserve.settings import Settings

__all__ = ["HOLD", "RUN_SLOTS", "BlockingPool", "ReadyQueue", "is_blocking_handler"]

# At shutdown, how long handler threads still running may take to return.
CLOSE_TIMEOUT = 5.0
# A blocking datagram handler's sendto waits for room in slices this long.
SEND_WAIT = 1.0
# A handler ended goodbye-first reads and drops its peer's last bytes this long at most.
LINGER_TIMEOUT = 5.0

logger = logging.getLogger("sockserve.blocking")

_SOCKETSERVER_MODULES = frozenset({"socketserver", "sockserve.socketserver"})

# Handler threads running Python at once. Two lets one thread's system call overlap
# another's Python; more only adds contention for the interpreter lock (measured in
# docs/benchmarks.md: 2 costs less CPU per round trip than 4 at 64 and 1000 clients).
RUN_SLOTS = 2
# A slot held this long without the thread coming back to read is given to the next
# ready client: its holder is busy with something else (sleeping, a database call).
HOLD = 0.002
# With this many stream connections or fewer, threads wait for input in the kernel's
# recv, as socketserver's do: so few wake together that the queue's hand-offs would cost
# more than the contention they save (docs/benchmarks.md, the 64-client point).
DIRECT_WAIT_MAX = 128

_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_send = socket.socket.send
_sendall = socket.socket.sendall
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_HAVE_EPOLL = hasattr(select, "epoll") and hasattr(os, "eventfd") and bool(_DONTWAIT)


def is_blocking_handler(cls: type) -> bool:
    """True for subclasses of BaseRequestHandler, from the stdlib or sockserve.socketserver."""
    return any(
        base.__name__ == "BaseRequestHandler" and base.__module__ in _SOCKETSERVER_MODULES
        for base in cls.__mro__
    )


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Idle timeout kept by the kernel (SO_RCVTIMEO/SO_SNDTIMEO) for a blocking socket.

    It bounds a send to a client that stopped reading, and any read a handler makes
    around the ``ReadyQueue`` (``os.read`` on the descriptor): the expired call fails
    with EAGAIN. ``settimeout`` would make Python poll() before every send instead.
    """
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class IdleTimeout(TimeoutError):
    """The client sent nothing for ``--idle-timeout`` seconds (raised from a read)."""


# Waiter states.
_RUNNING, _PARKED, _QUEUED, _LEADING, _LEADING_QUEUED = range(5)


class _Waiter:
    """A handler thread's place in the ReadyQueue."""

    __slots__ = ("fd", "granted", "lock", "pending", "promote", "slot", "state")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.lock.acquire()  # released (by another thread) to wake this one
        self.state = _RUNNING
        self.slot = False
        self.granted = 0.0
        self.promote = False  # woken to become the leader
        self.pending = False  # readable before it parked


class ReadyQueue:
    """Wakes handler threads whose sockets are readable, in arrival order, a few at once.

    One shared epoll holds every connection, armed one-shot while its thread waits.
    Leader/follower: the first thread to park with nobody polling becomes the leader
    and waits in ``epoll.poll``; the others wait on their own locks. The leader queues
    the ready ones and hands out run slots; a thread giving its slot up hands it to the
    head of the queue directly. So the event loop is not involved on the hot path, and
    a client answered wakes one thread, not a crowd. The event loop only runs a monitor
    while clients wait for a slot, taking slots back from holders that keep them past
    ``HOLD``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: int = RUN_SLOTS) -> None:
        self.loop = loop
        self.slots = slots
        self.running = 0
        self.epoll = select.epoll()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.kick, select.EPOLLIN)
        self.waiters: dict[int, _Waiter] = {}
        self.fifo: collections.deque[_Waiter] = collections.deque()
        self.parked: set[_Waiter] = set()
        self.holders: set[_Waiter] = set()
        self.leader: _Waiter | None = None
        self.monitoring = False
        self.lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Clients with input ready, waiting for a run slot."""
        return len(self.fifo)

    def register(self, fd: int) -> _Waiter:
        waiter = _Waiter(fd)
        with self.lock:
            self.waiters[fd] = waiter
        self.epoll.register(fd, 0)
        return waiter

    def unregister(self, waiter: _Waiter) -> None:
        """The handler returned: give up its slot, forget the socket (before closing it)."""
        with self.lock:
            self.waiters.pop(waiter.fd, None)
            self._unslot(waiter)
            wake = self._dispatch()
        self._wake(wake)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(waiter.fd)

    def close(self) -> None:
        self.epoll.close()
        os.close(self.kick)

    def give_up(self, waiter: _Waiter) -> None:
        """The thread is about to wait outside the queue: its slot goes to the next."""
        with self.lock:
            self._unslot(waiter)
            wake = self._dispatch()
        self._wake(wake)

    def enter(self, waiter: _Waiter) -> None:
        """Wait for a run slot (a new connection, before its handler starts)."""
        with self.lock:
            waiter.state = _QUEUED
            self.fifo.append(waiter)
            wake = self._dispatch()
            mine = self._take(wake, waiter)
        self._wake(wake)
        if not mine:
            self._wait(waiter, None)

    def wait_readable(self, waiter: _Waiter, timeout: float | None) -> bool:
        """Park until the socket is readable and a slot is ours; False after ``timeout``
        seconds with nothing to read."""
        self.epoll.modify(waiter.fd, select.EPOLLIN | select.EPOLLONESHOT)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self._unslot(waiter)
            if waiter.pending:  # the leader saw it readable before it parked
                waiter.pending = False
                waiter.state = _QUEUED
                self.fifo.append(waiter)
                wake = self._dispatch()
                lead, ready = False, self._take(wake, waiter)
            else:
                wake = self._dispatch()
                ready = False
                lead = self.leader is None
                if lead:
                    self.leader = waiter
                    waiter.state = _LEADING
                else:
                    waiter.state = _PARKED
                    self.parked.add(waiter)
        self._wake(wake)
        if ready:
            return True
        if lead:
            return self._lead(waiter, deadline)
        return self._wait(waiter, deadline)

    # -- internals (``self.lock`` held where noted) -------------------------------------

    def _unslot(self, waiter: _Waiter) -> None:
        """Under the lock: give the slot up, if it still has one."""
        if waiter.slot:
            waiter.slot = False
            self.running -= 1
            self.holders.discard(waiter)

    def _dispatch(self) -> list[tuple[_Waiter, bool]]:
        """Under the lock: grant free slots to the queue's head; returns whom to wake
        (and whether by kicking the leader out of epoll)."""
        fifo = self.fifo
        wake: list[tuple[_Waiter, bool]] = []
        if fifo and self.running < self.slots:
            now = time.monotonic()
            while fifo and self.running < self.slots:
                waiter = fifo.popleft()
                self.running += 1
                waiter.slot = True
                waiter.granted = now
                self.holders.add(waiter)
                wake.append((waiter, waiter.state == _LEADING_QUEUED))
                waiter.state = _RUNNING
        if fifo and not self.monitoring:
            self.monitoring = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: stopping
                self.loop.call_soon_threadsafe(self._monitor_soon)
        return wake

    @staticmethod
    def _take(wake: list[tuple[_Waiter, bool]], waiter: _Waiter) -> bool:
        """Under the lock: True (and off the wake list) if ``waiter`` was granted."""
        for i, (granted, _kick) in enumerate(wake):
            if granted is waiter:
                del wake[i]
                return True
        return False

    def _wake(self, wake: list[tuple[_Waiter, bool]]) -> None:
        for waiter, kick in wake:
            if kick:
                os.eventfd_write(self.kick, 1)
            else:
                waiter.lock.release()

    def _promote(self) -> _Waiter | None:
        """Under the lock: the leader is leaving; a parked follower takes over polling."""
        if self.leader is None and self.parked:
            follower = self.parked.pop()
            self.leader = follower
            follower.state = _LEADING
            follower.promote = True
            return follower
        return None

    def _wait(self, waiter: _Waiter, deadline: float | None) -> bool:
        if deadline is None:
            waiter.lock.acquire()
        elif not waiter.lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            with self.lock:
                if waiter.state == _PARKED:  # nothing arrived in time
                    self.parked.discard(waiter)
                    waiter.state = _RUNNING
                    return False
            # Ready and queued for a slot, granted, or promoted: the wake-up is coming.
            waiter.lock.acquire()
        if waiter.promote:
            waiter.promote = False
            return self._lead(waiter, deadline)
        return True

    def _lead(self, me: _Waiter, deadline: float | None) -> bool:
        epoll, waiters, kick = self.epoll, self.waiters, self.kick
        while True:
            timeout = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            events = epoll.poll(timeout, 1024)
            with self.lock:
                for fd, _mask in events:
                    if fd == kick:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(kick)
                        continue
                    waiter = waiters.get(fd)
                    if waiter is None:
                        continue
                    if waiter is me:
                        me.state = _LEADING_QUEUED
                        self.fifo.append(me)
                    elif waiter.state == _PARKED:
                        self.parked.discard(waiter)
                        waiter.state = _QUEUED
                        self.fifo.append(waiter)
                    elif waiter.state == _RUNNING:
                        waiter.pending = True
                wake = self._dispatch()
                self._take(wake, me)
                mine = me.slot  # granted now, or by a thread that kicked us
                if me.state == _LEADING_QUEUED:
                    deadline = None  # our input is here: not idle, wait for the slot
                timed_out = (
                    not mine
                    and me.state == _LEADING
                    and deadline is not None
                    and time.monotonic() >= deadline
                )
                follower = None
                if mine or timed_out:
                    me.state = _RUNNING
                    self.leader = None
                    follower = self._promote()
            self._wake(wake)
            if follower is not None:
                follower.lock.release()
            if mine or timed_out:
                return mine

    def _monitor_soon(self) -> None:
        self.loop.call_later(HOLD, self._monitor)

    def _monitor(self) -> None:
        """In the event loop, while clients wait for a slot: take slots back from holders
        that have had them for ``HOLD`` (they are blocked on something else)."""
        now = time.monotonic()
        with self.lock:
            for waiter in list(self.holders):
                if now - waiter.granted >= HOLD:
                    self._unslot(waiter)
            wake = self._dispatch()
            again = bool(self.fifo)
            self.monitoring = again
        self._wake(wake)
        if again:
            self.loop.call_later(HOLD, self._monitor)


class _Idle:
    """What a handler socket needs to wait for input: the queue, its place, the timeout."""

    __slots__ = ("expired", "idle_timeout", "on_wait", "queue", "waiter")

    def __init__(self, queue: ReadyQueue | None, fd: int, idle_timeout: float | None) -> None:
        self.queue = queue
        self.waiter = queue.register(fd) if queue is not None else None
        self.idle_timeout = idle_timeout
        self.expired = False
        # Called (in the handler's thread) each time it is about to wait for input.
        self.on_wait: Callable[[], None] | None = None

    def wait(self, fd: int, timeout: float | None) -> None:
        """Return once ``fd`` is readable; TimeoutError after ``timeout`` (the handler's
        own) or IdleTimeout after the idle timeout."""
        if self.on_wait is not None:
            self.on_wait()
        limit = self.idle_timeout if timeout is None else timeout
        if self.queue is not None and self.waiter is not None:
            ready = self.queue.wait_readable(self.waiter, limit)
        else:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            ready = bool(poller.poll(None if limit is None else limit * 1000))
        if ready:
            return
        if timeout is not None:
            raise TimeoutError("timed out")
        self.expired = True
        raise IdleTimeout(f"idle for {limit:.1f} s")

    def direct(self) -> bool:
        """Whether to wait for input in the kernel (few connections, or no epoll); the
        run slot, if any, is given up first."""
        if self.on_wait is not None:
            self.on_wait()
        queue, waiter = self.queue, self.waiter
        if queue is None or waiter is None:
            return True
        if len(queue.waiters) > DIRECT_WAIT_MAX:
            return False
        if waiter.slot:
            queue.give_up(waiter)
        return True

    def expire(self) -> None:
        """A kernel wait ran out (SO_RCVTIMEO): the connection was idle."""
        self.expired = True
        raise IdleTimeout(f"idle for {self.idle_timeout or 0:.1f} s")

    def release(self) -> None:
        if self.queue is not None and self.waiter is not None:
            self.queue.unregister(self.waiter)
            self.waiter = None


class HandlerSocket(socket.socket):
    """The blocking socket a stream handler gets: reads wait through the ReadyQueue.

    Otherwise an ordinary blocking socket (sends block; a timeout the handler sets is
    Python's own), and it counts the bytes it moves for the access log and metrics.
    """

    __slots__ = ("_idle", "bytes_in", "bytes_out")

    _idle: _Idle
    bytes_in: int
    bytes_out: int

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.gettimeout() is not None or flags & _WAITALL:
            data = _recv(self, bufsize, flags)
        elif self._idle.direct():
            try:
                data = _recv(self, bufsize, flags)
            except BlockingIOError:
                self._idle.expire()
                raise
        else:
            while True:
                try:
                    data = _recv(self, bufsize, flags | _DONTWAIT)
                    break
                except BlockingIOError:
                    self._idle.wait(self.fileno(), None)
        self.bytes_in += len(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self.gettimeout() is not None or flags & _WAITALL:
            n = _recv_into(self, buffer, nbytes, flags)
        elif self._idle.direct():
            try:
                n = _recv_into(self, buffer, nbytes, flags)
            except BlockingIOError:
                self._idle.expire()
                raise
        else:
            while True:
                try:
                    n = _recv_into(self, buffer, nbytes, flags | _DONTWAIT)
                    break
                except BlockingIOError:
                    self._idle.wait(self.fileno(), None)
        self.bytes_in += n
        return n

    def send(self, data: Any, flags: int = 0) -> int:
        n = _send(self, data, flags)
        self.bytes_out += n
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        _sendall(self, data, flags)
        self.bytes_out += memoryview(data).nbytes


class HandlerSSLSocket(ssl.SSLSocket):
    """The TLS socket a stream handler gets: blocking to the handler, never to the thread.

    The descriptor stays non-blocking after the handshake (done in the event loop), so
    OpenSSL never sits in a kernel ``recv``: a read that wants more input waits through
    the ReadyQueue, under the handler's timeout or the idle timeout. (A blocking TLS
    socket with a kernel receive timeout retries forever: CPython turns the expired
    ``recv`` into WANT_READ and reads again.) ``settimeout`` and friends are recorded
    and honoured here, as on a blocking socket.
    """

    _idle: _Idle
    _user_timeout: float | None = None
    bytes_in = 0
    bytes_out = 0

    def settimeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._user_timeout = value

    def gettimeout(self) -> float | None:
        return self._user_timeout

    def setblocking(self, flag: bool) -> None:
        self._user_timeout = None if flag else 0.0

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        while True:
            try:
                data: Any = super().read(len, buffer)
                break
            except ssl.SSLWantReadError:
                if self._user_timeout == 0.0:
                    raise
                self._idle.wait(self.fileno(), self._user_timeout)
            except ssl.SSLWantWriteError:
                if self._user_timeout == 0.0:
                    raise
                self._wait_writable()
        self.bytes_in += data if buffer is not None else builtins.len(data)
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        while True:
            try:
                n = super().send(data, flags)
                break
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                if self._user_timeout == 0.0:
                    raise
                if isinstance(exc, ssl.SSLWantReadError):
                    self._idle.wait(self.fileno(), self._user_timeout)
                else:
                    self._wait_writable()
        self.bytes_out += n
        return n

    def _wait_writable(self) -> None:
        limit = self._user_timeout if self._user_timeout is not None else self._idle.idle_timeout
        poller = select.poll()
        poller.register(self.fileno(), select.POLLOUT)
        if not poller.poll(None if limit is None else limit * 1000):
            if self._user_timeout is not None:
                raise TimeoutError("timed out")
            self._idle.expired = True
            raise IdleTimeout(f"send blocked for {limit:.1f} s")


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
        if self.queue is None and _HAVE_EPOLL:
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
            self._refused(address, listener, started, exc or "timeout")
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
            request._idle = _Idle(self.queue, request.fileno(), self._idle_timeout)
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
        idle: _Idle = request._idle
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
