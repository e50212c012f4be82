"""Reference: stdlib socketserver.ThreadingTCPServer with a StreamRequestHandler.

The listen backlog is the stdlib default (``request_queue_size`` = 5) unless
``--backlog`` is given: the harness runs both. ``--dropin`` runs the same program on
``sockserve.socketserver`` (its default backlog is ``socket.SOMAXCONN``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

if "--dropin" in sys.argv:
    from sockserve import socketserver
else:
    import socketserver  # type: ignore[no-redef]

from benchmarks.servers.common import announce


class UpperHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1:0")
    parser.add_argument("--backlog", type=int, default=socketserver.TCPServer.request_queue_size)
    parser.add_argument("--dropin", action="store_true", help="sockserve.socketserver")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = args.backlog

    with Server((host.strip("[]"), int(port)), UpperHandler) as server:
        announce("tcp", server.server_address)

        def stop(signum: int, frame: FrameType | None) -> None:
            threading.Thread(target=server.shutdown).start()

        signal.signal(signal.SIGTERM, stop)
        server.serve_forever()


if __name__ == "__main__":
    main()
