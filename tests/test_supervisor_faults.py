"""The supervisor survives what its workers and the system do to it: workers killed by
unnamed signals, handler imports that hang, descriptors running out."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import ServerProcess, address_of, ask, wait_for, worker_pids

StartServer = Callable[..., ServerProcess]

APP = """
import sockserve

class App(sockserve.LineHandler):
    def handle_line(self, line):
        return line
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def test_a_worker_killed_by_a_signal_without_a_name_is_replaced(
    start_server: StartServer, app_dir: Path
) -> None:
    server = start_server(
        ["run", "app:App", "--workers", "2", "--bind", "127.0.0.1:0"], cwd=str(app_dir)
    )
    address = address_of(server.urls[0])
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 2, server)
    victim = worker_pids(server)[0]
    unnamed = signal.SIGRTMIN + 6
    with pytest.raises(ValueError):
        signal.Signals(unnamed)
    os.kill(victim, unnamed)
    server.read_until(rf"worker {victim} died \(signal {int(unnamed)}\)")
    wait_for(lambda: server.text.count("sockserve.server: listening on") == 3, server)
    assert ask(address) == b"hi\n"
    assert victim not in worker_pids(server)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
