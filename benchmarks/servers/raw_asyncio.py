"""Reference: a hand-written asyncio.Protocol uppercase line server (``--loop uvloop`` too)."""

from __future__ import annotations

import asyncio
from typing import cast

from benchmarks.servers.common import announce, parse_args, run, serve_until_stopped


class UpperProtocol(asyncio.Protocol):
    """Buffer bytes, answer each complete line with its uppercase, in one write per read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        end = buffer.rfind(b"\n") + 1
        if end:
            assert self.transport is not None
            self.transport.write(buffer[:end].upper())
        self.buffer = buffer[end:]


async def serve(host: str, port: int, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpperProtocol, host, port, backlog=backlog)
    announce("tcp", server.sockets[0].getsockname())
    await serve_until_stopped(server)


def main() -> None:
    args = parse_args(__doc__ or "")
    run(lambda: serve(args.host, args.port, args.backlog), args.loop)


if __name__ == "__main__":
    main()
