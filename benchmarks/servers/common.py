"""Argument parsing and loop selection shared by the reference servers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def parse_args(description: str, *, loop: str | None = "asyncio") -> argparse.Namespace:
    """``--bind HOST:PORT`` (or positional HOST PORT), ``--backlog`` and ``--loop``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("host", nargs="?", default=None)
    parser.add_argument("port", nargs="?", type=int, default=None)
    parser.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT (port 0: ephemeral)")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog")
    if loop is not None:
        parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=loop)
    args = parser.parse_args()
    if args.host is not None:
        args.port = args.port or 0
    else:
        host, _, port = args.bind.rpartition(":")
        args.host, args.port = host.strip("[]") or "127.0.0.1", int(port)
    return args


def announce(scheme: str, sockname: tuple[Any, ...]) -> None:
    """Print the ``listening on URL`` line the harness waits for."""
    host = sockname[0]
    host = f"[{host}]" if ":" in host else host
    print(f"listening on {scheme}://{host}:{sockname[1]}", flush=True)


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str) -> None:
    """Run ``main()`` on uvloop or plain asyncio; Ctrl-C and SIGTERM end it quietly.

    The signals reach the event loop (add_signal_handler), which cancels ``main``; a
    KeyboardInterrupt from a Python-level handler would land wherever the loop happens
    to be instead.
    """
    if loop == "uvloop":
        import uvloop

        uvloop.run(_until_signalled(main))
    else:
        asyncio.run(_until_signalled(main))


async def _until_signalled(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    task = asyncio.current_task()
    assert task is not None
    running = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await main()


async def serve_until_stopped(server: asyncio.AbstractServer) -> None:
    """Serve until cancelled, then stop listening and return at once.

    Not ``async with server`` or ``serve_forever()``: on Python 3.12+ both wait for every
    client connection to close, so a signal with a client still connected hung the
    server. Open connections end with the process.
    """
    try:
        await asyncio.Event().wait()
    finally:
        server.close()
