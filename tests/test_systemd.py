"""Socket activation, inherited sockets and sd_notify, with the real programs and sockets.

systemd-socket-activate (Debian package systemd) binds the sockets, waits for the first
connection or datagram on any of them (without --accept it does not start the program
before that), then execs the program with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES set. As it
execs, its pid is the server's pid, so signals go straight to sockserve.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from helpers import (
    LISTENING,
    NotifySocket,
    ServerProcess,
    address_of,
    ask,
    read_line,
    require_program,
)

Spawn = Callable[..., ServerProcess]
StartServer = Callable[..., ServerProcess]
SOCKSERVE = [sys.executable, "-m", "sockserve"]
QUICK = ["--graceful-timeout", "2"]


def free_port() -> int:
    """A port that was free a moment ago.

    systemd-socket-activate cannot take port 0 (``-l 127.0.0.1:0`` is refused as an invalid
    address), so these tests must name a port: this is the only place that guesses one.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def activate(listen: Sequence[str], *options: str) -> list[str]:
    """The systemd-socket-activate command line for ``listen`` addresses and ``options``."""
    program = require_program("systemd-socket-activate")
    argv = [program]
    for address in listen:
        argv += ["-l", address]
    return [*argv, *options]


def wait_activator(server: ServerProcess, count: int) -> None:
    """Wait until systemd-socket-activate has bound ``count`` sockets (fds 3, 4, ...)."""
    for fd in range(3, 3 + count):
        server.read_until(rf"Listening on \S+ as {fd}\.", timeout=10)


def listening(server: ServerProcess, count: int) -> list[str]:
    urls = [server.read_until(LISTENING.pattern).group(1) for _ in range(count)]
    server.urls.extend(urls)
    return urls


def stop(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.text


# -- socket activation -------------------------------------------------------------------


def test_activation_one_tcp_socket(spawn: Spawn) -> None:
    port = free_port()
    argv = activate([f"127.0.0.1:{port}"])
    server = spawn([*argv, *SOCKSERVE, "demo", *QUICK])
    wait_activator(server, 1)
    # The first connection starts sockserve; it waits in the backlog meanwhile.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
        first.sendall(b"first\n")
        assert listening(server, 1) == [f"tcp://127.0.0.1:{port}"]
        assert read_line(first) == b"FIRST\n"
    assert ask(("127.0.0.1", port), b"hello\n") == b"HELLO\n"
    assert "Traceback" not in server.text
    stop(server)


def test_activation_tcp_and_unix_sockets(spawn: Spawn, tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "x.sock"
    argv = activate([f"127.0.0.1:{port}", str(path)])
    server = spawn([*argv, *SOCKSERVE, "demo", *QUICK])
    wait_activator(server, 2)
    # Started by a connection on the second socket this time.
    with socket.socket(socket.AF_UNIX) as unix:
        unix.settimeout(5)
        unix.connect(str(path))
        unix.sendall(b"over unix\n")
        assert sorted(listening(server, 2)) == sorted([f"tcp://127.0.0.1:{port}", f"unix:{path}"])
        assert read_line(unix) == b"OVER UNIX\n"
    assert ask(("127.0.0.1", port), b"hello\n") == b"HELLO\n"
    stop(server)
    assert path.exists()  # sockserve did not create the file, so it leaves it alone
    path.unlink()


def test_activation_datagram(spawn: Spawn) -> None:
    port = free_port()
    argv = activate([f"127.0.0.1:{port}"], "--datagram")
    server = spawn([*argv, *SOCKSERVE, "demo", *QUICK])
    wait_activator(server, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"first\n", ("127.0.0.1", port))  # starts sockserve, then is served
        assert listening(server, 1) == [f"udp://127.0.0.1:{port}"]
        assert client.recv(100) == b"FIRST\n"
        client.sendto(b"second\n", ("127.0.0.1", port))
        assert client.recv(100) == b"SECOND\n"
    stop(server)


def test_activation_passes_fd_names_and_environment(spawn: Spawn, tmp_path: Path) -> None:
    """LISTEN_FDNAMES from --fdname reaches systemd_listeners(); -E sets settings too."""
    port = free_port()
    path = tmp_path / "admin.sock"
    argv = activate(
        [f"127.0.0.1:{port}", str(path)],
        "--fdname=web:admin",
        "-E",
        "SOCKSERVE_MAX_LINE=10",
    )
    probe = (
        "import os\n"
        "from sockserve.binding import systemd_listeners\n"
        "print(os.environ['LISTEN_FDNAMES'], os.environ['SOCKSERVE_MAX_LINE'])\n"
        "print([(a.fd, a.name) for a in systemd_listeners()])\n"
    )
    server = spawn([*argv, sys.executable, "-c", probe], stdout=subprocess.PIPE)
    wait_activator(server, 2)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert server.wait() == 0, server.text
    assert server.proc.stdout is not None
    assert server.proc.stdout.read().decode().splitlines() == [
        "web:admin 10",
        "[(3, 'web'), (4, 'admin')]",
    ]

    # The same names and variable under sockserve: both sockets served, the setting applied.
    path.unlink()
    server = spawn([*argv, *SOCKSERVE, "demo", *QUICK])
    wait_activator(server, 2)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"this line is too long\n")
        assert sorted(listening(server, 2)) == sorted([f"tcp://127.0.0.1:{port}", f"unix:{path}"])
        assert f"listening on tcp://127.0.0.1:{port} (web)" in server.text  # systemd's names
        assert f"listening on unix:{path} (admin)" in server.text
        assert read_line(sock) == b""  # over SOCKSERVE_MAX_LINE: closed
    assert ask(("127.0.0.1", port), b"short\n") == b"SHORT\n"
    stop(server)
    path.unlink()  # bound by systemd-socket-activate, which leaves it


def worker_pids(server: ServerProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"started worker (\d+)", server.text)]


def socket_inodes(pid: int) -> set[str]:
    """The ``socket:[inode]`` links of every descriptor process ``pid`` holds."""
    links = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            links.add(link)
    return links


def test_activation_with_workers_shares_the_sockets(spawn: Spawn) -> None:
    port = free_port()
    argv = activate([f"127.0.0.1:{port}"])
    server = spawn([*argv, *SOCKSERVE, "demo", "--workers", "2", *QUICK])
    wait_activator(server, 1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
        first.sendall(b"first\n")
        assert listening(server, 1) == [f"tcp://127.0.0.1:{port}"]
        assert read_line(first) == b"FIRST\n"
    server.read_until(r"started worker \d+")
    server.read_until(r"started worker \d+")
    # Both workers hold the very socket systemd-socket-activate passed to the supervisor.
    activated = os.readlink(f"/proc/{server.proc.pid}/fd/3")
    assert activated.startswith("socket:")
    for pid in worker_pids(server):
        assert activated in socket_inodes(pid)
    # A reload starts new workers on the same inherited socket.
    server.signal(signal.SIGHUP)
    server.read_until("reload done")
    assert ask(("127.0.0.1", port), b"hello\n") == b"HELLO\n"
    stop(server)


# -- LISTEN_FDS for another process ------------------------------------------------------

# Puts a socket at fd 3 and sets LISTEN_* as a service manager would, then execs sockserve;
# LISTEN_PID is argv[2]: "self" for this very process, or a pid.
LAUNCHER = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else sys.argv[2]
os.execv(sys.executable, [sys.executable, "-m", "sockserve", *sys.argv[3:]])
"""


def test_listen_fds_for_another_pid_is_ignored(spawn: Spawn) -> None:
    """No --bind and LISTEN_PID not ours: the default address, never the fd."""
    with socket.socket() as inherited:
        inherited.bind(("127.0.0.1", 0))
        inherited.listen()
        fd = inherited.fileno()
        other_pid = str(os.getpid())  # a parent that got sockets and did not clear LISTEN_*
        argv = [sys.executable, "-c", LAUNCHER, str(fd), other_pid, "demo", *QUICK]
        server = spawn(argv, pass_fds=[fd])
        # 127.0.0.1:9999 may be taken on this machine: failing to bind it proves the point too.
        match = server.read_until(r"listening on (\S+)|cannot bind (\S+)")
        assert match.group(1) == "tcp://127.0.0.1:9999" or match.group(2) == "127.0.0.1:9999:"
        if match.group(1):
            assert ask(("127.0.0.1", 9999), b"hello\n") == b"HELLO\n"
            stop(server)
        else:
            assert server.wait() != 0
        assert len(LISTENING.findall(server.text)) <= 1  # fd 3 was never served


def test_bind_wins_over_listen_fds(spawn: Spawn) -> None:
    with socket.socket() as inherited:
        inherited.bind(("127.0.0.1", 0))
        inherited.listen()
        fd = inherited.fileno()
        argv = [sys.executable, "-c", LAUNCHER, str(fd), "self", "demo", "--bind", "127.0.0.1:0"]
        server = spawn([*argv, *QUICK], pass_fds=[fd])
        [url] = listening(server, 1)
        assert url != f"tcp://127.0.0.1:{inherited.getsockname()[1]}"
        assert ask(address_of(url), b"hello\n") == b"HELLO\n"
        stop(server)
        assert len(LISTENING.findall(server.text)) == 1


def test_listen_fds_for_this_pid_without_bind_is_served(spawn: Spawn) -> None:
    with socket.socket() as inherited:
        inherited.bind(("127.0.0.1", 0))
        inherited.listen()
        fd = inherited.fileno()
        argv = [sys.executable, "-c", LAUNCHER, str(fd), "self", "demo", *QUICK]
        server = spawn(argv, pass_fds=[fd])
        port = inherited.getsockname()[1]
        assert listening(server, 1) == [f"tcp://127.0.0.1:{port}"]
        assert ask(("127.0.0.1", port), b"hello\n") == b"HELLO\n"
        stop(server)


def test_listen_fds_naming_descriptors_that_are_not_open_fails_in_one_line() -> None:
    launcher = (
        "import os, sys\n"
        "os.environ.update(LISTEN_FDS='2', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'sockserve', 'demo'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", launcher],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "LISTEN_FDS=2" in lines[0]
    assert "descriptor 3 is not open" in lines[0]


# -- fd://N ------------------------------------------------------------------------------


def test_bind_fd_listening_tcp_socket(spawn: Spawn) -> None:
    with socket.socket() as inherited:
        inherited.bind(("127.0.0.1", 0))
        inherited.listen()
        fd = inherited.fileno()
        port = inherited.getsockname()[1]
        argv = [*SOCKSERVE, "demo", "--bind", f"fd://{fd}", *QUICK]
        server = spawn(argv, pass_fds=[fd])
        assert listening(server, 1) == [f"tcp://127.0.0.1:{port}"]
        assert ask(("127.0.0.1", port), b"hello\n") == b"HELLO\n"
        stop(server)


def test_bind_fd_bound_stream_socket_is_put_to_listen(spawn: Spawn, tmp_path: Path) -> None:
    path = tmp_path / "bound.sock"
    with socket.socket(socket.AF_UNIX) as inherited:
        inherited.bind(str(path))  # bound, not listening: sockserve calls listen()
        fd = inherited.fileno()
        argv = [*SOCKSERVE, "demo", "--bind", f"fd://{fd}", *QUICK]
        server = spawn(argv, pass_fds=[fd])
        assert listening(server, 1) == [f"unix:{path}"]
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            client.connect(str(path))
            client.sendall(b"unix\n")
            assert read_line(client) == b"UNIX\n"
        stop(server)
    path.unlink()  # bound here: ours to remove


def test_bind_fd_udp_socket_with_workers(spawn: Spawn) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inherited:
        inherited.bind(("127.0.0.1", 0))
        fd = inherited.fileno()
        address = inherited.getsockname()
        argv = [*SOCKSERVE, "demo", "--bind", f"fd://{fd}", "--workers", "2", *QUICK]
        server = spawn(argv, pass_fds=[fd])
        assert listening(server, 1) == [f"udp://127.0.0.1:{address[1]}"]
        server.read_until(r"started worker \d+")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"datagram\n", address)
            assert client.recv(100) == b"DATAGRAM\n"
        stop(server)


@pytest.mark.parametrize("kind", ["pipe", "closed"])
def test_bind_fd_that_is_not_a_socket_fails_in_one_line(kind: str) -> None:
    read_end, write_end = os.pipe()
    try:
        fd = read_end if kind == "pipe" else 250  # nothing is open at 250 in the child
        result = subprocess.run(
            [*SOCKSERVE, "demo", "--bind", f"fd://{fd}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            pass_fds=[read_end],
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"fd://{fd} is not a usable socket" in lines[0]
    assert "Traceback" not in result.stderr


# -- sd_notify ---------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    sock = NotifySocket(str(path))
    yield sock
    sock.close()
    path.unlink()


def check_notifications(server: ServerProcess, notify: NotifySocket) -> None:
    """READY=1 with MAINPID once listening; RELOADING=1 then READY=1 on HUP; STOPPING=1 on
    TERM; every message sent by the main process."""
    pid = server.proc.pid
    ready, sender = notify.receive()
    assert ready == {"READY": "1", "MAINPID": str(pid)}
    assert sender == pid
    assert server.urls  # READY comes after the listening line (the fixture waited for it)

    server.signal(signal.SIGHUP)
    reloading, sender = notify.receive()
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert sender == pid
    assert notify.receive() == ({"READY": "1"}, pid)
    assert ask(address_of(server.urls[0]), b"hello\n") == b"HELLO\n"

    server.signal(signal.SIGTERM)
    assert notify.receive() == ({"STOPPING": "1"}, pid)
    assert server.wait() == 0, server.text


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sd_notify_ready_reloading_stopping(
    start_server: StartServer, notify_socket: NotifySocket, workers: str
) -> None:
    server = start_server(
        ["demo", "--bind", "127.0.0.1:0", "--workers", workers, *QUICK], env=notify_socket.env
    )
    if workers == "2":
        server.read_until("started worker")
        server.read_until("started worker")
    check_notifications(server, notify_socket)


def test_sd_notify_abstract_socket(start_server: StartServer) -> None:
    notify = NotifySocket(f"@sockserve-test-notify-{os.getpid()}")
    try:
        server = start_server(["demo", "--bind", "127.0.0.1:0", *QUICK], env=notify.env)
        check_notifications(server, notify)
    finally:
        notify.close()
