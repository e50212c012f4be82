"""Workers whose code fails: reloads that fail end at once, boot errors stop, back-off
per worker slot, and workers stopped while they start still serve what they accepted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    Load,
    ServerProcess,
    address_of,
    ask,
    read_line,
    versioned,
    wait_for,
    worker_pids,
)

StartServer = Callable[..., ServerProcess]

APP = """
import os, time
import sockserve

VERSION = b"{version}"
time.sleep({import_delay})

class App(sockserve.LineHandler):
    def handle_line(self, line):
        if line == b"crash\\n":
            os._exit(7)
        return VERSION + b" " + str(os.getpid()).encode() + b" " + line
"""
BROKEN = "\nthis is not python(\n"
SYNTAX_ERROR = re.escape("SyntaxError: '(' was never closed (app.py, line ") + r"\d+\)"


def write_app(directory: Path, version: str, extra: str = "", import_delay: float = 0) -> None:
    """Write app.py with a modification time later than any before (the reloader and the
    importer compare times)."""
    path = directory / "app.py"
    before = path.stat().st_mtime if path.exists() else 0.0
    path.write_text(textwrap.dedent(APP.format(version=version, import_delay=import_delay)) + extra)
    stamp = max(time.time(), before + 2)
    os.utime(path, (stamp, stamp))
    for cached in (directory / "__pycache__").glob("app.*.pyc"):
        cached.unlink()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    write_app(tmp_path, "v1")
    return tmp_path


def run_cli(args: list[str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sockserve", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (BROKEN, SYNTAX_ERROR),
        ("\nraise RuntimeError('boom')\n", r"RuntimeError: boom \(app\.py, line \d+\)"),
    ],
    ids=["syntax-error", "raises"],
)
def test_a_reload_whose_code_fails_to_import_ends_at_once(
    start_server: StartServer, app_dir: Path, extra: str, expected: str
) -> None:
    server = start_server(
        ["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    write_app(app_dir, "v2", extra)
    server.signal(signal.SIGHUP)
    started = time.monotonic()
    line = server.read_until(r"reload failed: .*", timeout=15).group(0)
    assert re.fullmatch(
        rf"reload failed: importing 'app' failed: {expected}; keeping the old workers", line
    ), line
    assert time.monotonic() - started < 10  # not the 60 s reload timeout
    assert "Traceback" not in server.text
    assert ask(address).startswith(b"v1 ")
    # The next SIGHUP is acted on, not refused as "already under way".
    write_app(app_dir, "v3")
    server.signal(signal.SIGHUP)
    server.read_until("reload done", timeout=15)
    assert "already under way" not in server.text
    wait_for(lambda: ask(address).startswith(b"v3 "), server)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_reload_flag_loads_a_typo_fixed_seconds_later(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(["run", "app:App", "--reload", "--bind", "127.0.0.1:0"], cwd=str(app_dir))
    address = address_of(server.urls[0])
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 1, server)
    write_app(app_dir, "v2", BROKEN)
    server.read_until(r"source change: starting", timeout=10)
    server.read_until(rf"reload failed: importing 'app' failed: {SYNTAX_ERROR}", timeout=10)
    assert ask(address).startswith(b"v1 ")
    write_app(app_dir, "v2")  # the typo fixed
    server.read_until("reload done", timeout=15)
    wait_for(lambda: ask(address).startswith(b"v2 "), server)


def test_reload_watches_the_handler_modules_not_the_whole_directory(
    start_server: StartServer, app_dir: Path
) -> None:
    unrelated = app_dir / "docs" / "conf"
    unrelated.mkdir(parents=True)
    (unrelated / "conf.py").write_text("x = 1\n")
    server = start_server(["run", "app:App", "--reload", "--bind", "127.0.0.1:0"], cwd=str(app_dir))
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 1, server)
    stamp = time.time() + 5
    os.utime(unrelated / "conf.py", (stamp, stamp))
    with pytest.raises(AssertionError, match="no line matching"):
        server.read_until("source change", timeout=2.5)  # two scans and more
    write_app(app_dir, "v2")
    server.read_until("source change: starting", timeout=10)
    server.read_until("reload done", timeout=15)


def test_import_error_is_one_line_and_debug_shows_the_traceback(app_dir: Path) -> None:
    write_app(app_dir, "v1", BROKEN)
    for workers in ("1", "2"):
        result = run_cli(["run", "app:App", "--workers", workers, "--bind", "127.0.0.1:0"], app_dir)
        assert result.returncode == 2, result.stderr
        assert re.fullmatch(
            rf"sockserve: error: importing 'app' failed: {SYNTAX_ERROR}\n", result.stderr
        ), result.stderr
    debug = run_cli(["run", "app:App", "--bind", "127.0.0.1:0", "--log-level", "debug"], app_dir)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr
    assert re.search(rf"importing 'app' failed: {SYNTAX_ERROR}\n$", debug.stderr), debug.stderr


def test_a_missing_dependency_is_named_in_one_line(app_dir: Path) -> None:
    (app_dir / "app.py").write_text("import sockserve\nimport no_such_dependency_here\n")
    result = run_cli(["run", "app:App", "--bind", "127.0.0.1:0"], app_dir)
    assert result.returncode == 2
    assert result.stderr == (
        "sockserve: error: importing 'app' failed: ModuleNotFoundError: No module named"
        " 'no_such_dependency_here' (app.py, line 2)\n"
    )


def test_a_datagram_handler_on_a_tcp_listener_fails_at_start_with_workers(
    app_dir: Path,
) -> None:
    (app_dir / "dgram.py").write_text(
        "import sockserve\n\n"
        "class Echo(sockserve.DatagramHandler):\n"
        "    def handle_datagram(self, data, address):\n"
        "        return data\n"
    )
    result = run_cli(["run", "dgram:Echo", "--workers", "2", "--bind", "127.0.0.1:0"], app_dir)
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(
        r"sockserve: error: a datagram handler cannot serve stream listener"
        r" tcp://127\.0\.0\.1:\d+\n",
        result.stderr.splitlines(True)[-1],
    ), result.stderr
    assert "started worker" not in result.stderr


def test_workers_that_cannot_start_at_first_boot_stop_the_supervisor(app_dir: Path) -> None:
    """An import that works once (the check at start) and fails in every worker is a boot
    error: one line and exit 2, not a restart loop."""
    (app_dir / "once.py").write_text(
        "import os, sockserve\n"
        "if os.path.exists('imported'):\n"
        "    raise RuntimeError('imported twice')\n"
        "open('imported', 'w').close()\n\n"
        "class App(sockserve.LineHandler):\n"
        "    def handle_line(self, line):\n"
        "        return line\n"
    )
    result = run_cli(["run", "once:App", "--workers", "2", "--bind", "127.0.0.1:0"], app_dir)
    assert result.returncode == 2, result.stderr
    assert re.search(
        r"worker \d+ could not start: importing 'once' failed: RuntimeError: imported twice"
        r" \(once\.py, line 3\); stopping",
        result.stderr,
    ), result.stderr
    assert "starting a new one" not in result.stderr


def test_restart_back_off_is_per_slot_and_never_leaves_the_service_down(
    start_server: StartServer, app_dir: Path
) -> None:
    """Six requests that each kill the worker serving them, then a probe: with a global
    exponential back-off every worker stayed down for seconds."""
    server = start_server(
        ["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    for _ in range(6):
        with socket.create_connection(address, timeout=15) as sock:
            sock.sendall(b"crash\n")
            assert sock.recv(100) == b""
    last_crash = time.monotonic()
    assert ask(address, timeout=3).endswith(b" hi\n")
    down = time.monotonic() - last_crash
    print(f"FIGURES back-off: answered {down:.2f} s after the sixth crash")
    assert down < 2.5
    # A worker that died soon after it started says how soon, and when the next starts.
    server.read_until(
        r"worker \d+ died \(exit code 7\) \d+\.\d s after it started; starting a new one in"
    )
    assert "crashed soon after start" not in server.text


def test_sigterm_while_workers_import_serves_the_clients_in_the_backlog(
    start_server: StartServer, app_dir: Path
) -> None:
    write_app(app_dir, "v1", import_delay=1.5)
    server = start_server(
        ["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    server.read_until("started worker")
    clients = [socket.create_connection(address, timeout=10) for _ in range(3)]
    try:
        for sock in clients:
            sock.sendall(b"early\n")
        server.signal(signal.SIGTERM)  # the worker is still importing
        for sock in clients:
            assert read_line(sock).endswith(b" early\n")
    finally:
        for sock in clients:
            sock.close()
    try:
        assert server.wait() == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(server.text) from None
    assert len(re.findall(r"worker \d+ stopped \(exit code 0\)", server.text)) == 2, server.text


def test_a_new_worker_stopped_at_once_resets_no_client(
    start_server: StartServer, app_dir: Path
) -> None:
    """SIGTTIN, then SIGTERM to the new worker before it serves: it still starts, serves
    what it accepted and exits 0 instead of dying by the signal."""
    server = start_server(
        ["run", "app:App", "--workers", "1", "--reload", "--bind", "127.0.0.1:0"],
        cwd=str(app_dir),
    )
    address = address_of(server.urls[0])
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 1, server)
    load = Load(address, check=versioned)
    try:
        server.signal(signal.SIGTTIN)
        server.read_until(r"SIGTTIN: 2 worker")
        pid = int(server.read_until(r"started worker (\d+)").group(1))
        os.kill(pid, signal.SIGTERM)
        server.read_until(rf"worker {pid} \w+ \(exit code 0\)", timeout=15)
    finally:
        load.stop()
    assert load.failures() == [], server.text
    assert load.count("ok") > 0


def test_sigttou_at_one_worker_and_sigusr1_are_logged_and_ignored(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:App", "--workers", "1", "--reload", "--bind", "127.0.0.1:0"],
        cwd=str(app_dir),
    )
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 1, server)
    server.signal(signal.SIGTTOU)
    server.read_until("SIGTTOU: ignored, already at 1 worker")
    server.signal(signal.SIGUSR1)
    server.read_until("SIGUSR1: ignored")
    assert ask(address_of(server.urls[0])).startswith(b"v1 ")
    assert len(worker_pids(server)) == 1
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
