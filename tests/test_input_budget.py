"""--max-buffered-input: the input a worker holds for its handlers is bounded in total,
by deriving each connection's read-ahead from it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

import sockserve
from helpers import LOOPS, ThreadedServer, serving
from sockserve.lifecycle import read_ahead
from sockserve.settings import Settings


class NeverReads(sockserve.StreamHandler):
    async def handle(self) -> None:
        await asyncio.Event().wait()  # busy elsewhere while the peer pushes


class StuckOnALine(sockserve.LineHandler):
    async def handle_line(self, line: bytes) -> bytes:
        await asyncio.Event().wait()
        return line


def test_read_ahead_is_the_budget_shared_by_the_connections() -> None:
    def share(**settings: object) -> int:
        return read_ahead(Settings(**settings))  # type: ignore[arg-type]

    assert share(max_buffered_input="1g", max_connections=1000) == 256 * 1024  # capped
    assert share(max_buffered_input="1g", max_connections=10_000) == 1024**3 // 10_000 - 65536
    assert share(max_buffered_input="64m", max_connections=10_000) == 4096  # the floor
    assert share() == 1024**3 // 10_000 - 65536  # defaults: about 43 KiB


def buffered_by_server(server: ThreadedServer, piece: bytes) -> int:
    """Push ``piece`` every 2 ms for a second (about 1 MB) until the server stops reading:
    what the server took in. Paced, so that each read the server makes is small and what
    it holds is its threshold, not one large read past it."""
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                sock.send(piece)
            time.sleep(0.002)
        conns = server.call(lambda: list(server.server.ledger.connections))
        taken: int = max(conn.bytes_in for conn in conns)
    server.stop(timeout=0.2)  # the handler never returns
    return taken


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("handler", [NeverReads, StuckOnALine], ids=lambda h: h.__name__)
def test_a_peer_pushing_into_a_handler_that_does_not_read_is_held_to_its_share(
    loop: str, handler: type
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    line = b"x" * 2000 + b"\n"
    settings = {"max_connections": 10, "max_line": 4096}
    with serving(handler, loop, max_buffered_input="10m", **settings) as server:
        large = buffered_by_server(server, line)
    with serving(handler, loop, max_buffered_input="100k", **settings) as server:
        small = buffered_by_server(server, line)
    assert large > 256 * 1024  # 10 MiB over 10 connections: the 256 KiB cap
    assert small < 128 * 1024  # 100 KiB over 10: 6 KiB (past one line), plus a read
