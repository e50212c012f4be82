"""FaultProxy.connect() returns a connected client even when the server side fails at once."""

from __future__ import annotations

import select
import socket
from typing import Any

import pytest

from sockserve.testing import FaultProxy

HOLD = 0.5  # how long the client stays off the CPU right after its handshake


def test_a_reset_at_once_reaches_the_client_after_connect_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loaded machine can take the client's thread off the CPU between the handshake
    and connect() returning; a proxy that resets the client then (here: the server
    refuses the proxy) made connect() itself raise ConnectionResetError."""
    real_connect = socket.socket.connect
    reset_early: list[bool] = []

    def descheduled(sock: socket.socket, address: Any) -> None:
        real_connect(sock, address)
        if address == proxy.address:
            reset_early.append(bool(select.select([sock], [], [], HOLD)[0]))

    with socket.socket() as refusing:  # bound, not listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        with FaultProxy(refusing.getsockname()) as proxy:
            monkeypatch.setattr(socket.socket, "connect", descheduled)
            with proxy.connect() as client:
                monkeypatch.undo()
                assert reset_early == [False]
                with pytest.raises(ConnectionResetError):
                    client.read(1)
