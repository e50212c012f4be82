"""Logging setup (text or JSON), the access log, and the counters metrics are made of.

Counters live in plain integers on ``Stats`` (one ``+=`` on the hot path, no lock, no
metrics library call); the metrics exporter reads them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sockserve.settings import SettingsError, describe

if TYPE_CHECKING:
    from sockserve.binding import Listener

__all__ = [
    "JSONFormatter",
    "Metrics",
    "MetricsEndpoint",
    "Stats",
    "configure_logging",
    "log_access",
    "log_metrics_url",
]

access_logger = logging.getLogger("sockserve.access")

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else was passed in ``extra`` and goes in the JSON.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


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


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every log record to stderr, text or JSON, at ``level`` (the CLI's setup)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_access(
    peer: Any, listener: str, duration: float, bytes_in: int, bytes_out: int, reason: str
) -> None:
    """One record per connection on the ``sockserve.access`` logger."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "-")
    duration_ms = round(duration * 1000, 3)
    access_logger.info(
        "%s %s %.3fms in=%d out=%d %s",
        peer_text,
        listener,
        duration_ms,
        bytes_in,
        bytes_out,
        reason,
        extra={
            "peer": peer_text,
            "listener": listener,
            "duration_ms": duration_ms,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "close_reason": reason,
        },
    )


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
        self.restarts = counter("sockserve_worker_restarts", "Workers replaced after dying.")
        self.active = Gauge(
            "sockserve_connections_active",
            "Open connections.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._flushed: dict[str, int] = {}
        self._flushed_reasons: dict[str, Counter[str]] = {
            "rejected": Counter(),
            "closed": Counter(),
        }
        if multiprocess_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)

    def flush(self, stats: Stats, active: int) -> None:
        """Add what ``stats`` counted since the last flush (cheap: a few additions)."""
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
        for kind, counts, metric in (
            ("rejected", stats.rejected_by_reason, self.rejected),
            ("closed", stats.closed_by_reason, self.closed),
        ):
            flushed = self._flushed_reasons[kind]
            for reason, count in counts.items():
                delta = count - flushed[reason]
                if delta:
                    metric.labels(reason=reason).inc(delta)
                    flushed[reason] = count
        self.active.set(active)

    def worker_restarted(self) -> None:
        self.restarts.inc()

    def worker_exited(self, pid: int) -> None:
        if self.multiprocess_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)

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


class MetricsEndpoint(asyncio.Protocol):
    """Answers ``GET /metrics`` on the metrics listener: a few lines, not an HTTP server.

    ``prepare`` runs in the event loop (it reads the live counters); ``render`` runs on a
    thread, since with workers it reads every worker's metrics file from disk.
    """

    MAX_REQUEST = 8192

    def __init__(self, prepare: Callable[[], None], render: Callable[[], bytes]) -> None:
        self.prepare = prepare
        self.render = render
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(10.0, transport.close)

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
