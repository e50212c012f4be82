"""Handlers that say goodbye, one per kind, for the goodbye-first shutdown tests.

A line starting with ``slow`` takes 1.5 s to answer and logs when it starts, so a test
can stop the server while that request is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socketserver
import time

import sockserve

logger = logging.getLogger("sockserve.server")
GOODBYE = b"goodbye\n"
SLOW = 1.5


class Line(sockserve.LineHandler):
    async def handle_line(self, line: bytes) -> bytes:
        if line.startswith(b"slow"):
            logger.warning("slow request started")
            await asyncio.sleep(SLOW)
        return line.upper()

    def handle_shutdown(self) -> bytes:
        return GOODBYE


class SyncLine(sockserve.LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.upper()

    async def handle_shutdown(self) -> bytes:
        await asyncio.sleep(0)
        return GOODBYE


class Stream(sockserve.StreamHandler):
    async def handle(self) -> None:
        while line := await self.readline():
            if line.startswith(b"slow"):
                logger.warning("slow request started")
                await asyncio.sleep(SLOW)
            self.write(line.upper())

    async def handle_shutdown(self) -> None:
        self.write(GOODBYE)


class Blocking(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            if line.startswith(b"slow"):
                logger.warning("slow request started")
                time.sleep(SLOW)
            self.wfile.write(line.upper())

    def handle_shutdown(self) -> bytes:
        return GOODBYE


class Message(sockserve.MessageHandler):
    """Length-prefixed messages: its goodbye is framed like any reply."""

    framing = sockserve.LengthPrefixed("!I")

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()

    def handle_shutdown(self) -> bytes:
        return b"goodbye"


class Instance(sockserve.LineHandler):
    """Answers with its process id, so a client can tell which instance served it."""

    def handle_line(self, line: bytes) -> bytes:
        return b"%d %s" % (os.getpid(), line.upper())

    def handle_shutdown(self) -> bytes:
        return GOODBYE
