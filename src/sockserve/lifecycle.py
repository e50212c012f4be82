"""The connection ledger: what every connection reports to, whatever serves it.

The server accepts; handlers (async ones in the event loop, blocking ones on the pool's
threads) serve. Between them sits one ``ConnectionLedger``: it counts open connections,
holds the set of live async ones, keeps the stats and the rate-limited logs, and tells
the server when capacity changed. A connection is accounted for when it closes in one
place, ``closed``, whether a handler served it or it was refused before one ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from sockserve.admission import Admission, RemoteAdmission
from sockserve.metrics import Stats
from sockserve.observability import HandlerErrorLog, format_peer, log_access
from sockserve.settings import Settings

if TYPE_CHECKING:
    from sockserve.connection import _Connection
    from sockserve.server import Server

__all__ = [
    "FIRST_REQUEST_WAIT",
    "LINGER_TIMEOUT",
    "ConnectionLedger",
    "Connections",
    "RateLimitedLog",
    "age_jitter",
]

# Connection events (refusals, timeouts, handler errors) are the server's to report.
logger = logging.getLogger("sockserve.server")


LIMIT_LOG_INTERVAL = 10.0
# A connection ended goodbye-first whose peer does not close after our end of stream is
# cut after this long (a blocking handler reads and drops its last bytes this long).
LINGER_TIMEOUT = 5.0
# A connection ended goodbye-first (stop, reload) before its client sent anything gets
# until it is this old to send its first request: its client connected in the same
# instant as the stop, or was accepted from the backlog while stopping, and is about to
# send. Only then is it idle like a connection waiting for its next request.
FIRST_REQUEST_WAIT = 1.0


def age_jitter(seed: int) -> float:
    """A factor in [0.9, 1.1] fixed for each connection (its id), so connections opened
    together do not all reach --max-connection-age together."""
    return 0.9 + ((seed * 2654435761) >> 7) % 1001 / 5000


def read_ahead(settings: Settings) -> int:
    """How far a connection's reader may fall behind its peer, past one line, before
    reading from it pauses: --max-buffered-input shared by --max-connections."""
    from sockserve.connection import MIN_READ_AHEAD, READ_AHEAD

    share = settings.max_buffered_input // settings.max_connections - settings.max_line
    return min(READ_AHEAD, max(MIN_READ_AHEAD, share))


class RateLimitedLog:
    """Logs a recurring condition at most once per ``interval`` seconds, counting the rest.

    Peers choose how often these happen; a flood of them must not become a flood of logs.
    Safe to call from any thread (blocking handlers report from the pool's threads).
    """

    def __init__(self, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self.interval = interval
        self.level = level
        self.last = -interval
        self.suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self.last < self.interval:
                self.suppressed += 1
                return
            suppressed, self.last, self.suppressed = self.suppressed, now, 0
        args = tuple(format_peer(a) if isinstance(a, (tuple, bytes)) else a for a in args)
        if suppressed:
            msg += " (%d more since the last report)"
            args = (*args, suppressed)
        logger.log(self.level, msg, *args)


class ConnectionLedger:
    """Open connections, stats and peer-caused logs of one server.

    Everything but ``call_from_thread`` and the logs runs in the event loop thread.
    ``capacity_changed`` is the server's: called when a connection slot frees up at the
    limit (or fills the last one), so it can pause or resume accepting.
    """

    loop: asyncio.AbstractEventLoop
    server: Server  # what handlers see as ``self.server``

    def __init__(self, settings: Settings, capacity_changed: Callable[[], None]) -> None:
        self.settings = settings
        self.max_line = settings.max_line
        self.capacity_changed = capacity_changed
        self.max_connections = settings.max_connections
        self.access_log = settings.access_log
        self.read_ahead = read_ahead(settings)
        self.stats = Stats()
        self.open = 0  # accepted and not yet closed, handshaking ones included
        self.connections: set[_Connection] = set()  # async connections with a transport
        self.tasks: set[asyncio.Task[Any]] = set()  # cancelled if still running at the end
        self.stopping = False
        self.first_request_wait = FIRST_REQUEST_WAIT
        admission = Admission(settings.max_connections_per_ip, settings.connection_rate_per_ip)
        # Per-client counts: a connection admitted here is released in ``closed``.
        self.admission: Admission | RemoteAdmission | None = (
            admission if admission.enabled else None
        )
        self._idle_waiter: asyncio.Future[None] | None = None
        self._stop_waiting = False
        self.overload_log = RateLimitedLog()
        self.oversize_log = RateLimitedLog()
        self.reject_log = RateLimitedLog(interval=1.0)
        self.refuse_log = RateLimitedLog(interval=1.0, level=logging.INFO)
        self.idle_log = RateLimitedLog(interval=1.0, level=logging.INFO)
        self.long_line_log = RateLimitedLog(interval=1.0)
        self.slow_line_log = RateLimitedLog(interval=1.0, level=logging.INFO)
        self.slow_consumer_log = RateLimitedLog(interval=1.0)
        self.max_write_buffer = settings.max_write_buffer
        self.handler_error_log = HandlerErrorLog(logger)
        self.reflection_log = RateLimitedLog()
        # max_connections reached and left: a pause line at most every LIMIT_LOG_INTERVAL,
        # each followed by its resume line; the pauses in between are counted.
        self._paused_at: float | None = None  # when the logged pause began
        self._limit_logged = -LIMIT_LOG_INTERVAL
        self._pauses = 0

    @property
    def full(self) -> bool:
        return self.open >= self.max_connections

    def accepted(self) -> None:
        """A connection was accepted: it holds a slot until ``closed``."""
        self.open += 1
        self.stats.connections_total += 1
        if self.open >= self.max_connections:
            self._limit_reached()
            self.capacity_changed()

    def _limit_reached(self) -> None:
        now = time.monotonic()
        self.stats.limit_reached("max_connections")
        self._pauses += 1
        if now - self._limit_logged < LIMIT_LOG_INTERVAL or self._paused_at is not None:
            return
        more = (
            f" ({self._pauses - 1} more pauses since the last report)" if self._pauses > 1 else ""
        )
        logger.warning(
            "max_connections (%d) reached: accepting paused, new clients wait in the listen"
            " backlog%s",
            self.max_connections,
            more,
        )
        self._paused_at, self._limit_logged, self._pauses = now, now, 0

    def opened(self, conn: _Connection) -> float:
        """An async connection has its transport; returns its start time (the access log,
        --max-connection-age, the wait for a first request when stopping)."""
        self.connections.add(conn)
        return time.monotonic()

    def lost(self, conn: _Connection) -> None:
        """An async connection's transport is gone (``closed`` follows)."""
        self.connections.discard(conn)

    def closed(
        self,
        peer: Any,
        listener: str,
        duration: float,
        bytes_in: int,
        bytes_out: int,
        reason: str,
        admitted: bool = True,
    ) -> None:
        """Every accepted connection ends here once, refused ones included (those refused
        before admission with ``admitted=False``)."""
        self.stats.connection_closed(bytes_in, bytes_out, reason)
        if admitted and self.admission is not None:
            self.admission.release(peer)
        if self.access_log:
            log_access(peer, listener, duration, bytes_in, bytes_out, reason)
        self.open -= 1
        if self.stopping:
            if not self.open:
                self._wake_idle()
        elif self.open == self.max_connections - 1:
            if self._paused_at is not None:
                logger.info(
                    "below max_connections again after %.1f s: accepting resumed",
                    time.monotonic() - self._paused_at,
                )
                self._paused_at = None
            self.capacity_changed()  # was at the limit: accept again

    def rejected(self, reason: str) -> None:
        self.stats.rejected(reason)

    def handler_failed(self, peer: Any, exc: BaseException) -> None:
        self.stats.handler_errors += 1
        self.handler_error_log(peer, exc)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in a task that the server cancels if it still runs at the end."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def call_from_thread(self, callback: Callable[..., object], *args: Any) -> None:
        """The way in from another thread: run ``callback(*args)`` in the event loop."""
        self.loop.call_soon_threadsafe(callback, *args)

    # -- shutdown ------------------------------------------------------------------------

    async def wait_idle(self, deadline: float) -> None:
        """Wait until no connection is open, ``deadline`` (loop time) passes, or
        ``stop_waiting`` is called."""
        loop = self.loop
        while self.open and not self._stop_waiting and (left := deadline - loop.time()) > 0:
            self._idle_waiter = loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._idle_waiter), left)

    def stop_waiting(self) -> None:
        """Make ``wait_idle`` return now, and every later call at once."""
        self._stop_waiting = True
        self._wake_idle()

    def _wake_idle(self) -> None:
        if self._idle_waiter is not None and not self._idle_waiter.done():
            self._idle_waiter.set_result(None)


class Connections:
    """A live, read-only view of a server's open connections in this process.

    Iterating yields the handler instances of line, stream and message handlers (blocking
    handlers run on threads and are not listed), as a snapshot: handlers may connect and
    disconnect while a loop over it runs. ``on(url)`` narrows the view to one listener.
    Use it in the server's event loop thread (from a handler, or a task of the loop).
    """

    __slots__ = ("_connections", "_listener")

    def __init__(self, connections: set[_Connection], listener: str | None = None) -> None:
        self._connections = connections
        self._listener = listener

    def on(self, listener: str) -> Connections:
        """The connections accepted on ``listener`` (its URL, as in ``handler.listener``)."""
        return Connections(self._connections, listener)

    def _live(self) -> list[_Connection]:
        listener = self._listener
        if listener is None:
            return list(self._connections)
        return [conn for conn in self._connections if conn.listener == listener]

    def __iter__(self) -> Iterator[_Connection]:
        return iter(self._live())

    def __len__(self) -> int:
        if self._listener is None:
            return len(self._connections)
        return len(self._live())

    def __contains__(self, conn: object) -> bool:
        return conn in self._connections and (
            self._listener is None or getattr(conn, "listener", None) == self._listener
        )

    def __repr__(self) -> str:
        where = f" on {self._listener}" if self._listener else ""
        return f"<{len(self)} connection(s){where}>"

    def broadcast(
        self, data: bytes, *, exclude: _Connection | Iterable[_Connection] | None = None
    ) -> int:
        """``send(data)`` to every connection in the view but ``exclude`` (one connection
        or several); returns how many it was queued for.

        Never waits: each connection queues what its peer has not read yet, up to
        ``max_write_buffer``; one over that is closed as a slow consumer.
        """
        if exclude is None:
            skip: object = None
            excluded: Iterable[object] = ()
        elif isinstance(exclude, asyncio.BaseProtocol):
            skip, excluded = exclude, ()
        else:
            skip, excluded = None, frozenset(exclude)
        sent = 0
        for conn in self._live():
            if conn is skip or conn in excluded:
                continue
            if conn.send(data) is not False:
                sent += 1
        return sent
