"""A goodbye that cannot be sent is a handler error: shutdown and the sweep carry on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

import sockserve
from helpers import closed_by_server, read_line, serving


class UnsendableGoodbye(sockserve.MessageHandler):
    """Its goodbye holds the line delimiter, so framing it raises ValueError."""

    framing = sockserve.Lines()

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()

    def handle_shutdown(self) -> bytes:
        return b"bye\n"


class AsyncUnsendableGoodbye(UnsendableGoodbye):
    async def handle_shutdown(self) -> bytes:  # type: ignore[override]
        await asyncio.sleep(0)
        return b"bye\n"


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def answered(address: tuple[str, int], into: list[socket.socket]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    into.append(sock)
    sock.sendall(b"hi\n")
    assert read_line(sock) == b"HI\n"
    return sock


@pytest.mark.parametrize("handler", [UnsendableGoodbye, AsyncUnsendableGoodbye])
def test_shutdown_ends_every_connection_when_the_goodbye_cannot_be_sent(
    handler: type, clients: list[socket.socket]
) -> None:
    with serving(handler) as server:
        socks = [answered(server.address, clients) for _ in range(3)]
        server.stop(10)  # raised ValueError out of Server.shutdown before the fix
        for sock in socks:
            assert closed_by_server(sock)
        assert len(server.errors) == 3
        assert all(isinstance(error, ValueError) for error in server.errors)


def test_connections_past_their_age_with_an_unsendable_goodbye_keep_the_sweep_going(
    clients: list[socket.socket],
) -> None:
    """The first aged connection's failed goodbye used to end the sweep for good: no
    connection after it was ever timed out."""
    with serving(UnsendableGoodbye, max_connection_age=0.2, idle_timeout=0.5) as server:
        first = answered(server.address, clients)
        assert closed_by_server(first)
        server.wait_until(lambda: len(server.errors) == 1, timeout=10)
        second = answered(server.address, clients)
        assert closed_by_server(second)  # times out (socket timeout 10 s) before the fix
        assert len(server.errors) == 2
