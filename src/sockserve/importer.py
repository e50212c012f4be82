"""The handler: imported from ``module:Class`` with one-line errors, checked against the
listeners it must serve, and (for the supervisor, which never imports user code) both
done in a throwaway child as the service user."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from sockserve.kinds import HandlerKindError, kind_of
from sockserve.process import SUPERVISOR_SIGNALS, default_signals, signal_name

if TYPE_CHECKING:
    from sockserve.binding import Listener
    from sockserve.process import Identity

__all__ = [
    "HandlerImportError",
    "HandlerRef",
    "StartInterrupted",
    "check_handler_in_child",
    "check_kind",
    "load_handler",
    "load_handler_as",
]

# Import failures are part of starting the process, logged with running it.
logger = logging.getLogger("sockserve.runner")


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


def check_kind(handler: type, listeners: Sequence[Listener]) -> None:
    """HandlerKindError unless the handler can serve every listener."""
    kind = kind_of(handler)
    for listener in listeners:
        if not listener.datagram and not kind.serves_streams:
            raise HandlerKindError(
                f"a {kind.name} handler cannot serve stream listener {listener.url}"
            )


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
