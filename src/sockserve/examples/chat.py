"""The tutorial's multi-client server as a chat room.

Each line a client sends goes to every other client, prefixed by its sender; joins and
leaves are announced. A client that stops reading is disconnected as a slow consumer
once ``--max-write-buffer`` bytes are queued for it, instead of growing the server's
memory or holding back the room. Run it and talk with ``sockserve client``::

    sockserve run sockserve.examples.chat:Chat --bind 127.0.0.1:9999
    sockserve client 127.0.0.1:9999        # in two or more terminals

One room per process: with ``--workers N`` each worker is a room of its own.
"""

from __future__ import annotations

from sockserve.handlers import LineHandler


class Chat(LineHandler):
    """Relays each line to everyone else in the room as ``NAME: line``."""

    name: bytes

    def setup(self) -> None:
        if isinstance(self.client_address, tuple):
            host, port = self.client_address[:2]
            self.name = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        else:  # a Unix socket peer has no address of its own
            self.name = b"unix-%x" % id(self)
        self.server.broadcast(b"* " + self.name + b" joined\n", exclude=self)

    def handle_line(self, line: bytes) -> None:
        if not line.endswith(b"\n"):  # the last line of a stream may lack its newline
            line += b"\n"
        self.server.broadcast(self.name + b": " + line, exclude=self)

    def finish(self) -> None:
        self.server.broadcast(b"* " + self.name + b" left\n", exclude=self)
