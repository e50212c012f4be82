"""Helpers for the fault-injection tests: servers whose logs never fill a pipe, figures
read from /proc, and misbehaving peers.

Run as a script, ``python tests/faultkit.py drip HOST PORT COUNT INTERVAL DURATION`` is
the slowloris peer: COUNT connections each sending one byte (never a newline) every
INTERVAL seconds for DURATION seconds. It prints ``connected N`` once connected, then one
JSON line with what it saw (kept out of the test process so its GIL cannot slow the
client being measured).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving import read_line

LISTENING = re.compile(r"(?<!metrics )listening on ([^\s\"]+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Lift this process's soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- figures from /proc ----------------------------------------------------------------


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


# -- server processes --------------------------------------------------------------------


# Lowers RLIMIT_NOFILE (soft and hard, so the server cannot lift it) before running the
# CLI: preexec_fn would do the same but is unsafe in a process with threads.
_LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv.pop(1));"
    " resource.setrlimit(resource.RLIMIT_NOFILE, (n, n));"
    " sys.argv[0] = 'sockserve'; runpy.run_module('sockserve', run_name='__main__')"
)


@dataclass
class Proc:
    """A ``python -m sockserve ARGS`` child; a thread collects its stderr line by line."""

    args: Sequence[str]
    cwd: str | None = None
    nofile: int | None = None
    urls: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        launcher = ["-c", _LIMITED, str(self.nofile)] if self.nofile else ["-m", "sockserve"]
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.cwd,
        )
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name="server-stderr", daemon=True)
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

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """The first line from index ``start`` on that matches; AssertionError after timeout."""
        return self._find(pattern, timeout, start)[1]

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

    def start(self, listeners: int = 1, timeout: float = 15.0) -> Proc:
        """Wait for ``listeners`` lines saying ``listening on URL``; fill in ``urls``."""
        index = -1
        for _ in range(listeners):
            index, match = self._find(LISTENING.pattern, timeout, index + 1)
            self.urls.append(match.group(1))
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
        code = self.proc.wait(timeout)
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
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def address_of(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers of a supervisor)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


# -- clients -----------------------------------------------------------------------------


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
    when: float
    kind: str  # "ok", "refused" (at connect), or "failed"
    detail: str = ""


class ShortLived:
    """Threads doing connect / one request / reply / close until stopped (time-bounded).

    Every attempt is recorded with its time: ``refused`` means connect() itself failed,
    ``failed`` means a connection was made but the reply did not arrive whole.
    """

    def __init__(
        self,
        address: tuple[str, int],
        threads: int = 6,
        limit: float = 20.0,
        check: Callable[[bytes, bytes], bool] | None = None,
    ) -> None:
        self.address = address
        self.outcomes: list[Outcome] = []
        self.check = check or (lambda request, reply: reply == request.upper())
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + limit
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _record(self, kind: str, detail: str = "") -> None:
        with self._lock:
            self.outcomes.append(Outcome(time.monotonic(), kind, detail))

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            n += 1
            request = b"client %d request %d\n" % (index, n)
            try:
                sock = socket.create_connection(self.address, timeout=5)
            except OSError as exc:
                self._record("refused", repr(exc))
                if self._stop.wait(0.01):  # a stopped server refuses at once: do not spin
                    return
                continue
            try:
                with sock:
                    sock.sendall(request)
                    reply = read_line(sock)
                self._record("ok" if self.check(request, reply) else "failed", repr(reply))
            except OSError as exc:
                self._record("failed", repr(exc))

    def count(self, kind: str, after: float = 0.0, before: float = math.inf) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.kind == kind and after <= o.when < before)

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.kind == "failed"]

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
        self.socks = [socket.create_connection(address, timeout=5) for _ in range(connections)]
        self.sent = [0] * connections
        self.answered = [0] * connections
        self.ended: list[str | None] = [None] * connections
        self.period = period
        self._stop = threading.Event()
        self._answer = threading.Condition()
        self._deadline = time.monotonic() + limit
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(connections)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        sock = self.socks[index]
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            request = b"chat %d %d\n" % (index, self.sent[index])
            try:
                sock.sendall(request)
                self.sent[index] += 1
                reply = read_line(sock)
            except OSError as exc:
                self.ended[index] = repr(exc)
                return
            if not reply:
                self.ended[index] = "eof"
                return
            if reply != request.upper():
                self.ended[index] = f"wrong reply {reply!r}"
                return
            with self._answer:
                self.answered[index] += 1
                self._answer.notify_all()
            self._stop.wait(self.period)
        self.ended[index] = "stopped"

    def wait_answered(self, at_least: int = 1, timeout: float = 10.0) -> bool:
        """Wait until every connection has had ``at_least`` replies (or ended)."""
        deadline = time.monotonic() + timeout
        with self._answer:
            while not all(
                n >= at_least or end is not None
                for n, end in zip(self.answered, self.ended, strict=True)
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._answer.wait(min(left, 0.1))  # an ending is not notified
            return True

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self, timeout: float = 10.0) -> None:
        for thread in self._threads:
            thread.join(timeout)
        for sock in self.socks:
            sock.close()


# -- the slowloris peer (run as a child process) -----------------------------------------


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
        sock = socket.create_connection((host, port), timeout=5)
        sock.send(b"x")
        peers.append(_Drip(sock, time.monotonic()))
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
                    peer.sock.send(b"x")
                    peer.last_byte = time.monotonic()
                except OSError:
                    pass  # the reset shows up as readable and is recorded there
            turn = (turn + 1) % count
    closed = [p.closed_after for p in peers if p.closed_after is not None]
    for peer in peers:
        peer.sock.close()
    return {"connected": count, "closed": len(closed), "closed_after": closed}


def start_drippers(
    address: tuple[str, int], count: int, interval: float, duration: float
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "drip", *map(str, (*address, count, interval, duration))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the child's connects each time out at 5 s
    assert line.startswith("connected"), line
    return proc


def dripper_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["drip"]:
        host, port, count, interval, duration = sys.argv[2:7]
        outcome = drip(host, int(port), int(count), float(interval), float(duration))
        print(json.dumps(outcome), flush=True)
