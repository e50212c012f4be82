"""Nothing is answered once a goodbye has begun, even while an async goodbye runs."""

from __future__ import annotations

import asyncio
import socket
import threading

import sockserve
from helpers import read_all, read_line, serving

SENT = threading.Event()  # the test sent its late request


class SlowGoodbye(sockserve.LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.upper()

    async def handle_shutdown(self) -> bytes:
        await asyncio.to_thread(SENT.wait, 10)
        await asyncio.sleep(0.1)  # the late request, already here, is read meanwhile
        return b"goodbye\n"


def test_a_request_after_the_goodbye_began_is_not_answered() -> None:
    """A connection busy with a partial line at shutdown finishes that request, then its
    goodbye starts; a request sent during the goodbye was answered by the one-message
    fast path, after the goodbye had begun."""
    SENT.clear()
    with serving(SlowGoodbye) as server:
        sock = socket.create_connection(server.address, timeout=10)
        stopper = threading.Thread(target=server.stop, args=(10,))
        try:
            sock.sendall(b"hi\n")
            assert read_line(sock) == b"HI\n"
            sock.sendall(b"par")
            server.wait_until(lambda: next(iter(server.server.ledger.connections)).bytes_in == 6)
            stopper.start()
            server.wait_until(lambda: server.server.ledger.stopping, timeout=10)
            sock.sendall(b"tial\n")
            assert read_line(sock) == b"PARTIAL\n"
            sock.sendall(b"late\n")
            SENT.set()
            assert read_all(sock) == b"goodbye\n"
        finally:
            SENT.set()
            sock.close()
            stopper.join(20)
