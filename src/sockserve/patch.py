"""``patch()``: make ``import socketserver`` give sockserve.socketserver.

Modules that import socketserver after ``patch()`` (http.server, xmlrpc.server,
wsgiref.simple_server, logging.config and third-party code) build on sockserve's classes.
Modules imported before keep the stdlib's; ``patch()`` logs a warning naming them.
``unpatch()`` puts back exactly what was there before.
"""

from __future__ import annotations

import sys
import threading
import types

import sockserve.socketserver as _ours

__all__ = ["is_patched", "patch", "unpatch"]


def _warn(msg: str, *args: object) -> None:
    import logging  # on first use: importing the drop-in costs no more than the stdlib's

    logging.getLogger(__name__).warning(msg, *args)


_MISSING = object()
_lock = threading.Lock()
_previous: list[object] = []  # what sys.modules["socketserver"] was before patch(), if patched


def patch() -> None:
    """Make ``socketserver`` resolve to sockserve.socketserver.  Idempotent."""
    with _lock:
        if _previous:
            return
        previous = sys.modules.get("socketserver", _MISSING)
        _previous.append(previous)
        sys.modules["socketserver"] = _ours
    if isinstance(previous, types.ModuleType) and previous is not _ours:
        dependents = _dependents_of(previous)
        if dependents:
            _warn(
                "socketserver patched after %s imported it; they keep the stdlib classes "
                "(call sockserve.patch() before importing them)",
                ", ".join(dependents),
            )


def unpatch() -> None:
    """Restore ``sys.modules["socketserver"]`` as it was before ``patch()``.  Idempotent."""
    with _lock:
        if not _previous:
            return
        previous = _previous.pop()
        if sys.modules.get("socketserver") is not _ours:
            _warn("sys.modules['socketserver'] was replaced since patch(); left as is")
        elif previous is _MISSING:
            del sys.modules["socketserver"]
        else:
            sys.modules["socketserver"] = previous  # type: ignore[assignment]


def is_patched() -> bool:
    """Whether ``patch()`` is in effect."""
    return bool(_previous)


def _dependents_of(stdlib: types.ModuleType) -> list[str]:
    """Names of loaded modules holding the stdlib module or one of its classes."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or module is stdlib or name == "socketserver":
            continue
        try:
            values = list(vars(module).values())
        except TypeError:  # an object without __dict__ put in sys.modules
            continue
        if any(_comes_from(value, stdlib) for value in values):
            found.append(name)
    return sorted(found)


def _comes_from(value: object, stdlib: types.ModuleType) -> bool:
    if value is stdlib:
        return True
    return (
        isinstance(value, type)
        and value.__module__ == "socketserver"
        and (getattr(stdlib, value.__name__, None) is value)
    )
