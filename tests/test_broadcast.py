"""server.connections, server.broadcast and handler.send: the view, exclusion, slow consumers."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sockserve import LengthPrefixed, LineHandler, MessageHandler, StreamHandler
from sockserve.testing import Client, RunningServer, serve


class Room(LineHandler):
    """Commands: ``count``, ``here`` (on this listener), ``all TEXT``, ``others TEXT``,
    ``local TEXT`` (others on this listener), ``me TEXT`` (send to self), ``flood N``
    (N KiB to everyone else)."""

    def handle_line(self, line: bytes) -> bytes | None:
        command, _, rest = line.partition(b" ")
        connections = self.server.connections
        if command == b"count\n":
            return b"%d\n" % len(connections)
        if command == b"here\n":
            here = connections.on(self.listener)
            assert all(conn.listener == self.listener for conn in here)
            assert self in here and self in connections
            return b"%d\n" % len(here)
        if command == b"all":
            return b"sent to %d\n" % self.server.broadcast(rest)
        if command == b"others":
            return b"sent to %d\n" % self.server.broadcast(rest, exclude=self)
        if command == b"local":
            here = connections.on(self.listener)
            return b"sent to %d\n" % here.broadcast(rest, exclude=self)
        if command == b"me":
            assert self.send(rest)
            return None
        if command == b"flood":
            chunk = b"f" * 1023 + b"\n"
            reached = [self.server.broadcast(chunk, exclude=[self]) for _ in range(int(rest))]
            return b"sent to %d\n" % min(reached)
        return b"?\n"


@contextlib.contextmanager
def room(**settings: Any) -> Iterator[tuple[RunningServer, Callable[[int], None]]]:
    """A Room server, and ``joined(n)``: wait until ``n`` more clients are in the room."""
    arrivals: queue.Queue[None] = queue.Queue()

    class Joining(Room):
        def setup(self) -> None:
            arrivals.put(None)

    def joined(n: int) -> None:
        for _ in range(n):
            arrivals.get(timeout=10)

    with serve(Joining, **settings) as server:
        yield server, joined


def closed_reasons(server: RunningServer) -> dict[str, int]:
    return server.call(lambda: dict(server.server.stats.closed_by_reason))  # type: ignore[no-any-return]


def test_connections_is_a_live_view_filtered_by_listener(tmp_path: Any) -> None:
    finished: queue.Queue[str] = queue.Queue()

    class Tracked(Room):
        def finish(self) -> None:
            finished.put(self.listener)

    bind = ["127.0.0.1:0", f"unix:{tmp_path}/room.sock"]
    with serve(Tracked, bind=bind) as server:
        tcp = [server.connect() for _ in range(3)]
        for client in tcp:  # a reply means the server has it
            assert client.request(b"?") == b"?\n"
        assert tcp[0].request(b"count") == b"3\n"
        unix = socket.socket(socket.AF_UNIX)
        unix.connect(f"{tmp_path}/room.sock")
        with Client(unix) as other:
            assert other.request(b"count") == b"4\n"
            assert other.request(b"here") == b"1\n"
            assert tcp[1].request(b"here") == b"3\n"
            assert repr(server.call(lambda: server.server.connections)) == "<4 connection(s)>"
        tcp[2].close()
        tcp[1].close()
        for _ in range(3):
            finished.get(timeout=5)
        # finish() runs once the connection is out of the view.
        assert tcp[0].request(b"count") == b"1\n"
        assert tcp[0].request(b"here") == b"1\n"


def test_broadcast_reaches_everyone_but_the_excluded() -> None:
    with room() as (server, joined):
        a, b, c = (server.connect() for _ in range(3))
        joined(3)
        assert a.request(b"others hello\n") == b"sent to 2\n"
        assert b.readline() == c.readline() == b"hello\n"
        assert a.request(b"all everyone\n") == b"everyone\n"
        assert a.readline() == b"sent to 3\n"
        assert b.readline() == c.readline() == b"everyone\n"
        a.send(b"me just me\n")
        assert a.readline() == b"just me\n"


def flood_until_cut(talker: Client, readers: list[Client], others: int) -> None:
    """32 KiB at a time to everyone else, read by ``readers`` each time, until the
    others that do not read were cut (bounded: 16 MiB)."""
    for _ in range(512):
        reply = talker.request(b"flood 32")
        for reader in readers:
            assert reader.read(32 * 1024) == (b"f" * 1023 + b"\n") * 32
        if reply == b"sent to %d\n" % len(readers):
            break
        assert reply == b"sent to %d\n" % (len(readers) + others)
    else:
        pytest.fail("16 MiB queued and no slow consumer cut")


def stalled_client(server: RunningServer) -> socket.socket:
    """A peer that never reads, with kernel buffers kept small."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(server.address)
    return sock


def test_a_peer_that_does_not_read_is_cut_as_a_slow_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with room(max_write_buffer="64k") as (server, joined):
        talker, reader = server.connect(), server.connect()
        with stalled_client(server):
            joined(3)
            flood_until_cut(talker, [reader], 1)
            assert closed_reasons(server) == {"slow consumer": 1}
        assert talker.request(b"count") == b"2\n"
    assert "slow consumer" in caplog.text and "max_write_buffer 65536" in caplog.text


def test_send_from_a_stream_handler_is_bounded_too() -> None:
    refused: queue.Queue[int] = queue.Queue()

    class Writer(StreamHandler):
        """Sends the number of 64 KiB blocks asked for, never waiting."""

        async def handle(self) -> None:
            while line := await self.readline():
                for block in range(int(line)):
                    if not self.send(b"s" * 65536):
                        refused.put(block)
                        return

    with serve(Writer, max_write_buffer="1M") as server:
        with server.connect() as client:
            client.send(b"4\n")  # 256 KiB, read: within the bound
            assert client.read(4 * 65536) == b"s" * 4 * 65536
            client.send(b"1024\n")  # 64 MiB not read: cut
            assert refused.get(timeout=10) < 1024
            assert closed_reasons(server) == {"slow consumer": 1}


def test_bad_max_write_buffer_fails_naming_the_setting() -> None:
    from sockserve import SettingsError

    with pytest.raises(SettingsError, match=r"max_write_buffer \(--max-write-buffer"):
        with serve(Room, max_write_buffer="lots"):
            pass


def test_slow_consumer_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "sockserve.server")
    with room(max_write_buffer="16k") as (server, joined), contextlib.ExitStack() as stack:
        talker, reader = server.connect(), server.connect()
        for _ in range(5):
            stack.enter_context(stalled_client(server))
        joined(7)
        flood_until_cut(talker, [reader], 5)
        assert closed_reasons(server) == {"slow consumer": 5}
    lines = [r for r in caplog.records if "slow consumer" in r.getMessage()]
    assert len(lines) == 1


def test_message_handlers_frame_what_is_broadcast() -> None:
    arrivals: queue.Queue[None] = queue.Queue()

    class Relay(MessageHandler):
        """Each message goes to every other client, framed by the framing below."""

        framing = LengthPrefixed("!H")

        def setup(self) -> None:
            arrivals.put(None)

        def handle_message(self, message: bytes) -> bytes:
            return b"%d" % self.server.broadcast(message, exclude=self)

    with serve(Relay) as server:
        a, b, c = (server.connect() for _ in range(3))
        for _ in range(3):
            arrivals.get(timeout=10)
        assert a.request(b"hello\nworld") == b"2"
        assert b.read_message() == c.read_message() == b"hello\nworld"


def test_broadcast_to_one_listener() -> None:
    with room(bind=["127.0.0.1:0", "127.0.0.1:0"]) as (server, joined):
        second_url = server.urls[1]
        a, b = server.connect(), server.connect()
        other = Client(socket.create_connection(address_of(second_url), timeout=5))
        with other:
            joined(3)
            assert a.request(b"local on the first listener\n") == b"sent to 1\n"
            assert b.readline() == b"on the first listener\n"
            assert other.request(b"local alone here\n") == b"sent to 0\n"
            assert a.request(b"others everyone\n") == b"sent to 2\n"
            assert b.readline() == other.readline() == b"everyone\n"
        assert server.call(lambda: len(server.server.connections.on("tcp://nowhere:1"))) == 0


def address_of(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    return host, int(port)
