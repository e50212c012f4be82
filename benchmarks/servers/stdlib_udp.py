"""Reference: stdlib socketserver.UDPServer with a DatagramRequestHandler, uppercasing."""

from __future__ import annotations

import argparse
import signal
import socketserver
import threading
from types import FrameType

from benchmarks.servers.common import announce


class UpperHandler(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1:0")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    with socketserver.UDPServer((host.strip("[]"), int(port)), UpperHandler) as server:
        announce("udp", server.server_address)

        def stop(signum: int, frame: FrameType | None) -> None:
            threading.Thread(target=server.shutdown).start()

        signal.signal(signal.SIGTERM, stop)
        server.serve_forever()


if __name__ == "__main__":
    main()
