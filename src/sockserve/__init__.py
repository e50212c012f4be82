"""sockserve: socketserver-style servers, drop-in, fast on uvloop, ready for production."""

from __future__ import annotations

__version__ = "0.1.0"
