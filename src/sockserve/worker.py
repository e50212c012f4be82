"""A worker process: the child side of the supervisor's fork, and the supervisor's record of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from sockserve.binding import Listener
from sockserve.importer import HandlerImportError, HandlerRef, check_kind, load_handler_as
from sockserve.kinds import HandlerKindError
from sockserve.metrics import Metrics
from sockserve.process import Identity, default_signals
from sockserve.runner import StopError, run_server
from sockserve.settings import Settings

if TYPE_CHECKING:
    from sockserve.admission import BrokerLink

__all__ = ["BOOT_ERROR", "HEARTBEAT", "Worker", "WorkerProcess", "heartbeat_interval"]

# A worker's own life (failed to start, orphaned) is the supervisor's concern: workers.
logger = logging.getLogger("sockserve.supervisor")

BOOT_ERROR = 3  # a worker exits with this when it could not start serving
HEARTBEAT = 1.0  # a worker's loop writes a byte to the supervisor this often (at most)
READY = b"1"  # the first byte on the beat pipe: serving
BEAT = b"."  # every later one: the loop is alive
FAILED = b"E"  # instead of READY: could not start; a one-line reason follows
MAX_REASON = 2000


def heartbeat_interval(settings: Settings) -> float:
    """How often workers beat and the supervisor checks: several times per timeout."""
    return min(HEARTBEAT, settings.worker_timeout / 4)


@dataclass(eq=False)
class WorkerProcess:
    """The supervisor's record of one worker process, and the reading end of its beat
    pipe (``Worker`` writes it)."""

    pid: int
    slot: int  # which of the ``workers`` places it fills
    generation: int  # a reload starts a new one
    beat_fd: int  # the worker writes READY here once it serves, then a BEAT now and then
    started: float
    ready: bool = False
    stopping: bool = False
    last_beat: float = 0.0
    kill_at: float = math.inf  # SIGKILL if still running then (after a stop request)
    failure: str = ""  # why it could not start, in its own words
    link: BrokerLink | None = None  # the worker asks the per-client table over this

    def heard(self, data: bytes, now: float) -> bool:
        """Take what the worker wrote: READY (or FAILED and why) first, then heartbeats.
        True when this made it ready."""
        ready = False
        if not self.ready and not self.failure:
            if data.startswith(FAILED):
                self.failure = data[1:].decode(errors="replace").strip() or "no reason given"
                return False
            if data.startswith(READY):
                self.ready = ready = True
        if not data.strip(READY + BEAT):  # anything else is not a heartbeat
            self.last_beat = now
        return ready


class Worker:
    """Takes the service user's identity, imports the handler and serves ``listeners``
    until told to stop.

    It writes READY to ``beat_fd`` once it serves (or FAILED and the reason if it cannot),
    then a BEAT every heartbeat interval, and stops when ``alive_fd`` reads EOF (the
    supervisor is gone).
    """

    def __init__(
        self,
        handler: HandlerRef,
        settings: Settings,
        listeners: list[Listener],
        *,
        beat_fd: int,
        alive_fd: int,
        identity: Identity | None,
        ssl_context: ssl.SSLContext | None,
        metrics: tuple[Metrics, Listener] | None,
        admission_link: socket.socket | None = None,
    ) -> None:
        self.handler = handler
        self.admission_link = admission_link
        self.settings = settings
        self.listeners = listeners
        self.beat_fd = beat_fd
        self.alive_fd = alive_fd
        self.identity = identity
        self.ssl_context = ssl_context
        self.metrics = metrics
        self.ready = False
        self.early_signals: list[int] = []  # TERM/INT that came before the loop took over

    def start(self, blocked: Iterable[signal.Signals], let_go: Callable[[], None]) -> int:
        """Fork the worker's process and return its pid. The ``blocked`` signals wait
        until the child has its own handlers: one sent to the new pid at once must not run
        the parent's handler there (and be lost). In the child, ``let_go`` closes the
        parent's descriptors first; the child never returns."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
            if pid == 0:
                try:  # never back into the parent's loop: this is not the supervisor
                    let_go()
                    self.catch_signals()
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    self.run()
                except BaseException:
                    logger.exception("worker %d could not start", os.getpid())
                finally:
                    os._exit(BOOT_ERROR)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return pid

    def catch_signals(self) -> None:
        """First thing in the child: TERM and INT are noted (a worker stopped while it
        still imports serves what it accepted, then stops), the supervisor's other signals
        ignored."""
        default_signals()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._early_signal)
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    def _early_signal(self, signum: int, frame: object) -> None:
        self.early_signals.append(signum)

    def run(self) -> NoReturn:
        """Serve, then exit the process: never returns."""
        code = 0
        try:
            os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
            if self.identity is not None:
                self.identity.assume(log=False)
            try:
                handler = load_handler_as(self.handler, self.identity)
                check_kind(handler, self.listeners)
            except (HandlerImportError, HandlerKindError) as exc:
                self._failed(str(exc))
                code = BOOT_ERROR
            else:
                run_server(
                    handler,
                    self.settings,
                    self.listeners,
                    started=self._started,
                    early_signals=self.early_signals,
                    metrics=self.metrics,
                    ssl_context=self.ssl_context,
                    admission_link=self.admission_link,
                )
        except StopError:
            code = 1
        except BaseException as exc:
            if self.ready:
                logger.exception("worker %d failed", os.getpid())
                code = 1
            else:
                logger.debug("worker %d could not start", os.getpid(), exc_info=exc)
                self._failed(f"{type(exc).__name__}: {exc}")
                code = BOOT_ERROR
        finally:
            logging.shutdown()
            os._exit(code)

    def _failed(self, reason: str) -> None:
        """Tell the supervisor why this worker cannot serve (one write: one message)."""
        with contextlib.suppress(OSError):
            os.write(self.beat_fd, FAILED + reason.encode(errors="replace")[:MAX_REASON])

    def _started(self, stop: Callable[[bool], None]) -> None:
        """Serving: say so, start the heartbeat, and watch for the supervisor's death."""
        loop = asyncio.get_running_loop()
        os.write(self.beat_fd, READY)
        self.ready = True
        os.set_blocking(self.beat_fd, False)
        interval = heartbeat_interval(self.settings)

        def beat() -> None:
            with contextlib.suppress(OSError):  # full, or the supervisor is gone
                os.write(self.beat_fd, BEAT)
            loop.call_later(interval, beat)

        if interval:
            loop.call_later(interval, beat)

        def supervisor_gone() -> None:
            loop.remove_reader(self.alive_fd)
            logger.error("supervisor is gone; stopping")
            stop(False)

        loop.add_reader(self.alive_fd, supervisor_gone)
