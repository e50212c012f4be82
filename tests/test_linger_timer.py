"""A connection closed after a lingering goodbye is freed at once, not LINGER_TIMEOUT later."""

from __future__ import annotations

import gc
import socket
import weakref

import sockserve
from helpers import read_all, read_line, serving

HANDLERS: list[weakref.ref[sockserve.LineHandler]] = []


class Remembered(sockserve.LineHandler):
    def setup(self) -> None:
        HANDLERS.append(weakref.ref(self))

    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


def test_the_linger_timer_goes_with_the_connection(loop: str) -> None:
    """The timer that cuts a lingering close short was never cancelled: it held each
    closed connection for LINGER_TIMEOUT (5 s) more."""
    HANDLERS.clear()
    with serving(Remembered, loop, max_connection_age=0.2) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"hi\n")
            assert read_line(sock) == b"HI\n"
            assert read_all(sock) == b""  # aged: goodbye (none), then our end of stream
        server.wait_until(lambda: server.server.ledger.open == 0, timeout=10)
        server.call(gc.collect)
        assert len(HANDLERS) == 1
        assert HANDLERS[0]() is None
