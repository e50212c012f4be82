"""Metrics: the counters of one process (``Stats``) and their Prometheus endpoint.

Counters live in plain integers on ``Stats`` (one ``+=`` on the hot path, no lock, no
metrics library call); ``Metrics`` copies them into prometheus_client (imported only
when metrics are on) and ``MetricsServer`` serves them over HTTP on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sockserve import binding
from sockserve.settings import Settings, SettingsError, describe

if TYPE_CHECKING:
    from sockserve.binding import Listener

__all__ = [
    "Metrics",
    "MetricsEndpoint",
    "MetricsServer",
    "Stats",
    "bind_metrics",
    "log_metrics_url",
]

logger = logging.getLogger("sockserve.server")

BACKLOG = 128


def bind_metrics(settings: Settings) -> Listener:
    """The metrics socket, bound before any privilege drop."""
    assert settings.metrics is not None
    return binding.bind(binding.parse_address(settings.metrics), backlog=BACKLOG)[0]


class Stats:
    """Counters of one process: what the metrics endpoint reports."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.handler_errors = 0
        self.datagrams = 0
        self.datagrams_oversized = 0
        self.datagrams_dropped = 0
        self.rejected_by_reason: Counter[str] = Counter()
        self.closed_by_reason: Counter[str] = Counter()
        self.limits_reached: Counter[str] = Counter()
        self.handler_threads = 0  # gauges, set by the blocking pool's owner
        self.handler_waiting = 0

    def limit_reached(self, limit: str) -> None:
        """A bound was hit (``max_connections``, ``threads``): counted as well as logged."""
        self.limits_reached[limit] += 1

    def rejected(self, reason: str) -> None:
        self.rejected_by_reason[_label(reason)] += 1

    def connection_closed(self, bytes_in: int, bytes_out: int, reason: str) -> None:
        """Every accepted connection ends here once, refused ones included."""
        self.bytes_received += bytes_in
        self.bytes_sent += bytes_out
        self.closed_by_reason[_label(reason)] += 1


def _label(reason: str) -> str:
    """Reasons are a small fixed set used as a label: drop the detail after a colon."""
    return reason.split(":", 1)[0]


class Metrics:
    """Prometheus metrics fed from ``Stats`` (prometheus_client, imported only when used).

    With ``multiprocess_dir`` the values live in files there (prometheus_client's
    multiprocess mode), so any worker's endpoint reports the sum over all workers.
    Create it before forking workers.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
        try:
            from prometheus_client import CollectorRegistry, Gauge, values
            from prometheus_client import Counter as PromCounter
        except ImportError:
            raise SettingsError(
                f"{describe('metrics')}: needs prometheus_client (pip install 'sockserve[metrics]')"
            ) from None
        if multiprocess_dir is not None and not isinstance(
            values.ValueClass, type(values.MultiProcessValue())
        ):
            # prometheus_client picks its value class at import; it was imported earlier.
            values.ValueClass = values.MultiProcessValue()
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        registry = None if multiprocess_dir else self.registry

        def counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Any:
            return PromCounter(name, help_text, labels, registry=registry)

        self.connections = counter("sockserve_connections", "Connections accepted.")
        self.bytes_received = counter("sockserve_bytes_received", "Bytes received.")
        self.bytes_sent = counter("sockserve_bytes_sent", "Bytes sent.")
        self.handler_errors = counter("sockserve_handler_errors", "Handler exceptions.")
        self.rejected = counter(
            "sockserve_rejected_connections", "Connections refused, by reason.", ("reason",)
        )
        self.closed = counter(
            "sockserve_closed_connections", "Connections closed, by reason.", ("reason",)
        )
        self.datagrams = counter("sockserve_datagrams", "Datagrams received.")
        self.oversized = counter(
            "sockserve_datagrams_oversized", "Datagrams dropped for exceeding max_datagram."
        )
        self.replies_dropped = counter(
            "sockserve_datagram_replies_dropped", "Datagram replies dropped: socket buffer full."
        )
        self.limits = counter(
            "sockserve_limits_reached",
            "Times a bound was reached (max_connections, threads), by limit.",
            ("limit",),
        )
        self.restarts = counter("sockserve_worker_restarts", "Workers replaced after dying.")
        self.handler_threads = Gauge(
            "sockserve_handler_threads",
            "Blocking handler threads in use.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.handler_waiting = Gauge(
            "sockserve_handler_waiting",
            "Blocking handlers with input ready, waiting for their turn to run.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.active = Gauge(
            "sockserve_connections_active",
            "Open connections.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._failing = False
        self._flushed: dict[str, int] = {}
        self._flushed_reasons: dict[str, Counter[str]] = {
            "rejected": Counter(),
            "closed": Counter(),
            "limits": Counter(),
        }
        if multiprocess_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)

    @classmethod
    def for_workers(cls, owner: tuple[int, int] | None = None) -> Metrics:
        """Metrics in a new private directory every worker writes its file to, made for
        the user the workers run as (``owner``: uid, gid); ``remove_files()`` at the end.
        Our own file is open before any worker exists."""
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="sockserve-metrics-")
        try:
            metrics = cls(directory)
            if owner is not None:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    os.fchown(fd, *owner)
                finally:
                    os.close(fd)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return metrics

    def remove_files(self) -> None:
        if self.multiprocess_dir is not None:
            import shutil

            shutil.rmtree(self.multiprocess_dir, ignore_errors=True)

    def flush(self, stats: Stats, active: int) -> None:
        """Add what ``stats`` counted since the last flush (cheap: a few additions).

        Never raises: a metrics failure (a full disk, a directory we cannot write) is
        logged once and serving, timeouts and shutdown carry on without it.
        """
        try:
            self._flush(stats, active)
        except Exception as exc:
            self._failed("update", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            logger.error("metrics %s failed (%s); serving goes on without them", what, exc)

    def _flush(self, stats: Stats, active: int) -> None:
        for name, metric in (
            ("connections_total", self.connections),
            ("bytes_received", self.bytes_received),
            ("bytes_sent", self.bytes_sent),
            ("handler_errors", self.handler_errors),
            ("datagrams", self.datagrams),
            ("datagrams_oversized", self.oversized),
            ("datagrams_dropped", self.replies_dropped),
        ):
            value = getattr(stats, name)
            delta = value - self._flushed.get(name, 0)
            if delta:
                metric.inc(delta)
                self._flushed[name] = value
        for kind, label, counts, metric in (
            ("rejected", "reason", stats.rejected_by_reason, self.rejected),
            ("closed", "reason", stats.closed_by_reason, self.closed),
            ("limits", "limit", stats.limits_reached, self.limits),
        ):
            flushed = self._flushed_reasons[kind]
            for reason, count in counts.items():
                delta = count - flushed[reason]
                if delta:
                    metric.labels(**{label: reason}).inc(delta)
                    flushed[reason] = count
        self.active.set(active)
        self.handler_threads.set(stats.handler_threads)
        self.handler_waiting.set(stats.handler_waiting)

    def worker_restarted(self) -> None:
        try:
            self.restarts.inc()
        except Exception as exc:
            self._failed("update", exc)

    def worker_exited(self, pid: int) -> None:
        if self.multiprocess_dir is not None:
            from prometheus_client import multiprocess

            try:
                multiprocess.mark_process_dead(pid)
            except Exception as exc:
                self._failed("cleanup", exc)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


def log_metrics_url(listener: Listener) -> None:
    """The line that says where metrics are served (as ``listening on`` does for sockets)."""
    host, port = listener.sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    logging.getLogger("sockserve.server").info(
        "metrics listening on http://%s:%d/metrics", host, port
    )


class MetricsServer:
    """Accepts metrics scrapes on ``sock``, at most ``MAX_CONNECTIONS`` at once.

    Past the cap it stops accepting (the kernel backlog holds the rest), so idle scrapers
    cannot use up descriptors the main listeners need; each connection lives at most
    ``MetricsEndpoint.TIMEOUT``.
    """

    MAX_CONNECTIONS = 8
    OVERLOAD_BACKOFF = 0.1

    def __init__(
        self, sock: socket.socket, prepare: Callable[[], None], render: Callable[[], bytes]
    ) -> None:
        self.sock = sock
        self.prepare = prepare
        self.render = render
        self.endpoints: set[MetricsEndpoint] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0  # accepted, not yet connected to an endpoint
        self._reading = False
        self._closed = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._set_reading(True)

    def close(self) -> None:
        self._closed = True
        self._set_reading(False)
        for endpoint in list(self.endpoints):
            if endpoint.transport is not None:
                endpoint.transport.abort()
        for task in self._tasks:
            task.cancel()

    @property
    def open(self) -> int:
        return len(self.endpoints) + self._pending

    def _set_reading(self, on: bool) -> None:
        assert self.loop is not None
        on = on and not self._closed and self.open < self.MAX_CONNECTIONS
        if on != self._reading:
            self._reading = on
            if on:
                self.loop.add_reader(self.sock.fileno(), self._accept)
            else:
                self.loop.remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        assert self.loop is not None
        while self.open < self.MAX_CONNECTIONS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or memory: try again a bit later
                logger.warning("metrics: accept failed: %s", exc)
                self._set_reading(False)
                self.loop.call_later(self.OVERLOAD_BACKOFF, self._set_reading, True)
                return
            conn.setblocking(False)
            self._pending += 1
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._set_reading(False)

    async def _connect(self, conn: socket.socket) -> None:
        assert self.loop is not None
        try:
            await self.loop.connect_accepted_socket(
                lambda: MetricsEndpoint(self.prepare, self.render, self), sock=conn
            )
        except OSError:
            conn.close()
        finally:
            self._pending -= 1
            self._set_reading(True)

    def ended(self, endpoint: MetricsEndpoint) -> None:
        self.endpoints.discard(endpoint)
        self._set_reading(True)


class MetricsEndpoint(asyncio.Protocol):
    """Answers ``GET /metrics`` on the metrics listener: a few lines, not an HTTP server.

    ``prepare`` runs in the event loop (it reads the live counters); ``render`` runs on a
    thread, since with workers it reads every worker's metrics file from disk.
    """

    MAX_REQUEST = 8192
    TIMEOUT = 5.0  # a scrape sends its request and is answered well within this

    def __init__(
        self,
        prepare: Callable[[], None],
        render: Callable[[], bytes],
        owner: MetricsServer | None = None,
    ) -> None:
        self.prepare = prepare
        self.render = render
        self.owner = owner
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.owner is not None:
            self.owner.endpoints.add(self)
        self.timer = asyncio.get_running_loop().call_later(self.TIMEOUT, transport.abort)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.answered:
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer and b"\n\n" not in self.buffer:
            if len(self.buffer) > self.MAX_REQUEST:
                self.transport.close()
            return
        self.answered = True
        request_line = self.buffer.split(b"\n", 1)[0].split()
        if (
            len(request_line) >= 2
            and request_line[0] == b"GET"
            and (request_line[1] == b"/metrics" or request_line[1].startswith(b"/metrics?"))
        ):
            self.prepare()
            rendering = asyncio.get_running_loop().run_in_executor(None, self.render)
            rendering.add_done_callback(self._rendered)
        else:
            self._respond(b"404 Not Found", b"text/plain", b"not found\n")

    def _rendered(self, rendering: asyncio.Future[bytes]) -> None:
        if rendering.cancelled() or rendering.exception() is not None:
            if not rendering.cancelled():
                logger.error("rendering /metrics failed", exc_info=rendering.exception())
            self._respond(b"500 Internal Server Error", b"text/plain", b"metrics failed\n")
            return
        self._respond(b"200 OK", b"text/plain; version=0.0.4; charset=utf-8", rendering.result())

    def _respond(self, status: bytes, kind: bytes, body: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, kind, len(body))
            + body
        )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.owner is not None:
            self.owner.ended(self)
