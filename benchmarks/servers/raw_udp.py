"""Reference: a hand-written asyncio.DatagramProtocol uppercase server (``--loop``)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from benchmarks.servers.common import announce, parse_args, run


class UpperDatagram(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's are not subclasses

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data.upper(), addr)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(UpperDatagram, local_addr=(host, port))
    announce("udp", transport.get_extra_info("sockname"))
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


def main() -> None:
    args = parse_args(__doc__ or "", loop="uvloop")
    run(lambda: serve(args.host, args.port), args.loop)


if __name__ == "__main__":
    main()
