"""A worker process: the child side of the supervisor's fork."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import NoReturn

from sockserve.binding import Listener
from sockserve.kinds import HandlerKindError, handler_kind
from sockserve.observability import Metrics
from sockserve.runner import HandlerImportError, HandlerRef, load_handler, run_server
from sockserve.settings import Settings

__all__ = ["BOOT_ERROR", "HEARTBEAT", "Worker", "heartbeat_interval"]

logger = logging.getLogger("sockserve.supervisor")

BOOT_ERROR = 3  # a worker exits with this when the handler cannot be loaded
HEARTBEAT = 1.0  # a worker's loop writes a byte to the supervisor this often (at most)


def heartbeat_interval(settings: Settings) -> float:
    """How often workers beat and the supervisor checks: several times per timeout."""
    return min(HEARTBEAT, settings.worker_timeout / 4)


class Worker:
    """Imports the handler and serves ``listeners`` until told to stop.

    It writes one byte to ``beat_fd`` once it serves, then one every heartbeat interval,
    and stops when ``alive_fd`` reads EOF (the supervisor is gone).
    """

    def __init__(
        self,
        handler: HandlerRef,
        settings: Settings,
        listeners: list[Listener],
        *,
        beat_fd: int,
        alive_fd: int,
        metrics: tuple[Metrics, Listener] | None,
        admission_link: socket.socket | None = None,
    ) -> None:
        self.handler = handler
        self.admission_link = admission_link
        self.settings = settings
        self.listeners = listeners
        self.beat_fd = beat_fd
        self.alive_fd = alive_fd
        self.metrics = metrics

    @staticmethod
    def reset_signals() -> None:
        """Undo the supervisor's signal handling: first thing in the child after fork."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)  # the server's loop handles HUP once up

    def run(self) -> NoReturn:
        """Serve, then exit the process: never returns."""
        code = 0
        try:
            os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
            try:
                handler = load_handler(self.handler)
                handler_kind(handler)
            except (HandlerImportError, HandlerKindError) as exc:
                logger.error("worker %d cannot load the handler: %s", os.getpid(), exc)
                os._exit(BOOT_ERROR)
            run_server(
                handler,
                self.settings,
                self.listeners,
                started=self._started,
                metrics=self.metrics,
                admission_link=self.admission_link,
            )
        except BaseException:
            logger.exception("worker %d failed", os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _started(self, stop: Callable[[bool], None]) -> None:
        """Serving: say so, start the heartbeat, and watch for the supervisor's death."""
        loop = asyncio.get_running_loop()
        os.write(self.beat_fd, b"1")
        os.set_blocking(self.beat_fd, False)
        interval = heartbeat_interval(self.settings)

        def beat() -> None:
            with contextlib.suppress(BlockingIOError):
                os.write(self.beat_fd, b".")
            loop.call_later(interval, beat)

        if interval:
            loop.call_later(interval, beat)

        def supervisor_gone() -> None:
            loop.remove_reader(self.alive_fd)
            logger.error("supervisor is gone; stopping")
            stop(False)

        loop.add_reader(self.alive_fd, supervisor_gone)
