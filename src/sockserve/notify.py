"""systemd's sd_notify: READY, RELOADING and STOPPING, when NOTIFY_SOCKET is set."""

from __future__ import annotations

import contextlib
import os
import socket
import time

__all__ = ["notify"]


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``...) to the service manager; False if there is none.

    The socket path comes from NOTIFY_SOCKET (``@name`` is an abstract socket), as in
    sd_notify(3). Errors are swallowed: a lost notification must not stop the server.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not states:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    message = "\n".join(states).encode()
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.sendall(message)
        return True
    return False


def reloading() -> bool:
    """RELOADING=1 with the MONOTONIC_USEC systemd 253+ asks for (older ones ignore it)."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )
