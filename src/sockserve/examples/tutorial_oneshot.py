"""The tutorial's basic server: one message per connection, answered in uppercase."""

from __future__ import annotations

import sockserve.socketserver as socketserver  # noqa: PLR0402 (the tutorial's one change)
from sockserve.examples._args import host_port


class MyTCPHandler(socketserver.BaseRequestHandler):
    """
    The request handler class for our server.

    It is instantiated once per connection to the server, and must
    override the handle() method to implement communication to the
    client.
    """

    def handle(self) -> None:
        # self.request is the TCP socket connected to the client
        self.data = self.request.recv(1024).strip()
        print("{} wrote:".format(self.client_address[0]))  # noqa: UP032
        print(self.data)
        # just send back the same data, but upper-cased
        self.request.sendall(self.data.upper())


if __name__ == "__main__":
    HOST, PORT = host_port()

    # Create the server, binding to localhost on port 9999
    server = socketserver.TCPServer((HOST, PORT), MyTCPHandler)
    host, port = server.server_address[:2]
    print(f"listening on tcp://{host}:{port}", flush=True)

    # Activate the server; this will keep running until you
    # interrupt the program with Ctrl-C
    server.serve_forever()
