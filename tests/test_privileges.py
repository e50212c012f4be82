"""Starting as root with --user: what happens before and after the drop (needs root)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

import sockserve
from helpers import ServerProcess, address_of, ask, read_line, wait_exit, wait_for, worker_pids

StartServer = Callable[..., ServerProcess]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

# After the drop, the interpreter's files and sockserve's are unreadable, as they are for
# a Python installed under root's home (pyenv, uv): any module not imported before the
# drop fails to import.
ROOT_ONLY_SITE = """
import importlib.machinery, os, sys

ROOTS = {roots!r}


class RootOnlyFiles:
    def find_spec(self, name, path=None, target=None):
        if os.geteuid() == 0:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.origin and spec.origin.startswith(ROOTS):
            raise ImportError(f"{{spec.origin}}: permission denied (simulated)", name=name)
        return None


sys.meta_path.insert(0, RootOnlyFiles())
"""


@pytest.fixture
def root_only_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    roots = tuple(
        os.path.join(p, "")
        for p in {sys.base_prefix, sys.prefix, str(Path(sockserve.__file__).parent)}
    )
    (site / "sitecustomize.py").write_text(ROOT_ONLY_SITE.format(roots=roots))
    return {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A directory handed to the service user (as systemd's RuntimeDirectory= is);
    not under tmp_path, whose parents nobody cannot enter."""
    assert NOBODY is not None
    path = Path(tempfile.mkdtemp(prefix="sockserve-svc-"))
    path.chmod(0o755)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_after_dropping_privileges_exits(
    start_server: StartServer, root_only_env: dict[str, str], workers: str
) -> None:
    """Nothing the stop path needs is imported after the drop (ctypes for the SYN filter
    was, and the server then never exited)."""
    server = start_server(
        ["demo", "--bind", "127.0.0.1:0", "--user", "nobody", "--workers", workers],
        env=root_only_env,
    )
    address = address_of(server.urls[0])
    wait_for(lambda: "sockserve.server: listening on" in server.text, server)
    assert ask(address) == b"HI\n"
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0, server.text
    assert "Traceback" not in server.text
    assert "permission denied (simulated)" not in server.text


def test_a_socket_file_the_user_cannot_remove_is_announced(
    start_server: StartServer, tmp_path: Path
) -> None:
    root_dir = Path(tempfile.mkdtemp(prefix="sockserve-root-"))
    try:
        root_dir.chmod(0o755)
        path = root_dir / "app.sock"
        server = start_server(["demo", "--bind", f"unix:{path}", "--user", "nobody"])
        assert re.search(
            rf"{re.escape(str(path))} will be left behind at exit: uid \d+ cannot", server.text
        ), server.text
        assert path.stat().st_uid == NOBODY.pw_uid  # type: ignore[union-attr]
        server.signal(signal.SIGTERM)
        assert wait_exit(server) == 0
    finally:
        shutil.rmtree(root_dir, ignore_errors=True)


ATTACKER = """
import os, sys, time
os.setgroups([]); os.setgid(int(sys.argv[5])); os.setuid(int(sys.argv[4]))  # the service user
path, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
link = path + ".link"
print("watching", flush=True)
deadline = time.monotonic() + seconds
swaps = 0
while time.monotonic() < deadline:
    try:
        if os.path.islink(path):
            continue
        os.lstat(path)
    except FileNotFoundError:
        continue
    try:
        os.symlink(target, link)
    except FileExistsError:
        pass
    try:
        os.rename(link, path)
        swaps += 1
    except OSError:
        pass
print(swaps)
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unix_socket_owner_and_mode_never_follow_a_swapped_in_link(
    start_server: StartServer, service_dir: Path, tmp_path: Path, workers: str
) -> None:
    """The service user owns the socket's directory and swaps a link to a root-only file
    in for the socket file as soon as it appears: the file's owner and mode stay root's."""
    assert NOBODY is not None
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    path = service_dir / "app.sock"
    for _ in range(3):
        attacker = subprocess.Popen(
            [
                *(sys.executable, "-c", ATTACKER, str(path), str(secret), "5"),
                *(str(NOBODY.pw_uid), str(NOBODY.pw_gid)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert attacker.stdout is not None
            assert attacker.stdout.readline() == "watching\n"
            server = start_server(
                [
                    *("demo", "--bind", f"unix:{path}", "--user", "nobody"),
                    *("--unix-mode", "666", "--workers", workers),
                ]
            )
            server.signal(signal.SIGTERM)
            wait_exit(server)
        finally:
            attacker.kill()
            attacker.communicate(timeout=10)
        st = secret.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600), "the link was followed"
        for leftover in service_dir.iterdir():
            leftover.unlink()


def test_a_socket_directory_anyone_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = subprocess.run(
        [sys.executable, "-m", "sockserve", "demo", "--bind", f"unix:{shared}/app.sock"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert f"{shared} is writable by anyone and has no sticky bit" in result.stderr
    assert not (shared / "app.sock").exists()


def test_workers_with_metrics_and_a_user_keep_their_timeouts_and_metrics(
    start_server: StartServer,
) -> None:
    server = start_server(
        [
            *("demo", "--bind", "127.0.0.1:0", "--workers", "2", "--user", "nobody"),
            *("--metrics", "127.0.0.1:0", "--idle-timeout", "1"),
        ]
    )
    url = server.read_until(r"metrics listening on (http://\S+)").group(1)
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    address = address_of(server.urls[0])
    assert ask(address) == b"HI\n"
    with socket.create_connection(address, timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(10) == b""  # closed by the idle timeout
        assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        if re.search(r"^sockserve_connections_total 2\.0$", body, re.M):
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    assert "metrics update failed" not in server.text
    # The supervisor's own metrics file is mapped in its memory.
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    metrics_dir = re.search(r"\S*/sockserve-metrics-[^/\s]+", maps)
    assert metrics_dir, maps
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0
    assert not os.path.exists(metrics_dir.group(0))


def test_metrics_failures_never_stop_the_sweep_or_the_stop(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Workers that cannot write their metrics files (here: a directory they may not
    write to) still time idle peers out and stop on SIGTERM; orphaned workers exit."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.fchown = lambda *args: None\n")
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    server = start_server(
        [
            *("demo", "--bind", "127.0.0.1:0", "--workers", "2", "--user", "nobody"),
            *("--metrics", "127.0.0.1:0", "--idle-timeout", "1"),
        ],
        env=env,
    )
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    address = address_of(server.urls[0])
    assert ask(address) == b"HI\n"
    server.read_until("metrics update failed", timeout=10)
    with socket.create_connection(address, timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(10) == b""
        assert time.monotonic() - started < 5
    workers = worker_pids(server)
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    metrics_dir = re.search(r"\S*/sockserve-metrics-[^/\s]+", maps)
    assert metrics_dir, maps
    try:
        os.kill(server.proc.pid, signal.SIGKILL)  # the supervisor dies: the workers follow
        deadline = time.monotonic() + 15
        for pid in workers:
            while os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid):
                assert time.monotonic() < deadline, f"worker {pid} outlived its supervisor"
                time.sleep(0.1)
    finally:
        shutil.rmtree(metrics_dir.group(0), ignore_errors=True)  # nobody left to remove it


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


def test_reuse_port_workers_with_a_user_start_grow_and_reload(
    start_server: StartServer,
) -> None:
    server = start_server(
        [
            *("demo", "--bind", "127.0.0.1:0", "--workers", "2", "--user", "nobody"),
            "--reuse-port",
        ]
    )
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    server.signal(signal.SIGTTIN)
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 3, server)
    server.signal(signal.SIGHUP)
    server.read_until("reload done", timeout=20)
    assert "died" not in server.text and "Errno" not in server.text, server.text
    assert ask(address_of(server.urls[0])) == b"HI\n"
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0


IMPORT_RECORDER = """
import os, sockserve

with open({log!r}, "a") as log:
    log.write(f"{{os.geteuid()}}\\n")


class App(sockserve.LineHandler):
    def handle_line(self, line):
        return line
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_handler_is_imported_only_as_the_service_user(
    start_server: StartServer, service_dir: Path, workers: str
) -> None:
    log = service_dir / "imports.log"
    log.touch()
    os.chown(log, NOBODY.pw_uid, NOBODY.pw_gid)  # type: ignore[union-attr]
    (service_dir / "app.py").write_text(textwrap.dedent(IMPORT_RECORDER.format(log=str(log))))
    server = start_server(
        ["run", "app:App", "--bind", "127.0.0.1:0", "--user", "nobody", "--workers", workers],
        cwd=str(service_dir),
    )
    wait_for(lambda: "sockserve.server: listening on" in server.text, server)
    assert ask(address_of(server.urls[0])) == b"hi\n"
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0
    euids = log.read_text().split()
    assert euids and set(euids) == {str(NOBODY.pw_uid)}, euids  # type: ignore[union-attr]


def ask_tls(address: tuple[str, int], context: ssl.SSLContext) -> bytes:
    with socket.create_connection(address, timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"secret\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(100)
                if not chunk:
                    break
                data += chunk
            return data


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_root_only_key_serves_tls_after_the_drop_and_reloads(
    start_server: StartServer, tmp_path: Path, workers: str
) -> None:
    """The key is read before the drop and the context kept; with workers the supervisor
    re-reads it on SIGHUP, so a key only root may read still reloads."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)  # root's alone, as the key should be
    client = ssl.create_default_context()
    ca.configure_trust(client)
    server = start_server(
        [
            *("demo", "--bind", "127.0.0.1:0", "--user", "nobody", "--workers", workers),
            *("--tls-cert", str(cert_path), "--tls-key", str(key_path)),
        ]
    )
    wait_for(lambda: "sockserve.server: listening on" in server.text, server)
    address = address_of(server.urls[0])
    assert ask_tls(address, client) == b"SECRET\n"
    if workers == "2":
        server.signal(signal.SIGHUP)
        server.read_until("reload done", timeout=20)
        assert ask_tls(address, client) == b"SECRET\n"
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0, server.text
    assert "could not start" not in server.text and "died" not in server.text


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_handler_the_user_cannot_read_says_who_imported_it(
    service_dir: Path, workers: str
) -> None:
    """A module only root may read fails at start in one line naming the user that tried
    (it was imported as root before, and with workers then failed in every worker)."""
    (service_dir / "app.py").write_text(textwrap.dedent(IMPORT_RECORDER.format(log="/dev/null")))
    (service_dir / "app.py").chmod(0o600)  # root's
    result = subprocess.run(
        [
            *(sys.executable, "-m", "sockserve", "run", "app:App", "--bind", "127.0.0.1:0"),
            *("--user", "nobody", "--workers", workers),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=service_dir,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(
        f"sockserve: error: importing 'app' failed: PermissionError: [Errno 13] Permission"
        f" denied: '{service_dir}/app.py' (imported as uid {NOBODY.pw_uid})\n"  # type: ignore[union-attr]
    ), result.stderr
    assert "started worker" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_tls_reload_and_stop_after_the_drop_import_nothing_late(
    start_server: StartServer, root_only_env: dict[str, str], tmp_path: Path, workers: str
) -> None:
    """With the interpreter's and sockserve's files unreadable after the drop: TLS
    clients that name the host (SNI), a failed handshake, a reload (or, in one process,
    its refusal) and the stop all work, so nothing they need is imported late."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    server = start_server(
        [
            *("demo", "--bind", "127.0.0.1:0", "--user", "nobody", "--workers", workers),
            *("--tls-cert", str(cert_path), "--tls-key", str(key_path), "--access-log"),
        ],
        env=root_only_env,
    )
    wait_for(lambda: "sockserve.server: listening on" in server.text, server)
    address = address_of(server.urls[0])
    assert ask_tls(address, client) == b"SECRET\n"
    with socket.create_connection(address, timeout=5) as plain:  # not TLS: refused
        plain.sendall(b"hello\n")
        assert read_line(plain) == b""
    server.read_until("TLS handshake failed")
    server.signal(signal.SIGHUP)
    # One process cannot read root's files any more: it says so and keeps its context.
    server.read_until("reload done" if workers == "2" else "TLS reload failed, keeping", 20)
    assert ask_tls(address, client) == b"SECRET\n"
    server.signal(signal.SIGTERM)
    assert wait_exit(server) == 0, server.text
    assert "Traceback" not in server.text
    assert "permission denied (simulated)" not in server.text
    assert "died" not in server.text
