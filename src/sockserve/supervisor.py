"""Running a server: the event loop, signals, privileges; worker processes for workers > 1."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import resource
import signal
from typing import Any

from sockserve.binding import Listener
from sockserve.server import Server, bind_all
from sockserve.settings import Settings, SettingsError, describe

__all__ = ["new_event_loop", "run_server", "serve"]

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


def drop_privileges(user: str | None, group: str | None) -> None:
    """Switch to ``group`` and ``user`` (after binding, so privileged ports still work)."""
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise SettingsError(f"{describe('group')}: no group {group!r}") from None
        os.setgroups([gid])
        os.setgid(gid)
    if user is not None:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise SettingsError(f"{describe('user')}: no user {user!r}") from None
        if group is None:
            os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
            os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    if user is not None or group is not None:
        logger.info("running as uid %d gid %d", os.getuid(), os.getgid())


async def _serve_until_signalled(server: Server) -> None:
    """Start, then stop gracefully on TERM/INT (a second INT stops at once); HUP reloads TLS."""
    loop = asyncio.get_running_loop()
    await server.start()
    stopping: list[asyncio.Task[None]] = []

    def stop(immediate: bool) -> None:
        if immediate and stopping:
            logger.info("stopping now")
            server.abort()
            return
        if not stopping:
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
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    try:
        await server.wait_closed()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    logger.info("stopped")


def run_server(handler: type, settings: Settings, listeners: list[Listener] | None = None) -> None:
    """Serve in this process until a signal stops it."""
    loop = new_event_loop(settings.loop)
    try:
        server = Server(handler, settings, listeners=listeners)
        loop.run_until_complete(_serve_until_signalled(server))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def serve(handler: type, settings: Settings | None = None, **kwargs: Any) -> None:
    """Serve ``handler`` as ``sockserve run`` would, until SIGTERM or SIGINT.

    Keywords are settings (``bind=["127.0.0.1:0"], workers=4, ...``). Bad values raise
    SettingsError; an address that cannot be bound raises OSError.
    """
    settings = settings.replace(**kwargs) if settings else Settings(**kwargs)
    raise_open_file_limit()
    if settings.workers > 1 or settings.reload:
        from sockserve.workers import Supervisor

        Supervisor(handler, settings).run()
        return
    listeners = bind_all(settings)
    try:
        drop_privileges(settings.user, settings.group)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    run_server(handler, settings, listeners)
