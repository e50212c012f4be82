"""A connection is accounted closed (its slot, the stats, the access log) only once its
descriptor is closed: a test or an operator that sees the record and counts the
process's descriptors sees it gone."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest

from goodbye_handlers import Line, Stream
from helpers import LOOPS, read_line, serving


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("handler", [Line, Stream], ids=lambda h: h.__name__)
def test_a_connection_is_accounted_closed_once_its_descriptor_is(
    monkeypatch: pytest.MonkeyPatch, loop: str, handler: type
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with serving(handler, loop) as server:
        ledger = server.server.ledger
        accounted = ledger.closed
        fds_then: list[int] = []

        def closed(*args: Any, **kwargs: Any) -> None:
            fds_then.append(open_fds())
            accounted(*args, **kwargs)

        monkeypatch.setattr(ledger, "closed", closed)
        for _ in range(2):  # the first connection may leave the loop something for good
            baseline = server.call(open_fds)  # in the server's thread, no connection open
            fds_then.clear()
            with socket.create_connection(server.address, timeout=10) as sock:
                sock.sendall(b"hi\n")
                assert read_line(sock) == b"HI\n"
            deadline = time.monotonic() + 10
            while not server.call(lambda: bool(fds_then)):
                assert time.monotonic() < deadline, "the connection was never accounted closed"
                time.sleep(0.01)
        assert fds_then == [baseline]
