"""What every sockserve process sets up, alone or as the supervisor or one of its
workers: the event loop, the open-file limit, the ``--user``/``--group`` identity, and
the signals the supervisor acts on. Light to import: the benchmark client and the test
kit take their event loop from here."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import resource
import signal
from dataclasses import dataclass

from sockserve.settings import Settings, SettingsError, describe

__all__ = [
    "SUPERVISOR_SIGNALS",
    "Identity",
    "default_signals",
    "new_event_loop",
    "raise_open_file_limit",
    "signal_name",
]

# Dropping privileges is the process's own life, logged with running it.
logger = logging.getLogger("sockserve.runner")


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
