"""Running a server in this process: TLS and sockets before any privilege drop, one
``Server`` in an event loop with the signals of a single process, and ``serve()``.

What every process sets up is ``sockserve.process``; the handler import and its check,
``sockserve.importer``; the supervisor and its workers, ``sockserve.supervisor``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sockserve import binding, notify
from sockserve.binding import Listener, bind_all
from sockserve.importer import HandlerRef, check_kind, load_handler_as
from sockserve.metrics import Metrics, bind_metrics
from sockserve.observability import configure_logging
from sockserve.process import Identity, new_event_loop, raise_open_file_limit
from sockserve.server import Server
from sockserve.settings import Settings

__all__ = [
    "IMMEDIATE_STOP",
    "StopError",
    "load_before_drop",
    "load_tls",
    "run_server",
    "serve",
    "warn_unremovable",
]

# The process itself, with or without a supervisor: privileges, signals, stopping.
logger = logging.getLogger("sockserve.runner")

IMMEDIATE_STOP = 1.0  # after a second Ctrl-C, whatever still runs gets this long


def load_tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context, read now (before any privilege drop, so the key may stay root's)."""
    if not settings.tls_cert:
        return None
    from sockserve.tls import server_context

    return server_context(settings)


def warn_unremovable(listeners: Sequence[Listener]) -> None:
    """After a drop: say which socket files this process cannot remove at exit."""
    for listener in listeners:
        if listener.unix_path:
            directory = os.path.dirname(os.path.abspath(listener.unix_path))
            if not os.access(directory, os.W_OK | os.X_OK):
                logger.warning(
                    "%s will be left behind at exit: uid %d cannot remove files in %s"
                    " (it is removed at the next start)",
                    listener.unix_path,
                    os.getuid(),
                    directory,
                )


def load_before_drop(settings: Settings) -> None:
    """Import now what serving and stopping will need: after a privilege drop, the
    interpreter's own files may not be readable (a Python under root's home)."""
    binding.prepare_stop()
    if settings.loop in ("auto", "uvloop"):
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: F401


class StopError(Exception):
    """Stopping the server failed; the error was logged and the process should exit 1."""


def _stuck_handler_threads() -> int:
    return sum(
        1 for t in threading.enumerate() if t.name.startswith("sockserve-handler") and t.is_alive()
    )


async def _serve_until_signalled(
    server: Server,
    started: Callable[[Callable[[bool], None]], None] | None = None,
    early_signals: Sequence[int] = (),
) -> None:
    """Start, then stop gracefully on TERM/INT (a second INT stops at once); HUP reloads TLS.

    The signal handlers are in place before the server accepts anything, so a signal
    that arrives while it starts still means a graceful stop; ``early_signals`` are
    those that arrived before this (a worker still importing its handler).
    ``started(stop)`` is called once serving, with the function that stops the server.
    StopError if stopping failed.
    """
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[bool] = loop.create_future()  # True: the stop failed
    stopping: list[asyncio.Task[None]] = []
    requests: list[bool] = []  # stops asked for before the server was started
    serving = False

    def end(failed: bool) -> None:
        if not ended.done():
            ended.set_result(failed)

    def stopped(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("stopping failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            end(True)
        else:
            end(False)

    def stop(immediate: bool) -> None:
        if not serving:
            requests.append(immediate)
            return
        if immediate and stopping:
            logger.info("stopping now")
            try:
                server.abort()
            except Exception:
                logger.exception("stopping failed")
                end(True)
            loop.call_later(IMMEDIATE_STOP, end, False)  # whatever still runs, we go
            return
        if not stopping:
            if started is None:
                notify.notify("STOPPING=1")
            logger.info(
                "stopping: finishing open connections (up to %.1f s)%s",
                server.settings.graceful_timeout,
                "; Ctrl-C again stops at once" if interrupts[0] == 1 else "",
            )
            task = loop.create_task(server.shutdown())
            task.add_done_callback(stopped)
            stopping.append(task)

    interrupts = [0]

    def on_interrupt() -> None:
        """Ctrl-C: a graceful stop, or at once if a stop (by any signal) is under way."""
        interrupts[0] += 1
        stop(bool(stopping or requests))

    def on_signal(signum: int) -> None:
        if signum == signal.SIGINT:
            on_interrupt()
        else:
            stop(False)

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGTERM, stop, False)
    handled = [signal.SIGINT, signal.SIGTERM]
    if started is None:  # a single process; workers leave HUP and USR1 to the supervisor
        loop.add_signal_handler(signal.SIGHUP, _reload_tls, server)
        loop.add_signal_handler(signal.SIGUSR1, _nothing_to_reopen)
        handled += [signal.SIGHUP, signal.SIGUSR1]
    try:
        for signum in early_signals:
            on_signal(signum)
        await server.start()
        serving = True
        if started is not None:
            started(stop)
        else:
            notify.notify("READY=1", f"MAINPID={os.getpid()}")
        for immediate in requests:
            stop(immediate)
        closed = loop.create_task(server.wait_closed())
        closed.add_done_callback(lambda _: end(False))
        failed = await ended
        closed.cancel()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    if failed:
        raise StopError("stopping failed")
    stuck = _stuck_handler_threads()
    if stuck:
        logger.warning(
            "stopped; %d handler thread(s) still running past the graceful timeout are abandoned",
            stuck,
        )
    else:
        logger.info("stopped")


def _reload_tls(server: Server) -> None:
    """SIGHUP to a single process: re-read the TLS files (systemd hears of it either way)."""
    notify.reloading()
    if server.settings.tls_cert:
        server.reload_tls()
    else:
        logger.info(
            "SIGHUP: nothing to reload (no TLS certificate; new code needs --workers or a restart)"
        )
    notify.notify("READY=1")


def _nothing_to_reopen() -> None:
    logger.info("SIGUSR1: ignored (logs go to standard error: there is no log file to reopen)")


def run_server(
    handler: type,
    settings: Settings,
    listeners: list[Listener] | None = None,
    *,
    started: Callable[[Callable[[bool], None]], None] | None = None,
    early_signals: Sequence[int] = (),
    metrics: tuple[Metrics, Listener] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    admission_link: socket.socket | None = None,
) -> None:
    """Serve in this process until a signal stops it; StopError if stopping failed
    (``admission_link``: a worker's line to the supervisor's per-client table)."""
    loop = new_event_loop(settings.loop)
    try:
        server = Server(
            handler,
            settings,
            listeners=listeners,
            metrics=metrics[0] if metrics else None,
            metrics_listener=metrics[1] if metrics else None,
            ssl_context=ssl_context,
            admission_link=admission_link,
        )
        loop.run_until_complete(_serve_until_signalled(server, started, early_signals))
    finally:
        _cancel_remaining(loop)
        loop.close()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what a failed or cut-short stop left running, waiting for it (bounded)."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        waiting = asyncio.wait(tasks, timeout=IMMEDIATE_STOP)
        with contextlib.suppress(Exception):
            loop.run_until_complete(waiting)
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())


def serve(handler: HandlerRef, settings: Settings | None = None, **kwargs: Any) -> None:
    """Serve ``handler`` as ``sockserve run`` would, until SIGTERM or SIGINT.

    ``handler`` is a class or a ``"module:Class"`` path; with workers, a path is imported
    afresh by every worker, so a SIGHUP reload picks up new code. Keywords are settings
    (``bind=["127.0.0.1:0"], workers=4, ...``). Bad values raise SettingsError; an address
    that cannot be bound raises OSError; a handler that cannot be imported raises
    HandlerImportError; StopError if stopping failed (it was logged). Logs go to stderr
    as the CLI's do (``log_level``, ``log_format``) unless the application configured
    logging itself.

    Everything that needs privileges (binding, the TLS key, the metrics socket) happens
    before ``user``/``group`` are taken; the handler is imported after, as that user.
    A handler thread still stuck when the stop is over cannot be interrupted: the
    process then exits at once, without waiting for it.
    """
    settings = settings.replace(**kwargs) if settings else Settings(**kwargs)
    if not logging.getLogger().handlers:
        configure_logging(settings.log_level, settings.log_format)
    raise_open_file_limit()
    if settings.workers > 1 or settings.reload:
        from sockserve.supervisor import Supervisor

        Supervisor(handler, settings).run()
        return
    identity = Identity.of(settings)
    ssl_context = load_tls(settings)
    listeners = bind_all(settings, owner=identity.owner if identity else None)
    metrics: tuple[Metrics, Listener] | None = None
    try:
        if settings.metrics:
            metrics = (Metrics(), bind_metrics(settings))
        load_before_drop(settings)
        if identity is not None:
            identity.assume()
            warn_unremovable(listeners)
        handler_class = load_handler_as(handler, identity)
        check_kind(handler_class, listeners)
    except BaseException:
        for listener in listeners + ([metrics[1]] if metrics else []):
            listener.close()
        raise
    code = 0
    try:
        run_server(handler_class, settings, listeners, metrics=metrics, ssl_context=ssl_context)
    except BaseException as exc:
        code = 1
        if _stuck_handler_threads() and not isinstance(exc, StopError):
            logger.error("serving failed", exc_info=exc)  # not raised: the exit comes first
        raise
    finally:
        if _stuck_handler_threads():
            # Python would wait for them at exit, forever if they never return.
            logging.shutdown()
            os._exit(code)
