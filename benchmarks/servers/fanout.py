"""A broadcast server for ``benchmarks/broadcast.py``: each line goes to every other client.

Each line a client sends goes to every other client; the sender gets back the number of
clients it was queued for. A line ``?`` only asks how many other clients are connected.
"""

from __future__ import annotations

import sockserve


class Fanout(sockserve.LineHandler):
    __slots__ = ()

    def handle_line(self, line: bytes) -> bytes:
        if line == b"?\n":
            return b"%d\n" % (len(self.server.connections) - 1)
        return b"%d\n" % self.server.broadcast(line, exclude=self)
