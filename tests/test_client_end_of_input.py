"""``sockserve client`` at the end of its input prints every reply still on its way: the
last reply is not dropped because the one before it (or a message the server pushed) was
taken for the reply to the last line."""

from __future__ import annotations

import contextlib
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ThreadingUnixServer, serve_forever, tcp_server
from sockserve.framing import Framing, parse_framing

TIMEOUT = 20.0
EXPECTED = "got a\ndone a\ngot b\ndone b\n"


class HeldReplies(socketserver.BaseRequestHandler):
    """Answers each message twice: ``got M`` at once, ``done M`` when the next message
    arrives; the last ``done`` only once the input has ended and the test releases it.

    The client takes ``got M`` for the reply to M, so ``done b`` comes after it has read
    its reply to the last line, and after its end of input: only a client that keeps
    reading then prints it.
    """

    framing: Framing
    saw_end: threading.Event
    release: threading.Event

    def send(self, payload: bytes) -> None:
        self.request.sendall(self.framing.encode(payload))

    def handle(self) -> None:
        framer = self.framing.framer()
        held = None
        while data := self.request.recv(4096):
            framer.feed(data)
            while (message := framer.next_message()) is not None:
                if held is not None:
                    self.send(b"done " + held)
                self.send(b"got " + message)
                held = message
        self.saw_end.set()
        if held is not None and self.release.wait(TIMEOUT):
            with contextlib.suppress(OSError):  # a client that did not wait has gone
                self.send(b"done " + held)


@pytest.fixture
def held() -> Iterator[type[HeldReplies]]:
    """A HeldReplies class of its own (its events and framing), released in teardown."""

    class Held(HeldReplies):
        saw_end = threading.Event()
        release = threading.Event()

    yield Held
    Held.release.set()  # never leave a handler thread waiting


def run_client(address: str, stdin: bytes, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sockserve", "client", address, *options],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def client_released_at_end(
    handler: type[HeldReplies], address: str, *options: str
) -> subprocess.CompletedProcess[str]:
    """Run the client on ``a`` and ``b``; release the last reply once the server has seen
    the end of the client's input (its half-close), so that it comes late."""
    result: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(
        target=lambda: result.append(run_client(address, b"a\nb\n", *options))
    )
    thread.start()
    try:
        assert handler.saw_end.wait(TIMEOUT), "the server never saw the end of input"
    finally:
        handler.release.set()
        thread.join(TIMEOUT + 5)
    assert not thread.is_alive() and result
    return result[0]


@pytest.mark.parametrize("framing", ["line", "netstring", "u32"])
def test_last_reply_after_end_of_input_is_printed_tcp(
    held: type[HeldReplies], framing: str
) -> None:
    held.framing = parse_framing(framing)
    with tcp_server(held) as address:
        done = client_released_at_end(held, address, "--framing", framing)
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXPECTED
    assert done.stderr == ""


def test_last_reply_after_end_of_input_is_printed_unix(
    held: type[HeldReplies], tmp_path: Path
) -> None:
    held.framing = parse_framing("netstring")
    path = str(tmp_path / "held.sock")
    with serve_forever(ThreadingUnixServer(path, held)):
        done = client_released_at_end(held, f"unix:{path}", "--framing", "netstring")
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXPECTED


def test_a_server_that_does_not_close_is_waited_for_a_bounded_time() -> None:
    release = threading.Event()

    class Mute(socketserver.StreamRequestHandler):
        """Answers nothing and, after the client's end of input, keeps the connection
        open until the test lets it go."""

        def handle(self) -> None:
            for _ in self.rfile:
                pass
            release.wait(TIMEOUT)

    try:
        with tcp_server(Mute) as address:
            done = run_client(address, b"anyone?\n", "--timeout", "0.5")
            release.set()
    finally:
        release.set()
    assert done.returncode == 1  # the line went unanswered
    assert "no reply within 0.5 s" in done.stderr
    assert "did not close the connection within 0.5 s of end of input" in done.stderr


def test_tls_prints_a_reply_that_comes_after_the_last_one(tmp_path: Path) -> None:
    """TLS cannot half-close: the client reads until --quiet-time passes without bytes.
    The server sends ``done b`` (and closes) only once the client has printed ``got b``,
    which it takes for the whole reply to its last line."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    release = threading.Event()

    class TLSHeld(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with server_context.wrap_socket(self.request, server_side=True) as conn:
                for line in conn.makefile("rb"):
                    conn.sendall(b"got " + line)
                    if line == b"b\n":
                        break
                if release.wait(TIMEOUT):
                    with contextlib.suppress(OSError):
                        conn.sendall(b"done b\n")

    try:
        with tcp_server(TLSHeld) as address:
            port = address.rsplit(":", 1)[1]
            argv = [sys.executable, "-m", "sockserve", "client", f"localhost:{port}"]
            tls = ["--tls", "--tls-ca", str(ca_file), "--quiet-time", "10"]
            with subprocess.Popen(
                [*argv, *tls],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ) as proc:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(b"a\nb\n")
                proc.stdin.close()
                assert proc.stdout.readline() == b"got a\n"
                assert proc.stdout.readline() == b"got b\n"
                release.set()
                rest = proc.stdout.read()
                assert proc.wait(TIMEOUT) == 0
                assert proc.stderr is not None
                err = proc.stderr.read()
    finally:
        release.set()
    assert rest == b"done b\n", err
