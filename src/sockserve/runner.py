"""Running a server in this process: the event loop, the open-file limit, privileges,
the handler import, signals for a single process, and ``serve()``."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib
import logging
import os
import pwd
import resource
import signal
import socket
import ssl
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from sockserve import binding, notify
from sockserve.binding import Listener, bind_all
from sockserve.kinds import HandlerKindError, kind_of
from sockserve.metrics import Metrics, bind_metrics
from sockserve.observability import configure_logging
from sockserve.server import Server
from sockserve.settings import Settings, SettingsError, describe

__all__ = [
    "HandlerImportError",
    "HandlerRef",
    "Identity",
    "StartInterrupted",
    "StopError",
    "check_handler_in_child",
    "check_kind",
    "default_signals",
    "load_before_drop",
    "load_handler",
    "load_handler_as",
    "load_tls",
    "new_event_loop",
    "raise_open_file_limit",
    "run_server",
    "serve",
    "signal_name",
]

# The process itself, with or without a supervisor: privileges, signals, stopping.
logger = logging.getLogger("sockserve.runner")

IMMEDIATE_STOP = 1.0  # after a second Ctrl-C, whatever still runs gets this long


def new_event_loop(name: str) -> asyncio.AbstractEventLoop:
    """uvloop for ``uvloop`` (and for ``auto`` when importable), else asyncio's loop."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise SettingsError(f"{describe('loop')}: uvloop is not installed") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit: a server needs a descriptor per peer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


@dataclass(frozen=True)
class Identity:
    """The user and group ``--user``/``--group`` name, resolved once at start."""

    uid: int  # -1: keep the current one
    gid: int
    groups: list[int] | None  # supplementary groups to take, None to keep them

    @classmethod
    def of(cls, settings: Settings) -> Identity | None:
        """None when no drop is asked for; SettingsError for an unknown user or group."""
        user, group = settings.user, settings.group
        if user is None and group is None:
            return None
        uid = gid = -1
        groups: list[int] | None = None
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
            except KeyError:
                raise SettingsError(f"{describe('group')}: no group {group!r}") from None
            groups = [gid]
        if user is not None:
            try:
                entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
            except KeyError:
                raise SettingsError(f"{describe('user')}: no user {user!r}") from None
            uid = entry.pw_uid
            if group is None:
                gid = entry.pw_gid
                groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return cls(uid, gid, groups)

    @property
    def owner(self) -> tuple[int, int]:
        """The (uid, gid) files made for this identity are handed to."""
        return self.uid, self.gid

    def assume(self, log: bool = True) -> None:
        """Switch to this group and user for good."""
        if self.groups is not None:
            os.setgroups(self.groups)
        if self.gid != -1:
            os.setgid(self.gid)
        if self.uid != -1:
            os.setuid(self.uid)
        if log:
            logger.info("running as uid %d gid %d", os.getuid(), os.getgid())


def load_tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context, read now (before any privilege drop, so the key may stay root's)."""
    if not settings.tls_cert:
        return None
    from sockserve.tls import server_context

    return server_context(settings)


def check_kind(handler: type, listeners: Sequence[Listener]) -> None:
    """HandlerKindError unless the handler can serve every listener."""
    kind = kind_of(handler)
    for listener in listeners:
        if not listener.datagram and not kind.serves_streams:
            raise HandlerKindError(
                f"a {kind.name} handler cannot serve stream listener {listener.url}"
            )


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


HandlerRef = type | str  # a class, or "module:Class" imported in each worker


class HandlerImportError(ImportError):
    """``module:Class`` could not be imported; the message is one line for the user."""


def load_handler(ref: HandlerRef) -> type:
    """The handler class for a class or a ``module:Class`` path (cwd importable).

    Any failure is a HandlerImportError with a one-line message; the traceback of an
    exception raised by the module is logged at debug level.
    """
    if isinstance(ref, type):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerImportError(f"handler {ref!r} must look like MODULE:CLASS")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            message = f"cannot import {module_name!r}: no module named {exc.name!r}"
            raise HandlerImportError(message) from None
        raise _import_failed(module_name, exc) from None
    except (Exception, SystemExit) as exc:
        raise _import_failed(module_name, exc) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise HandlerImportError(f"{ref!r} is not a class")
    return obj


def load_handler_as(ref: HandlerRef, identity: Identity | None) -> type:
    """``load_handler`` after a switch to ``identity``: an import error says which user
    imported, since a module the service user cannot read looks missing."""
    try:
        return load_handler(ref)
    except HandlerImportError as exc:
        if identity is None:
            raise
        raise HandlerImportError(f"{exc} (imported as uid {os.getuid()})") from None


def _import_failed(module_name: str, exc: BaseException) -> HandlerImportError:
    """``importing 'app' failed: SyntaxError: '(' was never closed (app.py, line 3)``."""
    logger.debug("importing %r failed", module_name, exc_info=exc)
    if isinstance(exc, SyntaxError):
        text, filename, line = exc.msg, exc.filename, exc.lineno
    else:
        text, filename, line = str(exc), None, None
        machinery = os.path.dirname(importlib.__file__)
        for frame in traceback.extract_tb(exc.__traceback__):
            inside = frame.filename.startswith(("<", machinery)) or frame.filename == __file__
            if not inside:  # the last frame in the module's own code, not the import's
                filename, line = frame.filename, frame.lineno
    where = f" ({os.path.basename(filename)}, line {line})" if filename else ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return HandlerImportError(f"importing {module_name!r} failed: {detail}{where}")


SUPERVISOR_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SUPERVISOR_SIGNALS += (signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)


def default_signals() -> None:
    """In a child of the supervisor: the default action for the supervisor's signals and
    no wakeup descriptor, since the handlers that only queue a signal serve no one here."""
    signal.set_wakeup_fd(-1)
    for sig in SUPERVISOR_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def signal_name(signum: int) -> str:
    """``SIGKILL``, or the number for a signal with no name (a real-time one, as 40)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class StartInterrupted(Exception):
    """SIGTERM or SIGINT came while the handler was being checked: the check was ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise StartInterrupted(signum)


def check_handler_in_child(
    ref: HandlerRef, identity: Identity | None, listeners: Sequence[Listener]
) -> list[str]:
    """Import the handler in a throwaway child, as the service user, and check that it
    can serve ``listeners``: a bad handler fails at start while this process (the
    supervisor) never imports user code, and reloads stay fresh.

    Returns the files (under the current directory) of the modules the import loaded:
    what ``--reload`` watches. HandlerImportError or HandlerKindError, one line, if bad;
    StartInterrupted (the child killed) on SIGTERM or SIGINT, so a hanging import can be
    stopped.
    """
    read_end, write_end = os.pipe()
    # The child takes the default actions before any signal reaches it.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # child
        try:
            default_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        finally:
            _check_in_child(ref, identity, listeners, read_end, write_end)
    previous = {
        sig: signal.signal(sig, _interrupt)
        for sig in (signal.SIGTERM, signal.SIGINT)
        if signal.getsignal(sig) != signal.SIG_IGN
    }
    os.close(write_end)
    pipe = os.fdopen(read_end, "rb")
    status = None
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        output = pipe.read().decode("utf-8", "surrogateescape")
        _, status = os.waitpid(pid, 0)
    finally:
        pipe.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if status is None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        raise (HandlerKindError if output[:1] == "K" else HandlerImportError)(output[1:])
    if code < 0:
        message = f"importing {ref!r} was stopped: signal {signal_name(-code)}"
        raise HandlerImportError(message)
    if code != 0:
        raise RuntimeError(f"checking the handler {ref!r} failed:\n{output.strip()}")
    return [line for line in output.split("\n") if line]


def _check_in_child(
    ref: HandlerRef,
    identity: Identity | None,
    listeners: Sequence[Listener],
    read_end: int,
    write_end: int,
) -> NoReturn:
    """The child's side of ``check_handler_in_child``: never returns."""
    code = 0
    try:
        os.close(read_end)
        if identity is not None:
            identity.assume(log=False)
        before = set(sys.modules)
        check_kind(load_handler_as(ref, identity), listeners)
        files = _module_files(set(sys.modules) - before)
        os.write(write_end, "\n".join(files).encode("utf-8", "surrogateescape"))
    except HandlerKindError as exc:
        os.write(write_end, b"K" + str(exc).encode())
        code = 2
    except HandlerImportError as exc:
        os.write(write_end, b"I" + str(exc).encode())
        code = 2
    except BaseException:
        os.write(write_end, traceback.format_exc().encode())
        code = 1
    finally:
        os._exit(code)


def _module_files(names: set[str]) -> list[str]:
    """Source files of the modules ``names`` under the current directory (not those of
    the interpreter or its virtualenv, should it live there)."""
    cwd = os.path.join(os.getcwd(), "")
    installed = tuple(
        os.path.join(prefix, "") for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}
    )
    files = set()
    for name in names:
        path = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(path, str):
            path = os.path.abspath(path)
            if path.startswith(cwd) and not path.startswith(installed):
                files.add(path)
    return sorted(files)


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
