"""``sockserve bench ADDRESS``: a load generator for line protocols, or any framing.

Each of ``--connections`` connections sends a line (with ``--framing``, a message),
reads one reply, and sends the next, keeping ``--pipeline`` requests in flight.
Latencies go into a log-bucket histogram (bounded memory however long the run), the
run stops by itself at ``--duration`` or ``--requests``, and only the given address is
ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

from sockserve.bench_report import (
    LatencyHistogram,
    Results,
    format_summary,
    summary,
)
from sockserve.binding import FdAddress, TCPAddress, UDPAddress, UnixAddress, parse_address
from sockserve.dialing import describe, error_text, framing_of, positive
from sockserve.framing import (
    FRAMING_SPECS,
    FixedSize,
    Framer,
    Framing,
    ProtocolError,
)
from sockserve.process import new_event_loop, raise_open_file_limit
from sockserve.settings import SettingsError

__all__ = ["LatencyHistogram", "add_arguments", "run"]

PROG = "sockserve bench"
MAX_REPLY = 1 << 20  # a reply line longer than this is a broken server, not a slow one
CONNECTS_AT_ONCE = 256  # more would overflow the server's backlog and time out in SYN retries
PAD = b"abcdefghijklmnopqrstuvwxyz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sockserve bench``."""
    parser.description = (
        "Load a line-protocol server: each connection sends a line of --size bytes and "
        "reads one reply line, keeping --pipeline requests in flight. Stops at --duration "
        "or after --requests, whichever comes first, and prints throughput, errors and "
        "latency percentiles. Exit status 0 when every request got a (matching) reply, "
        "1 on any error (connect failures, closed connections, mismatches, unanswered "
        "requests), 130 when stopped with Ctrl-C."
    )
    parser.epilog = "ADDRESS: HOST:PORT, tcp://HOST:PORT, [V6]:PORT, unix:/PATH or unix:@NAME."
    parser.add_argument("address", metavar="ADDRESS", help="where the server listens")
    parser.add_argument(
        "-c",
        "--connections",
        type=positive(int),
        default=64,
        metavar="N",
        help="concurrent connections (default 64)",
    )
    parser.add_argument(
        "-s",
        "--size",
        type=_at_least(2),
        default=64,
        metavar="BYTES",
        help="request line length, newline included; with --framing, the payload's"
        " length (default 64)",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=positive(float),
        default=10.0,
        metavar="SECONDS",
        help="stop after this long (default 10)",
    )
    parser.add_argument(
        "-n",
        "--requests",
        type=positive(int),
        default=None,
        metavar="N",
        help="stop after N requests in all (default: no limit but --duration)",
    )
    parser.add_argument(
        "-p",
        "--pipeline",
        type=positive(int),
        default=1,
        metavar="K",
        help="requests in flight per connection (default 1)",
    )
    parser.add_argument(
        "--expect",
        choices=("upper", "echo", "none"),
        default="none",
        help="check each reply: the request uppercased, echoed, or any line (default none)",
    )
    parser.add_argument(
        "--timeout",
        type=positive(float),
        default=5.0,
        metavar="SECONDS",
        help="connect timeout; a request still unanswered this long at the end is an "
        "error (default 5)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop when importable (auto, the default)",
    )
    parser.add_argument(
        "--progress-interval",
        type=positive(float),
        default=None,
        metavar="SECONDS",
        help="progress on stderr this often (default 1 on a terminal, else 5)",
    )
    parser.add_argument(
        "--framing",
        default="line",
        metavar="SPEC",
        help=f"how requests and replies travel: {FRAMING_SPECS} (default line)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _at_least(minimum: int) -> Any:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    return convert


@dataclass
class Options:
    url: str
    connect_to: tuple[str, int] | str  # (host, port) or a Unix socket address
    connections: int
    size: int
    duration: float
    requests: int | None
    pipeline: int
    expect: str
    timeout: float
    progress: str  # "tty", "lines" or "none"
    progress_interval: float
    framing: Framing | None = None  # None: lines
    framing_name: str = "line"


class _Connection(asyncio.Protocol):
    """One client connection: requests out, reply lines in, all in callbacks."""

    def __init__(self, bench: _Bench, index: int) -> None:
        self.bench = bench
        self.prefix = f"{index:x}-".encode()
        self.seq = 0
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_flight: collections.deque[tuple[int, bytes | None]] = collections.deque()
        self.lost = False
        framing = bench.options.framing
        self.framer: Framer | None = None if framing is None else framing.framer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        for _ in range(self.bench.options.pipeline):
            self._send()

    def _send(self) -> None:
        bench = self.bench
        if not bench.take_request():
            return
        self.seq += 1
        framing = bench.options.framing
        size = bench.options.size if framing is not None else bench.options.size - 1
        body = (self.prefix + b"%x-" % self.seq + PAD * (size // 26 + 1))[:size]
        wire = body + b"\n" if framing is None else framing.encode(body)
        expected = bench.expected(body)
        self.in_flight.append((time.perf_counter_ns(), expected))
        assert self.transport is not None
        self.transport.write(wire)
        bench.results.bytes_sent += len(wire)

    def data_received(self, data: bytes) -> None:
        bench = self.bench
        bench.results.bytes_received += len(data)
        if self.framer is not None:
            self._messages_received(data)
            return
        buffer = self.buffer
        start = len(buffer)
        buffer += data
        begin = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            self._reply(bytes(buffer[begin:end]))
            begin = start = end + 1
        del buffer[:begin]
        if len(buffer) > MAX_REPLY:
            bench.close_reason(f"reply line longer than {MAX_REPLY} bytes")
            bench.results.errors.closed += 1
            self.lost = True
            assert self.transport is not None
            self.transport.abort()

    def _messages_received(self, data: bytes) -> None:
        framer = self.framer
        assert framer is not None
        framer.feed(data)
        try:
            while (message := framer.next_message()) is not None:
                self._reply(message)
        except ProtocolError as exc:
            self.bench.close_reason(f"bad reply: {exc}")
            self.bench.results.errors.closed += 1
            self.lost = True
            assert self.transport is not None
            self.transport.abort()

    def _reply(self, line: bytes) -> None:
        now = time.perf_counter_ns()
        bench = self.bench
        if not self.in_flight:
            bench.results.errors.unexpected += 1
            return
        sent, expected = self.in_flight.popleft()
        bench.in_flight -= 1
        bench.results.latency.record(now - sent)
        bench.results.requests += 1
        if expected is not None and line.rstrip(b"\r") != expected:
            bench.results.errors.mismatch += 1
        if not bench.stopping:
            self._send()
            bench.check_done()

    def connection_lost(self, exc: Exception | None) -> None:
        bench = self.bench
        bench.in_flight -= len(self.in_flight)
        if not bench.stopping and not self.lost:
            bench.results.errors.closed += 1
            bench.close_reason(str(exc) if exc else "server closed the connection")
        self.lost = True
        bench.connection_gone(self)


class _Bench:
    """The run: opens connections, hands out the request budget, decides when to stop."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.results = Results(options.connections)
        self.issued = 0
        self.in_flight = 0
        self.stopping = False
        self.open: set[_Connection] = set()
        self.pending_connects = options.connections
        self.done = asyncio.Event()
        self.start = 0.0

    def take_request(self) -> bool:
        """One request from the budget, or False when the run should send no more."""
        limit = self.options.requests
        if self.stopping or (limit is not None and self.issued >= limit):
            return False
        self.issued += 1
        self.in_flight += 1
        return True

    def expected(self, body: bytes) -> bytes | None:
        if self.options.expect == "upper":
            return body.upper()
        if self.options.expect == "echo":
            return body
        return None

    def check_done(self) -> None:
        limit = self.options.requests
        if limit is not None and self.issued >= limit and self.in_flight <= 0:
            self.stop()
        elif self.pending_connects == 0 and not self.open:
            self.stop()  # every connection failed or was closed: nothing left to measure

    def stop(self) -> None:
        self.done.set()

    def close_reason(self, reason: str) -> None:
        if self.results.first_close_reason is None:
            self.results.first_close_reason = reason

    def connection_gone(self, connection: _Connection) -> None:
        self.open.discard(connection)
        if not self.stopping:
            self.check_done()

    async def _connect_unix(
        self, path: str, index: int
    ) -> tuple[asyncio.BaseTransport, _Connection]:
        """Connect our own socket: uvloop takes no abstract name (NUL-led) as a path."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
            return await loop.create_unix_connection(lambda: _Connection(self, index), sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _connect(self, index: int, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        options = self.options
        try:
            async with gate:
                if self.stopping:
                    return
                target = options.connect_to
                if isinstance(target, str):
                    coro = self._connect_unix(target, index)
                else:
                    coro = loop.create_connection(lambda: _Connection(self, index), *target)
                _, protocol = await asyncio.wait_for(coro, options.timeout)
            self.results.connected += 1
            if protocol.lost:  # closed before we got here
                return
            self.open.add(protocol)
        except (OSError, asyncio.TimeoutError) as exc:
            self.results.errors.connect += 1
            if self.results.first_connect_error is None:
                self.results.first_connect_error = error_text(exc)
        finally:
            self.pending_connects -= 1
            if not self.stopping:
                self.check_done()

    async def _progress(self) -> None:
        mode = self.options.progress
        interval = self.options.progress_interval
        while True:
            await asyncio.sleep(interval)
            elapsed = time.monotonic() - self.start
            results = self.results
            line = (
                f"{elapsed:5.1f} s  {results.requests / elapsed:10.0f} req/s  "
                f"{results.requests} requests  {results.errors.total} errors  "
                f"{len(self.open)} connections"
            )
            if mode == "tty":
                sys.stderr.write(f"\r\033[K{line}")
            else:
                sys.stderr.write(f"{PROG}: {line}\n")
            sys.stderr.flush()

    async def run(self) -> Results:
        loop = asyncio.get_running_loop()
        self.start = time.monotonic()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        stopper = loop.call_later(self.options.duration, self.stop)
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
        connects = [
            asyncio.ensure_future(self._connect(i, gate)) for i in range(self.options.connections)
        ]
        progress = (
            asyncio.ensure_future(self._progress()) if self.options.progress != "none" else None
        )
        try:
            await self.done.wait()
        finally:
            self.stopping = True
            self.results.elapsed = time.monotonic() - self.start
            stopper.cancel()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
            tasks = [*connects, *([progress] if progress else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._count_unanswered()
            for connection in list(self.open):
                assert connection.transport is not None
                connection.transport.abort()
            for _ in range(2):  # aborted transports close their sockets in a callback
                await asyncio.sleep(0)
            if self.options.progress == "tty":
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
        return self.results

    def _interrupt(self) -> None:
        self.results.interrupted = True
        self.stop()

    def _count_unanswered(self) -> None:
        """Requests in flight for longer than --timeout when the run ended are errors."""
        oldest = time.perf_counter_ns() - int(self.options.timeout * 1e9)
        for connection in self.open:
            self.results.errors.timeout += sum(
                1 for sent, _ in connection.in_flight if sent < oldest
            )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every request got a good reply, 1 otherwise, 130 on Ctrl-C."""
    try:
        address = parse_address(args.address)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    connect_to: tuple[str, int] | str
    if isinstance(address, TCPAddress):
        connect_to = (address.host or "localhost", address.port)
    elif isinstance(address, UnixAddress) and not address.datagram:
        connect_to = address.sockaddr
    else:
        kind = "fd://" if isinstance(address, FdAddress) else "datagram"
        if isinstance(address, UDPAddress):
            kind = "udp://"
        print(
            f"{PROG}: error: {kind} addresses are not supported; "
            "give a stream address (tcp or unix)",
            file=sys.stderr,
        )
        return 2
    try:
        framing = framing_of(args.framing)
    except ValueError as exc:
        print(f"{PROG}: error: --framing: {exc}", file=sys.stderr)
        return 2
    if isinstance(framing, FixedSize) and args.size != framing.max_size:
        print(
            f"{PROG}: error: --size must be {framing.max_size} with --framing {args.framing}",
            file=sys.stderr,
        )
        return 2
    if framing is not None and args.size > framing.max_size:
        print(
            f"{PROG}: error: --size {args.size} is over what {framing!r} carries", file=sys.stderr
        )
        return 2
    url = describe(address)
    progress = "none" if args.quiet else ("tty" if sys.stderr.isatty() else "lines")
    options = Options(
        url=url,
        connect_to=connect_to,
        connections=args.connections,
        size=args.size,
        duration=args.duration,
        requests=args.requests,
        pipeline=args.pipeline,
        expect=args.expect,
        timeout=args.timeout,
        progress=progress,
        progress_interval=args.progress_interval or (1.0 if progress == "tty" else 5.0),
        framing=framing,
        framing_name=args.framing.strip().lower(),
    )
    try:
        loop = new_event_loop(args.loop)
    except SettingsError:
        print(f"{PROG}: error: --loop uvloop: uvloop is not installed", file=sys.stderr)
        return 2
    raise_open_file_limit()  # a descriptor per connection
    try:
        results = loop.run_until_complete(_run(options))
    except KeyboardInterrupt:  # before the loop's own SIGINT handler was in place
        return 130
    finally:
        loop.close()
    data = summary(results, options)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(format_summary(data))
    if results.first_connect_error:
        print(
            f"{PROG}: cannot connect to {url}: {results.first_connect_error} "
            f"({results.errors.connect} of {options.connections} connections failed)",
            file=sys.stderr,
        )
    if results.first_close_reason:
        print(
            f"{PROG}: {results.errors.closed} connections lost, the first: "
            f"{results.first_close_reason}",
            file=sys.stderr,
        )
    if results.interrupted:
        return 130
    if results.requests == 0 and not results.errors.total:
        print(f"{PROG}: no request got a reply", file=sys.stderr)
        return 1
    return 1 if results.errors.total else 0


async def _run(options: Options) -> Results:
    return await _Bench(options).run()


def main() -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
