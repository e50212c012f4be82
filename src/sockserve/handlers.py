"""Async handler bases: stream (one task per connection), line (the fast path), datagram.

Each stream or line handler instance is also the asyncio Protocol of its connection, so a
connection costs one Python object and a line costs one plain method call. Attributes
whose names start with ``_`` are the framework's; handlers use the public ones:
``server``, ``client_address``, ``listener``, ``proxy``, and the methods below.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import termios
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, ClassVar

from sockserve.framing import (
    Framer,
    FrameTooLong,
    Framing,
    LengthPrefixed,
    LineFramer,
    Lines,
    LineTooLong,
    ProtocolError,
)

if TYPE_CHECKING:
    from sockserve.lifecycle import ConnectionLedger
    from sockserve.proxy_protocol import ProxyHeader
    from sockserve.server import Server

__all__ = ["DatagramHandler", "LineHandler", "LineTooLong", "MessageHandler", "StreamHandler"]

# A reader that is this far behind the peer stops reading from the socket until it
# catches up (on top of the line limit, so one full line always fits). At most: with
# many connections the ledger's read_ahead, derived from --max-buffered-input, is less.
READ_AHEAD = 256 * 1024
# At least, whatever the budget: below this a stream is read in uselessly small steps.
MIN_READ_AHEAD = 4096
# Above this many buffered outgoing bytes the peer counts as not reading: the server
# stops reading from it (line handlers) or drain() waits (stream handlers).
WRITE_HIGH_WATER = 256 * 1024
# A connection ended goodbye-first whose peer does not close after our end of stream is
# cut after this long.
LINGER_TIMEOUT = 5.0

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
        "_max_line",
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
        "server",
    )

    server: Server
    client_address: Any
    listener: str
    proxy: ProxyHeader | None
    _ledger: ConnectionLedger
    bytes_in: int
    bytes_out: int
    _transport: asyncio.Transport
    _max_line: int
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

    def _attach(
        self, server: Server, ledger: ConnectionLedger, client_address: Any, listener: str
    ) -> None:
        """Set every field before the transport exists (slots have no defaults)."""
        self.server = server
        self._ledger = ledger
        self.client_address = client_address
        self.listener = listener
        self.proxy = None
        self.bytes_in = self.bytes_out = self._seen_in = self._seen_out = 0
        self._max_line = ledger.settings.max_line
        self._close_reason = None
        self._closed = self._eof = self._reading_paused = self._writing_paused = False
        self._drain_waiter = None
        self._ending = _SERVING
        self._opened = 0.0
        self._idle_since = None
        self._line_seen = None

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
        try:
            result = self.handle_shutdown()
        except Exception as exc:
            self._handler_error(exc)
            return
        if inspect.isawaitable(result):
            self._ledger.spawn(self._goodbye_async(result))
        else:
            self._said_goodbye(result)

    async def _goodbye_async(self, hook: Awaitable[Any]) -> None:
        try:
            result = await hook
        except Exception as exc:
            self._handler_error(exc)
            return
        self._said_goodbye(result)

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
        asyncio.get_running_loop().call_later(LINGER_TIMEOUT, self._cut_lingering)

    def _cut_lingering(self) -> None:
        if not self._closed:
            self._transport.abort()

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
        ledger.closed(
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
    """A closing connection's last protocol: discards what the peer still sends."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the peer has finished too: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)


class MessageHandler(_Connection):
    """Fast path for any framing: ``handle_message`` is called for each message; what it
    returns is framed and sent back.

    ``framing`` (a class attribute; ``Lines()`` by default) says how messages travel: the
    message is the payload alone, and a reply is framed with ``framing.encode``. Return
    bytes to reply, or None for no reply; ``send(payload)`` frames and writes a message
    at any time. Define ``handle_message`` as ``async def`` and messages are awaited one
    at a time, in order. A message over the framing's ``max_size`` or a malformed one
    closes the connection with a logged reason, before the body of an over-long message
    is read. A handler that raises is logged with its traceback and the connection is
    closed; other connections carry on.
    """

    __slots__ = ("_fast", "_framer", "_task")

    framing: ClassVar[Framing] = Lines()
    _async: ClassVar[bool] = False
    _handle: ClassVar[Callable[[Any, bytes], Any]]  # handle_message, or handle_line
    _fast: bool  # sync handler and nothing buffered: whole-message chunks skip the framer
    _framer: Framer | None  # created only once a message arrives in pieces
    _task: asyncio.Task[None] | None  # awaits an async handler, message after message

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.framing, Framing):
            raise TypeError(
                f"{cls.__qualname__}.framing must be a framing such as sockserve.Lines()"
                f" or sockserve.LengthPrefixed(), not {cls.framing!r}"
            )
        cls._handle = cls._handler()
        cls._async = inspect.iscoroutinefunction(cls._handle)
        # A class whose data_received is the framework's gets the one for its framing.
        if getattr(cls.data_received, "_for_framing", False):
            framing = cls.framing
            receive: Callable[[Any, bytes], None] = MessageHandler._any_data_received
            if isinstance(framing, LengthPrefixed):
                receive = _length_prefixed_data_received(framing)
            cls.data_received = receive  # type: ignore[method-assign,assignment]

    @classmethod
    def _handler(cls) -> Callable[[Any, bytes], Any]:
        return cls.handle_message

    def _attach(
        self, server: Server, ledger: ConnectionLedger, client_address: Any, listener: str
    ) -> None:
        super()._attach(server, ledger, client_address, listener)
        self._fast = not self._async
        self._framer = None
        self._task = None

    def handle_message(self, message: bytes) -> bytes | Awaitable[bytes | None] | None:
        """Answer one message; the default echoes it."""
        return message

    def send(self, payload: bytes) -> bool:
        """Frame ``payload`` as one message and queue it for the peer (server push).

        Never waits, bounded by ``max_write_buffer`` as ``_Connection.send``.
        """
        return super().send(self.framing.encode(payload))

    def _reply(self, reply: bytes) -> None:
        """Write a reply: framed, backpressure by pausing reads (not ``send``'s cut)."""
        self.write(self.framing.encode(reply))

    def _new_framer(self) -> Framer:
        return self.framing.framer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        try:
            self.setup()
        except Exception as exc:
            self._handler_error(exc)
            return
        if self._ledger.stopping:  # accepted from the backlog while stopping
            self._end("server shutdown")

    def _idle(self) -> bool:
        framer = self._framer
        return self._task is None and (framer is None or framer.empty)

    def _end(self, reason: str) -> None:
        if not self._closed and not self._ending:
            self._fast = False  # the framer's path answers the current request, then ends
        super()._end(reason)

    def _said_goodbye(self, result: Any) -> None:
        if result is not None:
            self.send(result)
        self._linger(self._close_reason or "server shutdown")

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        # Fast path: nothing buffered and the chunk is exactly one message, the usual case
        # for request/response traffic. Same outcome as the framer, without its calls.
        # (Subclasses get this, or one made for their framing: see __init_subclass__.)
        if self._fast:
            framing = self.framing
            message = framing.whole(data)
            if message is not None:
                try:
                    reply = self._handle(message)
                    if reply is not None:
                        reply = framing.encode(reply)
                except Exception as exc:
                    self._handler_error(exc)
                    return
                if reply is not None:
                    self.bytes_out += len(reply)
                    self._transport.write(reply)
                return
        self._buffer_data(data)

    data_received._for_framing = True  # type: ignore[attr-defined]
    _any_data_received = data_received

    def _buffer_data(self, data: bytes) -> None:
        """Through the framer: messages in pieces, several in a chunk, or async handlers."""
        if self._ending >= _ENDED:  # saying goodbye (the fast path is off by now)
            return
        framer = self._framer
        if framer is None:
            framer = self._framer = self._new_framer()
            self._fast = False
        framer.feed(data)
        if not self._async:
            self._answer_messages()
            return
        try:
            framer.check()  # an over-long message is refused now, not when its turn comes
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run_messages())
        self._update_reading()  # a handler behind by read_ahead bytes stops the reads

    def _answer_messages(self) -> None:
        """Answer every complete message the framer holds (sync handlers)."""
        framer = self._framer
        assert framer is not None
        while not self._closed:
            try:
                message = framer.next_message()
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            if message is None:
                break
            if not self._answer(message):
                return
            if self._ending:  # its current request is answered: the rest is not
                framer.take_buffer()
                break
        if framer.empty:
            self._framer = None
            self._fast = True
            if self._ending == _ENDING:
                self._goodbye()

    def _answer(self, message: bytes) -> bool:
        """Hand one message to the sync handler and send its reply; False once it raised."""
        try:
            reply = self._handle(message)
            if reply is not None:
                self._reply(reply)
        except Exception as exc:
            self._handler_error(exc)
            return False
        return True

    async def _run_messages(self) -> None:
        """Await the async handler for each buffered message, in order; the framer is the
        queue."""
        framer = self._framer
        assert framer is not None
        try:
            while not self._closed:
                message = framer.next_message()
                if message is None:
                    message = framer.end() if self._eof else None
                    if message is None:
                        break
                reply = await self._handle(message)
                if reply is not None:
                    self._reply(reply)
                    await self._wait_writable()
                if self._ending:  # its current request is answered: the rest is not
                    break
                self._update_reading()
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception as exc:
            self._handler_error(exc)
        finally:
            self._task = None
        if self._ending == _ENDING and not self._closed:
            framer.take_buffer()  # requests after the current one are not answered
            self._goodbye()
        elif self._eof and not self._closed:
            self._transport.close()

    def _update_reading(self) -> None:
        """Read from the peer unless it has ended, is not reading its replies, or the
        async handler is more than the ledger's read_ahead bytes behind."""
        framer = self._framer
        self._set_reading(
            not (
                self._eof
                or self._writing_paused
                or (framer is not None and framer.buffered > self._ledger.read_ahead)
            )
        )

    def _unfinished_line(self) -> int:
        framer = self._framer
        return 0 if framer is None or self._reading_paused else framer.unfinished

    def _waiting_for(self) -> str:
        return "message"

    def eof_received(self) -> bool:
        self._eof = True
        framer = self._framer
        if self._async:
            if framer is not None and not framer.empty and self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run_messages())
            return self._task is not None  # keep the transport open until messages are answered
        try:
            last = framer.end() if framer is not None else None
        except ProtocolError as exc:
            self._protocol_error(exc)
            return False
        if last is not None:  # the last line of a stream may lack its newline
            self._answer(last)
        return False

    def pause_writing(self) -> None:
        # A peer that does not read its replies does not get to send more requests.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._task is not None:
            self._task.cancel()
        try:
            self.finish()
        except Exception as error:
            self._ledger.handler_failed(self.client_address, error)


MessageHandler._handle = MessageHandler.handle_message  # the base class serves too: an echo


# Messages up to this many bytes find their length header in a table, shared by every
# class of one format: no struct call, tuple or int per request (about 4% of a small
# request's server CPU); a table costs 1025 small bytes objects, about 50 KiB.
SMALL_MESSAGE = 1024
_headers: dict[tuple[str, int, int], tuple[bytes, ...]] = {}


def _length_prefixed_data_received(framing: LengthPrefixed) -> Callable[[Any, bytes], None]:
    """MessageHandler.data_received for one length-prefixed framing: the header parsed and
    the reply framed inline, the framing's numbers in closure cells rather than looked up
    per request (this is the per-request cost of every length-prefixed server)."""
    size = framing.header.size
    unpack, pack, encode = framing.header.unpack_from, framing.header.pack, framing.encode
    adjust = size if framing.includes_header else 0
    limit = framing.max_size
    top = min(SMALL_MESSAGE, limit)
    key = (framing.fmt, adjust, top)
    headers = _headers.get(key)
    if headers is None:
        headers = _headers[key] = tuple(pack(n + adjust) for n in range(top + 1))

    def data_received(self: MessageHandler, data: bytes) -> None:
        n = len(data) - size  # the payload, if the chunk is exactly one message
        self.bytes_in += n + size
        # Fast path: nothing buffered and the chunk is exactly one message within the limit.
        if self._fast and (
            data.startswith(headers[n])
            if 0 <= n <= top
            else n > top and unpack(data)[0] - adjust == n <= limit
        ):
            try:
                reply = self._handle(data[size:])
                if reply is not None:
                    k = len(reply)
                    if k <= top:
                        reply = headers[k] + reply
                    else:  # encode raises for a reply over the limit: a handler error
                        reply = pack(k + adjust) + reply if k <= limit else encode(reply)
            except Exception as exc:
                self._handler_error(exc)
                return
            if reply is not None:
                self.bytes_out += len(reply)
                self._transport.write(reply)
            return
        self._buffer_data(data)

    data_received._for_framing = True  # type: ignore[attr-defined]
    return data_received


class LineHandler(MessageHandler):
    """Fast path: ``handle_line`` is called for each line; what it returns is sent back.

    A ``MessageHandler`` reading lines: the line keeps its ``b"\\n"`` and the reply is
    written as given (``send`` too). Return bytes to reply, or None for no reply. Define
    ``handle_line`` as ``async def`` and lines are awaited one at a time, in order. A line
    longer than ``max_line`` closes the connection. A handler that raises is logged with
    its traceback and the connection is closed; other connections carry on.

    On a datagram listener each datagram is handed to ``handle_line`` whole.
    """

    __slots__ = ()

    framing: ClassVar[Framing] = Lines(keep=True)

    @classmethod
    def _handler(cls) -> Callable[[Any, bytes], Any]:
        return cls.handle_line

    def handle_line(self, line: bytes) -> bytes | Awaitable[bytes | None] | None:
        """Answer one line; the default echoes it."""
        return line

    def send(self, payload: bytes) -> bool:
        """Queue ``payload`` for the peer as given (a line handler frames its own replies).

        Never waits, bounded by ``max_write_buffer`` as ``_Connection.send``.
        """
        return _Connection.send(self, payload)

    def _reply(self, reply: bytes) -> None:
        self.write(reply)

    def _new_framer(self) -> Framer:
        return LineFramer(self._max_line)

    def _waiting_for(self) -> str:
        return "line"

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        # Fast path: nothing buffered and the chunk is exactly one line, the usual case
        # for request/response traffic. Same outcome as the framer, without its calls.
        if self._fast:
            end = data.find(b"\n")
            if end == len(data) - 1 and end < self._max_line:
                try:
                    reply = self.handle_line(data)
                except Exception as exc:
                    self._handler_error(exc)
                    return
                if reply is not None:
                    self.bytes_out += len(reply)  # type: ignore[arg-type]
                    self._transport.write(reply)  # type: ignore[arg-type]
                return
        self._buffer_data(data)


_LINE, _SOME, _EXACTLY, _ALL, _MESSAGE = range(5)  # what a pending read waits for
_WAIT: Any = object()  # what _take returns when the pending read must wait


class _Ready:
    """An awaitable that is already done: ``drain()`` with nothing to wait for."""

    __slots__ = ()
    _done = iter(())

    def __await__(self) -> Generator[Any, None, None]:
        return self._done  # type: ignore[return-value]  # exhausted: the await returns at once


_READY = _Ready()


class StreamHandler(_Connection):
    """One instance and one task per connection: ``setup()``, ``await handle()``, ``finish()``.

    ``setup`` and ``finish`` may be plain or async. Read with ``readline``, ``read`` and
    ``readexactly``, write with ``write`` and ``await drain()``. ``readline`` raises
    LineTooLong past ``max_line`` (uncaught, it closes the connection with that reason).
    ``read_message`` and ``write_message`` speak the class's ``framing`` (by default
    lines kept whole, as ``readline`` reads them); reads of every kind may follow each
    other on one connection.

    Reads return futures, completed by the protocol as data arrives, so a line costs
    no coroutine of the framework's.
    """

    __slots__ = (
        "_framer",
        "_loop",
        "_messages",
        "_task",
        "_waiter",
        "_want",
        "_wanted",
    )

    framing: ClassVar[Framing] = Lines(keep=True)  # as readline and write: lines as given
    _framer: Framer | None  # None while nothing is buffered for reading lines
    _messages: bool  # the framer is the class framing's (read_message), not readline's
    _loop: asyncio.AbstractEventLoop
    _waiter: asyncio.Future[Any] | None
    _want: int
    _wanted: int  # the n of read(n) / readexactly(n)
    _task: asyncio.Task[None] | None
    _simple_hooks: ClassVar[bool] = True  # setup and finish are plain functions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.framing, Framing):
            raise TypeError(
                f"{cls.__qualname__}.framing must be a framing such as sockserve.Lines()"
                f" or sockserve.LengthPrefixed(), not {cls.framing!r}"
            )
        cls._simple_hooks = not (
            inspect.iscoroutinefunction(cls.setup) or inspect.iscoroutinefunction(cls.finish)
        )

    def _attach(
        self, server: Server, ledger: ConnectionLedger, client_address: Any, listener: str
    ) -> None:
        super()._attach(server, ledger, client_address, listener)
        self._messages = False
        self._waiter = self._task = self._framer = None
        self._want = _LINE
        self._wanted = 0

    async def handle(self) -> None:
        """Serve the connection; return to close it."""

    def _idle(self) -> bool:
        framer = self._framer
        return (
            self._waiter is not None
            and (framer is None or framer.empty)
            and not self._reading_paused
        )

    def _said_goodbye(self, result: Any) -> None:
        """The hook ran: the pending read (and every later one) sees the end of input."""
        if isinstance(result, (bytes, bytearray, memoryview)):
            self.write(bytes(result))
        self._eof = True
        self._framer = None
        self._set_reading(True)
        self._fulfil()

    def _unfinished_line(self) -> int:
        framer = self._framer
        waiting = (
            self._waiter is not None
            and self._want in (_LINE, _MESSAGE)
            and not self._reading_paused
            and framer is not None
        )
        return framer.unfinished if waiting else 0  # type: ignore[union-attr]

    def _waiting_for(self) -> str:
        return "message" if self._want == _MESSAGE else "line"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._loop = loop = asyncio.get_running_loop()
        if self._ledger.stopping:  # accepted from the backlog while stopping
            self._end("server shutdown")
        if self._simple_hooks:
            try:
                self.setup()
            except Exception as exc:
                self._handler_error(exc)
                return
            self._task = loop.create_task(self.handle())
            self._task.add_done_callback(self._handle_done)
        else:
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        """setup, handle and finish, for handlers with async setup or finish."""
        try:
            result = self.setup()
            if inspect.isawaitable(result):
                await result
            await self.handle()
        except BaseException as exc:
            self._ended(exc)
        try:
            result = self.finish()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            self._handler_error(exc)
        self._close_after_handler()

    def _handle_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._set_reason("cancelled")
        elif (exc := task.exception()) is not None:
            self._ended(exc)
        try:
            self.finish()
        except Exception as exc:
            self._handler_error(exc)
        self._close_after_handler()

    def _ended(self, exc: BaseException) -> None:
        """Why handle() ended, when it raised."""
        if isinstance(exc, ProtocolError):
            self._protocol_error(exc)
        elif isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)):
            self._set_reason(f"error: {exc}" if str(exc) else type(exc).__name__)
        elif isinstance(exc, asyncio.CancelledError):
            self._set_reason("cancelled")
        elif isinstance(exc, Exception):
            self._handler_error(exc)
        else:
            raise exc

    def _close_after_handler(self) -> None:
        self._task = None
        if self._ending >= _ENDED:  # (_linger does nothing if already lingering)
            self._linger(self._close_reason or "server shutdown")
        elif not self._closed:
            self._set_reason("closed by handler")
            self._transport.close()

    # Protocol side
    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._ending >= _ENDED:  # saying goodbye: the handler sees the end of input
            return
        waiter = self._waiter
        framer = self._framer
        if framer is None:
            if waiter is not None and self._want == _LINE:
                # Fast path: a readline is waiting and this chunk is exactly one line.
                end = data.find(b"\n")
                if end == len(data) - 1 and end < self._max_line and not waiter.done():
                    self._waiter = None
                    waiter.set_result(data)
                    return
            framer = self._framer_for(self._want == _MESSAGE if waiter else self._messages)
        framer.feed(data)
        if waiter is not None:
            self._fulfil()
        framer = self._framer
        limit = self._ledger.read_ahead + self._max_line
        if not self._reading_paused and framer and framer.buffered > limit:
            self._set_reading(False)

    def eof_received(self) -> bool:
        self._eof = True
        self._fulfil()
        return True  # the handler may still write; it closes when it returns

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._eof = True
        self._fulfil()

    def _fulfil(self) -> None:
        """Complete the pending read if the buffer (or the end of the stream) allows."""
        waiter = self._waiter
        if waiter is None:
            return
        if waiter.done():  # cancelled by its task
            self._waiter = None
            return
        try:
            result = self._take()
        except (ProtocolError, asyncio.IncompleteReadError) as exc:
            self._waiter = None
            waiter.set_exception(exc)
            return
        if result is not _WAIT:
            self._waiter = None
            waiter.set_result(result)

    def _framer_for(self, messages: bool) -> Framer:
        """The framer for lines (readline) or for the class framing (read_message); on a
        switch the new one takes over the bytes the old one held."""
        framer = self._framer
        if framer is not None and self._messages == messages:
            return framer
        new = self.framing.framer() if messages else LineFramer(self._max_line)
        if framer is not None:
            new.feed(framer.take_buffer())
        self._framer, self._messages = new, messages
        return new

    def _take(self) -> Any:
        """What the current read wants from the framer, or _WAIT if it must wait."""
        want = self._want
        framer = self._framer
        if want in (_LINE, _MESSAGE):
            if framer is None and not self._eof:
                return _WAIT
            framer = self._framer_for(want == _MESSAGE)
            result: Any = framer.next_message()
            if result is None:
                if not self._eof:
                    return _WAIT
                result = framer.end()  # the unterminated last line; None at the end
                if result is None and want == _LINE:
                    result = b""
        elif framer is None:  # nothing buffered
            if want == _EXACTLY and self._wanted == 0:
                return b""
            if not self._eof:
                return _WAIT
            if want == _EXACTLY:
                raise asyncio.IncompleteReadError(b"", self._wanted)
            return b""
        elif want == _SOME:
            if framer.empty and not self._eof:
                return _WAIT
            result = framer.read(self._wanted)
        elif want == _EXACTLY:
            result = framer.read_exactly(self._wanted)
            if result is None:
                if not self._eof:
                    return _WAIT
                raise asyncio.IncompleteReadError(framer.take_buffer(), self._wanted)
        else:
            if not self._eof:
                return _WAIT
            result = framer.take_buffer()
        if framer.empty and not self._messages:
            self._framer = None  # an idle connection holds no framer
        if self._reading_paused and framer.buffered <= self._ledger.read_ahead:
            self._set_reading(True)
        return result

    def _read(self, want: int, wanted: int = 0) -> asyncio.Future[Any]:
        if self._waiter is not None:
            raise RuntimeError("another read is already waiting on this connection")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._want, self._wanted = want, wanted
        result = self._take()  # may raise ProtocolError or IncompleteReadError right away
        if result is not _WAIT:
            future.set_result(result)
        else:
            self._waiter = future
            if self._reading_paused:
                self._set_reading(True)
            if self._ending == _ENDING and self._idle() and not self._input_pending():
                self._goodbye()
        return future

    # Handler side
    def readline(self) -> Awaitable[bytes]:
        """The next line with its ``b"\\n"``; at end of stream the rest, then ``b""``."""
        if self._framer is not None or self._eof or self._waiter is not None:
            return self._read(_LINE)
        # Nothing buffered: the usual wait for the next request, kept short.
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._want = _LINE
        self._waiter = future
        if self._ending == _ENDING and not self._input_pending():
            self._goodbye()
        return future

    def read(self, n: int = -1) -> Awaitable[bytes]:
        """Up to ``n`` bytes (at least one unless at end of stream); -1 reads to the end."""
        if n < 0:
            return self._read(_ALL)
        return self._read(_SOME, n)

    def readexactly(self, n: int) -> Awaitable[bytes]:
        """Exactly ``n`` bytes; asyncio.IncompleteReadError if the stream ends first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        return self._read(_EXACTLY, n)

    def read_message(self) -> Awaitable[bytes | None]:
        """The next message of the class's ``framing``, without its framing; None at the
        end of the stream. A message over the limit or malformed raises ProtocolError
        (uncaught, it closes the connection with a logged reason)."""
        return self._read(_MESSAGE)

    def write_message(self, payload: bytes) -> None:
        """Frame ``payload`` with the class's ``framing`` and write it."""
        self.write(self.framing.encode(payload))

    def drain(self) -> Awaitable[None]:
        """Wait while the peer is not reading what was written (backpressure)."""
        if self._closed:
            raise ConnectionResetError("connection closed")
        if not self._writing_paused:
            return _READY
        return self._drain_slow()

    async def _drain_slow(self) -> None:
        await self._wait_writable()
        if self._closed:
            raise ConnectionResetError("connection closed")

    def at_eof(self) -> bool:
        """True once the peer finished sending and everything was read."""
        return self._eof and (self._framer is None or self._framer.empty)


class DatagramHandler:
    """Called with each datagram; returns the reply, or None to send nothing.

    One instance serves one datagram listener. Define ``handle_datagram`` as ``async
    def`` to await it (datagrams are then handled concurrently, a bounded number at once).
    """

    server: Server
    listener: str

    def _attach(self, server: Server, listener: str) -> None:
        self.server = server
        self.listener = listener

    def setup(self) -> Any:
        """Called once before the first datagram."""

    def finish(self) -> Any:
        """Called once when the listener closes."""

    def handle_datagram(
        self, data: bytes, client_address: Any
    ) -> bytes | Awaitable[bytes | None] | None:
        """Answer one datagram; the default echoes it."""
        return data
