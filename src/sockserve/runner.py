"""Running a server in this process: the event loop, the open-file limit, privileges,
the handler import, signals for a single process, and ``serve()``."""

from __future__ import annotations

import asyncio
import grp
import importlib
import logging
import os
import pwd
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from sockserve import notify
from sockserve.binding import Listener, bind_all
from sockserve.kinds import HandlerKindError, handler_kind
from sockserve.observability import Metrics, configure_logging
from sockserve.server import Server
from sockserve.settings import Settings, SettingsError, describe

__all__ = [
    "HandlerImportError",
    "HandlerRef",
    "check_handler_in_child",
    "drop_privileges",
    "load_handler",
    "new_event_loop",
    "raise_open_file_limit",
    "run_server",
    "serve",
]

logger = logging.getLogger("sockserve.supervisor")


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


def drop_privileges(
    user: str | None, group: str | None, listeners: Sequence[Listener] = ()
) -> None:
    """Switch to ``group`` and ``user`` after binding (so privileged ports still work).

    Unix socket files made while binding are handed to that user and group first, so
    the group's clients can connect and the server can remove them at exit.
    """
    if user is None and group is None:
        return
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
    for listener in listeners:
        if listener.unix_path:
            os.chown(listener.unix_path, uid, gid)
    if groups is not None:
        os.setgroups(groups)
    if gid != -1:
        os.setgid(gid)
    if uid != -1:
        os.setuid(uid)
    logger.info("running as uid %d gid %d", os.getuid(), os.getgid())


async def _serve_until_signalled(
    server: Server, started: Callable[[Callable[[bool], None]], None] | None = None
) -> None:
    """Start, then stop gracefully on TERM/INT (a second INT stops at once); HUP reloads TLS.

    ``started(stop)`` is called once serving, with the function that stops the server.
    """
    loop = asyncio.get_running_loop()
    await server.start()
    stopping: list[asyncio.Task[None]] = []

    def stop(immediate: bool) -> None:
        if immediate and stopping:
            logger.info("stopping now")
            server.abort()
            return
        if not stopping:
            if started is None:
                notify.notify("STOPPING=1")
            logger.info(
                "stopping: finishing open connections (up to %.1f s)",
                server.settings.graceful_timeout,
            )
            stopping.append(loop.create_task(server.shutdown()))

    interrupts = [0]

    def on_interrupt() -> None:
        interrupts[0] += 1
        stop(interrupts[0] > 1)

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGTERM, stop, False)

    def reload() -> None:
        notify.reloading()
        server.reload_tls()
        notify.notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    if started is not None:
        started(stop)
    else:
        notify.notify("READY=1", f"MAINPID={os.getpid()}")
    try:
        await server.wait_closed()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    logger.info("stopped")


def run_server(
    handler: type,
    settings: Settings,
    listeners: list[Listener] | None = None,
    *,
    started: Callable[[Callable[[bool], None]], None] | None = None,
    metrics: tuple[Metrics, Listener] | None = None,
    admission_link: socket.socket | None = None,
) -> None:
    """Serve in this process until a signal stops it (``admission_link``: a worker's
    line to the supervisor's per-client table)."""
    loop = new_event_loop(settings.loop)
    try:
        server = Server(
            handler,
            settings,
            listeners=listeners,
            metrics=metrics[0] if metrics else None,
            metrics_listener=metrics[1] if metrics else None,
            admission_link=admission_link,
        )
        loop.run_until_complete(_serve_until_signalled(server, started))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


HandlerRef = type | str  # a class, or "module:Class" imported in each worker


class HandlerImportError(ImportError):
    """``module:Class`` could not be imported; the message is one line for the user."""


def load_handler(ref: HandlerRef) -> type:
    """The handler class for a class or a ``module:Class`` path (cwd importable)."""
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
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise HandlerImportError(f"{ref!r} is not a class")
    return obj


def check_handler_in_child(ref: str) -> None:
    """Import ``module:Class`` in a throwaway child, so a bad path fails at start while
    this process (the supervisor) never imports user code and reloads stay fresh."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        code = 0
        try:
            handler_kind(load_handler(ref))
        except (HandlerImportError, HandlerKindError) as exc:
            os.write(write_end, str(exc).encode())
            code = 2
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        raise HandlerImportError(message)
    if code != 0:
        raise RuntimeError(f"importing {ref!r} failed:\n{message}")


def serve(handler: HandlerRef, settings: Settings | None = None, **kwargs: Any) -> None:
    """Serve ``handler`` as ``sockserve run`` would, until SIGTERM or SIGINT.

    ``handler`` is a class or a ``"module:Class"`` path; with workers, a path is imported
    afresh by every worker, so a SIGHUP reload picks up new code. Keywords are settings
    (``bind=["127.0.0.1:0"], workers=4, ...``). Bad values raise SettingsError; an address
    that cannot be bound raises OSError. Logs go to stderr as the CLI's do (``log_level``,
    ``log_format``) unless the application configured logging itself.
    """
    settings = settings.replace(**kwargs) if settings else Settings(**kwargs)
    if not logging.getLogger().handlers:
        configure_logging(settings.log_level, settings.log_format)
    raise_open_file_limit()
    if settings.workers > 1 or settings.reload:
        from sockserve.supervisor import Supervisor

        Supervisor(handler, settings).run()
        return
    handler_class = load_handler(handler)
    handler_kind(handler_class)
    listeners = bind_all(settings)
    try:
        drop_privileges(settings.user, settings.group, listeners)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    run_server(handler_class, settings, listeners)
