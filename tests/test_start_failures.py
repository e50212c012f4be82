"""A server whose start fails part way closes what it opened."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from helpers import Upper
from sockserve import Server
from sockserve.settings import Settings


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_metrics_address_in_use_fails_start_and_closes_the_listeners(tmp_path: Path) -> None:
    """The listeners were left open and accepting when the metrics port (bound after
    them) was taken: a half-started server that answered nobody."""
    path = tmp_path / "server.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"

        async def main() -> Server:
            settings = Settings(bind=(f"unix:{path}", "udp://127.0.0.1:0"), metrics=metrics)
            server = Server(Upper, settings)
            with pytest.raises(OSError):
                await server.start()
            with socket.socket(socket.AF_UNIX) as client:
                with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
                    client.connect(str(path))
            await asyncio.wait_for(server.wait_closed(), 10)
            return server

        before = open_descriptors()
        server = asyncio.run(main())
        assert all(listener.sock.fileno() == -1 for listener in server.listeners)
        assert open_descriptors() <= before
