"""Async handler bases: message and line (the fast path), datagram; and stream (one task
per connection, in ``sockserve.streams``), importable from here too.

Each stream, message or line handler instance is also the asyncio Protocol of its
connection (``sockserve.connection``), so a connection costs one Python object and a line
costs one plain method call. Attributes whose names start with ``_`` are the framework's;
handlers use the public ones: ``server``, ``client_address``, ``listener``, ``proxy``,
and the methods below.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from sockserve.connection import _ENDED, _ENDING, _Connection
from sockserve.framing import (
    Framer,
    Framing,
    LengthPrefixed,
    LineFramer,
    Lines,
    LineTooLong,
    ProtocolError,
)
from sockserve.streams import StreamHandler

if TYPE_CHECKING:
    from sockserve.lifecycle import ConnectionLedger
    from sockserve.server import Server

__all__ = ["DatagramHandler", "LineHandler", "LineTooLong", "MessageHandler", "StreamHandler"]


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

    def _attach(self, ledger: ConnectionLedger, client_address: Any, listener: str) -> None:
        super()._attach(ledger, client_address, listener)
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
            self._fast = not self._ending  # an ending connection answers nothing more
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


# Replies up to this many bytes find their length header in a table, shared by every
# class of one format: no struct call, tuple or int per reply (about 4% of a small
# request's server CPU); a table costs 1025 small bytes objects, about 50 KiB.
SMALL_MESSAGE = 1024
_headers: dict[tuple[str, int, int], tuple[bytes, ...]] = {}


def _length_prefixed_data_received(framing: LengthPrefixed) -> Callable[[Any, bytes], None]:
    """MessageHandler.data_received for one length-prefixed framing: a chunk that is one
    small message has its header checked against the table and its reply framed from it,
    with three closure cells and no struct call (this is the per-request cost of every
    length-prefixed server); anything else takes the generic path."""
    size = framing.header.size
    adjust = size if framing.includes_header else 0
    top = min(SMALL_MESSAGE, framing.max_size)
    key = (framing.fmt, adjust, top)
    headers = _headers.get(key)
    if headers is None:
        headers = _headers[key] = tuple(framing.header.pack(n + adjust) for n in range(top + 1))
    generic = MessageHandler._any_data_received

    def data_received(self: MessageHandler, data: bytes) -> None:
        n = len(data) - size
        if 0 <= n <= top and self._fast:
            message = data.removeprefix(headers[n])  # data itself unless it matched
            if message is not data:  # (asyncio hands bytes: a copy means a match)
                self.bytes_in += n + size
                try:
                    reply = self._handle(message)
                    if reply is not None:
                        k = len(reply)
                        # encode raises for a reply over the limit: a handler error
                        reply = headers[k] + reply if k <= top else self.framing.encode(reply)
                except Exception as exc:
                    self._handler_error(exc)
                    return
                if reply is not None:
                    self.bytes_out += len(reply)
                    self._transport.write(reply)
                return
        generic(self, data)

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
        return LineFramer(self._ledger.max_line)

    def _waiting_for(self) -> str:
        return "line"

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        # Fast path: nothing buffered and the chunk is exactly one line, the usual case
        # for request/response traffic. Same outcome as the framer, without its calls.
        if self._fast:
            end = data.find(b"\n")
            if end == len(data) - 1 and end < self._ledger.max_line:
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
