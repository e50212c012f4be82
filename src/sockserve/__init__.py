"""sockserve: socketserver-style servers, drop-in, fast on uvloop, ready for production.

``serve(Handler, bind=[...])`` runs a handler as ``sockserve run`` does; ``Server`` is the
same server inside your own event loop; ``sockserve.socketserver`` is the drop-in module.
"""

from __future__ import annotations

from sockserve.framing import LineTooLong
from sockserve.handlers import DatagramHandler, LineHandler, StreamHandler
from sockserve.patch import patch, unpatch
from sockserve.server import HandlerKindError, Server
from sockserve.settings import Settings, SettingsError
from sockserve.supervisor import serve

__version__ = "0.1.0"

__all__ = [
    "DatagramHandler",
    "HandlerKindError",
    "LineHandler",
    "LineTooLong",
    "Server",
    "Settings",
    "SettingsError",
    "StreamHandler",
    "__version__",
    "patch",
    "serve",
    "unpatch",
]
