"""An async line handler on a datagram listener sees each datagram's own sender."""

from __future__ import annotations

import asyncio
import socket
from typing import ClassVar

import sockserve
from helpers import serving


class AwaitingWho(sockserve.LineHandler):
    """Answers each datagram with its sender's port, once two are in flight at once."""

    seen: ClassVar[int] = 0
    both: ClassVar[asyncio.Event | None] = None

    tag: bytes

    def setup(self) -> None:
        self.tag = b"set up"  # what setup() makes is seen by every datagram

    async def handle_line(self, line: bytes) -> bytes:
        cls = type(self)
        if cls.both is None:
            cls.both = asyncio.Event()
        cls.seen += 1
        if cls.seen == 2:
            cls.both.set()
        await asyncio.wait_for(cls.both.wait(), 10)
        return b"%d %s" % (self.client_address[1], self.tag)


def test_two_clients_awaiting_at_once_each_get_their_own_address() -> None:
    """One handler instance served every datagram and each overwrote its
    client_address: after the await, both answers named the last sender."""
    AwaitingWho.seen, AwaitingWho.both = 0, None
    with serving(AwaitingWho, bind=["udp://127.0.0.1:0"]) as server:
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            for client in clients:
                client.settimeout(10)
                client.bind(("127.0.0.1", 0))
                client.sendto(b"who\n", server.address)
            for client in clients:
                port = client.getsockname()[1]
                assert client.recv(100) == b"%d set up" % port
        finally:
            for client in clients:
                client.close()
