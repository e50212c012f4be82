"""Worker processes: respawn, graceful reload under load, TTIN/TTOU, boot failures."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import Load, ServerProcess, address_of, ask, read_line, versioned, worker_pids

StartServer = Callable[..., ServerProcess]

APP = """
import asyncio, os, socketserver, sys, time
import sockserve

VERSION = b"{version}"

class Versioned(sockserve.LineHandler):
    def handle_line(self, line):
        if line == b"block the loop\\n":
            time.sleep(60)
        return VERSION + b" " + str(os.getpid()).encode() + b" " + line

class SlowBlocking(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            if line == b"hold\\n":  # busy until the test has seen the server stopping
                sys.stderr.write("holding a request\\n")
                deadline = time.monotonic() + 30
                while not os.path.exists("go") and time.monotonic() < deadline:
                    time.sleep(0.01)
            self.wfile.write(VERSION + b" " + line)
"""


def write_app(directory: Path, version: str) -> None:
    (directory / "app.py").write_text(textwrap.dedent(APP.format(version=version)))
    # Make sure a rewrite within the same second still looks new to the importer.
    for cached in (directory / "__pycache__").glob("app.*.pyc"):
        cached.unlink()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_app(tmp_path, "v1")
    return tmp_path


def test_killed_worker_is_replaced_while_clients_are_served(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:Versioned", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    server.wait_until(lambda: len(worker_pids(server)) == 2)
    # Both workers serve before one is killed: the count below expects a third to.
    assert server.wait_count("sockserve.server: listening on", 2, timeout=20) == 2, server.text
    victim = worker_pids(server)[0]
    load = Load(address, threads=4, check=versioned)
    try:
        load.wait_ok(20)
        os.kill(victim, signal.SIGKILL)
        server.read_until(rf"worker {victim} died \(signal SIGKILL\)", timeout=5)
        server.read_until(r"started worker", timeout=5)
        replaced = server.wait_count("sockserve.server: listening on", 3, timeout=20)
        assert replaced == 3, server.text  # the replacement serves
        load.wait_more(20)  # served after the kill
    finally:
        load.stop()
    assert len(load.failures()) <= 4, load.failures()  # at most the requests the victim held
    assert len(worker_pids(server)) == 2
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_sighup_reload_loses_no_connection_and_loads_new_code(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:Versioned", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    server.wait_until(lambda: len(worker_pids(server)) == 2)
    old = set(worker_pids(server))
    long_lived = socket.create_connection(address, timeout=5)
    long_lived.sendall(b"before\n")
    assert read_line(long_lived).startswith(b"v1 ")
    load = Load(address, threads=4, check=versioned)
    try:
        load.wait_ok(20)
        write_app(app_dir, "v2")
        server.signal(signal.SIGHUP)
        server.read_until("reload done", timeout=15)
        load.wait_more(20)
    finally:
        load.stop()
    assert load.failures() == []
    assert any(reply.startswith(b"v2 ") for reply in load.replies)
    # The connection opened before the reload was idle: its old worker ended it at once
    # (goodbye-first), and the client reconnects to the new code.
    assert read_line(long_lived) == b""
    long_lived.close()
    with socket.create_connection(address, timeout=5) as again:
        again.sendall(b"after\n")
        assert read_line(again).startswith(b"v2 ")
    server.wait_until(lambda: not old & set(worker_pids(server)))
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_ttin_and_ttou_change_the_worker_count(start_server: StartServer, app_dir: Path) -> None:
    server = start_server(
        ["run", "app:Versioned", "--workers", "1", "--reload", "--bind", "127.0.0.1:0"],
        cwd=str(app_dir),
    )
    server.wait_until(lambda: len(worker_pids(server)) == 1)
    server.signal(signal.SIGTTIN)
    server.wait_until(lambda: len(worker_pids(server)) == 2)
    server.wait_until(lambda: server.text.count("sockserve.server: listening on") == 2)
    server.signal(signal.SIGTTOU)
    server.wait_until(lambda: "stopped (exit code 0)" in server.text)
    assert len(worker_pids(server)) == 1
    # The worker that stopped left the shared socket as it was: new clients get in at once.
    with socket.create_connection(address_of(server.urls[0]), timeout=0.5):
        pass
    assert ask(address_of(server.urls[0])).endswith(b" hi\n")


def test_a_worker_whose_loop_is_blocked_is_killed_and_replaced(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        [
            *("run", "app:Versioned", "--bind", "127.0.0.1:0"),
            *("--workers", "2", "--worker-timeout", "1"),
        ],
        cwd=str(app_dir),
    )
    server.wait_until(lambda: server.text.count("sockserve.server: listening on") == 2)
    address = address_of(server.urls[0])
    with socket.create_connection(address, timeout=5) as stuck:
        stuck.sendall(b"block the loop\n")
        blocked = int(server.read_until(r"worker (\d+) unresponsive for", timeout=10).group(1))
        server.read_until(rf"worker {blocked} died \(signal SIGKILL\); starting", timeout=10)
        with contextlib.suppress(ConnectionResetError):
            assert stuck.recv(100) == b""
    server.wait_until(lambda: len(worker_pids(server)) == 2 and blocked not in worker_pids(server))
    replaced = server.wait_count("sockserve.server: listening on", 3, timeout=20)
    assert replaced == 3, server.text  # the replacement too
    assert ask(address).endswith(b" hi\n")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_workers_stopped_with_their_supervisor_are_not_killed_on_resume(
    start_server: StartServer, app_dir: Path
) -> None:
    """Ctrl-Z then fg stops and resumes every process: the workers' silence while the
    supervisor was stopped too is not a blocked loop."""
    server = start_server(
        [
            *("run", "app:Versioned", "--bind", "127.0.0.1:0"),
            *("--workers", "2", "--worker-timeout", "1"),
        ],
        cwd=str(app_dir),
    )
    server.wait_until(lambda: server.text.count("sockserve.server: listening on") == 2)
    workers = worker_pids(server)
    for pid in [server.proc.pid, *workers]:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(2)
    os.kill(server.proc.pid, signal.SIGCONT)  # the supervisor first: the harder order
    time.sleep(0.1)
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    with pytest.raises(AssertionError, match="no line matching"):
        server.read_until("unresponsive|died", timeout=1.5)
    assert worker_pids(server) == workers
    assert ask(address_of(server.urls[0])).endswith(b" hi\n")


def test_source_change_reloads_workers_with_reload_flag(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:Versioned", "--reload", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    server.wait_until(lambda: len(worker_pids(server)) == 1)
    assert ask(address).startswith(b"v1 ")
    old = worker_pids(server)[0]
    # The supervisor took its first look at the sources before it started the worker that
    # just answered; a modification time it has not seen is a change, however soon.
    write_app(app_dir, "v2")
    os.utime(app_dir / "app.py", (time.time() + 5, time.time() + 5))
    server.read_until("reload done", timeout=15)
    server.read_until(rf"worker {old} stopped", timeout=15)
    assert ask(address).startswith(b"v2 ")


def test_sigterm_stops_every_worker_and_exits_0(start_server: StartServer, app_dir: Path) -> None:
    server = start_server(
        ["run", "app:SlowBlocking", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    server.wait_until(lambda: len(worker_pids(server)) == 2)
    pids = worker_pids(server)
    sock = socket.create_connection(address, timeout=5)
    sock.sendall(b"x\n")
    assert read_line(sock) == b"v1 x\n"
    sock.sendall(b"hold\n")
    server.read_until("holding a request")
    server.signal(signal.SIGTERM)
    assert server.wait_count("stopping: finishing open connections", 2) == 2, server.text
    (app_dir / "go").touch()
    assert read_line(sock) == b"v1 hold\n"  # the request under way when it stopped
    assert read_line(sock) == b""  # then the connection is ended
    sock.close()
    assert server.wait() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_worker_boot_failure_stops_the_supervisor(app_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sockserve", "run", "app:Nope", "--workers", "2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=app_dir,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "has no attribute 'Nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_reuse_port_gives_each_worker_its_own_socket(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:Versioned", "--workers", "2", "--reuse-port", "--bind", "127.0.0.1:0"],
        cwd=str(app_dir),
    )
    address = address_of(server.urls[0])
    server.wait_until(lambda: len(worker_pids(server)) == 2)
    pids = set(worker_pids(server))
    served_by = set()
    for _ in range(200):
        served_by.add(int(ask(address).split()[1]))
        if served_by == pids:
            break
    assert served_by == pids  # the kernel spreads connections over both sockets
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    server.read_until(rf"worker {victim} died", timeout=5)
    server.read_until(r"started worker", timeout=5)
    assert ask(address).endswith(b" hi\n")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
