"""The event-loop server: accept, connection lifecycle, limits, draining.

One ``Server`` serves one handler class on any mix of stream and datagram listeners in
one event loop. It accepts connections itself (not through ``loop.create_server``) so it
can pause at ``max_connections``, back off on EMFILE, drain the backlog on shutdown and
read a PROXY header before TLS starts, each without help from the loop.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sockserve import binding
from sockserve.admission import Admission, Pacer, RemoteAdmission
from sockserve.binding import Listener
from sockserve.kinds import HandlerKindError, kind_of
from sockserve.lifecycle import ConnectionLedger, Connections, age_jitter
from sockserve.observability import Metrics, MetricsServer, format_peer, log_metrics_url
from sockserve.settings import Settings, SettingsError

if TYPE_CHECKING:
    from sockserve.handlers import _Connection
    from sockserve.proxy_protocol import ProxyHeader

__all__ = ["HandlerKindError", "Server"]

logger = logging.getLogger("sockserve.server")

# Accept errors that mean "out of a resource": back off and retry (as trio does), never spin.
OVERLOAD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.1
# Connections accepted per readiness event, so one busy listener cannot starve the others.
ACCEPT_BATCH = 256
DATAGRAM_BATCH = 64
# Host strings remembered per listener so that connections from one peer share them.
SHARED_HOSTS = 1024
# Async datagram handlers running at once per listener before reading pauses.
DATAGRAM_CONCURRENCY = 1024
PROXY_PEEK = 16 + 4096
# Past the graceful timeout, connections get this long to close gracefully (our end of
# stream sent, their last bytes read) before they are aborted.
LINGER_BEFORE_ABORT = 1.0
# The housekeeping sweep runs about ten times per shortest timeout, within these bounds.
SWEEPS_PER_TIMEOUT = 10
SWEEP_MIN_INTERVAL = 0.05
SWEEP_MAX_INTERVAL = 1.0
# A handshake left no time by the PROXY header still gets this long.
MIN_HANDSHAKE_LEFT = 0.001


class _StreamListener:
    """Accepts connections from one listening socket while the server allows it."""

    def __init__(self, server: Server, listener: Listener) -> None:
        self.server = server
        self.listener = listener
        self.sock = listener.sock
        self.reading = False
        self.backing_off = False
        self.hosts: dict[str, str] = {}  # peers' host strings, shared by their connections

    def set_reading(self, on: bool) -> None:
        if on == self.reading:
            return
        self.reading = on
        if on:
            self.server.loop.add_reader(self.sock.fileno(), self.accept_ready)
        else:
            self.server.loop.remove_reader(self.sock.fileno())

    def accept_ready(self, limit: int = ACCEPT_BATCH, draining: bool = False) -> None:
        server = self.server
        sock = self.sock
        hosts = self.hosts
        pacer = None if draining else server._pacer
        for _ in range(limit):
            if pacer is not None and pacer.wait(server.loop.time()):
                server._pace()
                return
            try:
                fd, addr = sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OVERLOAD_ERRNOS:
                    server.ledger.overload_log(
                        "accept() on %s failed: %s; backing off %.1f s",
                        self.listener.url,
                        exc.strerror,
                        ACCEPT_BACKOFF,
                    )
                    self.backing_off = True
                    server.loop.call_later(ACCEPT_BACKOFF, self.end_backoff)
                    server._update_accepting()
                    return
                # ECONNABORTED, EPROTO, EPERM (firewall): that one peer is gone; go on.
                logger.debug("accept() on %s failed: %s", self.listener.url, exc)
                continue
            # The transport keeps this object for the connection's life: a bare
            # _socket.socket is 40 bytes smaller than the socket.socket accept() wraps.
            conn = _socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
            if type(addr) is tuple:  # an IP peer (a Unix peer's address is a str)
                # Its connections share one host string: 64 bytes less for each idle one
                # behind a load balancer or a NAT.
                if (host := hosts.get(addr[0])) is not None:
                    addr = (host, *addr[1:])
                else:
                    if len(hosts) >= SHARED_HOSTS:
                        hosts.clear()
                    hosts[addr[0]] = addr[0]
            if pacer is not None:
                pacer.take(server.loop.time())
            server._accepted(conn, addr, self.listener)
            if not self.reading and not draining:  # paused: limit reached or stopping
                return

    def end_backoff(self) -> None:
        # A flag, not a deadline: uvloop's clock may read a hair early when the timer fires.
        self.backing_off = False
        self.server._update_accepting()

    def drain_backlog(self) -> None:
        """Accept every connection already waiting, ignoring the limit (used when stopping)."""
        self.accept_ready(limit=1 << 30, draining=True)


class _DatagramEndpoint:
    """Reads datagrams itself: one preallocated buffer, no per-datagram 256 KiB allocation."""

    def __init__(self, server: Server, listener: Listener) -> None:
        self.server = server
        self.listener = listener
        self.sock = listener.sock
        self.max_size = server.settings.max_datagram
        self.buffer = bytearray(self.max_size + 1)
        self.view = memoryview(self.buffer)
        self.reading = False
        self.in_flight = 0
        answer = server.kind.datagram_answer(self)
        self.answer = answer.answer
        self.is_async = answer.is_async
        self.handler = answer.handler

    def start(self) -> None:
        if self.handler is not None:
            self.handler.setup()
        self.set_reading(True)

    def set_reading(self, on: bool) -> None:
        if on == self.reading:
            return
        self.reading = on
        if on:
            self.server.loop.add_reader(self.sock.fileno(), self.ready)
        else:
            self.server.loop.remove_reader(self.sock.fileno())

    def ready(self) -> None:
        server = self.server
        ledger = server.ledger
        stats = ledger.stats
        own_ports = server._own_ports
        for _ in range(DATAGRAM_BATCH):
            try:
                size, address = self.sock.recvfrom_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error of an earlier reply
                logger.debug("recvfrom on %s failed: %s", self.listener.url, exc)
                continue
            stats.datagrams += 1
            stats.bytes_received += size
            if type(address) is tuple and address[1] in own_ports and _is_local(address[0]):
                # From one of our own sockets (a spoofed source): answering it would make
                # the server answer itself forever.
                ledger.rejected("own address")
                ledger.reflection_log(
                    "dropped a datagram from %s on %s: it claims to come from this server's"
                    " own address (answering would loop)",
                    address,
                    self.listener.url,
                )
                continue
            if size > self.max_size:
                stats.datagrams_oversized += 1
                ledger.oversize_log(
                    "dropped a datagram from %s on %s: larger than %d bytes",
                    address,
                    self.listener.url,
                    self.max_size,
                )
                continue
            data = self.buffer[:size]
            if self.is_async:
                self.in_flight += 1
                ledger.spawn(self._answer_async(bytes(data), address))
                if self.in_flight >= DATAGRAM_CONCURRENCY:
                    self.set_reading(False)
                    return
                continue
            try:
                reply = self.answer(bytes(data), address)
            except Exception as exc:
                ledger.handler_failed(address, exc)
                continue
            if reply is not None:
                self.send(reply, address)
            if not self.reading:
                return

    async def _answer_async(self, data: bytes, address: Any) -> None:
        try:
            reply = await self.answer(data, address)
            if reply is not None:
                self.send(reply, address)
        except Exception as exc:
            self.server.ledger.handler_failed(address, exc)
        finally:
            self.in_flight -= 1
            if self.in_flight < DATAGRAM_CONCURRENCY // 2 and not self.server.ledger.stopping:
                self.set_reading(True)

    def send(self, reply: bytes, address: Any) -> None:
        if not address:  # an unbound Unix datagram client cannot be answered
            return
        try:
            self.sock.sendto(reply, address)
        except (BlockingIOError, InterruptedError):
            self.server.stats.datagrams_dropped += 1  # socket buffer full: UDP may drop
            return
        except OSError as exc:
            logger.debug("sendto %s failed: %s", format_peer(address), exc)
            return
        self.server.stats.bytes_sent += len(reply)

    def close(self) -> None:
        self.set_reading(False)
        if self.handler is not None:
            try:
                self.handler.finish()
            except Exception as exc:
                self.server.ledger.handler_failed(None, exc)


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
        self._connections_view = Connections(self.ledger.connections)
        self.stats = self.ledger.stats
        self.kind = kind(self)
        self.listeners: list[Listener] = list(listeners) if listeners is not None else []
        self._stream: list[_StreamListener] = []
        self._datagram: list[_DatagramEndpoint] = []
        self._tasks = self.ledger.tasks
        self._closed_event: asyncio.Event | None = None
        self._ssl = ssl_context  # loaded from the settings at start if not given
        self._sweeper: asyncio.TimerHandle | None = None
        self._own_ports: frozenset[int] = frozenset()  # of datagram listeners (reflection)
        rate = self.settings.connection_rate
        # With workers, each takes its share of the rate: together they accept R a second.
        self._pacer = Pacer(rate / self.settings.workers) if rate else None
        self._pacing = False  # waiting for the connection rate to allow the next accept
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
        """Bind (unless listeners were given), then start accepting and reading."""
        self.loop = self.ledger.loop = asyncio.get_running_loop()
        self._closed_event = asyncio.Event()
        if self._admission_link is not None and self.ledger.admission is not None:
            remote = RemoteAdmission(self._admission_link)
            remote.start(self.loop)
            self.ledger.admission = remote
        settings = self.settings
        if settings.tls_cert and self._ssl is None:
            from sockserve.tls import server_context

            self._ssl = server_context(settings)
        if not self.listeners:
            self.listeners = binding.bind_all(settings)
        self._own_ports = frozenset(
            listener.sock.getsockname()[1]
            for listener in self.listeners
            if listener.datagram and listener.family in (_socket.AF_INET, _socket.AF_INET6)
        )
        try:
            for listener in self.listeners:
                if listener.datagram:
                    endpoint = _DatagramEndpoint(self, listener)
                    self._datagram.append(endpoint)
                elif not self.kind.serves_streams:
                    raise HandlerKindError(
                        f"a {self.kind.name} handler cannot serve stream listener {listener.url}"
                    )
                else:
                    self._stream.append(_StreamListener(self, listener))
        except BaseException:
            self._close_listeners()
            raise
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
        if not ledger.stopping:
            ledger.stopping = True
            self._stop_accepting()
        deadline = self.loop.time() + timeout
        self._drain("server shutdown")
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
                self._ssl = server_context(self.settings)
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
        accepting = not self.ledger.full and not self._pacing and not self.kind.full
        for listener in self._stream:
            listener.set_reading(accepting and not listener.backing_off)
        if self.kind.datagrams_share_capacity:
            for endpoint in self._datagram:
                endpoint.set_reading(not self.kind.datagrams_full)

    def _accepted(self, conn: _socket.socket, address: Any, listener: Listener) -> None:
        self.ledger.accepted()
        settings = self.settings
        if settings.proxy_protocol != "off":
            if settings.proxy_from and not _in_networks(address, settings.proxy_from):
                self._reject(conn, address, listener, "untrusted proxy")
                return
            self.ledger.spawn(self._read_proxy(conn, address, listener))
            return
        if (settings.allow or settings.deny) and not self._allowed(address):
            self._reject(conn, address, listener, "denied")
            return
        self._admit_and_serve(conn, address, listener, None)

    def _pace(self) -> None:
        """Stop accepting until the connection rate allows the next one (backlog waits)."""
        assert self._pacer is not None
        if not self._pacing:
            self._pacing = True
            self._update_accepting()
            self.loop.call_later(self._pacer.wait(self.loop.time()), self._end_pacing)

    def _end_pacing(self) -> None:
        self._pacing = False
        self._update_accepting()

    def _admit_and_serve(
        self,
        conn: _socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        handshake_timeout: float | None = None,
    ) -> None:
        """Per-client limits (this worker's table, or with workers the supervisor's),
        then serve; past them the connection is refused."""
        admission = self.ledger.admission
        if admission is None:
            self._serve(conn, address, listener, proxy, handshake_timeout)
        elif isinstance(admission, Admission):
            reason = admission.admit(address, self.loop.time())
            self._admitted(reason, conn, address, listener, proxy, handshake_timeout)
        elif (answer := admission.admit(address)) is None:
            self._serve(conn, address, listener, proxy, handshake_timeout)
        else:
            answer.add_done_callback(
                lambda done: self._admitted(
                    done.result(), conn, address, listener, proxy, handshake_timeout
                )
            )

    def _admitted(
        self,
        reason: str | None,
        conn: _socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        handshake_timeout: float | None,
    ) -> None:
        if reason is None:
            self._serve(conn, address, listener, proxy, handshake_timeout)
        else:
            self._reject(conn, address, listener, reason)

    def _allowed(self, address: Any) -> bool:
        settings = self.settings
        if not isinstance(address, tuple):  # Unix sockets have no IP to check
            return True
        if settings.allow and not _in_networks(address, settings.allow):
            return False
        return not (settings.deny and _in_networks(address, settings.deny))

    def _reject(self, conn: _socket.socket, address: Any, listener: Listener, reason: str) -> None:
        ledger = self.ledger
        ledger.rejected(reason)
        ledger.refuse_log("refused %s on %s: %s", address, listener.url, reason)
        with contextlib.suppress(OSError):
            conn.close()
        ledger.closed(address, listener.url, 0.0, 0, 0, reason, admitted=False)

    async def _read_proxy(self, conn: _socket.socket, address: Any, listener: Listener) -> None:
        from sockserve.proxy_protocol import ProxyProtocolError

        started = self.loop.time()
        try:
            header = await asyncio.wait_for(
                self._proxy_header(conn), self.settings.handshake_timeout
            )
        except (ProxyProtocolError, ConnectionError, EOFError) as exc:
            self._reject(conn, address, listener, f"bad PROXY header: {exc}")
            return
        except asyncio.TimeoutError:
            self._reject(conn, address, listener, "no PROXY header in time")
            return
        except Exception as exc:  # OSError, or anything unforeseen: release the slot
            self._reject(conn, address, listener, f"PROXY header: {exc}")
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        real = address
        if header.command == "PROXY" and isinstance(header.source, tuple):
            real = header.source
        if (self.settings.allow or self.settings.deny) and not self._allowed(real):
            self._reject(conn, real, listener, "denied")
            return
        left = self.settings.handshake_timeout - (self.loop.time() - started)
        self._admit_and_serve(conn, real, listener, header, max(left, MIN_HANDSHAKE_LEFT))

    async def _proxy_header(self, conn: _socket.socket) -> ProxyHeader:
        """Read exactly the header's bytes (peeking first), so what follows stays unread."""
        from sockserve.proxy_protocol import parse_prefix

        accept = self.settings.proxy_protocol
        got = b""
        while True:
            await self._readable(conn)
            peek = conn.recv(PROXY_PEEK - len(got), socket.MSG_PEEK)
            if not peek:
                raise EOFError("connection closed before the PROXY header")
            header = parse_prefix(got + peek, accept)  # type: ignore[arg-type]
            if header is not None:
                rest = header.length - len(got)
                if rest and len(conn.recv(rest)) != rest:
                    raise EOFError("short read of a peeked PROXY header")
                return header
            # No complete header in what we saw, so all of it belongs to the header.
            got += conn.recv(len(peek))
            if len(got) >= PROXY_PEEK:
                raise EOFError("PROXY header too long")

    async def _readable(self, conn: _socket.socket) -> None:
        future: asyncio.Future[None] = self.loop.create_future()
        fd = conn.fileno()
        self.loop.add_reader(fd, future.set_result, None)
        try:
            await future
        finally:
            self.loop.remove_reader(fd)

    def _serve(
        self,
        conn: _socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        handshake_timeout: float | None = None,
    ) -> None:
        self.kind.serve_stream(
            conn,
            address,
            listener,
            proxy,
            self._ssl,
            handshake_timeout or self.settings.handshake_timeout,
        )

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
        counters to the metrics."""
        settings = self.settings
        idle_timeout, line_timeout = settings.idle_timeout, settings.line_timeout
        if idle_timeout or line_timeout:
            now = self.loop.time()
            for conn in list(self.ledger.connections):
                if (reason := conn._check_timeouts(now, idle_timeout, line_timeout)) is not None:
                    conn._abort(reason)
        if self.settings.max_connection_age:
            self._end_aged()
        if self.metrics is not None:
            self._flush_metrics()
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
            assert self.settings.metrics is not None
            address = binding.parse_address(self.settings.metrics)
            self._metrics_listener = binding.bind(address, backlog=128)[0]
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


_local_ips: dict[str, bool] = {}


def _is_local(host: str) -> bool:
    """Whether ``host`` is an address of this machine: only those can be bound."""
    host = host.split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    known = _local_ips.get(host)
    if known is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((host, 0))
            known = True
        except OSError:
            known = False
        if len(_local_ips) > 1024:  # sources are chosen by peers: keep the cache bounded
            _local_ips.clear()
        _local_ips[host] = known
    return known


def _in_networks(address: Any, networks: Iterable[Any]) -> bool:
    import ipaddress

    if not isinstance(address, tuple):
        return False
    try:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)
