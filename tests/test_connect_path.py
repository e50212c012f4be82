"""The connect path releases a connection's slot whatever goes wrong in it (issue 10.7)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from helpers import LOOPS, serving
from sockserve import LineHandler


class Echo(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line


def test_handshake_timeout_zero_is_refused_at_start() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sockserve",
            "demo",
            "-b",
            "127.0.0.1:0",
            "--handshake-timeout",
            "0",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert result.stderr == (
        "sockserve: error: handshake_timeout (--handshake-timeout, SOCKSERVE_HANDSHAKE_TIMEOUT):"
        " 0 is not allowed: this deadline cannot be turned off\n"
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_an_unforeseen_error_while_connecting_releases_the_slot(loop: str, tmp_path: Path) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    cert = trustme.CA().issue_cert("localhost")
    cert_path = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    with serving(Echo, loop, max_connections=2, tls_cert=str(cert_path)) as server:
        # An invalid deadline makes the loop's connect call raise ValueError: a stand-in for
        # any exception the connect path did not foresee.
        object.__setattr__(server.server.settings, "handshake_timeout", 0.0)
        for _ in range(5):  # more than max_connections: a leaked slot would stop accepting
            with socket.create_connection(server.address, timeout=5) as sock:
                try:
                    assert sock.recv(1) == b""  # closed by the server, not left waiting
                except ConnectionResetError:
                    pass
        assert server.call(lambda: server.server.ledger.open) == 0
