"""Two sockserve instances behind a real HAProxy, restarted one after the other under
continuous client load: goodbye-first draining loses no request, clients reconnect to
the other instance. This is the rolling restart docs/deployment.md describes."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from goodbye_handlers import GOODBYE
from helpers import ServerProcess, address_of, read_line, require_program

pytestmark = pytest.mark.external

TESTS = str(Path(__file__).parent)


class Balancer:
    """haproxy -db balancing over two backends, with its runtime API on a Unix socket."""

    def __init__(self, tmp: Path, ports: dict[str, int]) -> None:
        haproxy = require_program("haproxy")  # skips: before any socket is made
        self.front = socket.socket()
        self.front.bind(("127.0.0.1", 0))
        self.front.listen(128)
        self.api = str(tmp / "haproxy.sock")
        servers = "".join(
            f"    server {name} 127.0.0.1:{port} send-proxy\n" for name, port in ports.items()
        )
        config = tmp / "haproxy.cfg"
        config.write_text(
            f"global\n    maxconn 2000\n    stats socket {self.api} level admin\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n"
            "    timeout server 30s\n    retries 3\n    option redispatch\n"
            f"frontend fe\n    bind fd@{self.front.fileno()}\n    default_backend be\n"
            f"backend be\n    balance roundrobin\n{servers}"
        )
        self.proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)],
            pass_fds=[self.front.fileno()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not Path(self.api).exists():  # the runtime API is up once haproxy is
            assert time.monotonic() < deadline, "haproxy did not start"
            assert self.proc.poll() is None, "haproxy exited"
            time.sleep(0.02)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.front.getsockname()
        return host, port

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.api)
            sock.sendall(text.encode() + b"\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        return reply.decode()

    def set_state(self, server: str, state: str) -> None:
        assert self.command(f"set server be/{server} state {state}").strip() == ""

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.front.close()
        Path(self.api).unlink(missing_ok=True)  # haproxy leaves its runtime API socket


@dataclass
class Load:
    """Clients on long-lived connections sending request after request. A goodbye (or
    end of stream) means: reconnect and send that request again. Anything else is a
    failure: a reset, a refused connection, a wrong or missing reply."""

    address: tuple[str, int]
    clients: int = 6
    served: list[tuple[float, int]] = field(default_factory=list)  # (when, pid)
    goodbyes: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for index in range(self.clients):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, index: int) -> None:
        sent = 0
        deadline = time.monotonic() + 60
        sock: socket.socket | None = None
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                request = b"req %d %d\n" % (index, sent)
                if sock is None:
                    sock = socket.create_connection(self.address, timeout=10)
                sock.sendall(request)
                reply = read_line(sock)
                if reply in (GOODBYE, b""):
                    with self.lock:
                        self.goodbyes += 1
                    sock.close()
                    sock = None
                    continue  # the same request again, on a new connection
                pid, _, answer = reply.partition(b" ")
                if answer != request.upper():
                    raise AssertionError(f"wrong reply {reply!r} to {request!r}")
                with self.lock:
                    self.served.append((time.monotonic(), int(pid)))
                sent += 1
                self.stop.wait(0.01)
        except (OSError, AssertionError) as exc:
            with self.lock:
                self.failures.append(f"client {index}: {exc!r}")
        finally:
            if sock is not None:
                sock.close()

    def pids_since(self, since: float) -> set[int]:
        with self.lock:
            return {pid for when, pid in self.served if when >= since}

    def wait_served_by(self, pid: int, since: float, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while pid not in self.pids_since(since):
            assert time.monotonic() < deadline, f"no request served by {pid}"
            assert not self.failures, self.failures
            time.sleep(0.02)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[list[Balancer]]:
    started: list[Balancer] = []
    yield started
    for proxy in started:
        proxy.close()


def test_rolling_restart_behind_haproxy_loses_no_request(
    start_server: object, balancer: list[Balancer], tmp_path: Path
) -> None:
    def instance(bind: str) -> ServerProcess:
        return start_server(  # type: ignore[operator, no-any-return]
            [
                "run",
                "goodbye_handlers:Instance",
                "--bind",
                bind,
                "--proxy-protocol",
                "v1",
                "--graceful-timeout",
                "10",
            ],
            cwd=TESTS,
        )

    servers = {"a": instance("127.0.0.1:0"), "b": instance("127.0.0.1:0")}
    ports = {name: address_of(server.urls[0])[1] for name, server in servers.items()}
    proxy = Balancer(tmp_path, ports)
    balancer.append(proxy)
    load = Load(proxy.address)
    load.start()
    try:
        for server in servers.values():  # round robin: clients on both
            load.wait_served_by(server.proc.pid, since=0.0)
        for name, other in (("a", "b"), ("b", "a")):
            old = servers[name]
            proxy.set_state(name, "maint")  # no new connections to it
            stopping = time.monotonic()
            old.signal(signal.SIGTERM)  # its clients get their goodbye and come back
            assert old.wait(timeout=15) == 0
            stopped = time.monotonic()
            assert stopped - stopping < 5
            # Its clients came back through HAProxy to the other instance (the one
            # restarted first, the second time round), which served every request since.
            load.wait_served_by(servers[other].proc.pid, since=stopped)
            assert load.pids_since(stopping + 0.5) <= {servers[other].proc.pid}
            # The restarted instance takes clients again once the other one restarts.
            servers[name] = instance(f"127.0.0.1:{ports[name]}")
            proxy.set_state(name, "ready")
    finally:
        load.finish()
    assert load.failures == []
    assert load.goodbyes >= 2  # at least one client was on each instance restarted
    assert len(load.served) > 100
