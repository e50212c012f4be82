"""The tutorial examples, each run as ``python -m sockserve.examples.NAME 127.0.0.1 0``."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

TIMEOUT = 10.0
LISTENING = re.compile(r"listening on (\w+)://(\S+):(\d+)")


class Example:
    """A running example; its stdout and stderr are read line by line."""

    def __init__(self, module: str, *args: str, stdin: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"sockserve.examples.{module}", *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin.encode())
            self.proc.stdin.close()
        self.lines: list[str] = []
        self._partial = b""

    def read_until(self, pattern: str, count: int = 1) -> re.Match[str]:
        """Read output until ``pattern`` matched ``count`` times; return the last match.

        Matches are counted in the whole output, not per line: processes printing at
        once (the forking example's children) can put two messages on one line.
        """
        regex = re.compile(pattern, re.MULTILINE)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                matches = list(regex.finditer("\n".join(self.lines)))
                if len(matches) >= count:
                    return matches[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    break
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self._partial += chunk
                *complete, self._partial = self._partial.split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in complete)
        output = "\n".join(self.lines)
        raise AssertionError(f"{pattern!r} not matched {count} times in:\n{output}")

    def address(self) -> tuple[str, int]:
        match = self.read_until(LISTENING.pattern)
        return match.group(2), int(match.group(3))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def run_example() -> Iterator[Callable[..., Example]]:
    started: list[Example] = []

    def run(module: str, *args: str, stdin: str | None = None) -> Example:
        example = Example(module, *args, stdin=stdin)
        started.append(example)
        return example

    yield run
    for example in started:
        example.stop()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_oneshot(run_example: Callable[..., Example]) -> None:
    server = run_example("tutorial_oneshot", "127.0.0.1", "0")
    with socket.create_connection(server.address(), timeout=TIMEOUT) as client:
        client.sendall(b"hello\n")
        assert recv_exactly(client, 5) == b"HELLO"
        assert client.recv(10) == b""  # one message per connection
    server.read_until(r"^127\.0\.0\.1 wrote:")
    server.read_until(r"^b'hello'")


@pytest.mark.parametrize("module", ["tutorial_threading", "tutorial_forking"])
def test_four_concurrent_clients(run_example: Callable[..., Example], module: str) -> None:
    if module == "tutorial_forking" and not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    server = run_example(module, "127.0.0.1", "0")
    address = server.address()
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(socket.create_connection(address, timeout=TIMEOUT))
            for _ in range(4)
        ]
        for round_ in range(3):  # all four open at once, messages interleaved
            for n, client in enumerate(clients):
                message = b"client %d round %d" % (n, round_)
                client.sendall(message)
                assert recv_exactly(client, len(message)) == message.upper()
    server.read_until("the client is disconnected", count=4)
    server.read_until(r"IP: 127\.0\.0\.1, Port: \d+ link connected", count=12)
    server.read_until(r"client 3 round 2")


def test_udp(run_example: Callable[..., Example]) -> None:
    server = run_example("tutorial_udp", "127.0.0.1", "0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        client.sendto(b"hello udp", server.address())
        assert client.recv(100) == b"HELLO UDP"
    server.read_until(r"^b'hello udp'")


def test_client_against_the_threading_server(run_example: Callable[..., Example]) -> None:
    server = run_example("tutorial_threading", "127.0.0.1", "0")
    host, port = server.address()
    client = run_example("tutorial_client", host, str(port), stdin="hello\n\nworld\n")
    assert client.proc.wait(TIMEOUT) == 0
    client.read_until("received data: HELLO")
    client.read_until("received data: WORLD")
    server.read_until("the client is disconnected")
