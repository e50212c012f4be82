"""A UDPServer in the tutorial's style: each datagram is answered in uppercase."""

from __future__ import annotations

import sockserve.socketserver as socketserver  # noqa: PLR0402 (the tutorial's one change)
from sockserve.examples._args import host_port


class MyUDPHandler(socketserver.BaseRequestHandler):
    """
    This class works similar to the TCP handler class, except that
    self.request consists of a pair of data and client socket, and since
    there is no connection the client address must be given explicitly
    when sending data back via sendto().
    """

    def handle(self) -> None:
        data = self.request[0].strip()
        socket = self.request[1]
        print("{} wrote:".format(self.client_address[0]))  # noqa: UP032
        print(data)
        socket.sendto(data.upper(), self.client_address)


if __name__ == "__main__":
    HOST, PORT = host_port()
    server = socketserver.UDPServer((HOST, PORT), MyUDPHandler)
    host, port = server.server_address[:2]
    print(f"listening on udp://{host}:{port}", flush=True)
    server.serve_forever()
