"""A handler whose constructor raises costs its connection, never a connection slot."""

from __future__ import annotations

import socket

import sockserve
from helpers import closed_by_server, serving


class BrokenInit(sockserve.LineHandler):
    def __init__(self) -> None:
        raise RuntimeError("cannot make a handler")


def test_a_handler_that_cannot_be_made_releases_its_slot() -> None:
    """The slot ``accepted`` counted was never given back (nor the socket closed): after
    --max-connections such connections the server accepted no more."""
    with serving(BrokenInit, max_connections=2) as server:
        for _ in range(5):
            with socket.create_connection(server.address, timeout=10) as sock:
                assert closed_by_server(sock)
        server.wait_until(lambda: server.server.ledger.open == 0, timeout=10)
        assert len(server.errors) == 5
        assert all(isinstance(error, RuntimeError) for error in server.errors)
