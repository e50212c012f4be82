"""A bench run that got no reply prints no latency figures (not a row of 0.000)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys


def closed_port() -> int:
    with socket.socket() as sock:  # bound, read, closed: nothing else in the test binds
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sockserve", "bench", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


def test_no_replies_no_latencies() -> None:
    port = closed_port()
    text = bench(f"127.0.0.1:{port}", "-c", "2", "--duration", "5", "--quiet")
    assert text.returncode == 1
    assert "requests     0" in text.stdout
    assert "latency ms   - (no replies)" in text.stdout
    assert "0.000" not in text.stdout
    as_json = bench(f"127.0.0.1:{port}", "-c", "2", "--duration", "5", "--json")
    assert json.loads(as_json.stdout)["latency_ms"] is None
