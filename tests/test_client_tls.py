"""``sockserve client``: client certificates for mutual TLS, TLS failures named for what
they are, and a server close noticed while the interactive client waits for input."""

from __future__ import annotations

import os
import pty
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import ServerProcess, address_of

Start = Callable[..., ServerProcess]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client@example.org")
    files = {
        "ca": tmp_path / "ca.pem",
        "server": tmp_path / "server.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
        "other_key": tmp_path / "other.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    server.private_key_pem.write_to_path(str(files["other_key"]))
    return {name: str(path) for name, path in files.items()}


def client(address: str, stdin: bytes, *args: str) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "sockserve", "client", address, *args],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=60,
    )


def test_client_certificate_reaches_an_mtls_server(
    pki: dict[str, str], start_server: Start
) -> None:
    server = start_server(
        ["demo", "-b", "127.0.0.1:0", "--tls-cert", pki["server"], "--tls-client-ca", pki["ca"]]
    )
    port = address_of(server.urls[0])[1]
    address = f"localhost:{port}"
    tls = ["--tls", "--tls-ca", pki["ca"]]
    good = client(
        address, b"hello\n", *tls, "--tls-cert", pki["client_cert"], "--tls-key", pki["client_key"]
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout == b"HELLO\n"

    without = client(address, b"hello\n", *tls)
    assert without.returncode == 1
    err = without.stderr.decode()
    assert "client certificate" in err and "--tls-cert" in err, err
    assert "Traceback" not in err


def test_tls_against_a_plaintext_server_says_so(start_server: Start) -> None:
    server = start_server(["demo", "-b", "127.0.0.1:0"])
    host, port = address_of(server.urls[0])
    result = client(f"{host}:{port}", b"hello\n", "--tls", "--tls-insecure", "--timeout", "1")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "plaintext server" in err, err
    assert err.count("\n") == 1


def test_bad_client_certificate_files_are_named(pki: dict[str, str]) -> None:
    missing = client("127.0.0.1:1", b"", "--tls", "--tls-cert", "/nonexistent/c.pem")
    assert missing.returncode == 2
    assert missing.stderr.decode() == (
        "sockserve client: error: --tls-cert /nonexistent/c.pem: No such file or directory\n"
    )
    no_key = client("127.0.0.1:1", b"", "--tls", "--tls-cert", pki["client_cert"])
    assert no_key.returncode == 2
    assert "no private key in the file (give it with --tls-key)" in no_key.stderr.decode()
    mismatch = client(
        "127.0.0.1:1",
        b"",
        "--tls",
        "--tls-cert",
        pki["client_cert"],
        "--tls-key",
        pki["other_key"],
    )
    assert mismatch.returncode == 2
    assert "the key does not match the certificate" in mismatch.stderr.decode()
    no_tls = client("127.0.0.1:1", b"", "--tls-cert", pki["client_cert"])
    assert no_tls.returncode == 2
    assert "--tls-cert and --tls-key need --tls" in no_tls.stderr.decode()


def test_interactive_client_notices_a_close_while_waiting_for_input(start_server: Start) -> None:
    server = start_server(["demo", "-b", "127.0.0.1:0", "--idle-timeout", "1"])
    host, port = address_of(server.urls[0])
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockserve", "client", f"{host}:{port}"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "dumb"},
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        with selectors.DefaultSelector() as sel:
            sel.register(master, selectors.EVENT_READ)
            while b"server closed the connection" not in seen:
                left = deadline - time.monotonic()
                assert left > 0 and sel.select(left), f"no close noticed; saw {seen!r}"
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the client exited and closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
        assert proc.wait(10) == 1
        assert re.search(rb"> \r?\nsockserve client: server closed the connection", seen), seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
