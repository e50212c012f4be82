"""Stdlib socketserver peers for testing sockserve's client and load generator."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager

JOIN_TIMEOUT = 30.0


class TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    """Serve in a thread; shut down, close and join in teardown."""
    # A short poll interval: the stdlib's shutdown() waits up to one interval.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(JOIN_TIMEOUT)


@contextmanager
def tcp_server(handler: type[socketserver.BaseRequestHandler]) -> Iterator[str]:
    """An address ``127.0.0.1:PORT`` served by ``handler``."""
    with serving(TCPServer(("127.0.0.1", 0), handler)) as server:
        yield f"127.0.0.1:{server.server_address[1]}"  # type: ignore[index]
