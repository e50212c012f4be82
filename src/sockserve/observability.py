"""Logging: setup (text or JSON), the access log, handler errors, peers as log text.

The counters and the metrics endpoint are in ``sockserve.metrics``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = [
    "HandlerErrorLog",
    "JSONFormatter",
    "TextFormatter",
    "configure_logging",
    "escape",
    "format_peer",
    "log_access",
]

access_logger = logging.getLogger("sockserve.access")

TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else was passed in ``extra`` and goes in the JSON.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def format_peer(address: Any) -> str:
    """A peer as people and log parsers read it: ``127.0.0.1:46222``, ``[::1]:36334``,
    ``unix:/path`` or ``-`` (an unnamed Unix client); never a Python tuple."""
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
        host = str(address[0])
        if host.startswith("::ffff:") and "." in host:  # an IPv4 client of a dual-stack socket
            host = host[7:]
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    if isinstance(address, bytes):
        address = address.decode("utf-8", "surrogateescape")
    if not address:
        return "-"
    if isinstance(address, str):
        return "@" + address[1:] if address.startswith("\0") else address
    return str(address)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """Control characters as visible escapes (``\\n``, ``\\x1b``): a peer's bytes can
    neither start a forged log line nor send escape sequences to a terminal."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _escaped(value: object) -> object:
    """A log argument with control characters escaped; numbers stay numbers for %d."""
    return value if isinstance(value, (int, float)) else escape(str(value))


class TextFormatter(logging.Formatter):
    """The text log format, with control characters escaped in every argument and in
    exception messages (where peer-controlled text ends up); JSON escapes them itself."""

    def format(self, record: logging.LogRecord) -> str:
        if record.args:
            record = logging.makeLogRecord(vars(record))
            if isinstance(record.args, Mapping):  # "%(name)s" style
                record.args = {k: _escaped(v) for k, v in record.args.items()}
            else:
                record.args = tuple(_escaped(a) for a in record.args or ())
        return super().format(record)

    def formatException(self, ei: Any) -> str:
        return format_exception(ei[1]).rstrip("\n")


def format_exception(exc: BaseException) -> str:
    """A traceback as Python prints it, each exception's message escaped."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        cause = current.__cause__
        current = cause or (None if current.__suppress_context__ else current.__context__)
    parts: list[str] = []
    for e in reversed(chain):
        if parts:
            later = chain[chain.index(e) - 1]
            parts.append(
                "\nThe above exception was the direct cause of the following exception:\n\n"
                if later.__cause__ is e
                else "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        if e.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(e.__traceback__))
        kind = type(e)
        name = kind.__qualname__
        if kind.__module__ not in ("builtins", "__main__"):
            name = f"{kind.__module__}.{name}"
        message = escape(str(e))
        parts.append(f"{name}: {message}\n" if message else f"{name}\n")
    return "".join(parts)


class HandlerErrorLog:
    """Handler exceptions, rate-limited per kind (exception type and where it was raised).

    The first of a kind is logged with its traceback (again at most every ``full_every``
    seconds); the rest at most once per ``interval`` seconds, one line with a count. A peer
    that makes a handler fail on every datagram cannot flood the log. Thread-safe.
    """

    MAX_KINDS = 1024  # a table bound: handlers failing in more places than this start over

    def __init__(
        self, logger: logging.Logger, interval: float = 1.0, full_every: float = 60.0
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.full_every = full_every
        # kind -> [last line logged, last traceback logged, occurrences not logged]
        self._kinds: dict[tuple[str, str, int], list[float]] = {}
        self._lock = threading.Lock()

    def __call__(self, peer: Any, exc: BaseException) -> None:
        now = time.monotonic()
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        kind = (
            type(exc).__qualname__,
            tb.tb_frame.f_code.co_filename if tb else "",
            tb.tb_lineno if tb else 0,
        )
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                if len(self._kinds) >= self.MAX_KINDS:
                    self._kinds.clear()
                state = self._kinds[kind] = [-self.interval, -self.full_every, 0]
            if now - state[0] < self.interval:
                state[2] += 1
                return
            full = now - state[1] >= self.full_every
            suppressed = int(state[2])
            state[0], state[2] = now, 0
            if full:
                state[1] = now
        msg = "handler error for %s: %s"
        args: tuple[object, ...] = (format_peer(peer), exc)
        if suppressed:
            msg += " (%d more of this kind since the last report)"
            args = (*args, suppressed)
        if not full:
            msg += "; traceback logged earlier"
        self.logger.error(
            msg, *args, exc_info=(type(exc), exc, exc.__traceback__) if full else None
        )


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
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
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
    peer_text = format_peer(peer)
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
