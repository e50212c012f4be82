"""The tutorial's interactive client: sends each line typed, prints the server's answer.

Two guards beyond the tutorial: an empty line is not sent (the server would wait for
data forever) and end of input or a closed connection ends the loop.
"""

from __future__ import annotations

import socket

from sockserve.examples._args import host_port

if __name__ == "__main__":
    HOST, PORT = host_port()
    client = socket.socket()
    client.connect((HOST, PORT))
    while True:
        try:
            mess = input("Enter the data you want to send >>: ")
        except EOFError:
            break
        if not mess:
            continue
        client.send(mess.encode("utf-8"))  # the client sends data to the server
        data = client.recv(1024)
        if not data:
            break
        print("received data:", data.decode("utf-8"))
    client.close()
