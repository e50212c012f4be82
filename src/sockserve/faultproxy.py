"""A loopback TCP proxy for tests that makes the network misbehave (``FaultProxy``).

Part of the test kit and re-exported by ``sockserve.testing``; like it, it needs no
pytest, and ``import sockserve`` does not import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import TYPE_CHECKING, Literal

from sockserve.framing import Framing
from sockserve.proxy_protocol import encode_v1, encode_v2
from sockserve.testclient import DEFAULT_TIMEOUT, Client

if TYPE_CHECKING:
    from sockserve.testing import RunningServer

__all__ = ["FaultProxy"]

PIECE_PAUSE = 0.001  # between the pieces of a split or dripped write, so they arrive apart


class FaultProxy:
    """A loopback TCP proxy to ``target`` that makes the network misbehave.

    ``target`` is a ``RunningServer``, a ``(host, port)`` tuple or a Unix socket path.
    Clients connect to ``proxy.address`` (or use ``proxy.connect()``). Faults, each off
    by default and changeable while the proxy runs:

    - ``latency``: seconds added to every chunk, each way (chunks are not serialised:
      a stream keeps its throughput, only later);
    - ``drip``: the client's bytes reach the server one at a time;
    - ``split``: the client's writes reach the server in pieces of at most this size;
    - ``reset_after``: after this many bytes from the client, both connections are
      reset (RST), the server's mid-stream;
    - ``half_close_after``: after this many bytes from the client, the server sees the
      end of the stream (the rest is dropped); replies still flow back;
    - ``stalled`` (or ``stall()`` / ``resume()``): the proxy stops reading from the
      server, as a client that does not read its replies;
    - ``proxy_header``: ``"v1"`` or ``"v2"`` prepends a PROXY protocol header naming
      the client (or ``proxy_source``, an ``(ip, port)``); raw bytes are sent as given.

    Pieces of a drip or split are ``pause`` seconds apart.
    """

    def __init__(
        self,
        target: RunningServer | tuple[str, int] | str,
        *,
        latency: float = 0.0,
        drip: bool = False,
        split: int | None = None,
        reset_after: int | None = None,
        half_close_after: int | None = None,
        stalled: bool = False,
        proxy_header: Literal["v1", "v2"] | bytes | None = None,
        proxy_source: tuple[str, int] | None = None,
        pause: float = PIECE_PAUSE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        from sockserve.testing import RunningServer  # it imports this module

        self.target: tuple[str, int] | str = (
            target.address if isinstance(target, RunningServer) else target
        )
        self.latency = latency
        self.drip = drip
        self.split = split
        self.reset_after = reset_after
        self.half_close_after = half_close_after
        self.proxy_header = proxy_header
        self.proxy_source = proxy_source
        self.pause = pause
        self.timeout = timeout
        self._stalled = stalled
        self._clients: list[Client] = []
        self._loop = asyncio.new_event_loop()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.url = f"tcp://{self.address[0]}:{self.address[1]}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: set[socket.socket] = set()
        self._resumed: asyncio.Event | None = None
        # connect()'s clients by address while their connect() runs; the proxy's thread
        # holds each one accepted meanwhile until _release (a future per address).
        self._connecting: set[tuple[str, int]] = set()
        self._held: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sockserve-faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("fault proxy did not start")

    # -- the test's side ---------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stalled(self) -> bool:
        return self._stalled

    def stall(self) -> None:
        """Stop reading from the server (its replies back up in its buffers)."""
        self._stalled = True
        self._loop.call_soon_threadsafe(self._set_resumed, False)

    def resume(self) -> None:
        """Read from the server again."""
        self._stalled = False
        self._loop.call_soon_threadsafe(self._set_resumed, True)

    def connect(self, *, timeout: float | None = None, framing: Framing | None = None) -> Client:
        """A client connected through the proxy (``framing`` as for ``Client``); closed
        with the proxy if not before. The proxy connects to the server only after this
        returns: a server that fails at once shows on the client's first read, never as
        connect() raising ConnectionResetError (which a reset winning the race did)."""
        timeout = self.timeout if timeout is None else timeout
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.bind(("127.0.0.1", 0))  # its address, for the proxy to know it by
            local: tuple[str, int] = sock.getsockname()
            self._connecting.add(local)
            try:
                sock.connect(self.address)
            finally:
                if not self._loop.is_closed():
                    self._loop.call_soon_threadsafe(self._release, local)
        except BaseException:
            sock.close()
            raise
        client = Client(sock, timeout, url=self.url, framing=framing)
        self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every connection and the listener; wait for the proxy's thread to end."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout)

    # -- the proxy's thread --------------------------------------------------------------

    def _set_resumed(self, on: bool) -> None:
        assert self._resumed is not None
        if on:
            self._resumed.set()
        else:
            self._resumed.clear()

    def _release(self, address: tuple[str, int]) -> None:
        """connect() returned for ``address``: relay its connection if it is held."""
        self._connecting.discard(address)
        if (held := self._held.pop(address, None)) is not None and not held.done():
            held.set_result(None)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._resumed = asyncio.Event()
        if not self._stalled:
            self._resumed.set()
        loop.add_reader(self._listener.fileno(), self._accept)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            for task in self._tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            for sock in self._sockets:
                sock.close()
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    def _accept(self) -> None:
        try:
            client, address = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        self._sockets.add(client)
        if address in self._connecting:
            self._held[address] = self._loop.create_future()
        task = self._loop.create_task(self._relay(client, address))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _header(self, client: socket.socket, address: tuple[str, int]) -> bytes:
        header = self.proxy_header
        if header is None or isinstance(header, bytes):
            return header or b""
        source = self.proxy_source or address
        destination = client.getsockname()[:2]
        if header == "v1":
            return encode_v1(source, destination)
        return encode_v2(source, destination)

    async def _relay(self, client: socket.socket, address: tuple[str, int]) -> None:
        loop = self._loop
        if (held := self._held.get(address)) is not None:
            await held
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            upstream = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.setblocking(False)
        self._sockets.add(upstream)
        try:
            await loop.sock_connect(upstream, self.target)
            if header := self._header(client, address):
                await loop.sock_sendall(upstream, header)
        except OSError:
            _reset(client)
            return
        up = loop.create_task(self._pump(client, upstream, upstream=True))
        down = loop.create_task(self._pump(upstream, client, upstream=False))
        try:
            await asyncio.gather(up, down)
        except (ConnectionError, _Reset):
            _reset(client)
            _reset(upstream)
        finally:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            client.close()
            upstream.close()
            self._sockets.discard(client)
            self._sockets.discard(upstream)

    async def _pump(self, source: socket.socket, sink: socket.socket, *, upstream: bool) -> None:
        """Copy ``source`` to ``sink`` with the faults of this direction, then pass on EOF.

        A reader and a writer joined by a queue: latency delays each chunk without
        holding back the next one.
        """
        loop = self._loop
        # (when due, bytes); b"" passes on the end of the stream, None stops for a reset.
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(maxsize=64)
        writer = loop.create_task(self._write(queue, sink, upstream=upstream))
        forwarded = 0
        try:
            while True:
                if not upstream:
                    assert self._resumed is not None
                    await self._resumed.wait()
                data = await loop.sock_recv(source, 65536)
                if not data:
                    break
                if upstream:
                    limit = _first_limit(self.reset_after, self.half_close_after)
                    if limit is not None and forwarded + len(data) >= limit:
                        data = data[: limit - forwarded]
                        forwarded = limit
                        await queue.put((loop.time() + self.latency, data))
                        reset = limit == self.reset_after
                        await queue.put((0.0, None if reset else b""))
                        await writer
                        if reset:
                            raise _Reset
                        return
                    forwarded += len(data)
                await queue.put((loop.time() + self.latency, data))
            await queue.put((0.0, b""))
            await writer
        finally:
            writer.cancel()

    async def _write(
        self,
        queue: asyncio.Queue[tuple[float, bytes | None]],
        sink: socket.socket,
        *,
        upstream: bool,
    ) -> None:
        loop = self._loop
        while True:
            due, data = await queue.get()
            if data is None:
                return
            if not data:  # the end of this direction's stream
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            size = 1 if upstream and self.drip else (self.split if upstream else None)
            if not size:
                await loop.sock_sendall(sink, data)
                continue
            for start in range(0, len(data), size):
                if start:
                    await asyncio.sleep(self.pause)
                await loop.sock_sendall(sink, data[start : start + size])


class _Reset(Exception):
    """The reset fault fired: reset both connections."""


def _first_limit(*limits: int | None) -> int | None:
    given = [limit for limit in limits if limit is not None]
    return min(given) if given else None


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST) instead of an orderly end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
