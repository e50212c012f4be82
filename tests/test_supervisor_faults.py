"""The supervisor survives what its workers and the system do to it: workers killed by
unnamed signals, handler imports that hang, descriptors running out."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    NotifySocket,
    ServerProcess,
    address_of,
    ask,
    child_pids,
    sockserve_argv,
    wait_for,
    worker_pids,
)

StartServer = Callable[..., ServerProcess]
Spawn = Callable[..., ServerProcess]

APP = """
import sockserve

class App(sockserve.LineHandler):
    def handle_line(self, line):
        return line
"""

HANGS = """
import sys, time
print("importing app", file=sys.stderr, flush=True)
time.sleep(60)
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def test_a_worker_killed_by_a_signal_without_a_name_is_replaced(
    start_server: StartServer, app_dir: Path
) -> None:
    notify = NotifySocket(f"@sockserve-test-unnamed-{os.getpid()}")
    with contextlib.closing(notify):
        server = start_server(
            ["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"],
            cwd=str(app_dir),
            env=notify.env,
        )
        # READY=1 once a worker has told the supervisor it serves: a worker that dies
        # before any has is a failed start, not a crash to replace.
        assert notify.receive()[0]["READY"] == "1"
    address = address_of(server.urls[0])
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    victim = worker_pids(server)[0]
    unnamed = signal.SIGRTMIN + 6
    with pytest.raises(ValueError):
        signal.Signals(unnamed)
    os.kill(victim, unnamed)
    server.read_until(rf"worker {victim} died \(signal {int(unnamed)}\)")
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 3, server)
    assert ask(address) == b"hi\n"
    assert victim not in worker_pids(server)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@pytest.mark.parametrize("to", ["supervisor", "check", "both"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_handler_import_that_hangs_at_start_can_be_stopped(
    spawn: Spawn, app_dir: Path, to: str, signum: signal.Signals
) -> None:
    """The handler is checked in a child before any worker starts: TERM or INT to the
    supervisor, to that child or to both (the process group) ends the start at once."""
    (app_dir / "app.py").write_text(HANGS + APP)
    server = spawn(
        sockserve_argv(["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"]),
        cwd=str(app_dir),
        new_session=True,
    )
    server.read_until("importing app")
    (check,) = child_pids(server.pid)
    if to == "check":
        os.kill(check, signum)
    elif to == "supervisor":
        server.signal(signum)
    else:  # as Ctrl-C or a service manager's stop does: one signal to the whole group
        os.killpg(server.pid, signum)
    started = time.monotonic()
    code = server.wait(timeout=10)
    assert time.monotonic() - started < 10
    if to == "check":
        assert code == 2, server.text
        assert f"importing 'app:App' was stopped: signal {signum.name}" in server.text
    else:
        assert code == 0, server.text
        assert "stopped while the handler was being checked" in server.text
    assert "started worker" not in server.text
    with pytest.raises(ProcessLookupError):
        os.kill(check, 0)


FAILING_FORK = """
import sockserve.worker
from sockserve.runner import serve

def fail(self):
    raise RuntimeError("no signals for you")

sockserve.worker.Worker.catch_signals = fail
serve("app:App", workers=2, bind=["127.0.0.1:0"])
"""


def test_a_child_that_fails_before_it_serves_exits_and_never_acts_as_supervisor(
    spawn: Spawn, app_dir: Path
) -> None:
    server = spawn([sys.executable, "-c", FAILING_FORK], cwd=str(app_dir))
    assert server.wait(timeout=20) == 2
    pid = int(server.wait_for(r"worker (\d+) could not start: exit code 3; stopping").group(1))
    assert re.search(
        rf"worker {pid} could not start\n.*RuntimeError: no signals", server.text, re.S
    )
    assert server.count("supervisor stopped") == 1, server.text


def socket_inodes(pid: int) -> set[str]:
    """The sockets ``pid`` holds open, as ``socket:[INODE]``."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


def test_workers_share_only_the_listening_socket_with_the_supervisor(
    start_server: StartServer, app_dir: Path
) -> None:
    """Not the supervisor's signal wake pair: a worker holding its ends keeps them alive."""
    server = start_server(
        ["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    supervisor = socket_inodes(server.pid)
    for worker in worker_pids(server):
        assert len(socket_inodes(worker) & supervisor) == 1  # the listener


HANGS_IN_WORKERS = """
import os, sys, time
if os.path.exists("imported"):  # the check at start imports it first, and goes on
    print("worker importing app", file=sys.stderr, flush=True)
    time.sleep(60)
open("imported", "w").close()
"""


def test_a_worker_whose_import_hangs_is_killed_after_the_worker_timeout(
    spawn: Spawn, app_dir: Path
) -> None:
    """At the first start, a worker that never serves is a boot failure: exit 2."""
    (app_dir / "app.py").write_text(HANGS_IN_WORKERS + APP)
    args = ["run", "app:App", "--workers", "2", "--worker-timeout", "1", "--bind", "127.0.0.1:0"]
    server = spawn(sockserve_argv(args), cwd=str(app_dir))
    server.read_until("worker importing app")
    assert server.wait(timeout=15) == 2
    server.wait_for(r"worker (\d+) not serving [\d.]+ s after it started \(--worker-timeout\)")
    server.wait_for(r"worker \d+ could not start: not serving [\d.]+ s after it started; stopping")


def test_a_worker_that_cannot_be_started_is_retried_and_the_others_serve_on(
    start_server: StartServer, app_dir: Path
) -> None:
    """Out of descriptors (RLIMIT_NOFILE 16): SIGTTIN asks for workers the supervisor
    cannot start; it says why, backs off that slot and serves on."""
    server = start_server(
        ["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"],
        cwd=str(app_dir),
        nofile=16,
    )
    address = address_of(server.urls[0])
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    for workers in range(3, 12):  # one at a time: signals sent together merge into one
        server.signal(signal.SIGTTIN)
        server.wait_for(rf"SIGTTIN: {workers} worker\(s\)")
        if server.count("cannot start a worker"):
            break
    server.wait_for(r"cannot start a worker: \[Errno 24\] Too many open files")
    assert ask(address) == b"hi\n"
    assert "Traceback" not in server.text
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
