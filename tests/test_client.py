"""``python -m sockserve.client`` against real in-test servers, over pipes and a terminal."""

from __future__ import annotations

import os
import pty
import re
import selectors
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import (
    BlockingUpper,
    OneReplyThenClose,
    Silent,
    ThreadingUnixServer,
    serve_forever,
    tcp_server,
)

TIMEOUT = 20.0


class TutorialUpper(socketserver.BaseRequestHandler):
    """The tutorial's server: ``recv(1024).strip()`` back uppercased, with no newline."""

    def handle(self) -> None:
        while data := self.request.recv(1024).strip():
            self.request.sendall(data.upper())


class CloseWithoutReply(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()


class SlowTwoParts(socketserver.StreamRequestHandler):
    """A reply in two pieces 50 ms apart, the newline only in the second."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(b"PART-")
            self.wfile.flush()
            time.sleep(0.05)
            self.wfile.write(line.upper())


class UpperDatagrams(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def client(address: str, stdin: bytes, *options: str, timeout: float = TIMEOUT) -> Result:
    """Run the client with piped stdin; its output decoded as UTF-8."""
    done = subprocess.run(
        [sys.executable, "-m", "sockserve.client", address, *options],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def closed_port() -> int:
    """A port nothing listens on: bound, read, closed (nothing else in the test binds)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_lines_with_newlines() -> None:
    with tcp_server(BlockingUpper) as address:
        result = client(address, b"hello\nworld\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HELLO\nWORLD\n"
    assert result.stderr == ""


def test_tutorial_server_replies_without_newline() -> None:
    with tcp_server(TutorialUpper) as address:
        started = time.monotonic()
        result = client(address, b"dfasfdasd\n1\ndas\n")
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == "DFASFDASD\n1\nDAS\n"
    assert elapsed < 10  # each reply ends after the quiet period, not the timeout


def test_reply_in_pieces_is_one_reply() -> None:
    with tcp_server(SlowTwoParts) as address:
        # The quiet period only bounds the wait: the reply still ends at its newline.
        result = client(address, b"a\nb\n", "--quiet-time", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "PART-A\nPART-B\n"


def test_empty_lines_are_not_sent() -> None:
    with tcp_server(TutorialUpper) as address:
        result = client(address, b"one\n\n   \ntwo\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ONE\nTWO\n"
    assert result.stderr.count("empty line not sent") == 2


def test_last_line_without_newline_is_sent() -> None:
    with tcp_server(BlockingUpper) as address:
        result = client(address, b"one\ntwo")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ONE\nTWO\n"


def test_invalid_utf8_reply_is_replaced() -> None:
    with tcp_server(BlockingUpper) as address:
        result = client(address, b"caf\xe9\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "CAF\ufffd\n"


def test_server_closes_after_first_line() -> None:
    with tcp_server(OneReplyThenClose) as address:
        result = client(address, b"first\nsecond\n")
    assert result.returncode == 1
    assert result.stdout == "FIRST\n"
    assert result.stderr.strip() == "sockserve client: server closed the connection"


def test_server_closes_while_waiting_for_reply() -> None:
    with tcp_server(CloseWithoutReply) as address:
        result = client(address, b"hello\n")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "sockserve client: server closed the connection"


def test_no_reply_within_timeout() -> None:
    with tcp_server(Silent) as address:
        result = client(address, b"anyone?\n", "--timeout", "0.3")
    assert result.returncode == 1
    assert "no reply within 0.3 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_refused() -> None:
    port = closed_port()
    result = client(f"127.0.0.1:{port}", b"hello\n")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"sockserve client: cannot connect to tcp://127.0.0.1:{port}: Connection refused"
    )


def test_bad_address() -> None:
    result = client("no-port-here", b"")
    assert result.returncode == 2
    assert "is not an address" in result.stderr
    assert "Traceback" not in result.stderr


def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "upper.sock")
    with serve_forever(ThreadingUnixServer(path, BlockingUpper)):
        result = client(f"unix:{path}", b"over unix\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OVER UNIX\n"


def test_abstract_unix_socket() -> None:
    name = f"sockserve-client-test-{os.getpid()}"
    with serve_forever(ThreadingUnixServer("\0" + name, BlockingUpper)):
        result = client(f"unix:@{name}", b"abstract\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ABSTRACT\n"


def test_tls_usage_errors(tmp_path: Path) -> None:
    missing = client("127.0.0.1:1", b"", "--tls", "--tls-ca", str(tmp_path / "none.pem"))
    unix = client("unix:/tmp/x.sock", b"", "--tls")
    udp = client("udp://127.0.0.1:1", b"", "--tls")
    for result in (missing, unix, udp):
        assert result.returncode == 2
        assert result.stderr.startswith("sockserve client: error:"), result.stderr


def test_missing_unix_socket(tmp_path: Path) -> None:
    result = client(f"unix:{tmp_path}/none.sock", b"x\n")
    assert result.returncode == 1
    assert "cannot connect to unix:" in result.stderr
    assert "No such file or directory" in result.stderr


def test_udp_one_datagram_per_line() -> None:
    with serve_forever(socketserver.UDPServer(("127.0.0.1", 0), UpperDatagrams)) as server:
        port = server.server_address[1]  # type: ignore[index]
        result = client(f"udp://127.0.0.1:{port}", b"one\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ONE\nTWO\n"


def test_udp_closed_port() -> None:
    port = closed_port()
    result = client(f"udp://127.0.0.1:{port}", b"hello\n", "--timeout", "5")
    assert result.returncode == 1
    assert f"udp://127.0.0.1:{port}" in result.stderr
    assert "Connection refused" in result.stderr


def test_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    class TLSUpper(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                with server_context.wrap_socket(self.request, server_side=True) as conn:
                    while data := conn.recv(1024):
                        conn.sendall(data.upper())
            except (ssl.SSLError, OSError):
                pass  # the untrusting client below hangs up mid-handshake

    with tcp_server(TLSUpper) as address:
        port = address.rsplit(":", 1)[1]
        good = client(f"localhost:{port}", b"secret\n", "--tls", "--tls-ca", str(ca_file))
        untrusted = client(f"localhost:{port}", b"secret\n", "--tls")
    assert good.returncode == 0, good.stderr
    assert good.stdout == "SECRET\n"
    assert untrusted.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    assert "Traceback" not in untrusted.stderr


class Terminal:
    """The client on a pseudo-terminal: what a person at a keyboard sees."""

    def __init__(self, address: str) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockserve.client", address],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        self.seen = b""
        self.pos = 0  # output before this was matched by earlier expect() calls

    def expect(self, pattern: bytes, timeout: float = TIMEOUT) -> None:
        """Read the screen until ``pattern`` (a regex) shows after the last match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with selectors.DefaultSelector() as sel:
            sel.register(self.master, selectors.EVENT_READ)
            while not (match := regex.search(self.seen, self.pos)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    raise AssertionError(f"no {pattern!r} on the terminal; saw {self.seen!r}")
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the client closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {pattern!r}; saw {self.seen!r}")
                self.seen += chunk
        self.pos = match.end()

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def interrupt(self) -> int:
        """Ctrl-C; the exit status.

        A SIGINT landing between readline's prompt and its select() is only seen at the
        next wake-up (a CPython readline race), so it is sent again, a bounded number of
        times, as a person would press Ctrl-C again.
        """
        for _ in range(5):
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(2)
                break
            except subprocess.TimeoutExpired:
                continue
        return self.wait()

    def wait(self) -> int:
        code = self.proc.wait(TIMEOUT)
        self.drain()
        return code

    def drain(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.master, selectors.EVENT_READ)
            while sel.select(0):
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    return
                if not chunk:
                    return
                self.seen += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Callable[[str], Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(address: str) -> Terminal:
        opened.append(Terminal(address))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


def test_terminal_prompt_reply_and_ctrl_d(terminal: Callable[[str], Terminal]) -> None:
    with tcp_server(TutorialUpper) as address:
        term = terminal(address)
        term.expect(b"> ")
        term.type(b"hello\r")
        term.expect(b"HELLO\r?\n")
        term.expect(b"> ")
        term.type(b"\r")  # an empty line: a note, nothing sent, a new prompt
        term.expect(b"empty line not sent")
        term.expect(b"> ")
        term.type(b"\x04")
        assert term.wait() == 0
    assert b"Traceback" not in term.seen


def test_terminal_ctrl_c(terminal: Callable[[str], Terminal]) -> None:
    with tcp_server(BlockingUpper) as address:
        term = terminal(address)
        term.expect(b"> ")
        term.type(b"abc\r")
        term.expect(b"ABC\r?\n")
        term.expect(b"> ")
        assert term.interrupt() == 130
    assert b"Traceback" not in term.seen
    assert b"KeyboardInterrupt" not in term.seen


def test_terminal_ctrl_c_while_waiting_for_reply(terminal: Callable[[str], Terminal]) -> None:
    with tcp_server(Silent) as address:
        term = terminal(address)
        term.expect(b"> ")
        term.type(b"hello?\r")
        term.expect(b"hello\\?\r?\n")
        assert term.interrupt() == 130
    assert b"Traceback" not in term.seen


def test_terminal_server_gone_between_lines(terminal: Callable[[str], Terminal]) -> None:
    with tcp_server(OneReplyThenClose) as address:
        term = terminal(address)
        term.expect(b"> ")
        term.type(b"one\r")
        term.expect(b"ONE\r?\n")
        term.expect(b"> ")
        term.type(b"two\r")
        term.expect(b"server closed the connection")
        assert term.wait() == 1
    assert b"Traceback" not in term.seen
