"""TLS file errors name the setting and the file, at start and on a SIGHUP reload."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from helpers import ServerProcess

Start = Callable[..., ServerProcess]
CERT = "tls_cert (--tls-cert, SOCKSERVE_TLS_CERT)"
KEY = "tls_key (--tls-key, SOCKSERVE_TLS_KEY)"


@pytest.fixture
def files() -> Iterator[dict[str, str]]:
    """Certificates in a directory every user can reach (pytest's tmp_path is root-only)."""
    directory = tempfile.mkdtemp(prefix="sockserve-tls-", dir="/tmp")
    try:
        yield write_files(Path(directory))
    finally:
        shutil.rmtree(directory)


def write_files(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    other = ca.issue_cert("other")
    paths = {
        "cert": tmp_path / "cert.pem",  # certificate only
        "both": tmp_path / "both.pem",  # certificate and key
        "key": tmp_path / "key.pem",
        "other_key": tmp_path / "other.key",
    }
    issued.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    issued.private_key_and_cert_chain_pem.write_to_path(str(paths["both"]))
    issued.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    tmp_path.chmod(0o755)  # the unprivileged run below must reach the files
    return {name: str(path) for name, path in paths.items()}


def run_demo(*args: str, env: dict[str, str] | None = None, **popen: object) -> tuple[int, str]:
    bind = [] if "--bind" in args else ["--bind", "127.0.0.1:0"]
    result = subprocess.run(
        [sys.executable, "-m", "sockserve", "demo", *bind, *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        **popen,  # type: ignore[call-overload]
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tls-cert", "/nonexistent/nope.pem"], f"{CERT}: /nonexistent/nope.pem: no such file"),
        (["--tls-cert", "{cert}"], f"{CERT}: {{cert}}: no private key in the file"),
        (["--tls-cert", "{key}"], f"{CERT}: {{key}}: no PEM certificate in the file"),
        (
            ["--tls-cert", "{cert}", "--tls-key", "{other_key}"],
            f"{KEY}: {{other_key}}: the key does not match the certificate {{cert}}",
        ),
        (
            ["--tls-cert", "{cert}", "--tls-key", "/nonexistent/k.pem"],
            f"{KEY}: /nonexistent/k.pem: no such file",
        ),
        (["--tls-cert", "{cert}", "--tls-key", "{cert}"], f"{KEY}: {{cert}}: no PEM private key"),
    ],
    ids=["missing", "no-key", "not-a-cert", "mismatch", "missing-key", "key-not-a-key"],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_tls_files_fail_at_start_in_one_line(
    files: dict[str, str], args: list[str], expected: str, workers: str
) -> None:
    code, err = run_demo(*(a.format(**files) for a in args), "--workers", workers)
    assert code == 2, err
    assert err == f"sockserve: error: {expected.format(**files)}\n" or (
        err.startswith(f"sockserve: error: {expected.format(**files)}") and err.count("\n") == 1
    ), err


# Root reads anything: the CLI runs as nobody, with what it needs imported before the
# switch (the interpreter's own files may be unreadable to nobody).
AS_NOBODY = """
import locale, os, shutil, sys  # argparse imports shutil (and 3.10's gettext, locale) late
import sockserve.cli, sockserve.observability, sockserve.server, sockserve.supervisor
import sockserve.tls, sockserve.examples.uppercase
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(sockserve.cli.main(sys.argv[1:]))
"""


def test_unreadable_key_is_named(files: dict[str, str]) -> None:
    os.chmod(files["key"], 0o000)
    args = ["demo", "--bind", "127.0.0.1:0", "--tls-cert", files["cert"], "--tls-key", files["key"]]
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        cwd="/",
    )
    code, err = result.returncode, result.stderr
    assert code == 2, err
    assert err == f"sockserve: error: {KEY}: {files['key']}: permission denied\n"


def test_empty_tls_cert_variable_is_refused_not_plaintext(files: dict[str, str]) -> None:
    code, err = run_demo(env={"SOCKSERVE_TLS_CERT": ""})
    assert code == 2
    assert err == f"sockserve: error: {CERT}: empty: give a value, or leave the setting out\n"


@pytest.mark.parametrize("bind", ["udp://127.0.0.1:0", "unix-dgram:{dir}/d.sock"])
def test_tls_on_datagram_listeners_only_is_refused(
    files: dict[str, str], bind: str, tmp_path: Path
) -> None:
    address = bind.format(dir=tmp_path)
    code, err = run_demo("--bind", address, "--tls-cert", files["both"])
    assert code == 2
    assert err.startswith(f"sockserve: error: {CERT}: TLS needs a stream listener"), err
    assert "plaintext" in err and err.count("\n") == 1


def test_reload_with_a_bad_key_names_it_and_keeps_serving(
    files: dict[str, str], start_server: Start
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"\0sockserve-test-{os.getpid()}-tls")
    notify.settimeout(15)
    try:
        server = start_server(
            [
                "demo",
                "--bind",
                "127.0.0.1:0",
                "--tls-cert",
                files["cert"],
                "--tls-key",
                files["key"],
            ],
            env={"NOTIFY_SOCKET": f"@sockserve-test-{os.getpid()}-tls"},
        )
        assert b"READY=1" in notify.recv(4096)  # SIGHUP is handled from now on
    finally:
        notify.close()
    Path(files["key"]).write_bytes(Path(files["other_key"]).read_bytes())
    server.signal(signal.SIGHUP)
    line = server.read_until("TLS reload failed").string
    assert (
        f"keeping the old certificate: {KEY}: {files['key']}: the key does not match the"
        f" certificate {files['cert']}" in line
    )
    os.unlink(files["cert"])
    server.signal(signal.SIGHUP)
    line = server.read_until("TLS reload failed").string
    assert f"{CERT}: {files['cert']}: no such file" in line
