"""The framing kit from the command line: client and bench --framing, the JSON example,
the --message-timeout alias, and a message handler under ``sockserve run --workers``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import serving
from sockserve import LengthPrefixed, MessageHandler, Netstring
from sockserve.cli import build_parser, settings_from
from sockserve.examples.json_rpc import FRAMING, JsonRpc, JsonRpcClient
from sockserve.settings import env_settings

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0


class UpperU32(MessageHandler):
    framing = LengthPrefixed("!I")

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()


class BinaryNetstring(MessageHandler):
    """Replies with bytes that are not text, and pushes a greeting first."""

    framing = Netstring()

    def setup(self) -> None:
        self.send(b"hi\x00")

    def handle_message(self, message: bytes) -> bytes:
        return message + b"\xff\n"


class Garbage(MessageHandler):
    """Answers a netstring with bytes no netstring starts with."""

    framing = Netstring()

    def handle_message(self, message: bytes) -> None:
        self.write(b"x:bad")


def sockserve(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sockserve", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )


def test_client_sends_each_line_as_one_frame() -> None:
    with serving(UpperU32) as server:
        host, port = server.address
        done = sockserve("client", f"{host}:{port}", "--framing", "u32", stdin="hello\nwor\tld\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "HELLO\nWOR\\tLD\n"


def test_client_escapes_what_is_not_printable_and_prints_pushed_messages() -> None:
    with serving(BinaryNetstring) as server:
        host, port = server.address
        done = sockserve("client", f"{host}:{port}", "--framing", "netstring", stdin="a\nb\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\\x00\na\\xff\\n\nb\\xff\\n\n"


def test_client_reports_a_bad_framing_and_a_broken_reply() -> None:
    done = sockserve("client", "127.0.0.1:9", "--framing", "u24")
    assert done.returncode == 2
    assert "--framing" in done.stderr and "u24" in done.stderr
    with serving(Garbage) as server:
        host, port = server.address
        done = sockserve("client", f"{host}:{port}", "--framing", "netstring", stdin="x\n")
    assert done.returncode == 1
    assert "bad reply" in done.stderr


class UpperNetstring(MessageHandler):
    framing = Netstring()

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()


@pytest.mark.parametrize("framing", ["u32", "netstring"])
def test_bench_drives_framed_load(framing: str) -> None:
    handler = UpperU32 if framing == "u32" else UpperNetstring
    with serving(handler) as server:
        host, port = server.address
        args = ["bench", f"{host}:{port}", "--framing", framing, "-c", "4", "-n", "400"]
        done = sockserve(*args, "--expect", "upper", "--json", "-q")
        text = sockserve(*args, "--expect", "upper", "-q")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["framing"] == framing and data["requests"] == 400 and data["errors"] == 0
    header = 4 if framing == "u32" else len("64:,")
    assert data["bytes_sent"] == 400 * (64 + header)
    assert f"64-byte {framing} messages" in text.stdout


def test_bench_counts_mismatches_in_frames() -> None:
    with serving(UpperU32) as server:
        host, port = server.address
        done = sockserve(
            "bench", f"{host}:{port}", "--framing", "u32", "-n", "50", "--expect", "echo", "-q"
        )
    assert done.returncode == 1
    assert re.search(r"mismatch 50", done.stdout)


def test_bench_refuses_a_size_the_framing_cannot_carry() -> None:
    done = sockserve("bench", "127.0.0.1:9", "--framing", "u8", "--size", "300")
    assert done.returncode == 2 and "--size 300" in done.stderr
    done = sockserve("bench", "127.0.0.1:9", "--framing", "fixed:8")
    assert done.returncode == 2 and "--size must be 8" in done.stderr


def test_json_example_client_and_server() -> None:
    with serving(JsonRpc) as server:
        with JsonRpcClient(server.address) as rpc:
            assert rpc.call("add", 2, 3) == 5
            assert rpc.call("upper", "abc") == "ABC"
            with pytest.raises(RuntimeError, match="KeyError"):
                rpc.call("nope")
            assert rpc.call("echo", 1, [2]) == [1, [2]]
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(FRAMING.encode(b"[1, 2]"))
            framer = FRAMING.framer()
            while (reply := framer.next_message()) is None:
                framer.feed(sock.recv(100))
            assert json.loads(reply)["error"].startswith("TypeError")
            sock.sendall(struct.pack("!I", 1 << 20))  # over the example's 64 KiB
            assert sock.recv(100) == b""


def test_message_timeout_is_an_alias_of_line_timeout() -> None:
    args = build_parser().parse_args(["run", "x:Y", "--message-timeout", "5"])
    assert settings_from(args).line_timeout == 5.0
    args = build_parser().parse_args(["run", "x:Y", "--line-timeout", "7"])
    assert settings_from(args).line_timeout == 7.0
    assert env_settings({"SOCKSERVE_MESSAGE_TIMEOUT": "3"}) == {"line_timeout": "3"}
    both = {"SOCKSERVE_MESSAGE_TIMEOUT": "3", "SOCKSERVE_LINE_TIMEOUT": "4"}
    assert env_settings(both) == {"line_timeout": "4"}


@pytest.fixture
def workers_server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sockserve",
            "run",
            "sockserve.examples.json_rpc:JsonRpc",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        port = 0
        while not port and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if match := re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
        assert port, "no listening line"
        yield proc, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_message_handler_with_workers(workers_server: tuple[subprocess.Popen[str], int]) -> None:
    _, port = workers_server
    for _ in range(4):
        with JsonRpcClient(("127.0.0.1", port)) as rpc:
            assert rpc.call("add", 1, 2, 3) == 6
