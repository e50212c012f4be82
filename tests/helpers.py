"""The test suite's helpers, in one place: server processes and in-thread servers, clients
and load generators, the handlers the tests share, and figures read from /proc.

The fixtures built on these (``start_server``, ``spawn``, ``loop``, ``ca``, ``certs``)
are in conftest.py. This module imports only the standard library and sockserve, so a
server process can serve its handlers too: ``start_server(["run", "helpers:StreamUpper"])``.

Run as a script, ``python tests/helpers.py drip HOST PORT COUNT INTERVAL DURATION`` is
the slowloris peer: COUNT connections each sending one byte (never a newline) every
INTERVAL seconds for DURATION seconds. It prints ``connected N`` once connected, then one
JSON line with what it saw (kept out of the test process so its GIL cannot slow the
client being measured).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sockserve
from sockserve.testing import RunningServer

TESTS = Path(__file__).resolve().parent
LOOPS = ["asyncio", "uvloop"]
REQUIRE_ALL = os.environ.get("SOCKSERVE_REQUIRE_ALL") == "1"
# Programs the tests act as if not installed: a newcomer's machine, on one that has them.
# Left in the environment for the test processes pytest-xdist starts.
HIDDEN_PROGRAMS = set(os.environ.get("SOCKSERVE_TEST_HIDE", "").replace(",", " ").split())
# A bound socket's line, in text or JSON logs (not the "metrics listening on" line).
LISTENING = re.compile(r"(?<!metrics )listening on ([^\s\"]+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1024 * 1024


def require_program(name: str) -> str:
    """The program's path; skip when it is missing, or fail under SOCKSERVE_REQUIRE_ALL=1.

    A program named in SOCKSERVE_TEST_HIDE counts as missing.
    """
    import pytest

    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None or name in HIDDEN_PROGRAMS:
        message = f"{name} is not installed (Debian: apt-get install the package providing it)"
        if name in HIDDEN_PROGRAMS:
            message = f"{name} is hidden by SOCKSERVE_TEST_HIDE"
        if REQUIRE_ALL:
            pytest.fail(message + "; SOCKSERVE_REQUIRE_ALL=1 forbids skipping")
        pytest.skip(message)
    return path


def address_of(url: str) -> tuple[str, int]:
    """``tcp://127.0.0.1:4000`` or ``udp://[::1]:4000`` as a (host, port) pair."""
    rest = url.split("://", 1)[1]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


# -- handlers shared by in-thread servers and server processes ----------------------------


class Upper(sockserve.LineHandler):
    """Each line back upper-cased: the fast path."""

    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


class AsyncUpper(sockserve.LineHandler):
    async def handle_line(self, line: bytes) -> bytes:
        await asyncio.sleep(0)
        return line.upper()


class StreamUpper(sockserve.StreamHandler):
    async def handle(self) -> None:
        while line := await self.readline():
            self.write(line.upper())
            await self.drain()


class BlockingUpper(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


class EchoLines(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class OneReplyThenClose(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


class Silent(socketserver.StreamRequestHandler):
    """Reads everything, answers nothing."""

    def handle(self) -> None:
        for _ in self.rfile:
            pass


class Sizes(sockserve.DatagramHandler):
    """Answers each datagram with its length."""

    def handle_datagram(self, data: bytes, client_address: Any) -> bytes:
        return b"%d" % len(data)


def _who(handler: Any) -> bytes:
    proxy = handler.proxy
    version = proxy.version if proxy else 0
    authority = proxy.authority if proxy else None
    unique = proxy.unique_id.decode() if proxy and proxy.unique_id else "-"
    host, port = handler.client_address[:2]
    return f"{host}:{port} v{version} {authority} {unique}\n".encode()


class Who(sockserve.LineHandler):
    """``HOST:PORT vVERSION AUTHORITY UNIQUE-ID`` of the client and its PROXY header."""

    def handle_line(self, line: bytes) -> bytes:
        return _who(self)


class StreamWho(sockserve.StreamHandler):
    """The client's host and the common name of its TLS certificate."""

    async def handle(self) -> None:
        while await self.readline():
            cert = self.get_extra_info("peercert")
            subject = dict(x[0] for x in cert["subject"]) if cert else {}
            self.write(f"{self.client_address[0]} {subject.get('commonName')}\n".encode())


class BlockingWho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for _ in self.rfile:
            self.wfile.write(f"{self.client_address[0]}:{self.client_address[1]}\n".encode())


# -- clients --------------------------------------------------------------------------------


def connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def read_line(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read up to and including the next newline (or to end of stream)."""
    data = bytearray()
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection without sending anything (FIN or RST)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def ask(address: tuple[str, int], request: bytes = b"hi\n", timeout: float = 5.0) -> bytes:
    """One request on a new connection; the reply line."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        return read_line(sock)


def round_trips(
    address: tuple[str, int], count: int, period: float = 0.0, deadline: float = 30.0
) -> list[float]:
    """``count`` request/reply times on one connection, one request every ``period`` s."""
    latencies: list[float] = []
    stop_at = time.monotonic() + deadline
    with socket.create_connection(address, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        next_at = time.monotonic()
        for i in range(count):
            if time.monotonic() > stop_at:
                break
            request = b"ping %d\n" % i
            started = time.monotonic()
            sock.sendall(request)
            reply = read_line(sock)
            latencies.append(time.monotonic() - started)
            assert reply == request.upper(), reply
            next_at += period
            if (pause := next_at - time.monotonic()) > 0:
                time.sleep(pause)
    return latencies


@dataclass
class Outcome:
    when: float  # when it was known (monotonic)
    kind: str  # "ok", "refused" (at connect), or "failed"
    detail: str = ""
    reply: bytes = b""
    started: float = 0.0  # when the attempt began, before its connect()


def upper_cased(request: bytes, reply: bytes) -> bool:
    return reply == request.upper()


class Load:
    """Threads doing connect / one request / reply / close until stopped (time-bounded).

    Every attempt is recorded with its time: ``refused`` means connect() itself failed,
    ``goodbye`` that the server ended the connection before answering (an end of stream
    and nothing else: a stopping or reloading server ends idle connections that way, and
    the request is sent again on a new one), ``failed`` that the reply did not arrive
    whole or was wrong (``check(request, reply)`` said so). Tests wait for a number of
    answered requests (``wait_ok``), never for a guessed time.
    """

    def __init__(
        self,
        address: tuple[str, int],
        threads: int = 6,
        limit: float = 20.0,
        check: Callable[[bytes, bytes], bool] = upper_cased,
    ) -> None:
        self.address = address
        self.outcomes: list[Outcome] = []
        self.check = check
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._deadline = time.monotonic() + limit
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-{i}") for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _record(self, started: float, kind: str, detail: str = "", reply: bytes = b"") -> None:
        with self._changed:
            self.outcomes.append(Outcome(time.monotonic(), kind, detail, reply, started))
            self._changed.notify_all()

    def _run(self, index: int) -> None:
        n = 0
        retry = False
        while not self._stop.is_set() and (started := time.monotonic()) < self._deadline:
            if not retry:
                n += 1
            retry = False
            request = b"client %d request %d\n" % (index, n)
            try:
                sock = socket.create_connection(self.address, timeout=5)
            except OSError as exc:
                self._record(started, "refused", repr(exc))
                if self._stop.wait(0.01):  # a stopped server refuses at once: do not spin
                    return
                continue
            try:
                with sock:
                    sock.sendall(request)
                    reply = read_line(sock)
                if reply == b"":
                    self._record(started, "goodbye")
                    retry = True
                    continue
                ok = self.check(request, reply)
                self._record(started, "ok" if ok else "failed", repr(reply), reply)
            except OSError as exc:
                self._record(started, "failed", repr(exc))

    def count(self, kind: str, after: float = 0.0, before: float = math.inf) -> int:
        with self._changed:
            return sum(1 for o in self.outcomes if o.kind == kind and after <= o.when < before)

    def failures(self) -> list[Outcome]:
        with self._changed:
            return [o for o in self.outcomes if o.kind == "failed"]

    @property
    def replies(self) -> list[bytes]:
        with self._changed:
            return [o.reply for o in self.outcomes if o.kind == "ok"]

    def wait_ok(self, n: int, after: float = 0.0, timeout: float = 15.0) -> None:
        """Wait until ``n`` requests made after ``after`` (monotonic) were answered."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count("ok", after) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not any(t.is_alive() for t in self._threads):
                    raise AssertionError(
                        f"{self.count('ok', after)} of {n} requests answered;"
                        f" last outcomes: {self.outcomes[-5:]}"
                    )
                self._changed.wait(left)

    def wait_more(self, n: int, timeout: float = 15.0) -> None:
        """Wait until ``n`` more requests than so far were answered."""
        self.wait_ok(self.count("ok") + n, timeout=timeout)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


class Chatty:
    """Long-lived connections, each sending a line every ``period`` s and reading its reply.

    Each connection stops at end of stream or an error and records how it ended; ``sent``
    and ``answered`` count lines per connection.
    """

    def __init__(
        self, address: tuple[str, int], connections: int, period: float = 0.02, limit: float = 20.0
    ) -> None:
        self.socks: list[socket.socket] = []
        try:
            for _ in range(connections):
                self.socks.append(socket.create_connection(address, timeout=5))
        except OSError:
            for sock in self.socks:
                sock.close()
            raise
        self.sent = [0] * connections
        self.answered = [0] * connections
        self.ended: list[str | None] = [None] * connections
        self.period = period
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._deadline = time.monotonic() + limit
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"chatty-{i}")
            for i in range(connections)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        try:
            self.ended[index] = self._chat(index)
        finally:
            with self._changed:
                self._changed.notify_all()

    def _chat(self, index: int) -> str:
        sock = self.socks[index]
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            request = b"chat %d %d\n" % (index, self.sent[index])
            try:
                sock.sendall(request)
                self.sent[index] += 1
                reply = read_line(sock)
            except OSError as exc:
                return repr(exc)
            if not reply:
                return "eof"
            if reply != request.upper():
                return f"wrong reply {reply!r}"
            with self._changed:
                self.answered[index] += 1
                self._changed.notify_all()
            self._stop.wait(self.period)
        return "stopped"

    def wait_answered(self, at_least: int = 1, timeout: float = 10.0) -> bool:
        """Wait until every connection has had ``at_least`` replies (or ended)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(
                n >= at_least or end is not None
                for n, end in zip(self.answered, self.ended, strict=True)
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def wait_ended(self, timeout: float = 10.0) -> bool:
        """Wait until every connection has ended (end of stream or an error)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while any(end is None for end in self.ended):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self, timeout: float = 10.0) -> None:
        for thread in self._threads:
            thread.join(timeout)
        for sock in self.socks:
            sock.close()


# -- servers in this process --------------------------------------------------------------


class ThreadedServer(RunningServer):
    """sockserve.testing's server thread with the suite's defaults: the loop named, and
    handler errors kept in ``errors`` for the tests that provoke them, not re-raised."""

    def __init__(self, handler: type, loop: str = "asyncio", **settings: Any) -> None:
        super().__init__(handler, loop=loop, **settings)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()``, checked in the server's loop, holds: for server
        state that has no event of its own. AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while not self.call(predicate):
            assert time.monotonic() < deadline, f"timed out waiting for {predicate.__qualname__}"
            pause.wait(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully, giving open connections ``timeout`` seconds."""
        self.stop_timeout = timeout
        super().stop()


@contextlib.contextmanager
def serving(handler: type, loop: str = "asyncio", **settings: Any) -> Iterator[ThreadedServer]:
    """A sockserve Server for ``handler`` in a thread, on 127.0.0.1 port 0 by default."""
    server = ThreadedServer(handler, loop, **settings)
    try:
        yield server
    finally:
        server.stop()


class ThreadingTCPServer(socketserver.ThreadingTCPServer):
    """The stdlib's threading server, as a peer for sockserve's client and load generator."""


class ThreadingUnixServer(socketserver.ThreadingUnixStreamServer):
    """Removes its socket file when closed, which the stdlib's server leaves behind."""

    def server_close(self) -> None:
        super().server_close()
        path = self.server_address
        if isinstance(path, str) and path and not path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@contextlib.contextmanager
def serve_forever(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    """Run a socketserver-style server in a thread; shut down, close and join on exit."""
    # A short poll interval: the stdlib's shutdown() waits up to one interval.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), name="serve-forever")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads (block_on_close)
        thread.join(30)


@contextlib.contextmanager
def tcp_server(handler: type[socketserver.BaseRequestHandler]) -> Iterator[str]:
    """An address ``127.0.0.1:PORT`` served by the stdlib's threading server."""
    with serve_forever(ThreadingTCPServer(("127.0.0.1", 0), handler)) as server:
        yield f"127.0.0.1:{server.server_address[1]}"  # type: ignore[index]


# -- server processes ---------------------------------------------------------------------


# Lowers RLIMIT_NOFILE (soft and hard, so the server cannot lift it) before running the
# CLI: preexec_fn would do the same but is unsafe in a process with threads.
_LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv.pop(1));"
    " resource.setrlimit(resource.RLIMIT_NOFILE, (n, n));"
    " sys.argv[0] = 'sockserve'; runpy.run_module('sockserve', run_name='__main__')"
)


def sockserve_argv(args: Sequence[str], nofile: int | None = None) -> list[str]:
    """``python -m sockserve ARGS``, under RLIMIT_NOFILE ``nofile`` if given."""
    launcher = ["-c", _LIMITED, str(nofile)] if nofile else ["-m", "sockserve"]
    return [sys.executable, *launcher, *args]


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: unbuffered, and able to import this module."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}


class ServerProcess:
    """A child process whose stderr a thread collects line by line.

    ``read_until`` consumes lines in order (each call starts after the last match);
    ``wait_for``, ``wait_count`` and ``count`` look at every line; ``urls`` are the
    addresses of the ``listening on`` lines read by ``start``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
        new_session: bool = False,
    ) -> None:
        self.urls: list[str] = []
        self.lines: list[str] = []
        self._pos = 0  # lines before this one were consumed by read_until
        self._changed = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_environment(env),
            cwd=cwd,
            pass_fds=pass_fds,
            start_new_session=new_session,  # its own process group, for os.killpg
        )
        self._reader = threading.Thread(target=self._read, name="server-stderr")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _find(self, pattern: str, timeout: float, start: int) -> tuple[int, re.Match[str]]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self.lines):
                    if match := regex.search(self.lines[index]):
                        return index, match
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    break
                self._changed.wait(left)
        raise AssertionError(f"no line matching {pattern!r}; server said:\n{self.text}")

    def read_until(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The next line, after the last one read this way, that matches."""
        index, match = self._find(pattern, timeout, self._pos)
        self._pos = index + 1
        return match

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """The first line from index ``start`` on that matches; AssertionError after timeout."""
        return self._find(pattern, timeout, start)[1]

    def start(self, listeners: int = 1, timeout: float = 15.0) -> ServerProcess:
        """Read ``listeners`` lines saying ``listening on URL``; fill in ``urls``."""
        for _ in range(listeners):
            self.urls.append(self.read_until(LISTENING.pattern, timeout).group(1))
        return self

    def wait_count(self, pattern: str, n: int, timeout: float = 10.0) -> int:
        """Wait until ``n`` lines match; return how many do (fewer only after the timeout)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = scanned = 0
        with self._changed:
            while True:
                seen += sum(1 for line in self.lines[scanned:] if regex.search(line))
                scanned = len(self.lines)
                left = deadline - time.monotonic()
                if seen >= n or left <= 0 or self._eof:
                    return seen
                self._changed.wait(left)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds, checking it again at each new line of output
        (and every 0.1 s, for conditions on the world outside the log)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; server said:\n{self.text}")
                self._changed.wait(min(left, 0.1))

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit and for the last of its output."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout} s; it said:\n{self.text}"
            ) from None
        self._reader.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None:
                stream.close()


def worker_pids(server: ServerProcess) -> list[int]:
    started = [int(m) for m in re.findall(r"started worker (\d+)", server.text)]
    stopped = {int(m) for m in re.findall(r"worker (\d+) (?:stopped|died)", server.text)}
    return [pid for pid in started if pid not in stopped]


def versioned(request: bytes, reply: bytes) -> bool:
    """The app's reply: ``VERSION PID REQUEST``."""
    return reply.endswith(b" " + request)


def wait_exit(server: ServerProcess, timeout: float = 15) -> int:
    try:
        return server.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{server.text}") from None


def wait_for(condition: Callable[[], bool], server: ServerProcess, timeout: float = 10) -> None:
    """``server.wait_until(condition, timeout)``."""
    server.wait_until(condition, timeout)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers of a supervisor)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


# -- figures from /proc ---------------------------------------------------------------------


def raise_nofile() -> int:
    """Lift this process's soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size, from VmRSS in /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_fds_at_most(pid: int, limit: int, timeout: float = 5.0) -> int:
    """The process's descriptor count once it is at most ``limit``, or after ``timeout``.

    A server logs a connection's end just before it closes the socket: the count read
    right after the log line may still include it. /proc has no event to wait for.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while (count := open_fds(pid)) > limit and time.monotonic() < deadline:
        pause.wait(0.01)
    return count


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def report(name: str, **figures: object) -> None:
    """One greppable line of figures (shown with ``pytest -s``)."""
    print(f"\nFIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


# -- the slowloris peer (run as a child process) ------------------------------------------


@dataclass
class _Drip:
    sock: socket.socket
    last_byte: float = 0.0
    closed_after: float | None = None  # seconds after its last byte


def drip(host: str, port: int, count: int, interval: float, duration: float) -> dict[str, Any]:
    """COUNT connections each sending one byte on connecting, then one every INTERVAL s for
    DURATION s; never a newline. Each peer keeps its own schedule, so the silences the
    server sees are all INTERVAL long."""
    raise_nofile()
    peers: list[_Drip] = []
    for _ in range(count):
        # The server's idle clock may start when it accepts, before the first byte is
        # sent (this process can be descheduled in between), so silence counts from here.
        connecting = time.monotonic()
        sock = socket.create_connection((host, port), timeout=5)
        sock.send(b"x")
        peers.append(_Drip(sock, connecting))
    print(f"connected {count}", flush=True)
    with selectors.DefaultSelector() as selector:
        for peer in peers:
            peer.sock.setblocking(False)
            selector.register(peer.sock, selectors.EVENT_READ, peer)
        stop_at = time.monotonic() + duration
        turn = 0  # peers are due in connection order, so one pointer walks the schedule
        while (now := time.monotonic()) < stop_at and selector.get_map():
            peer = peers[turn]
            due = peer.last_byte + interval
            for key, _ in selector.select(min(stop_at, due) - now if due > now else 0):
                closed = key.data
                try:
                    gone = closed.sock.recv(1) == b""
                except (ConnectionError, BlockingIOError):
                    gone = True
                if gone:
                    closed.closed_after = time.monotonic() - closed.last_byte
                    selector.unregister(closed.sock)
            if time.monotonic() < due:
                continue
            if peer.closed_after is None:
                try:
                    # A close that came in since the select is recorded here rather than
                    # crossed by a byte sent after it (the close would then look early).
                    gone = peer.sock.recv(1, socket.MSG_PEEK) == b""
                except (BlockingIOError, ConnectionError):
                    gone = False  # a reset shows up as readable and is recorded there
                if gone:
                    peer.closed_after = time.monotonic() - peer.last_byte
                    selector.unregister(peer.sock)
                else:
                    with contextlib.suppress(OSError):
                        peer.sock.send(b"x")
                        peer.last_byte = time.monotonic()
            turn = (turn + 1) % count
    closed = [p.closed_after for p in peers if p.closed_after is not None]
    for peer in peers:
        peer.sock.close()
    return {"connected": count, "closed": len(closed), "closed_after": closed}


@dataclass
class Drippers:
    """The slowloris peer process started by ``start_drippers``."""

    proc: subprocess.Popen[str]
    result: dict[str, Any] = field(default_factory=dict)

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the peers' report; kill the process if it does not come in time."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        self.result = json.loads(out.strip().splitlines()[-1])
        return self.result


def start_drippers(
    address: tuple[str, int], count: int, interval: float, duration: float
) -> Drippers:
    proc = subprocess.Popen(
        [sys.executable, __file__, "drip", *map(str, (*address, count, interval, duration))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the child's connects each time out at 5 s
    drippers = Drippers(proc)
    if not line.startswith("connected"):
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the drippers did not connect: {line!r}")
    return drippers


if __name__ == "__main__":
    if sys.argv[1:2] == ["drip"]:
        host, port, count, interval, duration = sys.argv[2:7]
        outcome = drip(host, int(port), int(count), float(interval), float(duration))
        print(json.dumps(outcome), flush=True)


# -- sd_notify ---------------------------------------------------------------------------


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET: a Unix datagram socket that also
    receives each sender's pid (SO_PASSCRED), as systemd does."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(10)
        self.env = {"NOTIFY_SOCKET": address}

    def receive(self) -> tuple[dict[str, str], int]:
        """The next message as a dict of its ``KEY=VALUE`` lines, and the sender's pid."""
        creds = array.array("i", [0, 0, 0])  # struct ucred: pid, uid, gid
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds.itemsize * 3))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                creds = array.array("i", payload[: creds.itemsize * 3])
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return fields, creds[0]

    def close(self) -> None:
        self.sock.close()
