"""``StreamHandler``: one task per connection, reading with ``readline``, ``read``,
``readexactly`` and ``read_message``, writing with ``write`` and ``drain``."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any, ClassVar

from sockserve.connection import _ENDED, _ENDING, _Connection
from sockserve.framing import (
    Framer,
    Framing,
    LineFramer,
    Lines,
    ProtocolError,
)

if TYPE_CHECKING:
    from sockserve.lifecycle import ConnectionLedger

__all__ = ["StreamHandler"]


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

    def _attach(self, ledger: ConnectionLedger, client_address: Any, listener: str) -> None:
        super()._attach(ledger, client_address, listener)
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
        self._loop = asyncio.get_running_loop()
        if self._ledger.stopping:  # accepted from the backlog while stopping
            self._end("server shutdown")
        if self._simple_hooks:
            try:
                self.setup()
            except Exception as exc:
                self._handler_error(exc)
                return
            # The ledger's: a handler still running when the server finishes is cancelled.
            self._task = self._ledger.spawn(self.handle())
            self._task.add_done_callback(self._handle_done)
        else:
            self._task = self._ledger.spawn(self._run())

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
                if end == len(data) - 1 and end < self._ledger.max_line and not waiter.done():
                    self._waiter = None
                    waiter.set_result(data)
                    return
            framer = self._framer_for(self._want == _MESSAGE if waiter else self._messages)
        framer.feed(data)
        if waiter is not None:
            self._fulfil()
        framer = self._framer
        limit = self._ledger.read_ahead + self._ledger.max_line
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
        new = self.framing.framer() if messages else LineFramer(self._ledger.max_line)
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
                self._goodbye_unless_fresh()
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
            self._goodbye_unless_fresh()
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
