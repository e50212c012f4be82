"""The gate: who gets served, decided for each accepted connection.

In order: the proxy allow-list, the allow/deny rules, the PROXY header (which names the
real client), the per-client limits; then the handler kind serves the connection. A
refused connection is closed, logged (rate-limited) and accounted for like any other.
The global connection rate (``--connection-rate``) is paced here too: the listeners ask
before each accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sockserve.admission import Admission, Pacer, plain_host

if TYPE_CHECKING:
    from sockserve.binding import Listener
    from sockserve.kinds import HandlerKind
    from sockserve.lifecycle import ConnectionLedger
    from sockserve.proxy_protocol import ProxyHeader
    from sockserve.settings import Settings

__all__ = ["Gate"]

PROXY_PEEK = 16 + 4096
# A handshake left no time by the PROXY header still gets this long.
MIN_HANDSHAKE_LEFT = 0.001


class Gate:
    """Admits or refuses accepted connections; admitted ones go to the handler kind.

    A new admission rule goes in ``accepted`` when it judges the peer's own address, or
    in ``_admit_and_serve`` when it must judge the real client behind a PROXY header.
    """

    def __init__(
        self,
        settings: Settings,
        ledger: ConnectionLedger,
        kind: HandlerKind,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.kind = kind
        self.ssl = ssl_context  # for connections accepted from now on
        rate = settings.connection_rate
        # With workers, each takes its share of the rate: together they accept R a second.
        self.pacer = Pacer(rate / settings.workers) if rate else None
        self.pacing = False  # waiting for the connection rate to allow the next accept

    def accepted(self, conn: socket.socket, address: Any, listener: Listener) -> None:
        """A new connection: refuse it, or read its PROXY header, or admit and serve it."""
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

    def pace(self) -> None:
        """Stop accepting until the connection rate allows the next one (backlog waits)."""
        assert self.pacer is not None
        if not self.pacing:
            self.pacing = True
            self.ledger.capacity_changed()
            loop = self.ledger.loop
            loop.call_later(self.pacer.wait(loop.time()), self._end_pacing)

    def _end_pacing(self) -> None:
        self.pacing = False
        self.ledger.capacity_changed()

    def _admit_and_serve(
        self,
        conn: socket.socket,
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
            reason = admission.admit(address, self.ledger.loop.time())
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
        conn: socket.socket,
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

    def _reject(self, conn: socket.socket, address: Any, listener: Listener, reason: str) -> None:
        ledger = self.ledger
        ledger.rejected(reason)
        ledger.refuse_log("refused %s on %s: %s", address, listener.url, reason)
        with contextlib.suppress(OSError):
            conn.close()
        ledger.closed(address, listener.url, 0.0, 0, 0, reason, admitted=False)

    async def _read_proxy(self, conn: socket.socket, address: Any, listener: Listener) -> None:
        from sockserve.proxy_protocol import ProxyProtocolError

        started = self.ledger.loop.time()
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
        left = self.settings.handshake_timeout - (self.ledger.loop.time() - started)
        self._admit_and_serve(conn, real, listener, header, max(left, MIN_HANDSHAKE_LEFT))

    async def _proxy_header(self, conn: socket.socket) -> ProxyHeader:
        """Read exactly the header's bytes (peeking first), so what follows stays unread."""
        from sockserve.proxy_protocol import parse_prefix

        accept = self.settings.proxy_protocol
        assert accept != "off", "the gate reads a PROXY header only when one is expected"
        got = b""
        while True:
            await self._readable(conn)
            peek = conn.recv(PROXY_PEEK - len(got), socket.MSG_PEEK)
            if not peek:
                raise EOFError("connection closed before the PROXY header")
            header = parse_prefix(got + peek, accept)
            if header is not None:
                rest = header.length - len(got)
                if rest and len(conn.recv(rest)) != rest:
                    raise EOFError("short read of a peeked PROXY header")
                return header
            # No complete header in what we saw, so all of it belongs to the header.
            got += conn.recv(len(peek))
            if len(got) >= PROXY_PEEK:
                raise EOFError("PROXY header too long")

    async def _readable(self, conn: socket.socket) -> None:
        future: asyncio.Future[None] = self.ledger.loop.create_future()
        fd = conn.fileno()
        self.ledger.loop.add_reader(fd, future.set_result, None)
        try:
            await future
        finally:
            self.ledger.loop.remove_reader(fd)

    def _serve(
        self,
        conn: socket.socket,
        address: Any,
        listener: Listener,
        proxy: ProxyHeader | None,
        handshake_timeout: float | None = None,
    ) -> None:
        try:
            self.kind.serve_stream(
                conn,
                address,
                listener,
                proxy,
                self.ssl,
                handshake_timeout or self.settings.handshake_timeout,
            )
        except Exception as exc:  # the handler's __init__, say: release the slot
            ledger = self.ledger
            ledger.handler_failed(address, exc)
            with contextlib.suppress(OSError):
                conn.close()
            ledger.closed(address, listener.url, 0.0, 0, 0, "handler error")


def _in_networks(address: Any, networks: Iterable[Any]) -> bool:
    if not isinstance(address, tuple) or not isinstance(address[0], str):
        return False
    try:
        ip = ipaddress.ip_address(plain_host(address[0]))
    except ValueError:
        return False
    return any(ip in net for net in networks)
