"""MessageHandler and StreamHandler.read_message over real sockets, for every framing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme

from helpers import closed_by_server, read_line, serving
from sockserve import (
    FixedSize,
    Framing,
    LengthPrefixed,
    LineHandler,
    Lines,
    MessageHandler,
    Netstring,
    StreamHandler,
)
from sockserve.proxy_protocol import encode_v1

FRAMINGS: list[Framing] = [
    Lines(),
    Lines(b"\r\n"),
    Lines(b"\0"),
    LengthPrefixed("!B"),
    LengthPrefixed("!H"),
    LengthPrefixed("!I"),
    LengthPrefixed("!Q"),
    LengthPrefixed("<I"),
    LengthPrefixed(">H", includes_header=True),
    Netstring(),
    FixedSize(5),
]
IDS = [repr(f) for f in FRAMINGS]
PAYLOADS = [b"hello", b"a\tb c", b"12345", b"", b"x" * 5]


def handler_for(chosen: Framing, kind: str) -> type:
    """An upper-casing handler of ``kind`` (sync, async or stream) speaking ``chosen``."""
    if kind == "sync":

        class Sync(MessageHandler):
            framing = chosen

            def handle_message(self, message: bytes) -> bytes:
                return message.upper()

        return Sync
    if kind == "async":

        class Async(MessageHandler):
            framing = chosen

            async def handle_message(self, message: bytes) -> bytes:
                await asyncio.sleep(0)
                return message.upper()

        return Async

    class Stream(StreamHandler):
        framing = chosen

        async def handle(self) -> None:
            while (message := await self.read_message()) is not None:
                self.write_message(message.upper())
                await self.drain()

    return Stream


def payloads_for(framing: Framing) -> list[bytes]:
    if isinstance(framing, FixedSize):
        return [p for p in PAYLOADS if len(p) == framing.max_size]
    return PAYLOADS


def read_message(sock: socket.socket, framing: Framing, buffered: bytearray) -> bytes:
    """The next message the server sent, read with a framer of the same framing."""
    framer = framing.framer()
    framer.feed(bytes(buffered))
    buffered.clear()
    while (message := framer.next_message()) is None:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        framer.feed(chunk)
    buffered += framer.take_buffer()
    return message


KINDS = ["sync", "async", "stream"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("framing", FRAMINGS, ids=IDS)
def test_every_framing_packed_and_split_at_every_byte(
    loop: str, framing: Framing, kind: str
) -> None:
    """Several messages in one write come back in order; a message cut at any byte, its
    first part sent with the message before it (so the server reads it before the rest),
    comes back whole."""
    payloads = payloads_for(framing)
    with serving(handler_for(framing, kind), loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            buffered = bytearray()
            sock.sendall(b"".join(framing.encode(p) for p in payloads))
            assert [read_message(sock, framing, buffered) for _ in payloads] == [
                p.upper() for p in payloads
            ]
            first, wire = framing.encode(payloads[0]), framing.encode(payloads[-1])
            for cut in range(1, len(wire)):
                sock.sendall(first + wire[:cut])
                assert read_message(sock, framing, buffered) == payloads[0].upper()
                sock.sendall(wire[cut:])
                assert read_message(sock, framing, buffered) == payloads[-1].upper()
            assert not buffered


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_one_byte_at_a_time(loop: str, kind: str) -> None:
    framing = LengthPrefixed("!I")
    with serving(handler_for(framing, kind), loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in framing.encode(b"drip"):
                sock.sendall(bytes([byte]))
            assert read_message(sock, framing, bytearray()) == b"DRIP"


@contextlib.contextmanager
def bystander(address: tuple[str, int], framing: Framing) -> Iterator[socket.socket]:
    """A client connected before the trouble, checked to be served after it."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(framing.encode(b"before"))
        assert read_message(sock, framing, bytearray()) == b"BEFORE"
        yield sock
        sock.sendall(framing.encode(b"after"))
        assert read_message(sock, framing, bytearray()) == b"AFTER"


@pytest.mark.parametrize("kind", KINDS)
def test_a_huge_length_header_closes_at_once_with_nothing_buffered(
    loop: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4-byte header announcing 1 GiB: the server closes as soon as it has the header,
    without waiting for (or allocating) the body; other clients carry on."""
    caplog.set_level(logging.INFO, "sockserve")
    framing = LengthPrefixed("!I", max_size=1 << 20)
    with serving(handler_for(framing, kind), loop) as server:
        with bystander(server.address, framing):
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(struct.pack("!I", 1 << 30))
                assert closed_by_server(sock)
    assert "message longer than 1048576 bytes" in caplog.text
    assert server.server.stats.closed_by_reason["message too long"] == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("framing", "wire"),
    [
        (Netstring(), b"5:hello;"),
        (Netstring(), b"x:"),
        (LengthPrefixed("!H", includes_header=True), b"\x00\x01"),
    ],
    ids=["netstring-comma", "netstring-length", "header-shorter-than-itself"],
)
def test_a_malformed_frame_closes_with_a_logged_reason(
    loop: str, kind: str, framing: Framing, wire: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sockserve")
    with serving(handler_for(framing, kind), loop) as server:
        with bystander(server.address, framing):
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(framing.encode(b"ok"))
                assert read_message(sock, framing, bytearray()) == b"OK"
                sock.sendall(wire)
                assert closed_by_server(sock)
    assert "netstring" in caplog.text or "shorter than its header" in caplog.text
    assert server.server.stats.closed_by_reason["malformed message"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_an_over_long_line_of_a_lines_framing(
    loop: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sockserve")
    framing = Lines(b"\r\n", max_size=100)
    with serving(handler_for(framing, kind), loop) as server:
        with bystander(server.address, framing):
            with socket.create_connection(server.address, timeout=5) as sock:
                sock.sendall(b"y" * 101)
                assert closed_by_server(sock)
    assert "line longer than 100 bytes" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_a_message_cut_by_the_end_of_the_stream(
    loop: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sockserve")
    framing = LengthPrefixed("!H")
    with serving(handler_for(framing, kind), loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(framing.encode(b"whole") + b"\x00\x09par")
            sock.shutdown(socket.SHUT_WR)
            assert read_message(sock, framing, bytearray()) == b"WHOLE"
            assert closed_by_server(sock)
    assert "the stream ended inside a message (5 bytes)" in caplog.text


def test_a_lines_framing_answers_an_unterminated_last_line(loop: str) -> None:
    framing = Lines()
    with serving(handler_for(framing, "sync"), loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"one\ntwo")
            sock.shutdown(socket.SHUT_WR)
            assert read_line(sock) == b"ONE\n"
            assert read_line(sock) == b"TWO\n"


@pytest.mark.parametrize("kind", KINDS)
def test_a_dripped_message_is_cut_at_the_message_deadline(
    loop: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``line_timeout`` is the deadline of any framing's message, from its first byte."""
    caplog.set_level(logging.INFO, "sockserve")
    framing = LengthPrefixed("!I")
    settings = {"line_timeout": 0.5, "idle_timeout": 60}
    with serving(handler_for(framing, kind), loop, **settings) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            stop = threading.Event()

            def drip() -> None:
                with contextlib.suppress(OSError):
                    sock.sendall(struct.pack("!I", 1000))
                    while not stop.wait(0.05):
                        sock.sendall(b"x")

            thread = threading.Thread(target=drip)
            started = time.monotonic()
            thread.start()
            try:
                assert closed_by_server(sock)
                waited = time.monotonic() - started
            finally:
                stop.set()
                thread.join(5)
    assert 0.4 <= waited < 4
    assert "message unfinished after" in caplog.text
    assert server.server.stats.closed_by_reason["message timeout"] == 1


class Pusher(MessageHandler):
    """Greets on connect, answers each message, and pushes a message a tick later."""

    framing = LengthPrefixed("!H")

    def setup(self) -> None:
        self.send(b"welcome")

    def handle_message(self, message: bytes) -> None:
        asyncio.get_running_loop().call_soon(self.send, b"pushed " + message)


def test_send_pushes_framed_messages_at_any_time(loop: str) -> None:
    framing = Pusher.framing
    with serving(Pusher, loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            buffered = bytearray()
            assert read_message(sock, framing, buffered) == b"welcome"
            sock.sendall(framing.encode(b"a") + framing.encode(b"b"))
            assert read_message(sock, framing, buffered) == b"pushed a"
            assert read_message(sock, framing, buffered) == b"pushed b"


class SlowFirst(MessageHandler):
    """Async: the first message takes longest; replies must still come in order."""

    framing = Netstring()

    async def handle_message(self, message: bytes) -> bytes:
        await asyncio.sleep(0.2 if message == b"0" else 0)
        return message


def test_async_handlers_are_awaited_in_order(loop: str) -> None:
    framing = SlowFirst.framing
    with serving(SlowFirst, loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"".join(framing.encode(b"%d" % i) for i in range(20)))
            buffered = bytearray()
            assert [read_message(sock, framing, buffered) for _ in range(20)] == [
                b"%d" % i for i in range(20)
            ]


class Mixed(StreamHandler):
    """A text line first (a handshake), then length-prefixed frames, then a raw read."""

    framing = LengthPrefixed("!H")

    async def handle(self) -> None:
        hello = await self.readline()
        self.write(b"hi " + hello)
        while (message := await self.read_message()) != b"raw":
            assert message is not None
            self.write_message(message[::-1])
        self.write(b"rest " + await self.readexactly(3))


def test_stream_handler_mixes_lines_messages_and_raw_reads(loop: str) -> None:
    framing = Mixed.framing
    with serving(Mixed, loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            # All in one write: each read takes over what the one before left.
            sock.sendall(b"me\n" + framing.encode(b"abc") + framing.encode(b"raw") + b"xyz")
            assert read_line(sock) == b"hi me\n"
            buffered = bytearray()
            assert read_message(sock, framing, buffered) == b"cba"
            while len(buffered) < 8:
                buffered += sock.recv(100)
            assert bytes(buffered) == b"rest xyz"


def test_a_class_framing_must_be_a_framing() -> None:
    with pytest.raises(TypeError, match="framing must be a framing"):

        class Bad(MessageHandler):
            framing = b"\n"  # type: ignore[assignment]

    with pytest.raises(TypeError, match="framing must be a framing"):

        class AlsoBad(StreamHandler):
            framing = "u32"  # type: ignore[assignment]


class TooBig(MessageHandler):
    framing = LengthPrefixed("!B")

    def handle_message(self, message: bytes) -> bytes:
        return message * 300  # more than a 1-byte length can announce


def test_a_reply_the_framing_cannot_carry_is_a_handler_error(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(TooBig, loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(TooBig.framing.encode(b"ab"))
            assert closed_by_server(sock)
    assert "over max_size 255" in caplog.text
    assert server.server.stats.closed_by_reason["handler error"] == 1


class Echo(MessageHandler):
    framing = LengthPrefixed("!I")


def test_unix_socket(loop: str, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with serving(Echo, loop, bind=[f"unix:{path}"]):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(Echo.framing.encode(b"over unix"))
            assert read_message(sock, Echo.framing, bytearray()) == b"over unix"


def test_datagrams_are_whole_messages(loop: str) -> None:
    with serving(handler_for(LengthPrefixed(), "sync"), loop, bind=["udp://127.0.0.1:0"]) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"one datagram", server.address)
            assert sock.recv(100) == b"ONE DATAGRAM"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, dict[str, Any]]:
    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    return ca, {"tls_cert": str(directory / "server.pem"), "tls_key": str(directory / "server.key")}


@pytest.mark.parametrize("proxy", [False, True], ids=["tls", "proxy-then-tls"])
@pytest.mark.parametrize("kind", KINDS)
def test_tls_and_proxy(
    loop: str, kind: str, proxy: bool, certs: tuple[trustme.CA, dict[str, Any]]
) -> None:
    ca, settings = certs
    framing = LengthPrefixed("!I")

    class Who(MessageHandler):
        framing = LengthPrefixed("!I")

        def handle_message(self, message: bytes) -> bytes:
            host: str = self.client_address[0]
            return message + b" from " + host.encode()

    handler = Who if kind == "sync" else handler_for(framing, kind)
    if proxy:
        settings = {**settings, "proxy_protocol": "v1"}
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with serving(handler, loop, **settings) as server:
        with socket.create_connection(server.address, timeout=5) as raw:
            if proxy:
                raw.sendall(encode_v1(("203.0.113.7", 4000), ("192.0.2.1", 443)))
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                wire = framing.encode(b"a") + framing.encode(b"b")
                sock.sendall(wire[:3])
                sock.sendall(wire[3:])
                buffered = bytearray()
                got = [read_message(sock, framing, buffered) for _ in range(2)]
    if kind == "sync":
        where = b"203.0.113.7" if proxy else b"127.0.0.1"
        assert got == [b"a from " + where, b"b from " + where]
    else:
        assert got == [b"A", b"B"]


class Counting(LineHandler):
    """The line handler is a message handler: the line keeps its newline, replies go as is."""

    def handle_line(self, line: bytes) -> bytes:
        self.send(b"> ")
        return line


def test_line_handler_is_a_message_handler(loop: str) -> None:
    assert issubclass(LineHandler, MessageHandler)
    with serving(Counting, loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"a\nb")
            assert read_line(sock) == b"> a\n"
            sock.sendall(b"\n")
            assert read_line(sock) == b"> b\n"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_whole_message_over_the_limit_in_one_chunk_is_refused(
    loop: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The one-message fast path checks the limit too."""
    framing = LengthPrefixed("!H", max_size=10)
    with serving(handler_for(framing, kind), loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(struct.pack("!H", 11) + b"x" * 11)
            assert closed_by_server(sock)
    assert "message longer than 10 bytes" in caplog.text


class Base(MessageHandler):
    framing: ClassVar[Framing] = LengthPrefixed("!H")

    def handle_message(self, message: bytes) -> bytes:
        return message[::-1]


class Derived(Base):
    framing = Netstring()


class Lower(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.lower()


@pytest.mark.parametrize("handler", [Base, Derived, Lower], ids=lambda h: h.__name__)
def test_each_class_reads_its_own_framing(loop: str, handler: type[MessageHandler]) -> None:
    """A subclass that changes the framing gets the receive path of its own framing."""
    framing = handler.framing
    with serving(handler, loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(framing.encode(b"AbC\n" if handler is Lower else b"abc"))
            expected = b"abc\n" if handler is Lower else b"cba"
            assert read_message(sock, framing, bytearray()) == expected


class Busy(MessageHandler):
    """Async, and stuck on its first message until the test lets it go."""

    framing = LengthPrefixed("!I", max_size=1000)
    release: ClassVar[asyncio.Event | None] = None

    async def handle_message(self, message: bytes) -> bytes:
        release = type(self).release
        if release is None:
            release = type(self).release = asyncio.Event()
        await release.wait()
        return message


def test_a_busy_async_handler_still_refuses_an_over_long_header_at_once(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The header is checked when it arrives, not when the handler gets to it."""
    Busy.release = None
    with serving(Busy, loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(Busy.framing.encode(b"first"))
            sock.sendall(struct.pack("!I", 1 << 30))
            assert closed_by_server(sock)  # the handler is still waiting on "first"
    assert "message longer than 1000 bytes" in caplog.text


class BigReplies(MessageHandler):
    """Each message answered with 16 MiB: a reply, not a push, so never a slow consumer."""

    framing = LengthPrefixed("!I", max_size=32 << 20)

    def handle_message(self, message: bytes) -> bytes:
        return message * (16 << 20)


@pytest.mark.parametrize("split", [False, True], ids=["fast-path", "framer"])
def test_replies_over_the_write_buffer_bound_are_backpressure(loop: str, split: bool) -> None:
    """A reply larger than max_write_buffer is written and waited on, on the fast path and
    through the framer alike; only send() and broadcast cut slow consumers."""
    framing = BigReplies.framing
    with serving(BigReplies, loop, max_write_buffer=1 << 20) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            buffered = bytearray()
            for _ in range(2):
                wire = framing.encode(b"z")
                if split:  # the reply to the first part: none; the message completes later
                    sock.sendall(wire[:2])
                    sock.sendall(wire[2:])
                else:
                    sock.sendall(wire)
                assert read_message(sock, framing, buffered) == b"z" * (16 << 20)


@pytest.mark.parametrize("size", [1023, 1024, 1025, 5000, 70000])
def test_messages_around_the_small_header_table(loop: str, size: int) -> None:
    """Messages up to 1 KiB take their header from a table, larger ones from struct."""
    framing = LengthPrefixed("!I")
    with serving(handler_for(framing, "sync"), loop) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            payload = bytes(range(97, 123)) * (size // 26) + b"q" * (size % 26)
            sock.sendall(framing.encode(payload))
            assert read_message(sock, framing, bytearray()) == payload.upper()
