"""``python -m sockserve.bench`` against in-test stdlib servers; the latency histogram alone."""

from __future__ import annotations

import json
import math
import os
import pty
import selectors
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from helpers import (
    BlockingUpper,
    EchoLines,
    OneReplyThenClose,
    Silent,
    ThreadingUnixServer,
    serve_forever,
    tcp_server,
)
from sockserve.bench import LatencyHistogram

TIMEOUT = 30.0


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout)
        return data


def bench(address: str, *options: str) -> Result:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sockserve.bench", address, *options],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def assert_percentiles_ordered(summary: dict[str, Any]) -> None:
    latency = summary["latency_ms"]
    values = [latency[name] for name in ("p50", "p90", "p99", "p99.9", "max")]
    assert values == sorted(values), latency
    assert values[0] > 0


def test_uppercase_server() -> None:
    with tcp_server(BlockingUpper) as address:
        result = bench(
            address, "--connections", "4", "--duration", "1", "--expect", "upper", "--json"
        )
    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["requests"] > 0
    assert summary["errors"] == 0
    assert summary["connected"] == 4
    assert summary["throughput"] > 0
    answered = 64 * summary["requests"]  # plus at most one request in flight per connection:
    assert answered <= summary["bytes_sent"] <= answered + 4 * 64
    assert answered <= summary["bytes_received"] <= answered + 4 * 64
    assert 0.9 <= summary["duration"] < 5
    assert_percentiles_ordered(summary)
    assert "Traceback" not in result.stderr


def test_mismatches_are_errors() -> None:
    with tcp_server(EchoLines) as address:
        result = bench(address, "-c", "2", "--duration", "0.5", "--expect", "upper", "--json")
    assert result.returncode == 1
    summary = result.summary
    assert summary["errors"] > 0
    assert summary["error_counts"]["mismatch"] == summary["requests"]


def test_echo_expectation() -> None:
    with tcp_server(EchoLines) as address:
        result = bench(
            address, "-c", "2", "-n", "50", "--expect", "echo", "--size", "300", "--json"
        )
    assert result.returncode == 0, result.stderr
    assert result.summary["requests"] == 50
    assert result.summary["bytes_sent"] == 50 * 300


def test_request_count_stops_the_run() -> None:
    with tcp_server(BlockingUpper) as address:
        result = bench(
            address,
            "-c",
            "4",
            "--requests",
            "100",
            "--duration",
            "25",
            "--expect",
            "upper",
            "--json",
        )
    assert result.returncode == 0, result.stderr
    assert result.summary["requests"] == 100
    assert result.summary["errors"] == 0
    assert result.elapsed < 20


def test_pipeline() -> None:
    with tcp_server(BlockingUpper) as address:
        result = bench(
            address, "-c", "3", "--pipeline", "8", "-n", "301", "--expect", "upper", "--json"
        )
    assert result.returncode == 0, result.stderr
    assert result.summary["requests"] == 301
    assert result.summary["errors"] == 0


def test_text_summary() -> None:
    with tcp_server(BlockingUpper) as address:
        result = bench(address, "-c", "2", "-n", "20")
    assert result.returncode == 0, result.stderr
    for label in ("connections", "requests     20", "throughput", "errors       0", "p99.9"):
        assert label in result.stdout


def test_closed_port() -> None:
    with socket.socket() as sock:  # bound, read, closed: nothing else in the test binds
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = bench(f"127.0.0.1:{port}", "-c", "4", "--duration", "20", "--quiet")
    assert result.returncode == 1
    assert (
        f"sockserve bench: cannot connect to tcp://127.0.0.1:{port}: Connection refused "
        "(4 of 4 connections failed)"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.elapsed < 15  # no connection left: the run ends without waiting


def test_server_closing_connections() -> None:
    with tcp_server(OneReplyThenClose) as address:
        result = bench(address, "-c", "3", "--duration", "20", "--json")
    assert result.returncode == 1
    summary = result.summary
    assert summary["requests"] == 3
    assert summary["error_counts"]["closed"] == 3
    assert "connections lost" in result.stderr
    assert result.elapsed < 15


def test_unanswered_requests() -> None:
    with tcp_server(Silent) as address:
        result = bench(address, "-c", "2", "--duration", "1", "--timeout", "0.2", "--json")
    assert result.returncode == 1
    summary = result.summary
    assert summary["requests"] == 0
    assert summary["error_counts"]["timeout"] == 2


def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "upper.sock")
    with serve_forever(ThreadingUnixServer(path, BlockingUpper)):
        result = bench(f"unix:{path}", "-c", "2", "-n", "40", "--expect", "upper", "--json")
    assert result.returncode == 0, result.stderr
    assert result.summary["requests"] == 40


def test_abstract_unix_socket() -> None:
    name = f"sockserve-bench-test-{os.getpid()}"
    with serve_forever(ThreadingUnixServer("\0" + name, BlockingUpper)):
        result = bench(f"unix:@{name}", "-c", "2", "-n", "40", "--expect", "upper", "--json")
    assert result.returncode == 0, result.stderr
    assert result.summary["requests"] == 40


def test_asyncio_loop() -> None:
    with tcp_server(BlockingUpper) as address:
        result = bench(address, "-c", "2", "-n", "40", "--loop", "asyncio", "--expect", "upper")
    assert result.returncode == 0, result.stderr


PROGRESS_OPTIONS = ("-c", "1", "--duration", "1", "--progress-interval", "0.3")


def test_progress_lines_when_not_a_terminal() -> None:
    with tcp_server(BlockingUpper) as address:
        shown = bench(address, *PROGRESS_OPTIONS)
        quiet = bench(address, *PROGRESS_OPTIONS, "--quiet")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.splitlines()
    assert 2 <= len(lines) <= 4, lines  # about one per 0.3 s of a 1 s run
    assert all(line.startswith("sockserve bench: ") and "req/s" in line for line in lines)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def test_progress_on_a_terminal() -> None:
    master, slave = pty.openpty()
    try:
        with tcp_server(BlockingUpper) as address:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sockserve.bench", address, *PROGRESS_OPTIONS],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=slave,
                text=True,
            )
            os.close(slave)
            slave = -1
            stdout, _ = proc.communicate(timeout=TIMEOUT)
        screen = b""
        with selectors.DefaultSelector() as sel:
            sel.register(master, selectors.EVENT_READ)
            while sel.select(0):
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: nothing left, the writer is gone
                    break
                if not chunk:
                    break
                screen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    updates = screen.split(b"\r\x1b[K")
    assert updates[0] == b""
    assert updates[-1] == b""  # the last progress line is cleared at the end
    assert 2 <= len(updates) - 2 <= 4, screen  # about one per 0.3 s of a 1 s run
    assert all(b"req/s" in update for update in updates[1:-1])
    assert b"\n" not in screen
    assert "requests" in stdout


def test_ctrl_c_prints_the_summary() -> None:
    reached = threading.Event()
    lines = [0]

    class Upper(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                lines[0] += 1
                if lines[0] >= 3:  # closed loop: a second request means a reply arrived
                    reached.set()
                self.wfile.write(line.upper())

    with tcp_server(Upper) as address:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sockserve.bench", address, "-c", "2", "-d", "25", "--json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert reached.wait(TIMEOUT)
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    assert summary["requests"] > 0


def test_bad_addresses() -> None:
    for address in ("nonsense", "udp://127.0.0.1:9", "fd://3"):
        result = bench(address)
        assert result.returncode == 2, address
        assert result.stderr.startswith("sockserve bench: error:"), result.stderr
        assert "Traceback" not in result.stderr


def test_histogram_empty() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(50) == 0
    assert histogram.max == 0


def test_histogram_small_values_are_exact() -> None:
    histogram = LatencyHistogram()
    for value in range(1, 101):
        histogram.record(value)
    assert histogram.percentile(50) == 50
    assert histogram.percentile(99) == 99
    assert histogram.percentile(100) == 100
    assert histogram.max == 100


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=200))
def test_histogram_percentiles_within_bucket_error(values: list[int]) -> None:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    assert histogram.max == ordered[-1]
    previous = 0
    for p in (0.1, 50, 90, 99, 99.9, 100):
        exact = ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]
        reported = histogram.percentile(p)
        assert exact <= reported <= exact + exact / 64 + 1, (p, exact, reported)
        assert reported >= previous
        previous = reported
