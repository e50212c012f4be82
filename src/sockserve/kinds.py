"""Handler kinds: how each kind of handler serves a connection or a datagram.

``Server.__init__`` picks the kind of its handler class once (``kind_of``); from then on
it asks that object, never the class: how to serve an accepted stream connection, how to
answer a datagram, whether it is full. A new kind of handler is one more class here,
listed in ``KINDS``.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import copy
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from sockserve.blocking import BlockingPool, is_blocking_handler
from sockserve.connection import _Connection
from sockserve.handlers import DatagramHandler, MessageHandler, StreamHandler

if TYPE_CHECKING:
    from sockserve.binding import Listener
    from sockserve.listeners import DatagramEndpoint
    from sockserve.proxy_protocol import ProxyHeader
    from sockserve.server import Server

__all__ = ["KINDS", "HandlerKind", "HandlerKindError", "kind_of"]


class HandlerKindError(TypeError):
    """The handler class cannot serve this kind of listener."""


@dataclass
class DatagramAnswer:
    """How a kind answers the datagrams of one listener: ``answer(data, address)``
    returns the reply (or None, or an awaitable of either when ``is_async``)."""

    answer: Callable[[bytes, Any], Any]
    is_async: bool = False
    handler: Any = None  # its setup() runs before the first datagram, finish() at the end


class HandlerKind:
    """What the server asks of a kind of handler; the defaults serve no listener."""

    name: ClassVar[str]
    handler_base: ClassVar[type | None] = None
    serves_streams: ClassVar[bool] = True
    # Datagrams run on a bounded pool: reading pauses while ``datagrams_full``.
    datagrams_share_capacity: ClassVar[bool] = False

    def __init__(self, server: Server) -> None:
        self.server = server
        self.handler_class: Any = server.handler_class
        self.ledger = server.ledger
        self.settings = server.settings

    @classmethod
    def accepts(cls, handler: type) -> bool:
        return cls.handler_base is not None and issubclass(handler, cls.handler_base)

    @property
    def full(self) -> bool:
        """No room for one more connection: stop accepting until ``capacity_changed``."""
        return False

    @property
    def datagrams_full(self) -> bool:
        """No room for one more datagram: stop reading until ``capacity_changed``."""
        return False

    def threads(self) -> tuple[int, int]:
        """Handler threads in use, and handlers ready to run waiting for their turn."""
        return 0, 0

    def serve_stream(
        self,
        conn: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        context: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        """Serve an accepted, admitted connection until it closes (without blocking)."""
        raise NotImplementedError

    def datagram_answer(self, endpoint: DatagramEndpoint) -> DatagramAnswer:
        raise HandlerKindError(
            f"a {self.name} handler cannot serve datagram listener {endpoint.listener.url}"
        )

    def release_all(self) -> None:
        """Shutdown, past the graceful timeout: unblock handlers stuck reading."""

    def drain(self, spread: float) -> None:
        """Shutdown: end what the kind serves outside the ledger's connections
        goodbye-first, spread over ``spread`` seconds."""

    def end_aged(self, now: float, age: float) -> None:
        """End goodbye-first what the kind serves outside the ledger's connections that
        is older than ``age`` seconds (``now`` is time.monotonic())."""

    async def close(self) -> None:
        """Wait (bounded) for what the kind runs outside the event loop."""


class _HandedToLibuv(_socket.socket):
    """An accepted socket given to uvloop: 64 bytes a connection instead of a
    socket.socket's 96, for uvloop keeps the object as long as the connection.

    Once libuv has closed the descriptor, uvloop calls ``detach()`` on a socket.socket
    and ``close()`` on anything else: here ``close()`` does what ``detach()`` does, so the
    number, perhaps already another file's, is never closed twice. ``discard()`` closes
    a descriptor uvloop never took. Plaintext only: a failed TLS connection's transport
    closes after ``_connect`` gives up, while a socket.socket's close() waits for it.
    """

    __slots__ = ()

    def close(self) -> None:
        self.detach()

    def discard(self) -> None:
        _socket.socket.close(self)  # a no-op once uvloop has let go


class _AsyncKind(HandlerKind):
    """Line and stream handlers: the handler object is the connection's Protocol."""

    def serve_stream(
        self,
        conn: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        context: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        if conn.family != socket.AF_UNIX:
            # Replies go out at once (uvloop does this itself; asyncio skips sockets
            # whose proto field is 0, as accepted ones are).
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handler = self.handler_class()
        handler._attach(self.ledger, address, listener.url)
        handler.proxy = proxy
        sock: socket.socket | _HandedToLibuv = conn
        if context is None and type(self.ledger.loop).__module__.startswith("uvloop"):
            sock = _HandedToLibuv(conn.family, conn.type, conn.proto, conn.detach())
        self.ledger.spawn(self._connect(sock, handler, context, handshake_timeout))

    async def _connect(
        self,
        conn: socket.socket | _HandedToLibuv,
        handler: _Connection,
        context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        loop = self.ledger.loop
        sock = cast(socket.socket, conn)  # uvloop asks only what both have
        try:
            if context is None:
                await loop.connect_accepted_socket(lambda: handler, sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: handler, sock, ssl=context, ssl_handshake_timeout=timeout
                )
        except Exception as exc:
            # Failed handshake, plaintext on a TLS port, a peer gone before we started; or
            # anything unforeseen: whatever it is, the connection's slot must be released.
            ledger = self.ledger
            reason = "TLS handshake failed" if context is not None else "connect failed"
            ledger.rejected("tls" if context is not None else "error")
            why = str(exc) or type(exc).__name__  # a bare TimeoutError says nothing
            ledger.reject_log("%s for %s: %s", reason, handler.client_address, why)
            with contextlib.suppress(OSError):
                _discard(conn)
            if handler not in ledger.connections:  # else connection_lost accounts for it
                ledger.closed(handler.client_address, handler.listener, 0.0, 0, 0, reason)
        except asyncio.CancelledError:  # stopping before the connection was set up
            _discard(conn)
            raise


def _discard(conn: socket.socket | _HandedToLibuv) -> None:
    """Close an accepted socket the transport did not take (or has let go of)."""
    if isinstance(conn, _HandedToLibuv):
        conn.discard()
    else:
        conn.close()


class LineKind(_AsyncKind):
    """``MessageHandler`` and its ``LineHandler``: on a datagram listener each datagram is
    one message (one line), answered unframed."""

    name = "line"
    handler_base = MessageHandler

    def datagram_answer(self, endpoint: DatagramEndpoint) -> DatagramAnswer:
        handler = self.handler_class()
        handler._attach(self.ledger, None, endpoint.listener.url)

        def answer(data: bytes, address: Any) -> Any:
            handler.client_address = address
            return handler._handle(data)

        def answer_async(data: bytes, address: Any) -> Any:
            # Up to DATAGRAM_CONCURRENCY run at once: each gets its own client_address
            # (a shallow copy shares what setup() made).
            own = copy.copy(handler)
            own.client_address = address
            return own._handle(data)

        if handler._async:
            return DatagramAnswer(answer_async, True, handler)
        return DatagramAnswer(answer, False, handler)


class StreamKind(_AsyncKind):
    """``StreamHandler``: one task per connection; stream listeners only."""

    name = "stream"
    handler_base = StreamHandler


class DatagramKind(HandlerKind):
    """``DatagramHandler``: one instance per datagram listener; no stream listeners."""

    name = "datagram"
    handler_base = DatagramHandler
    serves_streams = False

    def datagram_answer(self, endpoint: DatagramEndpoint) -> DatagramAnswer:
        handler = self.handler_class()
        handler._attach(self.server, endpoint.listener.url)
        answer = handler.handle_datagram
        return DatagramAnswer(answer, asyncio.iscoroutinefunction(answer), handler)


class BlockingKind(HandlerKind):
    """socketserver handlers: each connection on a thread of its own (up to
    max_connections), each datagram on a thread of a bounded pool."""

    name = "blocking"
    datagrams_share_capacity = True

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self.pool = BlockingPool(server, self.settings, self.ledger, self.settings.threads)

    @classmethod
    def accepts(cls, handler: type) -> bool:
        return is_blocking_handler(handler)

    @property
    def datagrams_full(self) -> bool:
        return self.pool.full

    def threads(self) -> tuple[int, int]:
        return self.pool.streams + self.pool.busy, self.pool.waiting

    def serve_stream(
        self,
        conn: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        context: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        self.pool.submit_stream(conn, address, listener, proxy, context, handshake_timeout)

    def datagram_answer(self, endpoint: DatagramEndpoint) -> DatagramAnswer:
        pool, sock = self.pool, endpoint.sock

        def answer(data: bytes, address: Any) -> None:
            pool.submit_datagram(data, address, sock)
            if pool.full:
                endpoint.set_reading(False)

        return DatagramAnswer(answer)

    def release_all(self) -> None:
        self.pool.release_all()

    def drain(self, spread: float) -> None:
        self.pool.drain(spread)

    def end_aged(self, now: float, age: float) -> None:
        self.pool.end_aged(now, age)

    async def close(self) -> None:
        await self.pool.close()


# Looked up in order: the first kind that accepts the class serves it.
KINDS: tuple[type[HandlerKind], ...] = (LineKind, StreamKind, DatagramKind, BlockingKind)


def kind_of(handler: type) -> type[HandlerKind]:
    """The kind that serves ``handler``; HandlerKindError for anything else."""
    if not isinstance(handler, type):
        raise HandlerKindError(f"{handler!r} is not a class")
    for kind in KINDS:
        if kind.accepts(handler):
            return kind
    raise HandlerKindError(
        f"{handler.__module__}.{handler.__qualname__} is not a handler: subclass"
        " sockserve.LineHandler, MessageHandler, StreamHandler, DatagramHandler or a"
        " socketserver BaseRequestHandler"
    )
