"""Logging setup (text or JSON), the access log, and the counters metrics are made of.

Counters live in plain integers on ``Stats`` (one ``+=`` on the hot path, no lock, no
metrics library call); the metrics exporter reads them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from typing import Any

__all__ = ["JSONFormatter", "Stats", "configure_logging", "log_access"]

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

    def rejected(self, reason: str) -> None:
        # Reasons are a small fixed set used as a label: drop the detail after a colon.
        self.rejected_by_reason[reason.split(":", 1)[0]] += 1

    def connection_closed(self, bytes_in: int, bytes_out: int) -> None:
        self.bytes_received += bytes_in
        self.bytes_sent += bytes_out


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
