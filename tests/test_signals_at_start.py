"""A signal sent as soon as the server says it listens is acted on: the handlers are in
place before the first "listening on" line, with workers and without."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from helpers import ServerProcess

StartServer = Callable[..., ServerProcess]
MODES = {"single": [], "workers": ["--workers", "2"]}


@pytest.mark.parametrize("mode", MODES)
def test_sighup_right_after_listening_is_acted_on(start_server: StartServer, mode: str) -> None:
    server = start_server(["demo", "--bind", "127.0.0.1:0", *MODES[mode]])
    server.signal(signal.SIGHUP)  # at once: start_server returns on the first listening line
    server.read_until("reload done" if mode == "workers" else "SIGHUP: nothing to reload", 30)
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.text


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_right_after_listening_stops_gracefully(
    start_server: StartServer, mode: str
) -> None:
    server = start_server(["demo", "--bind", "127.0.0.1:0", *MODES[mode]])
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.text
    assert "stopped" in server.text
