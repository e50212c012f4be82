"""A reader that goes away early (``sockserve bench --json | head``) ends the command quietly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def closed_port() -> int:
    with socket.socket() as sock:  # bound, read, closed: nothing else in the test binds
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_bench_json_into_a_closed_pipe_exits_quietly() -> None:
    argv = [sys.executable, "-m", "sockserve", "bench", f"127.0.0.1:{closed_port()}"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the summary is printed
    try:
        done = subprocess.run(
            [*argv, "-c", "1", "--duration", "1", "--json", "--quiet"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            check=False,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr
    assert "BrokenPipeError" not in done.stderr
