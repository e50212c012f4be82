"""The tutorial's uppercase echo server on the line-handler fast path (``sockserve demo``)."""

from __future__ import annotations

from sockserve.handlers import LineHandler


class Uppercase(LineHandler):
    """Answers each line with its uppercase, on TCP, Unix sockets and datagrams alike."""

    __slots__ = ()  # no per-connection state beyond the framework's: no instance dict

    def handle_line(self, line: bytes) -> bytes:
        return line.upper()
