"""The Python API: Server.serve_forever, and leaving ``async with Server`` promptly."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from sockserve import LineHandler, Server, StreamHandler


class Echo(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line


class Stuck(StreamHandler):
    """Busy for ever once it has answered a line: only a timeout ends it."""

    async def handle(self) -> None:
        self.write(await self.readline())
        await asyncio.sleep(3600)


async def round_trip(url: str) -> asyncio.StreamWriter:
    """A client that sent a line and got it back (so its connection is being served)."""
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"hi\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"hi\n"
    return writer


async def closed_by_server(writer: asyncio.StreamWriter) -> None:
    """Wait (bounded) until the server has closed the client's connection, then close it,
    as a well-behaved client does (the server lingers until then, at most 5 s)."""
    reader = writer._protocol._stream_reader  # type: ignore[attr-defined]
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def client_closing(writer: asyncio.StreamWriter) -> asyncio.Task[None]:
    """The client, reading until the server closes and then closing, in its own task."""
    return asyncio.create_task(closed_by_server(writer))


def test_serve_forever_until_shutdown_or_cancelled() -> None:
    async def main() -> None:
        server = Server(Echo, bind=["127.0.0.1:0"])
        await server.start()
        task = asyncio.create_task(server.serve_forever())
        closing = client_closing(await round_trip(server.urls[0]))
        await server.shutdown()
        await asyncio.wait_for(task, 5)  # returned: the server stopped
        await closing

        server = Server(Echo, bind=["127.0.0.1:0"])
        await server.start()
        url = server.urls[0]
        task = asyncio.create_task(server.serve_forever())
        closing = client_closing(await round_trip(url))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        await closing
        with pytest.raises(OSError):  # shut down: nothing listens any more
            await round_trip(url)

    asyncio.run(main())


def test_leaving_async_with_closes_idle_clients_at_once() -> None:
    async def main() -> float:
        async with Server(Echo, bind=["127.0.0.1:0"]) as server:  # graceful timeout 30 s
            closing = client_closing(await round_trip(server.urls[0]))
            started = time.monotonic()
        elapsed = time.monotonic() - started
        await closing
        return elapsed

    assert asyncio.run(main()) < 5


def test_graceful_timeout_keyword_bounds_leaving_async_with() -> None:
    async def main() -> float:
        async with Server(Stuck, bind=["127.0.0.1:0"], graceful_timeout=0.5) as server:
            closing = client_closing(await round_trip(server.urls[0]))  # busy for an hour
            started = time.monotonic()
        elapsed = time.monotonic() - started
        await closing
        return elapsed

    assert asyncio.run(main()) < 5


def test_shutdown_timeout_chooses_another_bound() -> None:
    async def main() -> float:
        async with Server(Stuck, bind=["127.0.0.1:0"]) as server:  # graceful timeout 30 s
            closing = client_closing(await round_trip(server.urls[0]))
            started = time.monotonic()
            await server.shutdown(timeout=0.2)
        elapsed = time.monotonic() - started  # leaving after shutdown waits for nothing
        await closing
        return elapsed

    assert asyncio.run(main()) < 5
