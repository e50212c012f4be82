"""Log lines people and parsers read: peers as HOST:PORT, peer text escaped, handler
errors rate-limited, limits and typos announced. Real processes, real sockets."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import LISTENING, ServerProcess, address_of, read_line

Start = Callable[..., ServerProcess]

APP = textwrap.dedent(
    """
    import sockserve

    class Boom(sockserve.LineHandler):
        def handle_line(self, line):
            if line.strip() == b"ping":
                return b"pong\\n"
            raise ValueError("peer said " + line.decode("latin-1"))

    class DatagramBoom(sockserve.DatagramHandler):
        def handle_datagram(self, data, address):
            if data == b"ping":
                return b"pong"
            raise ValueError("bad datagram " + data.decode("latin-1"))

    class Echo(sockserve.LineHandler):
        def handle_line(self, line):
            return line
    """
)


@pytest.fixture
def app_dir() -> Iterator[Path]:
    """The handlers, in a short directory (Unix socket paths must fit in 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    (directory / "app.py").write_text(APP)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_peers_are_host_port_in_server_and_access_logs(app_dir: Path, start_server: Start) -> None:
    server = start_server(
        ["run", "app:Boom", "-b", ":0", "-b", "[::1]:0", "--access-log"],
        cwd=str(app_dir),
        listeners=2,
    )
    dual = next(u for u in server.urls if "[::]" in u)
    v6 = next(u for u in server.urls if "[::1]" in u)
    with socket.create_connection(("127.0.0.1", address_of(dual)[1]), timeout=5) as a:
        a.sendall(b"hello\n")
        assert read_line(a) == b""  # the handler failed: closed
        port_a = a.getsockname()[1]
    with socket.create_connection(address_of(v6), timeout=5) as b:
        b.sendall(b"ping\n")
        assert read_line(b) == b"pong\n"
        port_b = b.getsockname()[1]
    server.read_until(rf"sockserve.access: \[::1\]:{port_b} ")
    text = server.text
    assert f"handler error for 127.0.0.1:{port_a}: peer said hello" in text
    assert re.search(rf"sockserve.access: 127\.0\.0\.1:{port_a} tcp://\[::\]:\d+ ", text)
    assert "('" not in text and "::ffff:" not in text


def test_peer_text_is_escaped_in_text_logs(app_dir: Path, start_server: Start) -> None:
    sock_path = app_dir / "s.sock"
    server = start_server(
        ["run", "app:Boom", "-b", f"unix:{sock_path}", "--access-log"], cwd=str(app_dir)
    )
    forged = "2026-01-01 00:00:00,000 [1] ERROR sockserve.server: forged"
    client_path = str(app_dir / f"c\n{forged}\x1b[2J")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.bind(client_path)
        client.settimeout(5)
        client.connect(str(sock_path))
        client.sendall(b"bell\x07 and \x1b]0;title\x07 then\n")
        assert read_line(client) == b""
    os.unlink(client_path)
    server.read_until("sockserve.access: ")
    text = server.text
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("2026-01-01") for line in text.splitlines()), text
    assert f"c\\n{forged}\\x1b[2J" in text  # the path, escaped, in the error and access lines
    assert "peer said bell\\x07 and \\x1b]0;title\\x07 then" in text


def test_handler_errors_are_rate_limited_per_kind(app_dir: Path, start_server: Start) -> None:
    server = start_server(["run", "app:DatagramBoom", "-b", "udp://127.0.0.1:0"], cwd=str(app_dir))
    address = address_of(server.urls[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)

        def flood(count: int) -> None:
            """Bad datagrams in batches the socket buffer holds, each batch handled."""
            for start in range(0, count, 50):
                for i in range(start, min(count, start + 50)):
                    client.sendto(b"x%d" % i, address)
                client.sendto(b"ping", address)
                assert client.recvfrom(64)[0] == b"pong"  # the batch before it was handled

        flood(300)
        deadline = time.monotonic() + 15
        while True:  # a second later the next error reports the count
            assert time.monotonic() < deadline, server.text
            flood(5)
            try:
                server.read_until("more of this kind", timeout=0.3)
                break
            except AssertionError:
                continue
    text = server.text
    assert text.count("Traceback (most recent call last)") == 1, text
    assert re.search(
        r"handler error for 127\.0\.0\.1:\d+: bad datagram x\d+ \(\d+ more of this kind since"
        r" the last report\); traceback logged earlier",
        text,
    )
    assert text.count("handler error for") < 20


def test_max_connections_reached_and_resumed_are_logged(app_dir: Path, start_server: Start) -> None:
    server = start_server(
        ["run", "app:Echo", "-b", "127.0.0.1:0", "--max-connections", "2"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    first = socket.create_connection(address, timeout=5)
    second = socket.create_connection(address, timeout=5)
    try:
        for sock in (first, second):
            sock.sendall(b"a\n")
            assert read_line(sock) == b"a\n"
        server.read_until(r"max_connections \(2\) reached: accepting paused")
        with socket.create_connection(address, timeout=5) as third:  # waits in the backlog
            third.sendall(b"c\n")
            first.close()
            server.read_until(r"below max_connections again after [\d.]+ s: accepting resumed")
            assert read_line(third) == b"c\n"
    finally:
        first.close()
        second.close()


def test_unknown_sockserve_variable_is_named(start_server: Start) -> None:
    server = start_server(
        ["demo", "-b", "127.0.0.1:0"],
        env={"SOCKSERVE_BINDD": "127.0.0.1:1", "SOCKSERVE_IDLE_TIMOUT": "3"},
    )
    text = server.text
    assert "ignoring SOCKSERVE_BINDD: no such setting (did you mean SOCKSERVE_BIND?)" in text
    assert "ignoring SOCKSERVE_IDLE_TIMOUT: no such setting (did you mean" in text


SERVE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import sockserve
from app import Echo
sockserve.serve(Echo, bind=["127.0.0.1:0"])
"""


def test_serve_logs_like_the_cli_unless_logging_is_configured(app_dir: Path) -> None:
    for configured in (False, True):
        script = SERVE_SCRIPT
        if configured:  # the application's own logging: left alone
            script = (
                "import logging\nlogging.basicConfig(level='INFO', format='APP %(message)s')\n"
                + script
            )
        server = ServerProcess([sys.executable, "-c", script, str(app_dir)])
        try:
            if configured:
                server.read_until("^APP listening on tcp://127.0.0.1:")
                assert "INFO sockserve" not in server.text
            else:
                url = server.read_until(LISTENING.pattern).group(1)
                assert "INFO sockserve.server: listening on tcp://127.0.0.1:" in server.text
                assert url.startswith("tcp://127.0.0.1:")
        finally:
            server.stop()


def test_proxy_from_with_a_unix_listener_is_explained(app_dir: Path, start_server: Start) -> None:
    sock_path = app_dir / "p.sock"
    proxy = ["--proxy-protocol", "v1", "--proxy-from", "10.0.0.0/8"]
    server = start_server(["run", "app:Echo", "-b", f"unix:{sock_path}", *proxy], cwd=str(app_dir))
    server.read_until(
        rf"PROXY headers on unix:{re.escape(str(sock_path))} are refused from every peer:"
        r" --proxy-from lists IP networks and a Unix socket peer has none"
    )


def test_text_formatter_escapes_every_argument_style() -> None:
    from sockserve.observability import TEXT_FORMAT, TextFormatter

    formatter = TextFormatter(TEXT_FORMAT)

    def shown(msg: str, *args: object) -> str:
        record = logging.makeLogRecord({"msg": msg, "args": args, "levelname": "INFO"})
        if len(args) == 1 and isinstance(args[0], dict):
            record.args = args[0]
        return formatter.format(record).split(": ", 1)[1]

    assert shown("peer %s", "a\nb\x1b") == "peer a\\nb\\x1b"
    assert shown("%(peer)s said %(n)d", {"peer": "x\ry", "n": 3}) == "x\\ry said 3"
    assert shown("%d bytes in %.1f s", 10, 2.5) == "10 bytes in 2.5 s"
    try:
        raise ValueError("forged\n2026-01-01 line")
    except ValueError as exc:
        text = formatter.formatException((type(exc), exc, exc.__traceback__))
    assert text.endswith("ValueError: forged\\n2026-01-01 line")
