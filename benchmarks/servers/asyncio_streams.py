"""Reference: asyncio.start_server streams (readline/write/drain), on uvloop by default."""

from __future__ import annotations

import asyncio

from benchmarks.servers.common import announce, parse_args, run, serve_until_stopped


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, backlog: int) -> None:
    server = await asyncio.start_server(handle, host, port, backlog=backlog)
    announce("tcp", server.sockets[0].getsockname())
    await serve_until_stopped(server)


def main() -> None:
    args = parse_args(__doc__ or "", loop="uvloop")
    run(lambda: serve(args.host, args.port, args.backlog), args.loop)


if __name__ == "__main__":
    main()
