"""Stopping always ends the process: a failing or wedged stop path, stuck handler threads,
Ctrl-C twice; other signals are logged, never fatal; the metrics endpoint is capped."""

from __future__ import annotations

import signal
import socket
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import ServerProcess, address_of, ask, open_fds, read_line, wait_exit, wait_for

StartServer = Callable[..., ServerProcess]

APP = """
import asyncio, socketserver, threading
import sockserve, sockserve.server

class Echo(sockserve.LineHandler):
    def handle_line(self, line):
        return line

class Stuck(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"stuck\\n")
        threading.Event().wait()  # never returns, whatever happens to the socket

{patch}
"""

BROKEN_STOP = """
async def shutdown(self, timeout=None):
    raise RuntimeError("broken stop path")

sockserve.server.Server.shutdown = shutdown
"""

WEDGED_STOP = """
async def shutdown(self, timeout=None):
    await asyncio.Event().wait()  # never finishes

sockserve.server.Server.shutdown = shutdown
sockserve.server.Server.abort = lambda self: None
"""

FAILS_AFTER_THE_STOP = """
import sockserve.runner

serve_until_stopped = sockserve.runner.run_server

def run_server(*args, **kwargs):
    serve_until_stopped(*args, **kwargs)
    raise RuntimeError("failed after the stop")

sockserve.runner.run_server = run_server
"""


def write_app(directory: Path, patch: str = "") -> None:
    (directory / "app.py").write_text(textwrap.dedent(APP.format(patch=patch)))


def test_an_exception_while_stopping_is_logged_and_exits_1(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_app(tmp_path, BROKEN_STOP)
    server = start_server(["run", "app:Echo", "--bind", "127.0.0.1:0"], cwd=str(tmp_path))
    assert ask(address_of(server.urls[0])) == b"hi\n"
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 1
    assert "stopping failed: RuntimeError: broken stop path" in server.text


def test_a_second_ctrl_c_stops_at_once_even_when_the_stop_is_wedged(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_app(tmp_path, WEDGED_STOP)
    server = start_server(["run", "app:Echo", "--bind", "127.0.0.1:0"], cwd=str(tmp_path))
    server.signal(signal.SIGINT)
    server.read_until(r"stopping: finishing open connections .*; Ctrl-C again stops at once")
    server.signal(signal.SIGINT)
    started = time.monotonic()
    wait_exit(server, timeout=10)
    print(f"FIGURES second Ctrl-C: exited {time.monotonic() - started:.2f} s after it")
    assert "stopping now" in server.text


STUCK_ARGS = ["run", "app:Stuck", "--bind", "127.0.0.1:0", "--graceful-timeout", "0.5"]


def stop_while_stuck(server: ServerProcess) -> float:
    """Get a handler stuck on a connection, then SIGTERM the server; when it was sent."""
    with socket.create_connection(address_of(server.urls[0]), timeout=5) as sock:
        sock.sendall(b"x\n")
        assert read_line(sock) == b"stuck\n"
        server.signal(signal.SIGTERM)
        return time.monotonic()


def test_a_stuck_blocking_handler_does_not_keep_the_process_alive(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_app(tmp_path)
    server = start_server(STUCK_ARGS, cwd=str(tmp_path))
    started = stop_while_stuck(server)
    assert wait_exit(server, timeout=20) == 0
    print(f"FIGURES stuck handler: exited {time.monotonic() - started:.2f} s after SIGTERM")
    assert "handler thread(s) still running past the graceful timeout" in server.text


def test_a_failure_with_a_stuck_blocking_handler_is_logged_and_exits_1(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The exit that does not wait for the stuck thread keeps the failure and its status."""
    write_app(tmp_path, FAILS_AFTER_THE_STOP)
    server = start_server(STUCK_ARGS, cwd=str(tmp_path))
    stop_while_stuck(server)
    assert wait_exit(server, timeout=20) == 1
    assert "serving failed" in server.text
    assert "RuntimeError: failed after the stop" in server.text


def test_ctrl_c_says_a_second_one_stops_at_once_with_workers(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_app(tmp_path)
    server = start_server(
        ["run", "app:Echo", "--bind", "127.0.0.1:0", "--workers", "2"], cwd=str(tmp_path)
    )
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    server.signal(signal.SIGINT)
    server.read_until(r"SIGINT: stopping 2 worker\(s\) gracefully .*; Ctrl-C again stops at once")
    assert wait_exit(server) == 0


def test_sighup_without_tls_and_sigusr1_are_logged_and_harmless(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_app(tmp_path)
    server = start_server(["run", "app:Echo", "--bind", "127.0.0.1:0"], cwd=str(tmp_path))
    server.signal(signal.SIGHUP)
    server.read_until(r"SIGHUP: nothing to reload \(no TLS certificate")
    server.signal(signal.SIGUSR1)
    server.read_until("SIGUSR1: ignored")
    assert ask(address_of(server.urls[0])) == b"hi\n"
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_idle_metrics_connections_are_capped_and_timed_out(
    start_server: StartServer, tmp_path: Path, workers: str
) -> None:
    """Idle scrapers hold at most a handful of descriptors per process, the main
    listener keeps answering, and the idle ones are closed after a few seconds."""
    pytest.importorskip("prometheus_client")
    write_app(tmp_path)
    server = start_server(
        [
            *("run", "app:Echo", "--bind", "127.0.0.1:0", "--workers", workers),
            *("--metrics", "127.0.0.1:0"),
        ],
        cwd=str(tmp_path),
    )
    metrics = server.read_until(r"metrics listening on http://([\d.]+):(\d+)/metrics")
    metrics_address = (metrics.group(1), int(metrics.group(2)))
    wait_for(lambda: server.text.count("sockserve.server: listening on") == int(workers), server)
    pids = [server.proc.pid] if workers == "1" else _children(server.proc.pid)
    before = sum(open_fds(pid) for pid in pids)
    idle = [socket.create_connection(metrics_address, timeout=10) for _ in range(60)]
    try:
        assert ask(address_of(server.urls[0])) == b"hi\n"
        time.sleep(0.5)  # let the server accept whatever it is going to
        held = sum(open_fds(pid) for pid in pids) - before
        print(f"FIGURES metrics cap: 60 idle scrapers hold {held} descriptors")
        assert held <= 8 * len(pids) + 2
        started = time.monotonic()
        assert idle[0].recv(10) == b""  # timed out by the server
        assert time.monotonic() - started < 8
    finally:
        for sock in idle:
            sock.close()
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_a_second_sigint_stops_workers_at_once(start_server: StartServer, tmp_path: Path) -> None:
    """The first SIGINT reaches the workers as SIGTERM (a terminal's Ctrl-C also reaches
    them directly), the second as SIGINT: a worker already stopping then stops at once,
    by itself rather than by the supervisor's SIGKILL."""
    write_app(tmp_path)
    server = start_server(
        ["run", "app:Echo", "--bind", "127.0.0.1:0", "--workers", "2"], cwd=str(tmp_path)
    )
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    with socket.create_connection(address_of(server.urls[0]), timeout=5) as held:
        held.sendall(b"hi\n")
        assert read_line(held) == b"hi\n"
        server.signal(signal.SIGINT)
        server.read_until("Ctrl-C again stops at once")
        server.read_until("stopping: finishing open connections")
        server.signal(signal.SIGINT)
        started = time.monotonic()
        assert wait_exit(server, timeout=10) == 0
    assert time.monotonic() - started < 2
    assert "did not stop in time" not in server.text
