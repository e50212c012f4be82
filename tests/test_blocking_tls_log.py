"""What blocking (socketserver) handlers' TLS handshakes log when they fail."""

from __future__ import annotations

import logging
import re
import time

import pytest

from helpers import BlockingUpper, closed_by_server, connect, serving


def test_a_silent_tls_peer_is_logged_as_a_handshake_timeout(
    loop: str, certs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = {"tls_cert": certs["cert"], "tls_key": certs["key"], "handshake_timeout": 0.3}
    with serving(BlockingUpper, loop, **settings) as server:
        with connect(server.address) as sock:
            assert closed_by_server(sock)  # no ClientHello ever comes
        deadline = time.monotonic() + 5
        while "TLS handshake failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert re.search(r"TLS handshake failed for 127\.0\.0\.1:\d+: timeout\n", caplog.text), (
        caplog.text
    )
