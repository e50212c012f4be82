"""The uppercase server as sockserve handlers, for ``sockserve run benchmarks.servers.handlers:X``.

``sockserve demo`` is the line-handler fast path; these are the other TCP kinds, and the
message handler with a 4-byte length prefix (``loadgen --framing u32`` drives it).
"""

from __future__ import annotations

import socketserver

import sockserve


class UpperStream(sockserve.StreamHandler):
    """Async stream handler: readline, write, drain."""

    __slots__ = ()

    async def handle(self) -> None:
        while line := await self.readline():
            self.write(line.upper())
            await self.drain()


class UpperLine(sockserve.LineHandler):
    """Line handler (the same as ``sockserve demo``)."""

    __slots__ = ()

    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


class UpperU32(sockserve.MessageHandler):
    """Message handler, 4-byte big-endian length prefix: the payload uppercased."""

    __slots__ = ()
    framing = sockserve.LengthPrefixed("!I")

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()


class UpperBlocking(socketserver.StreamRequestHandler):
    """The stdlib handler of benchmarks/servers/stdlib_threading.py, unchanged."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())
