"""A real HAProxy on loopback in front of sockserve, speaking PROXY v1 and v2."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import sockserve
from helpers import BlockingWho, Who, closed_by_server, read_line, require_program, serving
from sockserve.proxy_protocol import parse_prefix

pytestmark = pytest.mark.external

CLIENT_IP = "127.0.0.2"  # the test client connects from here; the handler must see it


class HAProxy:
    """haproxy -db with frontends on sockets we bound (fd@N), so no port is guessed."""

    def __init__(self, tmp: Path, backends: dict[str, str]) -> None:
        haproxy = require_program("haproxy")  # skips: before any socket is made
        self.frontends: dict[str, socket.socket] = {}
        sections = [
            "global\n    maxconn 2000\n",
            "defaults\n    mode tcp\n    timeout connect 5s\n"
            "    timeout client 30s\n    timeout server 30s\n",
        ]
        for name, server_line in backends.items():
            front = socket.socket()
            front.bind(("127.0.0.1", 0))
            front.listen(128)
            self.frontends[name] = front
            sections.append(
                f"frontend fe_{name}\n    bind fd@{front.fileno()}\n"
                "    unique-id-format %{+X}o\\ %ci_%Ts_%rt\n"
                f"    default_backend be_{name}\n"
                f"backend be_{name}\n    server s1 {server_line}\n"
            )
        config = tmp / "haproxy.cfg"
        config.write_text("\n".join(sections))
        fds = [s.fileno() for s in self.frontends.values()]
        check = subprocess.run(
            [haproxy, "-c", "-f", str(config)],
            pass_fds=fds,
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)],
            pass_fds=fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def connect(self, name: str) -> socket.socket:
        sock = socket.socket()
        sock.settimeout(5)
        sock.bind((CLIENT_IP, 0))
        sock.connect(self.frontends[name].getsockname())
        return sock

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        for front in self.frontends.values():
            front.close()


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[object]:
    started: list[HAProxy] = []

    def start(backends: dict[str, str]) -> HAProxy:
        proxy = HAProxy(tmp_path, backends)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


@pytest.mark.parametrize("handler", [Who, BlockingWho], ids=lambda h: h.__name__)
def test_haproxy_v1_and_v2_give_the_real_client_address(haproxy: object, handler: type) -> None:
    with serving(handler, "asyncio", proxy_protocol="any") as server:
        port = server.address[1]
        proxy = haproxy(  # type: ignore[operator]
            {
                "v1": f"127.0.0.1:{port} send-proxy",
                "v2": f"127.0.0.1:{port} send-proxy-v2 proxy-v2-options unique-id,crc32c",
            }
        )
        for name in ("v1", "v2"):
            for _ in range(3):
                with proxy.connect(name) as sock:
                    sock.sendall(b"who\n")
                    reply = read_line(sock).decode()
                    assert reply.startswith(CLIENT_IP), (name, reply)
                    if handler is Who:
                        assert f" {name} " in reply
                        if name == "v2":  # the unique-id TLV made it to the handler
                            assert reply.split()[3].startswith("7F000002")


def test_peers_without_a_valid_header_are_refused(haproxy: object) -> None:
    seen: list[bytes] = []

    class Record(sockserve.LineHandler):
        def handle_line(self, line: bytes) -> bytes:
            seen.append(line)
            return line

    with serving(Record, "asyncio", proxy_protocol="v2", handshake_timeout=1) as server:
        port = server.address[1]
        proxy = haproxy(  # type: ignore[operator]
            {"plain": f"127.0.0.1:{port}", "v1": f"127.0.0.1:{port} send-proxy"}
        )
        for name in ("plain", "v1"):  # no header, and a v1 header where v2 is required
            with proxy.connect(name) as sock:
                sock.sendall(b"sneaky\n")
                assert closed_by_server(sock)
        with socket.create_connection(server.address, timeout=5) as direct:
            direct.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhi\n")  # v1 when v2 is required
            assert closed_by_server(direct)
        assert seen == []
        assert server.server.stats.rejected_by_reason["bad PROXY header"] >= 3


def test_haproxy_header_parses_as_haproxy_sends_it(tmp_path: Path, haproxy: object) -> None:
    """Capture HAProxy's bytes on a plain socket and check the sans-IO parser agrees."""
    with socket.create_server(("127.0.0.1", 0)) as backend:
        backend.settimeout(5)
        port = backend.getsockname()[1]
        proxy = haproxy(  # type: ignore[operator]
            {"v2": f"127.0.0.1:{port} send-proxy-v2 proxy-v2-options unique-id,crc32c,authority"}
        )
        with proxy.connect("v2") as sock:
            sock.sendall(b"payload\n")
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while not data.endswith(b"payload\n"):
                    chunk = conn.recv(4096)
                    assert chunk
                    data += chunk
    header = parse_prefix(data)
    assert header is not None and header.version == 2 and header.command == "PROXY"
    assert isinstance(header.source, tuple) and header.source[0] == CLIENT_IP
    assert data[header.length :] == b"payload\n"


@pytest.mark.parametrize("handler", [Who, BlockingWho], ids=lambda h: h.__name__)
def test_per_client_limit_applies_to_each_real_client_behind_haproxy(
    haproxy: object, handler: type
) -> None:
    """Every connection reaches sockserve from HAProxy's address; the limit must count
    the client the PROXY header names instead."""
    with serving(handler, "asyncio", proxy_protocol="v1", max_connections_per_ip=3) as server:
        port = server.address[1]
        proxy = haproxy({"v1": f"127.0.0.1:{port} send-proxy"})  # type: ignore[operator]
        front = proxy.frontends["v1"].getsockname()
        opened: list[socket.socket] = []

        def client(source: str) -> socket.socket:
            sock = socket.socket()
            opened.append(sock)
            sock.settimeout(5)
            sock.bind((source, 0))
            sock.connect(front)
            return sock

        try:
            first = [client(CLIENT_IP) for _ in range(3)]
            for sock in first:
                sock.sendall(b"who\n")
                assert read_line(sock).startswith(CLIENT_IP.encode())
            fourth = client(CLIENT_IP)
            fourth.sendall(b"who\n")
            assert closed_by_server(fourth)
            other = client("127.0.0.3")
            other.sendall(b"who\n")
            assert read_line(other).startswith(b"127.0.0.3")
        finally:
            for sock in opened:
                sock.close()
        assert server.server.stats.rejected_by_reason["too many connections from client"] == 1
