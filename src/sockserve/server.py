"""The event-loop server: start, stop, when to accept, housekeeping.

One ``Server`` serves one handler class on any mix of stream and datagram listeners in
one event loop. It accepts connections itself (not through ``loop.create_server``) so it
can pause at ``max_connections``, back off on EMFILE, drain the backlog on shutdown and
read a PROXY header before TLS starts, each without help from the loop. The parts:
``listeners`` accept and read datagrams, the ``gate`` admits, the handler ``kinds``
serve, the ``lifecycle`` ledger accounts; docs/architecture.md draws who calls whom.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sockserve import binding
from sockserve.admission import RemoteAdmission
from sockserve.binding import Listener
from sockserve.gate import Gate
from sockserve.kinds import HandlerKindError, kind_of
from sockserve.lifecycle import ConnectionLedger, Connections, age_jitter
from sockserve.listeners import DatagramEndpoint, StreamListener
from sockserve.metrics import Metrics, MetricsServer, bind_metrics, log_metrics_url
from sockserve.settings import Settings, SettingsError

if TYPE_CHECKING:
    from sockserve.connection import _Connection

__all__ = ["HandlerKindError", "Server"]

logger = logging.getLogger("sockserve.server")

# Past the graceful timeout, connections get this long to close gracefully (our end of
# stream sent, their last bytes read) before they are aborted.
LINGER_BEFORE_ABORT = 1.0
# The housekeeping sweep runs about ten times per shortest timeout, within these bounds.
SWEEPS_PER_TIMEOUT = 10
SWEEP_MIN_INTERVAL = 0.05
SWEEP_MAX_INTERVAL = 1.0


class Server:
    """Serves ``handler`` on the listeners of ``settings`` in the running event loop.

    ``async with Server(Handler, bind=["127.0.0.1:0"]) as server:`` starts it (bound and
    listening, ``server.urls`` filled in) and stops it gracefully on exit: idle
    connections close at once, busy ones get up to ``graceful_timeout`` (a keyword like
    any setting; ``await server.shutdown(timeout=...)`` before leaving chooses another).
    ``await server.serve_forever()`` serves until stopped.
    """

    loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        handler: type,
        settings: Settings | None = None,
        *,
        listeners: Iterable[Listener] | None = None,
        metrics: Metrics | None = None,
        metrics_listener: Listener | None = None,
        admission_link: socket.socket | None = None,
        ssl_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings.replace(**kwargs) if settings else Settings(**kwargs)
        kind = kind_of(handler)
        self.handler_class = handler
        self.RequestHandlerClass = handler  # what socketserver handlers may look for
        self.ledger = ConnectionLedger(self.settings, self._update_accepting)
        self.ledger.server = self
        self._connections_view = Connections(self.ledger.connections)
        self.stats = self.ledger.stats
        self.kind = kind(self)
        self.gate = Gate(self.settings, self.ledger, self.kind, ssl_context)
        self.listeners: list[Listener] = list(listeners) if listeners is not None else []
        self._stream: list[StreamListener] = []
        self._datagram: list[DatagramEndpoint] = []
        self._tasks = self.ledger.tasks
        self._closed_event: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.metrics = metrics
        self._metrics_listener = metrics_listener
        self._metrics_server: MetricsServer | None = None
        # With workers: the supervisor's per-client table, asked over this socket.
        self._admission_link = admission_link

    # -- public API --------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """The real addresses served, ``tcp://127.0.0.1:40123`` style."""
        return [listener.url for listener in self.listeners]

    @property
    def server_address(self) -> Any:
        """The first listener's address, as socketserver's attribute of that name."""
        return self.listeners[0].sock.getsockname() if self.listeners else None

    @property
    def connections(self) -> Connections:
        """The open connections of this process, live and read-only (see ``Connections``)."""
        return self._connections_view

    def broadcast(
        self, data: bytes, *, exclude: _Connection | Iterable[_Connection] | None = None
    ) -> int:
        """Send ``data`` to every open connection but ``exclude``; never waits.

        ``handler.send(data)`` on each: framed for message handlers, as given otherwise.
        A connection with more than ``max_write_buffer`` bytes queued is closed as a slow
        consumer. Returns how many connections it was queued for. Call it in the event
        loop thread (from a blocking handler: ``server.loop.call_soon_threadsafe``).
        """
        return self._connections_view.broadcast(data, exclude=exclude)

    async def start(self) -> None:
        """Bind (unless listeners were given), then start accepting and reading. A start
        that fails part way closes all it opened: the server is then stopped."""
        self.loop = self.ledger.loop = asyncio.get_running_loop()
        self._closed_event = asyncio.Event()
        try:
            await self._start()
        except BaseException:
            await self._abandon_start()
            raise

    async def _abandon_start(self) -> None:
        self.ledger.stopping = True
        for listener in self._stream:
            listener.set_reading(False)
        for endpoint in self._datagram:
            endpoint.close()
        self._close_listeners()
        await self._finish()

    async def _start(self) -> None:
        if self._admission_link is not None and self.ledger.admission is not None:
            remote = RemoteAdmission(self._admission_link)
            remote.start(self.loop)
            self.ledger.admission = remote
        settings = self.settings
        if settings.tls_cert and self.gate.ssl is None:  # else given to the constructor
            from sockserve.tls import server_context

            self.gate.ssl = server_context(settings)
        if not self.listeners:
            self.listeners = binding.bind_all(settings)
        own_ports = frozenset(  # of datagram listeners: datagrams "from" them are dropped
            listener.sock.getsockname()[1]
            for listener in self.listeners
            if listener.datagram and listener.family in (socket.AF_INET, socket.AF_INET6)
        )
        for listener in self.listeners:
            if listener.datagram:
                self._datagram.append(DatagramEndpoint(self, listener, own_ports))
            elif not self.kind.serves_streams:
                raise HandlerKindError(
                    f"a {self.kind.name} handler cannot serve stream listener {listener.url}"
                )
            else:
                self._stream.append(StreamListener(self.gate, listener))
        for endpoint in self._datagram:
            endpoint.start()
        self._update_accepting()
        for listener in self.listeners:
            logger.info("listening on %s", listener.describe())
        if settings.proxy_protocol != "off":
            self._warn_proxy_trust()
        if settings.metrics:
            await self._start_metrics()
        if (
            settings.idle_timeout
            or settings.line_timeout
            or settings.max_connection_age
            or self.metrics is not None
        ):
            self._schedule_sweep()

    def _warn_proxy_trust(self) -> None:
        """Say at start whom PROXY headers are taken from, where that is not obvious."""
        unix = [s.listener.url for s in self._stream if s.listener.family == socket.AF_UNIX]
        inet = len(unix) < len(self._stream)
        if self.settings.proxy_from and unix:
            logger.warning(
                "PROXY headers on %s are refused from every peer: --proxy-from lists IP"
                " networks and a Unix socket peer has none (the socket file's permissions,"
                " --unix-mode, decide who may connect there: serve it without --proxy-from)",
                ", ".join(unix),
            )
        elif inet and not self.settings.proxy_from:
            logger.warning(
                "PROXY headers are accepted from any peer: set --proxy-from to the load"
                " balancers' addresses"
            )

    async def wait_closed(self) -> None:
        """Wait until the server has stopped."""
        assert self._closed_event is not None, "start() first"
        await self._closed_event.wait()

    async def serve_forever(self) -> None:
        """Start (unless started) and serve until stopped, as asyncio's ``Server`` does:
        ``shutdown()`` from another task ends it, and so does cancelling this one, which
        first shuts the server down gracefully (within ``graceful_timeout``)."""
        if self._closed_event is None:
            await self.start()
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            await self.shutdown()
            raise

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting (serving what waits in the backlog), end idle connections at
        once and let busy ones finish for up to ``timeout`` seconds (default:
        graceful_timeout), then close the rest. Does nothing once stopped."""
        if self._closed_event is not None and self._closed_event.is_set():
            return
        if timeout is None:
            timeout = self.settings.graceful_timeout
        ledger = self.ledger
        deadline = self.loop.time() + timeout
        if not ledger.stopping:
            ledger.stopping = True
            # Goodbyes first to the connections open now; those the backlog still holds
            # are accepted after, and get their FIRST_REQUEST_WAIT to send a request.
            self._drain("server shutdown")
            self._stop_accepting()
        await ledger.wait_idle(deadline)
        if ledger.open:
            logger.info("graceful timeout: closing %d connection(s)", ledger.open)
            for conn in list(ledger.connections):
                conn._linger("server shutdown")
            self.kind.release_all()
            await ledger.wait_idle(self.loop.time() + LINGER_BEFORE_ABORT)
            for conn in list(ledger.connections):
                conn._abort("server shutdown")
        await self._finish()

    def _drain(self, reason: str) -> None:
        """Goodbye-first: end each connection now if idle, else once its current request is
        done; with --close-spread, at times spread evenly over that window."""
        conns = list(self.ledger.connections)
        spread = self.settings.close_spread
        for i, conn in enumerate(conns):
            if spread and i:
                self.loop.call_later(spread * i / len(conns), conn._end, reason)
            else:
                conn._end(reason)
        self.kind.drain(spread)

    def reload_tls(self) -> None:
        """Re-read the certificate and key for connections accepted from now on."""
        if self.settings.tls_cert:
            from sockserve.tls import server_context

            try:
                self.gate.ssl = server_context(self.settings)
            except SettingsError as exc:
                logger.error("TLS reload failed, keeping the old certificate: %s", exc)
            else:
                logger.info("TLS certificate reloaded")

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- accepting ---------------------------------------------------------------------

    def _update_accepting(self) -> None:
        """Accept while under the limit, not backing off, not stopping."""
        if self.ledger.stopping:
            return
        accepting = not self.ledger.full and not self.gate.pacing and not self.kind.full
        for listener in self._stream:
            listener.set_reading(accepting and not listener.backing_off)
        if self.kind.datagrams_share_capacity:
            for endpoint in self._datagram:
                endpoint.set_reading(not self.kind.datagrams_full)

    # -- housekeeping --------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        settings = self.settings
        timeouts = [
            t
            for t in (settings.idle_timeout, settings.line_timeout, settings.max_connection_age)
            if t
        ]
        interval = SWEEP_MAX_INTERVAL
        if timeouts:
            interval = min(interval, max(SWEEP_MIN_INTERVAL, min(timeouts) / SWEEPS_PER_TIMEOUT))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Every so often: close idle connections and lines too slow to arrive, push
        counters to the metrics. Always scheduled again: timeouts must not stop for good."""
        try:
            settings = self.settings
            idle_timeout, line_timeout = settings.idle_timeout, settings.line_timeout
            if idle_timeout or line_timeout:
                now = self.loop.time()
                for conn in list(self.ledger.connections):
                    reason = conn._check_timeouts(now, idle_timeout, line_timeout)
                    if reason is not None:
                        conn._abort(reason)
            if self.settings.max_connection_age:
                self._end_aged()
            if self.metrics is not None:
                self._flush_metrics()
        finally:
            self._schedule_sweep()

    def _end_aged(self) -> None:
        """End connections past --max-connection-age (each with its own jitter) the way a
        stop does: goodbye first, once idle."""
        age = self.settings.max_connection_age
        now = time.monotonic()
        for conn in list(self.ledger.connections):
            if not conn._ending and now - conn._opened >= age * age_jitter(id(conn)):
                conn._end("max connection age")
        self.kind.end_aged(now, age)

    def _update_gauges(self) -> None:
        self.stats.handler_threads, self.stats.handler_waiting = self.kind.threads()

    def _flush_metrics(self) -> None:
        assert self.metrics is not None
        self._update_gauges()
        self.metrics.flush(self.stats, self.ledger.open)

    async def _start_metrics(self) -> None:
        """Serve /metrics: our own listener, or the supervisor's shared one."""
        if self.metrics is None:
            self.metrics = Metrics()
        metrics = self.metrics
        if self._metrics_listener is None:
            self._metrics_listener = bind_metrics(self.settings)
        if not self._metrics_listener.shared:  # a worker's: the supervisor said it
            log_metrics_url(self._metrics_listener)
        self._metrics_server = MetricsServer(
            self._metrics_listener.sock, self._flush_metrics, metrics.render
        )
        self._metrics_server.start()

    # -- stopping ------------------------------------------------------------------------

    def _stop_accepting(self) -> None:
        for listener in self._stream:
            listener.listener.refuse_new()
            listener.drain_backlog()
            listener.set_reading(False)
        for endpoint in self._datagram:
            endpoint.close()
        self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()

    def abort(self) -> None:
        """Cut a graceful shutdown short: close every connection now (a second SIGINT)."""
        self.ledger.stop_waiting()

    async def _finish(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if isinstance(self.ledger.admission, RemoteAdmission):
            self.ledger.admission.close()
        if self.metrics is not None:
            self.metrics.flush(self.stats, self.ledger.open)
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._metrics_listener is not None:
            self._metrics_listener.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.kind.close()
        if self._closed_event is not None:
            self._closed_event.set()
