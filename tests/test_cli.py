"""The sockserve command end to end: real processes, real sockets, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import ServerProcess, address_of, read_all, read_line, sockserve_argv

StartServer = Callable[..., ServerProcess]

HANDLERS = textwrap.dedent(
    """
    import asyncio, socketserver
    import sockserve

    class Slow(sockserve.LineHandler):
        async def handle_line(self, line):
            self.write(b"started\\n")  # the test's cue: the request was read
            await asyncio.sleep(float(line))
            return b"done " + line

    class Blocking(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.upper())

    class NotAHandler:
        pass
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(HANDLERS)
    return tmp_path


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "sockserve", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_demo_serves_lines_and_stops_on_sigterm(start_server: StartServer) -> None:
    server = start_server(["demo", "--bind", "127.0.0.1:0"])
    assert server.urls[0].startswith("tcp://127.0.0.1:")
    with socket.create_connection(address_of(server.urls[0]), timeout=5) as sock:
        sock.sendall(b"hello sockserve\n")
        assert read_line(sock) == b"HELLO SOCKSERVE\n"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert "Traceback" not in server.text


def test_demo_on_every_kind_of_listener(start_server: StartServer, tmp_path: Path) -> None:
    sock_path = tmp_path / "demo.sock"
    server = start_server(
        ["demo", "-b", "127.0.0.1:0", "-b", "udp://127.0.0.1:0", "-b", f"unix:{sock_path}"],
        listeners=3,
    )
    _, udp, unix = server.urls
    assert udp.startswith("udp://127.0.0.1:") and unix == f"unix:{sock_path}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"datagram", address_of(udp))
        assert u.recv(100) == b"DATAGRAM"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"unix\n")
        assert read_line(s) == b"UNIX\n"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "app:Blocking", "--workers", "-1"], "workers (--workers"),
        (["run", "app:Blocking", "--max-line", "lots"], "max_line (--max-line"),
        (["run", "app:Blocking", "--bind", "nonsense"], "bind (--bind"),
        (["run", "missing_module:X"], "no module named 'missing_module'"),
        (["run", "app:Missing"], "has no attribute 'Missing'"),
        (["run", "app:NotAHandler"], "is not a handler"),
        (["run", "app"], "MODULE:CLASS"),
    ],
)
def test_bad_start_fails_in_one_line(app_dir: Path, args: list[str], needle: str) -> None:
    result = run_cli(*args, cwd=app_dir)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_environment_variable_fails_naming_it(app_dir: Path) -> None:
    result = run_cli("run", "app:Blocking", cwd=app_dir, env={"SOCKSERVE_IDLE_TIMEOUT": "soon"})
    assert result.returncode == 2
    assert "SOCKSERVE_IDLE_TIMEOUT" in result.stderr and "Traceback" not in result.stderr


def test_address_in_use_fails_in_one_line(app_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "app:Blocking", "--bind", f"127.0.0.1:{port}", cwd=app_dir)
    assert result.returncode == 1
    assert "cannot bind 127.0.0.1" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_imports_from_the_current_directory(start_server: StartServer, app_dir: Path) -> None:
    server = start_server(["run", "app:Blocking", "--bind", "127.0.0.1:0"], cwd=str(app_dir))
    with socket.create_connection(address_of(server.urls[0]), timeout=5) as sock:
        sock.sendall(b"blocking\n")
        assert read_line(sock) == b"BLOCKING\n"


def test_environment_configures_the_server(start_server: StartServer, app_dir: Path) -> None:
    server = start_server(
        ["run", "app:Blocking"],
        cwd=str(app_dir),
        env={"SOCKSERVE_BIND": "127.0.0.1:0", "SOCKSERVE_LOG_FORMAT": "json"},
    )
    assert '"logger": "sockserve.server"' in server.text


def test_sigterm_answers_requests_in_flight_then_exits_0(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(["run", "app:Slow", "--bind", "127.0.0.1:0"], cwd=str(app_dir))
    address = address_of(server.urls[0])
    socks = [socket.create_connection(address, timeout=5) for _ in range(5)]
    for sock in socks:
        sock.sendall(b"0.5\n")
    for sock in socks:
        assert read_line(sock) == b"started\n"
    server.signal(signal.SIGTERM)
    for sock in socks:
        assert read_line(sock) == b"done 0.5\n"
        sock.close()
    assert server.wait() == 0
    with pytest.raises(OSError):  # nothing new is accepted
        socket.create_connection(address, timeout=1).close()


def test_graceful_timeout_then_second_sigint_stops_at_once(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:Slow", "--bind", "127.0.0.1:0", "--graceful-timeout", "30"],
        cwd=str(app_dir),
    )
    sock = socket.create_connection(address_of(server.urls[0]), timeout=5)
    sock.sendall(b"20\n")
    assert read_line(sock) == b"started\n"
    server.signal(signal.SIGINT)
    server.read_until("stopping", timeout=5)
    started = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.wait() == 0
    assert time.monotonic() - started < 5
    assert read_all(sock) == b""
    sock.close()


def test_console_script_and_settings_reference() -> None:
    script = Path(sys.executable).parent / "sockserve"
    result = subprocess.run(
        [str(script), "--version"], check=False, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout.startswith("sockserve ")
    reference = run_cli("settings")
    assert reference.returncode == 0 and "--max-connections" in reference.stdout


def test_privileges_are_dropped_after_binding(start_server: StartServer) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    # Not under tmp_path: pytest keeps its parents root-only, so nobody could not reach it.
    # The service's own runtime directory (as systemd's RuntimeDirectory= makes it).
    shared = Path(tempfile.mkdtemp(prefix="sockserve-priv-"))
    shared.chmod(0o755)
    os.chown(shared, nobody.pw_uid, nobody.pw_gid)
    path = shared / "app.sock"
    server = start_server(
        [
            "demo",
            "--bind",
            f"unix:{path}",
            "--user",
            "nobody",
            "--group",
            group,
            "--unix-mode",
            "660",
        ]
    )
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(nobody.pw_uid)}
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (nobody.pw_uid, nobody.pw_gid, 0o660)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b"dropped\n")
        assert read_line(sock) == b"DROPPED\n"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not path.exists()  # removed at exit by the unprivileged server
    shared.rmdir()


def test_everything_works_without_uvloop(tmp_path: Path) -> None:
    """With uvloop not importable, --loop auto runs on asyncio and --loop uvloop says so."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['uvloop'] = None  # as if not installed\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    refused = run_cli("demo", "--loop", "uvloop", "--bind", "127.0.0.1:0", env=env)
    assert refused.returncode == 2
    assert "uvloop is not installed" in refused.stderr and "Traceback" not in refused.stderr
    server = ServerProcess(
        sockserve_argv(["demo", "--bind", "127.0.0.1:0", "--workers", "2"]), env=env
    )
    try:
        url = server.start().urls[0]
        with socket.create_connection(address_of(url), timeout=5) as sock:
            sock.sendall(b"plain asyncio\n")
            assert read_line(sock) == b"PLAIN ASYNCIO\n"
        probe = subprocess.run(
            [sys.executable, "-c", "import uvloop"],
            check=False,
            capture_output=True,
            env={**os.environ, **env},
            timeout=30,
        )
        assert probe.returncode != 0
    finally:
        server.stop()
