"""With --workers, per-client limits hold for the whole server: the supervisor keeps the
table and every worker asks it."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ServerProcess, address_of, closed_by_server, read_line

TESTS = str(Path(__file__).parent)


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def pid_serving(address: tuple[str, int], source: str, into: list[socket.socket]) -> int | None:
    """Connect from ``source``: the serving worker's pid, or None if refused."""
    sock = socket.socket()
    into.append(sock)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(address)
    try:
        sock.sendall(b"hi\n")
        reply = read_line(sock)
    except ConnectionResetError:  # refused: closed before reading what we sent
        return None
    return int(reply.split()[0]) if reply else None


def start_workers(start_server: object, limit: int) -> tuple[ServerProcess, tuple[str, int]]:
    server: ServerProcess = start_server(  # type: ignore[operator]
        [
            "run",
            "goodbye_handlers:Instance",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--reuse-port",  # the kernel spreads connections over both workers
            "--max-connections-per-ip",
            str(limit),
        ],
        cwd=TESTS,
    )
    for _ in range(2):
        server.read_until("listening on")  # each worker's own socket
    return server, address_of(server.urls[0])


def spread_client(
    address: tuple[str, int], count: int, opened: list[socket.socket]
) -> tuple[str, list[int]]:
    """A client address whose ``count`` connections landed on both workers."""
    for last in range(2, 60):
        source = f"127.0.0.{last}"
        pids = [pid_serving(address, source, opened) for _ in range(count)]
        assert None not in pids
        if len(set(pids)) == 2:
            return source, pids  # type: ignore[return-value]
    pytest.fail("connections never spread over both workers")


def test_the_limit_per_client_is_shared_by_the_workers(
    start_server: object, opened: list[socket.socket]
) -> None:
    server, address = start_workers(start_server, 3)
    # Three connections on both workers: a limit kept per worker would let more in
    # through either of them.
    source, _ = spread_client(address, 3, opened)
    assert [pid_serving(address, source, opened) for _ in range(6)] == [None] * 6
    assert pid_serving(address, "127.0.0.250", opened) is not None
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_a_killed_workers_connections_free_their_clients_slots(
    start_server: object, opened: list[socket.socket]
) -> None:
    server, address = start_workers(start_server, 2)
    source, pids = spread_client(address, 2, opened)
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    server.read_until(rf"worker {victim} died")
    assert closed_by_server(opened[-2])
    # The dead worker's connection no longer counts: one more fits, then no more.
    assert pid_serving(address, source, opened) not in (None, victim)
    assert pid_serving(address, source, opened) is None
