"""Shared test helpers: servers started on port 0 as real processes, stopped in teardown."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

REQUIRE_ALL = os.environ.get("SOCKSERVE_REQUIRE_ALL") == "1"
# A bound socket's line, in text or JSON logs (not the "metrics listening on" line).
LISTENING = re.compile(r"(?<!metrics )listening on ([^\s\"]+)")


def require_program(name: str) -> str:
    """The program's path; skip when it is missing, or fail under SOCKSERVE_REQUIRE_ALL=1."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install the package providing it)"
        if REQUIRE_ALL:
            pytest.fail(message + "; SOCKSERVE_REQUIRE_ALL=1 forbids skipping")
        pytest.skip(message)
    return path


@dataclass
class ServerProcess:
    """A ``python -m sockserve ...`` child; ``urls`` are the addresses it logged."""

    proc: subprocess.Popen[bytes]
    urls: list[str]
    output: list[str] = field(default_factory=list)
    _pos: int = 0  # lines before this one were consumed by earlier read_until calls
    _pending: bytes = b""  # an unfinished last line

    def read_until(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Read the server's stderr up to the next line that matches; fail after ``timeout``."""
        regex = re.compile(pattern)
        while self._pos < len(self.output):
            self._pos += 1
            if match := regex.search(self.output[self._pos - 1]):
                return match
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while (remaining := deadline - time.monotonic()) > 0:
                if not sel.select(remaining):
                    break
                chunk = os.read(fd, 65536)  # unbuffered: select() sees everything not yet read
                if not chunk:
                    break
                self._pending += chunk
                *lines, rest = self._pending.split(b"\n")
                self._pending = rest
                for raw in lines:
                    self.output.append(raw.decode(errors="replace") + "\n")
                while self._pos < len(self.output):
                    self._pos += 1
                    if match := regex.search(self.output[self._pos - 1]):
                        return match
        raise AssertionError(f"no line matching {pattern!r}; server said:\n{''.join(self.output)}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        code = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        rest = self._pending + self.proc.stderr.read()
        self._pending = b""
        self.output.extend(rest.decode(errors="replace").splitlines(True))
        return code

    @property
    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None:
                stream.close()


def host_port(url: str) -> tuple[str, int]:
    """``tcp://127.0.0.1:4000`` or ``udp://[::1]:4000`` as a (host, port) pair."""
    rest = url.split("://", 1)[1]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.fixture
def start_server() -> Iterator[object]:
    """Start ``python -m sockserve ARGS`` and wait for ``listening`` lines; stop in teardown."""
    started: list[ServerProcess] = []

    def start(
        args: Sequence[str],
        *,
        listeners: int = 1,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 15.0,
        stdin: int | None = subprocess.DEVNULL,
    ) -> ServerProcess:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "sockserve", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
        )
        server = ServerProcess(proc, [])
        started.append(server)
        for _ in range(listeners):
            server.urls.append(server.read_until(LISTENING.pattern, timeout).group(1))
        return server

    yield start
    for server in started:
        server.stop()
