"""A client that connects in the same instant as a stop or a reload is served: its
connection, new and silent so far, is not taken for an idle one and closed before its
first request arrives (the request is answered, then the goodbye follows)."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from goodbye_handlers import GOODBYE, Blocking, Line, Stream, SyncLine
from helpers import ServerProcess, ThreadedServer, address_of, read_all, read_line, serving

HANDLERS = [Line, SyncLine, Stream, Blocking]
TESTS = str(Path(__file__).parent)
StartServer = Callable[..., ServerProcess]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def stopping(server: ThreadedServer) -> Iterator[None]:
    """A graceful stop of ``server`` under way in a thread; over when the block is."""
    thread = threading.Thread(target=server.stop, args=(30.0,))
    thread.start()
    try:
        wait_until(lambda: server.call(lambda: server.server.ledger.stopping), "the stop")
        yield
    finally:
        thread.join(40)


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_a_new_connection_that_sends_its_request_once_the_stop_began_is_answered(
    handler: type,
) -> None:
    with serving(handler, threads=8) as server:
        # Long enough that the request below is sent within it on any machine.
        server.server.ledger.first_request_wait = 30.0
        with socket.create_connection(server.address, timeout=10) as sock:
            wait_until(lambda: server.call(lambda: server.server.ledger.open) == 1, "accept")
            with stopping(server):
                sock.sendall(b"hi\n")
                assert read_all(sock) == b"HI\n" + GOODBYE
                sock.close()  # the server lingers until its client closes


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_a_new_connection_that_stays_silent_is_told_goodbye_once_its_wait_is_over(
    handler: type,
) -> None:
    wait = 0.5
    with serving(handler, threads=8) as server:
        server.server.ledger.first_request_wait = wait
        with socket.create_connection(server.address, timeout=10) as sock:
            connected = time.monotonic()
            wait_until(lambda: server.call(lambda: server.server.ledger.open) == 1, "accept")
            with stopping(server):
                assert read_all(sock) == GOODBYE
                assert time.monotonic() - connected >= wait  # its clock started later
                sock.close()


def test_a_connection_that_was_answered_is_told_goodbye_at_once() -> None:
    """Only a client yet to send anything is waited for: one waiting for its next
    request is idle, and ends at once."""
    with serving(Line) as server:
        server.server.ledger.first_request_wait = 30.0
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"hi\n")
            assert sock.recv(3) == b"HI\n"
            started = time.monotonic()
            with stopping(server):
                assert read_all(sock) == GOODBYE
                assert time.monotonic() - started < 10.0  # not the 30 s
                sock.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Any]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return {"cert": str(paths["cert"]), "key": str(paths["key"]), "client": client}


class Clients:
    """Client threads each connecting, sending one line and reading the first line that
    comes back, again and again until stopped; what every connection got is kept."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, count: int) -> None:
        self.address = address
        self.context = context
        self.results: list[bytes | str] = []
        self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # bounded whatever happens to the test
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                raw = socket.create_connection(self.address, timeout=10)
            except ConnectionRefusedError:  # the server stopped: never accepted
                with self._lock:
                    self.refused += 1
                return
            try:
                with self.context.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(b"hello\n")
                    result: bytes | str = read_line(sock)
            except (OSError, ssl.SSLError) as exc:
                result = f"{type(exc).__name__}: {exc}"
            finally:
                raw.close()
            with self._lock:
                self.results.append(result)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for_more(self, more: int) -> None:
        target = self.count() + more
        wait_until(lambda: self.count() >= target, f"{more} more clients served")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_clients_connecting_across_reloads_are_all_answered(
    start_server: StartServer, tls_files: dict[str, Any]
) -> None:
    """TLS makes the race wide: the old worker finishes a handshake after its stop began,
    and the request is still on its way."""
    server = start_server(
        [
            *("run", "goodbye_handlers:Line", "--bind", "127.0.0.1:0", "--workers", "2"),
            *("--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]),
        ],
        cwd=TESTS,
    )
    server.read_until("sockserve.server: listening on", timeout=20)
    clients = Clients(address_of(server.urls[0]), tls_files["client"], 4)
    try:
        for _ in range(3):
            server.signal(signal.SIGHUP)
            server.read_until("reload done", timeout=30)
            clients.wait_for_more(20)
    finally:
        clients.stop()
    assert clients.refused == 0
    wrong = [r for r in clients.results if r != b"HELLO\n"]
    assert not wrong, f"{len(wrong)} of {len(clients.results)}: {wrong[:5]}"


def test_clients_connecting_across_a_stop_are_all_answered(
    start_server: StartServer, tls_files: dict[str, Any]
) -> None:
    server = start_server(
        [
            *("run", "goodbye_handlers:Line", "--bind", "127.0.0.1:0"),
            *("--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]),
        ],
        cwd=TESTS,
    )
    clients = Clients(address_of(server.urls[0]), tls_files["client"], 4)
    try:
        clients.wait_for_more(20)
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        clients.stop()
    wrong = [r for r in clients.results if r != b"HELLO\n"]
    assert not wrong, f"{len(wrong)} of {len(clients.results)}: {wrong[:5]}"
