"""Idle and line timeouts: the connection's own check with an injected clock, and the
line timeout over a real socket with the idle timeout off."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from helpers import ServerProcess, address_of
from sockserve.handlers import LineHandler
from sockserve.lifecycle import ConnectionLedger
from sockserve.settings import Settings

StartServer = Callable[..., ServerProcess]


def attached(**settings: object) -> LineHandler:
    """A line handler set up as the server sets it up, with no transport (none is used)."""
    conn = LineHandler()
    ledger = ConnectionLedger(Settings(**settings), lambda: None)  # type: ignore[arg-type]
    conn._attach(ledger, ("127.0.0.1", 4000), "tcp://127.0.0.1:1")
    return conn


def test_idle_after_the_timeout_with_no_byte_moving() -> None:
    conn = attached()
    assert conn._check_timeouts(100.0, 10.0, 0.0) is None  # first sight: the clock starts
    assert conn._check_timeouts(109.9, 10.0, 0.0) is None
    assert conn._check_timeouts(110.0, 10.0, 0.0) == "idle timeout"


def test_bytes_either_way_restart_the_idle_clock() -> None:
    conn = attached()
    assert conn._check_timeouts(100.0, 10.0, 0.0) is None
    conn.bytes_out += 5
    assert conn._check_timeouts(109.0, 10.0, 0.0) is None
    conn.bytes_in += 5
    assert conn._check_timeouts(118.0, 10.0, 0.0) is None
    assert conn._check_timeouts(127.9, 10.0, 0.0) is None
    assert conn._check_timeouts(128.0, 10.0, 0.0) == "idle timeout"


def test_a_line_unfinished_for_the_line_timeout_with_idle_off() -> None:
    conn = attached()
    conn.data_received(b"abc")
    assert conn._check_timeouts(100.0, 0.0, 5.0) is None
    conn.data_received(b"def")  # dripping: bytes move, the same line goes on
    assert conn._check_timeouts(104.9, 0.0, 5.0) is None
    assert conn._check_timeouts(105.0, 0.0, 5.0) == "line timeout"


def test_each_new_line_gets_its_own_time() -> None:
    conn = attached()
    conn.data_received(b"abc")
    assert conn._check_timeouts(100.0, 0.0, 5.0) is None
    conn._framer = None  # the line was answered and a new one begun
    conn._fast = True
    conn.data_received(b"next")
    assert conn._check_timeouts(104.0, 0.0, 5.0) is None  # a new start: the clock restarts
    assert conn._check_timeouts(108.9, 0.0, 5.0) is None
    assert conn._check_timeouts(109.0, 0.0, 5.0) == "line timeout"


def test_no_unfinished_line_no_line_timeout() -> None:
    conn = attached()
    assert conn._check_timeouts(100.0, 0.0, 5.0) is None
    assert conn._check_timeouts(1000.0, 0.0, 5.0) is None


def test_both_off_never_times_out() -> None:
    conn = attached()
    conn.data_received(b"abc")
    for now in (0.0, 1e6, 1e9):
        assert conn._check_timeouts(now, 0.0, 0.0) is None


def test_a_closed_connection_is_not_timed_out_again() -> None:
    conn = attached()
    assert conn._check_timeouts(100.0, 10.0, 0.0) is None
    conn._closed = True
    assert conn._check_timeouts(200.0, 10.0, 0.0) is None


def test_line_timeout_without_idle_timeout_cuts_a_dripping_line(
    start_server: StartServer,
) -> None:
    """``--idle-timeout 0`` must leave ``--line-timeout`` on: a peer dripping one byte at
    a time is never idle, and only the line timeout frees its slot."""
    server = start_server(
        ["demo", "--bind", "127.0.0.1:0", "--idle-timeout", "0", "--line-timeout", "1"]
    )
    with socket.create_connection(address_of(server.urls[0]), timeout=10) as sock:
        sock.sendall(b"hi\n")
        assert sock.recv(10) == b"HI\n"
        sock.settimeout(0.1)
        deadline = time.monotonic() + 20
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"x")
                closed = sock.recv(10) == b""
            except TimeoutError:
                continue
            except OSError:  # reset: the server aborted the connection
                closed = True
        assert closed, "the dripped line was never cut"
    server.read_until(r"closing .*: line unfinished after", timeout=10)


@pytest.mark.parametrize("idle", ["0", "30"])
def test_sweep_runs_when_either_timeout_is_on(start_server: StartServer, idle: str) -> None:
    """The line timeout cuts at about its own time, whatever the idle timeout."""
    server = start_server(
        ["demo", "--bind", "127.0.0.1:0", "--idle-timeout", idle, "--line-timeout", "0.5"]
    )
    with socket.create_connection(address_of(server.urls[0]), timeout=10) as sock:
        sock.sendall(b"unfinished")
        assert sock.recv(10) == b""  # blocks until the server closes it (bounded by 10 s)
