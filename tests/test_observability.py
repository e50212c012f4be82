"""Access log and Prometheus metrics match the traffic sent, in one process and across workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from helpers import ServerProcess, address_of, closed_by_server, read_line
from sockserve.metrics import MetricsServer

StartServer = Callable[..., ServerProcess]

APP = textwrap.dedent(
    """
    import sockserve

    class Upper(sockserve.LineHandler):
        def handle_line(self, line):
            if line.startswith(b"boom"):
                raise RuntimeError("boom")
            return line.upper()
    """
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metrics_url(server: ServerProcess) -> str:
    return server.read_until(r"metrics listening on (http://[^\s\"]+)").group(1)


def wait_metrics(url: str, expected: Mapping[str, float], timeout: float = 5.0) -> dict[str, float]:
    """Scrape until the expected values show (workers push their counters every second)."""
    deadline = time.monotonic() + timeout
    while True:
        values = scrape(url)
        if all(values.get(k) == v for k, v in expected.items()) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def talk(address: tuple[str, int], lines: list[bytes]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        for line in lines:
            sock.sendall(line)
            assert read_line(sock) == line.upper()


def test_metrics_and_json_access_log_match_the_traffic(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        [
            "run",
            "app:Upper",
            "--bind",
            "127.0.0.1:0",
            "--bind",
            "udp://127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--access-log",
            "--log-format",
            "json",
            "--deny",
            "127.0.0.3/32",
        ],
        listeners=2,
        cwd=str(app_dir),
    )
    url = metrics_url(server)
    tcp = address_of(server.urls[0])
    talk(tcp, [b"hello\n", b"world\n"])  # 12 bytes each way
    talk(tcp, [b"x" * 99 + b"\n"])  # 100 bytes each way
    with socket.create_connection(tcp, timeout=5) as sock:
        sock.sendall(b"boom\n")
        assert closed_by_server(sock)
    denied = socket.socket()
    denied.bind(("127.0.0.3", 0))
    denied.settimeout(5)
    denied.connect(tcp)
    assert closed_by_server(denied)
    denied.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        for _ in range(3):
            udp.sendto(b"dgram", address_of(server.urls[1]))
            assert udp.recv(100) == b"DGRAM"
    expected = {
        "sockserve_connections_total": 4,
        "sockserve_bytes_received_total": 12 + 100 + 5 + 15,
        "sockserve_bytes_sent_total": 12 + 100 + 15,
        "sockserve_handler_errors_total": 1,
        'sockserve_rejected_connections_total{reason="denied"}': 1,
        # Every accepted connection ends once, with its reason: these add up to the total.
        'sockserve_closed_connections_total{reason="eof"}': 2,
        'sockserve_closed_connections_total{reason="handler error"}': 1,
        'sockserve_closed_connections_total{reason="denied"}': 1,
        "sockserve_datagrams_total": 3,
        "sockserve_connections_active": 0,
    }
    values = wait_metrics(url, expected)
    for name, value in expected.items():
        assert values.get(name) == value, (name, values)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=5)

    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
    access = [r for r in records if r["logger"] == "sockserve.access"]
    assert len(access) == 4  # the refused peer too: one record per connection
    by_bytes = sorted((r["bytes_in"], r["bytes_out"], r["close_reason"]) for r in access)
    assert by_bytes == [
        (0, 0, "denied"),
        (5, 0, "handler error"),
        (12, 12, "eof"),
        (100, 100, "eof"),
    ]
    for record in access:
        peer = "127.0.0.3:" if record["close_reason"] == "denied" else "127.0.0.1:"
        assert record["peer"].startswith(peer)
        assert record["listener"] == server.urls[0]
        assert record["duration_ms"] >= 0


def test_text_access_log_has_the_same_facts(start_server: StartServer) -> None:
    server = start_server(["demo", "--bind", "127.0.0.1:0", "--access-log"])
    talk(address_of(server.urls[0]), [b"abc\n"])
    line = server.read_until(r"sockserve\.access").string
    assert re.search(r"127\.0\.0\.1:\d+ tcp://127\.0\.0\.1:\d+ [\d.]+ms in=4 out=4 eof", line)


def test_metrics_are_summed_over_workers_and_count_restarts(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:Upper", "--workers", "2", "--bind", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
        cwd=str(app_dir),
    )
    url = metrics_url(server)
    tcp = address_of(server.urls[0])
    for _ in range(20):
        talk(tcp, [b"ping\n"])
    values = wait_metrics(url, {"sockserve_connections_total": 20})
    assert values["sockserve_connections_total"] == 20
    assert values["sockserve_bytes_received_total"] == 100
    victim = int(server.read_until(r"started worker (\d+)").group(1))
    os.kill(victim, signal.SIGKILL)
    server.read_until(rf"worker {victim} died", timeout=5)
    values = wait_metrics(url, {"sockserve_worker_restarts_total": 1})
    assert values["sockserve_worker_restarts_total"] == 1
    # The dead worker's counted connections are still in the sum.
    assert values["sockserve_connections_total"] >= 20 - 10


def test_a_failing_scrape_answers_500_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    def render() -> bytes:
        raise OSError("the metrics directory is gone")

    async def scrape_once(sock: socket.socket) -> bytes:
        server = MetricsServer(sock, lambda: None, render)
        server.start()
        try:
            reader, writer = await asyncio.open_connection(*sock.getsockname())
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()
            return answer
        finally:
            server.close()

    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        answer = asyncio.run(scrape_once(sock))
    assert answer.startswith(b"HTTP/1.1 500 "), answer
    assert "rendering /metrics failed" in caplog.text
    assert "the metrics directory is gone" in caplog.text
