"""The tutorial's multithreaded server: the looping handler on ThreadingTCPServer."""

from __future__ import annotations

import sockserve.socketserver as socketserver  # noqa: PLR0402 (the tutorial's one change)
from sockserve.examples._args import host_port


class MyTCPHandler(socketserver.BaseRequestHandler):
    """Create a socketserver request handler: one instance per connection."""

    def handle(self) -> None:
        while True:
            self.data = self.request.recv(1024).strip()  # receive the message sent by the client
            if not self.data:
                # empty data: the client disconnected
                print(self.client_address, "the client is disconnected !!!")
                break
            print(
                "IP: %s, Port: %s link connected !!!"  # noqa: UP031 (the tutorial's code)
                % (self.client_address[0], self.client_address[1])
            )
            print(self.data.decode("utf-8"))  # print the received message
            self.request.send(self.data.upper())  # return the received message in uppercase


if __name__ == "__main__":
    HOST, PORT = host_port()
    server = socketserver.ThreadingTCPServer(
        (HOST, PORT), MyTCPHandler
    )  # create a connection instance
    host, port = server.server_address[:2]
    print(f"listening on tcp://{host}:{port}", flush=True)
    server.serve_forever()
