"""The connection every async handler is: the asyncio Protocol of one accepted socket.

``_Connection`` holds what line, message and stream handlers share: addresses, byte
counters, write and close, read pausing, its own timeouts and lingering close, and the
goodbye-first ending. It reports to the server only through its ``ConnectionLedger``.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import termios
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from sockserve.framing import (
    FrameTooLong,
    LineTooLong,
    ProtocolError,
)
from sockserve.lifecycle import LINGER_TIMEOUT

if TYPE_CHECKING:
    from sockserve.lifecycle import ConnectionLedger
    from sockserve.proxy_protocol import ProxyHeader
    from sockserve.server import Server

__all__ = ["MIN_READ_AHEAD", "READ_AHEAD", "WRITE_HIGH_WATER"]

# A reader that is this far behind the peer stops reading from the socket until it
# catches up (on top of the line limit, so one full line always fits). At most: with
# many connections the ledger's read_ahead, derived from --max-buffered-input, is less.
READ_AHEAD = 256 * 1024
# At least, whatever the budget: below this a stream is read in uselessly small steps.
MIN_READ_AHEAD = 4096
# Above this many buffered outgoing bytes the peer counts as not reading: the server
# stops reading from it (line handlers) or drain() waits (stream handlers).
WRITE_HIGH_WATER = 256 * 1024

# How far a connection is in being ended goodbye-first (stop, reload, max age).
# ENDING: at the end of the current request; ENDED: saying goodbye; LINGERING: our end
# of stream is sent (nothing more may be written), the peer's last bytes are dropped.
_SERVING, _ENDING, _ENDED, _LINGERING = 0, 1, 2, 3


class _Connection(asyncio.Protocol):
    """What every connection handler has: addresses, counters, write and close."""

    # Slots keep an idle connection small: no instance dict unless a subclass adds fields.
    __slots__ = (
        "_close_reason",
        "_closed",
        "_drain_waiter",
        "_ending",
        "_eof",
        "_idle_since",
        "_ledger",
        "_line_seen",
        "_opened",
        "_reading_paused",
        "_seen_in",
        "_seen_out",
        "_transport",
        "_writing_paused",
        "bytes_in",
        "bytes_out",
        "client_address",
        "listener",
        "proxy",
    )

    client_address: Any
    listener: str
    proxy: ProxyHeader | None
    _ledger: ConnectionLedger
    bytes_in: int
    bytes_out: int
    _transport: asyncio.Transport
    _close_reason: str | None
    _closed: bool
    _eof: bool  # the peer has finished sending
    _reading_paused: bool  # we stopped reading from the peer (see _set_reading)
    _writing_paused: bool
    _drain_waiter: asyncio.Future[None] | None
    _ending: int  # _SERVING, _ENDING or _ENDED
    _opened: float
    _idle_since: float | None  # when the idle sweep last saw bytes move
    _seen_in: int
    _seen_out: int
    # Where in the stream the unfinished line the sweep saw begins, and when it first saw it.
    _line_seen: tuple[int, float] | None

    def _attach(self, ledger: ConnectionLedger, client_address: Any, listener: str) -> None:
        """Set every field before the transport exists (slots have no defaults)."""
        self._ledger = ledger
        self.client_address = client_address
        self.listener = listener
        self.proxy = None
        self.bytes_in = self.bytes_out = self._seen_in = self._seen_out = 0
        self._close_reason = None
        self._closed = self._eof = self._reading_paused = self._writing_paused = False
        self._drain_waiter = None
        self._ending = _SERVING
        self._opened = 0.0
        self._idle_since = None
        self._line_seen = None

    @property
    def server(self) -> Server:
        """The server this connection belongs to (``self.server`` of socketserver)."""
        return self._ledger.server

    # socketserver-style hooks
    def setup(self) -> Any:
        """Called once the connection is up, before any data is handled."""

    def finish(self) -> Any:
        """Called once the connection is over, whatever the reason."""

    def handle_shutdown(self) -> Any:
        """The server ends this connection (stop, reload, ``--max-connection-age``) while
        it is idle or once its current request is done: say goodbye. Plain or async; a
        message or line handler's return value is sent like a reply, a stream handler may
        write()."""
        return None

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (see ``drain`` for backpressure)."""
        # A transport that hit a send error is closing before connection_lost runs; asyncio
        # logs a warning for every further write, so drop them here, and after our end of
        # stream (lingering), where a write raises.
        if not self._closed and not self._transport.is_closing() and self._ending < _LINGERING:
            self.bytes_out += len(data)
            self._transport.write(data)

    def send(self, data: bytes) -> bool:
        """Queue ``data`` for the peer without waiting, as ``server.broadcast`` does.

        Where ``write`` leaves backpressure to ``drain()``, ``send`` never waits: a peer
        that lets more than ``max_write_buffer`` bytes pile up is closed as a slow
        consumer. Returns False if the connection is closed (or just was).
        """
        transport = self._transport
        if self._closed or transport.is_closing() or self._ending == _LINGERING:
            return False
        self.bytes_out += len(data)
        transport.write(data)
        queued = transport.get_write_buffer_size()
        if queued > self._ledger.max_write_buffer:
            self._ledger.slow_consumer_log(
                "closing %s: slow consumer, %d bytes queued for it (max_write_buffer %d)",
                self.client_address,
                queued,
                self._ledger.max_write_buffer,
            )
            self._abort("slow consumer")
            return False
        return True

    def close(self) -> None:
        """Close the connection once queued bytes are sent."""
        self._set_reason("closed by handler")
        self._transport.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport details: ``peercert``, ``ssl_object``, ``sockname``, ``socket``..."""
        return self._transport.get_extra_info(name, default)

    def _unfinished_line(self) -> int:
        """Bytes of a line begun and not finished that the handler is waiting on."""
        return 0

    def _waiting_for(self) -> str:
        """What ``_unfinished_line`` counts the bytes of: a line or a message."""
        return "line"

    # -- goodbye-first ending ----------------------------------------------------------

    def _idle(self) -> bool:
        """No unfinished input buffered, no handler call running, nothing to answer."""
        return True

    def _end(self, reason: str) -> None:
        """End this connection goodbye-first: now if idle, else once its current request
        is done (the kind's code calls ``_goodbye`` then)."""
        if self._closed or self._ending:
            return
        self._set_reason(reason)
        self._ending = _ENDING
        if self._idle() and not self._input_pending():
            self._goodbye_unless_fresh()

    def _goodbye_unless_fresh(self) -> None:
        """An ending connection is idle: goodbye now, unless its client has not sent its
        first request yet and connected less than the ledger's first_request_wait ago;
        then it gets until then to send it (it is answered, then told goodbye)."""
        wait = 0.0
        if not self.bytes_in:
            wait = self._opened + self._ledger.first_request_wait - time.monotonic()
        if wait > 0:
            self._ledger.loop.call_later(wait, self._first_request_late)
        else:
            self._goodbye()

    def _first_request_late(self) -> None:
        if (
            self._ending == _ENDING
            and not self._closed
            and self._idle()
            and not self._input_pending()
        ):
            self._goodbye()

    def _input_pending(self) -> bool:
        """Bytes the peer sent that we have not read yet (a request racing the end, or
        sent from the backlog before we accepted): they are answered before the goodbye."""
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return False
        return unread != b"\0\0\0\0"

    def _goodbye(self) -> None:
        """Run ``handle_shutdown``, send what it returns, then end the connection."""
        self._ending = _ENDED
        try:  # sending the goodbye runs handler code too (a framing's encode)
            result = self.handle_shutdown()
            if inspect.isawaitable(result):
                self._ledger.spawn(self._goodbye_async(result))
            else:
                self._said_goodbye(result)
        except Exception as exc:
            self._handler_error(exc)

    async def _goodbye_async(self, hook: Awaitable[Any]) -> None:
        try:
            self._said_goodbye(await hook)
        except Exception as exc:
            self._handler_error(exc)

    def _said_goodbye(self, result: Any) -> None:
        if isinstance(result, (bytes, bytearray, memoryview)):
            self.write(bytes(result))
        self._linger(self._close_reason or "server shutdown")

    def _linger(self, reason: str) -> None:
        """Close gracefully: send what is queued and our end of stream, then read and drop
        the peer's last bytes until it closes (closing with unread input sends a reset),
        for LINGER_TIMEOUT at most."""
        self._set_reason(reason)
        transport = self._transport
        if self._closed or transport.is_closing() or self._ending == _LINGERING:
            return
        if not transport.can_write_eof():  # TLS: its close_notify is the end of stream
            transport.close()
            return
        self._ending = _LINGERING
        transport.set_protocol(_Lingering(self))
        transport.write_eof()
        transport.resume_reading()

    def _set_reason(self, reason: str) -> None:
        if self._close_reason is None:
            self._close_reason = reason

    def _abort(self, reason: str) -> None:
        self._set_reason(reason)
        self._transport.abort()

    def _check_timeouts(self, now: float, idle_timeout: float, line_timeout: float) -> str | None:
        """Why this connection should be closed at ``now`` (loop time), logged, or None.

        Called by the server's sweep every so often, never on a read. A connection is idle
        while no byte moves either way; that is read from its byte counters instead of a
        time stamped on every read. Likewise an unfinished line is known by where it
        starts in the stream, so a new one is told from an old one. A timeout of 0 is off.
        """
        if line_timeout and (unfinished := self._unfinished_line()):
            start = self.bytes_in - unfinished
            seen = self._line_seen
            if seen is None or seen[0] != start:
                self._line_seen = (start, now)
            elif now - seen[1] >= line_timeout and not self._closed:
                unit = self._waiting_for()
                self._ledger.slow_line_log(
                    "closing %s: %s unfinished after %.1f s (%d bytes)",
                    self.client_address,
                    unit,
                    now - seen[1],
                    unfinished,
                )
                return f"{unit} timeout"
        else:
            self._line_seen = None
        if not idle_timeout:
            return None
        # Only references are stored: ``now`` is one float shared by every connection
        # in a sweep, and the counters are the connection's own int objects.
        if (
            self.bytes_in != self._seen_in
            or self.bytes_out != self._seen_out
            or self._idle_since is None
        ):
            self._seen_in, self._seen_out = self.bytes_in, self.bytes_out
            self._idle_since = now
        elif now - self._idle_since >= idle_timeout and not self._closed:
            idle = now - self._idle_since
            self._ledger.idle_log("closing %s: idle for %.1f s", self.client_address, idle)
            return "idle timeout"
        return None

    def _handler_error(self, exc: BaseException) -> None:
        self._ledger.handler_failed(self.client_address, exc)
        self._set_reason("handler error")
        self._transport.close()

    def _protocol_error(self, exc: ProtocolError) -> None:
        """The peer broke the framing: log why (rate-limited) and cut the connection."""
        if isinstance(exc, LineTooLong):
            reason = "line too long"
        elif isinstance(exc, FrameTooLong):
            reason = "message too long"
        else:
            reason = "malformed message"
        self._ledger.long_line_log("closing %s: %s", self.client_address, exc)
        self._abort(reason)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        self._opened = self._ledger.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if not self._transport.is_closing():
            # Python 3.10's TLS transport is not marked closed when the peer ends the
            # connection and warns when collected; closing it here is a no-op elsewhere.
            self._transport.close()
        self._set_reason("eof" if exc is None else f"error: {exc}")
        self._wake_drain()
        ledger = self._ledger
        ledger.lost(self)
        # Accounted for (slot, stats, access log) once the descriptor is closed: the
        # transport (asyncio's and uvloop's alike) closes it right after this returns.
        ledger.loop.call_soon(
            ledger.closed,
            self.client_address,
            self.listener,
            time.monotonic() - self._opened if self._opened else 0.0,
            self.bytes_in,
            self.bytes_out,
            self._close_reason or "eof",
        )

    def _set_reading(self, on: bool) -> None:
        """Read from the peer, or stop: the handler is too far behind, or the peer does
        not read its replies. The kernel's buffers then push back on the peer."""
        if on == self._reading_paused:
            self._reading_paused = not on
            if on:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain()

    async def _wait_writable(self) -> None:
        if self._writing_paused and not self._closed:
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
            await waiter

    def _wake_drain(self) -> None:
        if (waiter := self._drain_waiter) is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)


class _Lingering(asyncio.Protocol):
    """A closing connection's last protocol: discards what the peer still sends, and
    cuts the connection after LINGER_TIMEOUT if the peer does not close it."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.timer = conn._ledger.loop.call_later(LINGER_TIMEOUT, self._cut)

    def _cut(self) -> None:
        if not self.conn._closed:
            self.conn._transport.abort()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the peer has finished too: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()  # else it keeps the connection for LINGER_TIMEOUT
        self.conn.connection_lost(exc)
