"""A length-prefixed JSON request/reply server, and the client that speaks to it.

Each message is a 4-byte big-endian length, then that many bytes of JSON: a request
``{"id": 1, "method": "add", "params": [2, 3]}`` gets ``{"id": 1, "result": 5}``, or
``{"id": 1, "error": "..."}`` for a bad request. A request over 64 KiB closes the
connection (logged) before its body is read.

Serve it::

    python -m sockserve.examples.json_rpc [HOST [PORT]]        # default localhost 9999
    sockserve run sockserve.examples.json_rpc:JsonRpc --bind 127.0.0.1:9999 --workers 4

Talk to it from Python (the client below), or type requests at
``sockserve client 127.0.0.1:9999 --framing u32``::

    with JsonRpcClient(("127.0.0.1", 9999)) as rpc:
        print(rpc.call("add", 2, 3))  # 5
"""

from __future__ import annotations

import json
import socket
from types import TracebackType
from typing import Any

from sockserve.examples._args import host_port
from sockserve.framing import LengthPrefixed
from sockserve.handlers import MessageHandler

FRAMING = LengthPrefixed("!I", max_size=64 * 1024)

METHODS: dict[str, Any] = {
    "add": lambda *numbers: sum(numbers),
    "upper": lambda text: text.upper(),
    "echo": lambda *params: list(params),
}


class JsonRpc(MessageHandler):
    """Answers each JSON request with its result, on the length-prefixed fast path."""

    __slots__ = ()
    framing = FRAMING

    def handle_message(self, message: bytes) -> bytes:
        ident = None
        try:
            request = json.loads(message)
            if not isinstance(request, dict):
                raise TypeError("a request is a JSON object")
            ident = request.get("id")
            method = METHODS[request["method"]]
            reply = {"id": ident, "result": method(*request.get("params", []))}
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            reply = {"id": ident, "error": f"{type(exc).__name__}: {exc}"}
        return json.dumps(reply).encode()


class JsonRpcClient:
    """A blocking client: ``call(method, *params)`` sends one request, returns its result."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.framer = FRAMING.framer()
        self.next_id = 0

    def call(self, method: str, *params: Any) -> Any:
        self.next_id += 1
        request = {"id": self.next_id, "method": method, "params": list(params)}
        self.sock.sendall(FRAMING.encode(json.dumps(request).encode()))
        while (message := self.framer.next_message()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.framer.feed(chunk)
        reply = json.loads(message)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> JsonRpcClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


if __name__ == "__main__":
    from sockserve.runner import serve

    host, port = host_port()
    serve(JsonRpc, bind=[f"{host}:{port}"])
