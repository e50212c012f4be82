"""Smoke tests of the benchmark suite: the C load generator and a tiny harness run."""

from __future__ import annotations

import json
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ServerProcess, address_of, require_program

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "loadgen.c"


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The load generator, compiled warning-free (-Wall -Wextra -Werror)."""
    cc = require_program("cc")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)],
        check=True,
        timeout=60,
    )
    return binary


@pytest.fixture
def raw_server() -> Iterator[tuple[int, int]]:
    """benchmarks/servers/raw_asyncio.py on port 0: (port, pid); stopped in teardown."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.servers.raw_asyncio", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(15), "the server printed nothing in 15 s"
            line = proc.stdout.readline().decode()
        match = re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield int(match.group(1)), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def run_loadgen(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_tcp_closed_loop(loadgen: Path, raw_server: tuple[int, int]) -> None:
    port, pid = raw_server
    done = run_loadgen(
        loadgen, "tcp", "--port", str(port), "--conns", "8", "--size", "64",
        "--duration", "1", "--cpu-pid", str(pid),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"] > 0
    assert summary["errors"] == summary["mismatches"] == summary["resets"] == 0
    assert summary["connected"] == 8
    assert 0 < summary["p50_us"] <= summary["p99_us"] <= summary["p999_us"]
    assert summary["server_cpu_s"] >= 0
    assert summary["seconds"] < 5


def test_burst(loadgen: Path, raw_server: tuple[int, int]) -> None:
    port, _ = raw_server
    done = run_loadgen(loadgen, "burst", "--port", str(port), "--conns", "50", "--size", "100")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["served"] == 50
    assert summary["errors"] == summary["timeouts"] == 0
    assert 0 < summary["all_served_s"] < 5


@pytest.mark.parametrize("module", ["raw_asyncio", "asyncio_streams"])
def test_reference_server_stops_on_sigterm_with_a_client_connected(module: str) -> None:
    """On Python 3.12+ ``async with server`` waits for every client to leave: the
    reference servers must stop on SIGTERM all the same."""
    server = ServerProcess(
        [sys.executable, "-m", f"benchmarks.servers.{module}", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert server.proc.stdout is not None
        line = server.proc.stdout.readline().decode()  # bounded by the test timeout
        match = re.search(r"listening on (tcp://\S+)", line)
        assert match, line
        with socket.create_connection(address_of(match.group(1)), timeout=5) as client:
            client.sendall(b"still here\n")
            assert client.recv(100) == b"STILL HERE\n"
            server.signal(signal.SIGTERM)
            assert server.wait(10) == 0
    finally:
        server.stop()


def test_refuses_non_loopback(loadgen: Path) -> None:
    for host in ("10.0.0.1", "192.168.1.1", "localhost", "0.0.0.0"):
        done = run_loadgen(loadgen, "tcp", "--host", host, "--port", "9", "--duration", "0.1")
        assert done.returncode == 2
        assert "refusing" in done.stderr
        assert done.stdout == ""


def test_harness_quick(tmp_path: Path) -> None:
    require_program("cc")
    output = tmp_path / "bench.md"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
            "--duration", "0.5", "--repeat", "1", "--only", "raw",
            "--output", str(output), "--results", str(tmp_path / "results"),
        ],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 50
    text = output.read_text()
    assert "## tcp-c64-s64" in text
    assert "## udp-c32-s64" in text
    assert "| raw-uvloop |" in text
    assert "| raw-udp-asyncio |" in text
    (results,) = (tmp_path / "results").glob("*.json")
    data = json.loads(results.read_text())
    for point in data["runs"].values():
        for runs in point.values():
            assert runs, data["notes"]
            assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs)
