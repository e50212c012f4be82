"""A stream handler still running when the server finishes is cancelled and finished."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

import sockserve
from helpers import read_line, serving

finished: list[str] = []


class Stuck(sockserve.StreamHandler):
    """Never returns from handle() on its own, whatever its client does."""

    async def handle(self) -> None:
        self.write(b"ready\n")
        await asyncio.Event().wait()

    def finish(self) -> None:
        finished.append("finish")


class AsyncStuck(Stuck):
    async def finish(self) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        finished.append("async finish")


@pytest.mark.parametrize("handler", [Stuck, AsyncStuck])
def test_shutdown_cancels_a_handler_that_outlives_its_connection(handler: type) -> None:
    """handle() ran in a task of its own that the server never cancelled: it outlived
    its connection and the server, and finish() never ran."""
    finished.clear()
    with serving(handler) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            assert read_line(sock) == b"ready\n"
        server.stop(0.5)
        expected = "finish" if handler is Stuck else "async finish"
        assert finished == [expected]
