"""sockserve.testing: every handler kind served in a thread, errors re-raised, nothing leaked."""

from __future__ import annotations

import contextlib
import os
import shutil
import socketserver as stdlib_socketserver
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockserve import DatagramHandler, LineHandler, MessageHandler, StreamHandler
from sockserve import socketserver as sockserve_socketserver
from sockserve.framing import LengthPrefixed
from sockserve.process import new_event_loop
from sockserve.testing import Client, RunningServer, serve

ROOT = Path(__file__).resolve().parent.parent


class Upper(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


class StreamUpper(StreamHandler):
    async def handle(self) -> None:
        while line := await self.readline():
            self.write(line.upper())
            await self.drain()


class DatagramUpper(DatagramHandler):
    def handle_datagram(self, data: bytes, client_address: Any) -> bytes:
        return data.upper()


class BlockingUpper(sockserve_socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


class StdlibBlockingUpper(stdlib_socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


class BlockingDatagramUpper(sockserve_socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


HANDLERS = [Upper, StreamUpper, DatagramUpper, BlockingUpper, StdlibBlockingUpper]
HANDLERS.append(BlockingDatagramUpper)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def no_leaks() -> Iterator[None]:
    """Fail if the block leaves a thread or a file descriptor behind."""
    new_event_loop("auto").close()  # uvloop's first loop opens a pipe kept for the process
    threads = set(threading.enumerate())
    fds = open_fds()
    yield
    assert set(threading.enumerate()) - threads == set()
    # A descriptor number may be reused; what must hold is that none is left open.
    assert open_fds() - fds == set()


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_serves_every_handler_kind(handler: type, unix: bool) -> None:
    with no_leaks():
        with serve(handler, unix=unix) as server:
            scheme = server.url.split(":", 1)[0]
            datagram = handler in (DatagramUpper, BlockingDatagramUpper)
            if unix:
                assert scheme == ("unix-dgram" if datagram else "unix")
                assert os.path.exists(server.address)
                socket_dir = os.path.dirname(server.address)
            else:
                assert scheme == ("udp" if datagram else "tcp")
                host, port = server.address
                assert host == "127.0.0.1" and port > 0
            with server.connect() as client:
                assert client.request(b"hello\n") == b"HELLO\n"
                assert client.request(b"again") == b"AGAIN" + (b"" if datagram else b"\n")
            other = server.connect()  # left open: stopping the server closes it
            other.send(b"x\n")
            assert other.read_message() == b"X\n"
        assert server.errors == []
    if unix:
        assert not os.path.exists(socket_dir)


def test_fixture_serves_and_tears_down(
    sockserve_server: Callable[..., RunningServer],
) -> None:
    first = sockserve_server(Upper)
    second = sockserve_server(StreamUpper, unix=True)
    for server in (first, second):
        with server.connect() as client:
            assert client.request(b"fixture") == b"FIXTURE\n"


class Crashing(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        if line.startswith(b"boom"):
            raise ZeroDivisionError("boom")
        return line


class CrashingBlocking(sockserve_socketserver.StreamRequestHandler):
    def handle(self) -> None:
        raise KeyError("blocking boom")


def test_handler_error_is_reraised_at_exit() -> None:
    with no_leaks():
        with pytest.raises(ZeroDivisionError, match="boom"):
            with serve(Crashing) as server:
                with server.connect() as client:
                    assert client.request(b"fine") == b"fine\n"
                    client.send(b"boom\n")
                    assert client.wait_closed() == b""  # the failing connection is closed
                with server.connect() as client:
                    assert client.request(b"still serving") == b"still serving\n"


def test_blocking_handler_error_is_reraised_at_exit() -> None:
    with pytest.raises(KeyError, match="blocking boom"):
        with serve(CrashingBlocking) as server:
            with server.connect() as client:
                client.wait_closed()


def test_errors_kept_without_raising() -> None:
    with serve(Crashing, raise_errors=False) as server:
        for _ in range(2):
            with server.connect() as client:
                client.send(b"boom\n")
                client.wait_closed()
    assert [type(error) for error in server.errors] == [ZeroDivisionError] * 2


def test_error_in_the_block_is_not_masked() -> None:
    with pytest.raises(AssertionError, match="the test's own failure"):
        with serve(Crashing) as server:
            with server.connect() as client:
                client.send(b"boom\n")
                client.wait_closed()
            raise AssertionError("the test's own failure")
    assert len(server.errors) == 1


class Silent(LineHandler):
    def handle_line(self, line: bytes) -> None:
        return None


def test_reads_time_out_naming_the_server() -> None:
    with serve(Silent) as server:
        with server.connect(timeout=0.2) as client:
            client.send(b"no reply\n")
            with pytest.raises(TimeoutError, match=f"no line from {server.url} within 0.2 s"):
                client.readline()
            with pytest.raises(TimeoutError, match="no 4 bytes"):
                client.read(4, timeout=0.1)
            with pytest.raises(TimeoutError, match="end of stream"):
                client.wait_closed(timeout=0.1)


def test_datagram_reads_time_out() -> None:
    class Mute(DatagramHandler):
        def handle_datagram(self, data: bytes, client_address: Any) -> None:
            return None

    with serve(Mute) as server:
        with server.connect(timeout=0.2) as client:
            with pytest.raises(TimeoutError, match="no datagram"):
                client.request(b"anyone?")


def test_client_reads_bytes_and_half_closes() -> None:
    class Count(StreamHandler):
        async def handle(self) -> None:
            data = await self.read()
            self.write(b"%d\n" % len(data))

    with serve(Count) as server:
        with server.connect() as client:
            assert isinstance(client, Client)
            client.send(b"x" * 100_000)
            client.shutdown_write()
            assert client.read(3) == b"100"
            assert client.read() == b"000\n"


def test_call_runs_in_the_server_loop() -> None:
    with serve(Upper) as server:
        assert server.call(threading.current_thread) is not threading.current_thread()
        assert server.call(lambda: server.server.urls) == [server.url]


def test_bad_setting_fails_at_start_and_leaks_nothing() -> None:
    from sockserve import HandlerKindError, SettingsError

    with no_leaks():
        with pytest.raises(SettingsError, match="max_line"):
            with serve(Upper, max_line=0):
                pass
        with pytest.raises(SettingsError, match=r"workers .* one server in a thread"):
            with serve(Upper, workers=2):
                pass
        with pytest.raises(HandlerKindError):
            with serve(object, unix=True):
                pass
        with pytest.raises(OSError):  # a bind that fails stops nothing but itself
            with serve(Upper, bind=["unix:/nonexistent-dir/x.sock"]):
                pass


def test_import_sockserve_does_not_load_pytest() -> None:
    code = "import sys, sockserve, sockserve.server; assert 'pytest' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# A test module a user might write: no conftest, no import of the plugin.
USER_TESTS = textwrap.dedent(
    """
    from sockserve import LineHandler


    class Upper(LineHandler):
        def handle_line(self, line):
            if line == b"crash\\n":
                raise RuntimeError("handler crashed")
            return line.upper()


    def test_upper(sockserve_server):
        server = sockserve_server(Upper)
        with server.connect() as client:
            assert client.request(b"hi") == b"HI\\n"


    def test_crash_fails_at_teardown(sockserve_server):
        server = sockserve_server(Upper)
        with server.connect() as client:
            client.send(b"crash\\n")
            client.wait_closed()
    """
)


def run_user_tests(python: str, directory: Path) -> subprocess.CompletedProcess[str]:
    (directory / "test_user.py").write_text(USER_TESTS)
    return subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=directory,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def check_user_run(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert "2 passed, 1 error" in output, output  # the crash fails its teardown
    assert "RuntimeError: handler crashed" in output, output
    assert "ERROR at teardown of test_crash_fails_at_teardown" in output, output


def test_plugin_works_in_a_project_without_conftest(tmp_path: Path) -> None:
    check_user_run(run_user_tests(sys.executable, tmp_path))


def pip(*args: str) -> None:
    """Run this environment's pip (the new venv has none of its own)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)  # builds a wheel and installs pytest: slow on a loaded machine
def test_plugin_works_after_pip_install_into_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it and pytest into a new venv, run a user's test file."""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside it
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    pip("wheel", "--no-deps", "-w", str(wheels), str(source))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    (wheel,) = wheels.glob("sockserve-*.whl")
    pip("--python", python, "install", str(wheel), "pytest")
    project = tmp_path / "project"
    project.mkdir()
    check_user_run(run_user_tests(python, project))


class LengthUpper(StreamHandler):
    """Frames by hand what a message handler would: a 4-byte length, then the payload."""

    framing = LengthPrefixed("!I")

    async def handle(self) -> None:
        while header := await self.read(4):
            payload = await self.readexactly(int.from_bytes(header, "big"))
            self.write(self.framing.encode(payload.upper()))


def test_messages_use_the_handlers_framing() -> None:
    with serve(LengthUpper) as server:
        with server.connect() as client:
            assert client.framing is LengthUpper.framing
            assert client.request(b"no newline needed") == b"NO NEWLINE NEEDED"
            client.send(LengthUpper.framing.encode(b"one") + LengthUpper.framing.encode(b"two"))
            assert [client.read_message(), client.read_message()] == [b"ONE", b"TWO"]
            client.send_message(b"x" * 100_000)
            assert client.read_message() == b"X" * 100_000
            client.shutdown_write()
            assert client.read_message() == b""


class MessageUpper(MessageHandler):
    """Lines() framing by default: the message is the line without its newline."""

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()


class LengthMessageUpper(MessageHandler):
    framing = LengthPrefixed("!I")

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("handler", [MessageUpper, LengthMessageUpper], ids=lambda h: h.__name__)
def test_serves_message_handlers_in_their_framing(
    handler: type[MessageHandler], unix: bool
) -> None:
    with no_leaks():
        with serve(handler, unix=unix) as server:
            with server.connect() as client:
                assert client.framing is handler.framing
                assert client.request(b"hello") == b"HELLO"
                client.send_message(b"one")
                client.send_message(b"two")
                assert [client.read_message(), client.read_message()] == [b"ONE", b"TWO"]


def test_connects_over_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with no_leaks():
        with serve(StreamUpper, tls_cert=str(cert)) as server:
            with server.connect(tls=context) as client:
                assert isinstance(client.sock, ssl.SSLSocket)
                assert client.request(b"secret") == b"SECRET\n"
