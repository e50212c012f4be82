"""sockserve: socketserver-style servers, drop-in, fast on uvloop, ready for production.

``serve(Handler, bind=[...])`` runs a handler as ``sockserve run`` does; ``Server`` is the
same server inside your own event loop; ``sockserve.socketserver`` is the drop-in module.

The names below load on first use (PEP 562), so ``import sockserve.socketserver`` costs
no more than the stdlib's ``socketserver``: no asyncio, no ssl, no typing.
"""

from __future__ import annotations

import importlib

# Eager: the submodule ``sockserve.patch`` would otherwise shadow the function once imported.
from sockserve.patch import patch, unpatch

TYPE_CHECKING = False  # typing costs more to import than the drop-in module
if TYPE_CHECKING:
    from sockserve.framing import (
        FixedSize,
        FrameTooLong,
        Framing,
        LengthPrefixed,
        Lines,
        LineTooLong,
        MalformedFrame,
        Netstring,
        ProtocolError,
    )
    from sockserve.handlers import DatagramHandler, LineHandler, MessageHandler, StreamHandler
    from sockserve.kinds import HandlerKindError
    from sockserve.runner import serve
    from sockserve.server import Server
    from sockserve.settings import Settings, SettingsError

__version__ = "0.1.0"

__all__ = [
    "DatagramHandler",
    "FixedSize",
    "FrameTooLong",
    "Framing",
    "HandlerKindError",
    "LengthPrefixed",
    "LineHandler",
    "LineTooLong",
    "Lines",
    "MalformedFrame",
    "MessageHandler",
    "Netstring",
    "ProtocolError",
    "Server",
    "Settings",
    "SettingsError",
    "StreamHandler",
    "__version__",
    "patch",
    "serve",
    "unpatch",
]

_LAZY = {
    "DatagramHandler": "sockserve.handlers",
    "HandlerKindError": "sockserve.kinds",
    "LineHandler": "sockserve.handlers",
    "FixedSize": "sockserve.framing",
    "FrameTooLong": "sockserve.framing",
    "Framing": "sockserve.framing",
    "LengthPrefixed": "sockserve.framing",
    "Lines": "sockserve.framing",
    "LineTooLong": "sockserve.framing",
    "MalformedFrame": "sockserve.framing",
    "MessageHandler": "sockserve.handlers",
    "Netstring": "sockserve.framing",
    "ProtocolError": "sockserve.framing",
    "Server": "sockserve.server",
    "Settings": "sockserve.settings",
    "SettingsError": "sockserve.settings",
    "StreamHandler": "sockserve.handlers",
    "serve": "sockserve.runner",
}


def __getattr__(name: str) -> object:
    """Import the module defining ``name`` on first use, then keep the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sockserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
