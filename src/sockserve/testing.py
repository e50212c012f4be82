"""Test kit for sockserve handlers: a server in a thread, a client, a fault-injecting proxy.

``with serve(Handler) as server:`` runs any handler kind on an ephemeral loopback port
(or a temporary Unix socket) in a background thread and stops it completely on exit,
re-raising what the handler raised so a test cannot pass over a crashing handler.
``server.connect()`` is a blocking client whose every read is bounded by a timeout.
``FaultProxy`` sits between a client and a server and makes the network misbehave.

Installing sockserve registers this module as a pytest plugin (entry point
``pytest11``): the fixture ``sockserve_server`` is ``serve`` as a factory, torn down
after the test. ``import sockserve`` does not import this module, and nothing here
needs pytest except that fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from sockserve.blocking import is_blocking_handler
from sockserve.framing import Framing, Lines
from sockserve.handlers import DatagramHandler
from sockserve.proxy_protocol import encode_v1, encode_v2
from sockserve.runner import new_event_loop
from sockserve.server import Server
from sockserve.settings import Settings, SettingsError, describe

if TYPE_CHECKING:
    import ssl

__all__ = [
    "Client",
    "DatagramClient",
    "FaultProxy",
    "RunningServer",
    "serve",
]

DEFAULT_TIMEOUT = 5.0  # seconds any single read, connect or start may take
STOP_TIMEOUT = 5.0  # seconds open connections get to finish when the server stops


def _serves_datagrams(handler: type) -> bool:
    """True for handlers that only make sense on a datagram socket."""
    if issubclass(handler, DatagramHandler):
        return True
    return is_blocking_handler(handler) and any(
        base.__name__ == "DatagramRequestHandler" for base in handler.__mro__
    )


class _CollectingServer(Server):
    """A Server that also keeps every exception its handler raised."""

    def __init__(self, handler: type, settings: Settings, errors: list[BaseException]) -> None:
        super().__init__(handler, settings)
        report = self.ledger.handler_failed

        def handler_failed(peer: Any, exc: BaseException) -> None:
            errors.append(exc)
            report(peer, exc)

        # Every handler error of every kind is reported to the ledger: collect it there.
        setattr(self.ledger, "handler_failed", handler_failed)  # noqa: B010


class RunningServer:
    """A sockserve Server running in a background thread, as ``serve()`` hands it out.

    ``url`` and ``address`` are where it listens (``address`` is a ``(host, port)``
    tuple, or a path for Unix sockets); ``errors`` holds what the handler raised so far;
    ``server`` is the ``sockserve.Server`` itself (touch it only through ``call``).
    """

    def __init__(
        self,
        handler: type,
        *,
        unix: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        **settings: Any,
    ) -> None:
        self.handler_class = handler
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.errors: list[BaseException] = []
        self._clients: list[Client] = []
        self._tempdir: str | None = None
        datagram = _serves_datagrams(handler)
        if "bind" not in settings:
            if unix:
                self._tempdir = tempfile.mkdtemp(prefix="sockserve-")
                scheme = "unix-dgram" if datagram else "unix"
                settings["bind"] = [f"{scheme}:{self._tempdir}/server.sock"]
            else:
                settings["bind"] = ["udp://127.0.0.1:0" if datagram else "127.0.0.1:0"]
        try:
            self.settings = Settings(**settings)
            if self.settings.workers != 1 or self.settings.reload:
                # Worker processes and reloading belong to `sockserve run`, not a thread.
                raise SettingsError(
                    f"{describe('workers')}: serve() runs one server in a thread; test"
                    " --workers and --reload with `sockserve run` in a subprocess"
                )
            self._loop = new_event_loop(self.settings.loop)
            try:
                self.server: Server = _CollectingServer(handler, self.settings, self.errors)
            except BaseException:
                self._loop.close()
                raise
        except BaseException:
            self._remove_tempdir()
            raise
        self._started = threading.Event()
        self._start_error: list[BaseException] = []  # what start() raised, if it did
        self._thread = threading.Thread(target=self._run, name="sockserve-testing", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise TimeoutError(f"server did not start within {timeout} s")
        if self._start_error:
            self._thread.join(timeout)
            self._remove_tempdir()
            raise self._start_error[0]

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as exc:
                self._start_error.append(exc)
                return
            finally:
                self._started.set()
            loop.run_until_complete(self.server.wait_closed())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    @property
    def urls(self) -> list[str]:
        """Every address served, ``tcp://127.0.0.1:40123`` style."""
        return self.server.urls

    @property
    def url(self) -> str:
        """The first address served."""
        return self.server.urls[0]

    @property
    def address(self) -> Any:
        """The first listener's address: ``(host, port)``, or a Unix socket path."""
        address = self.server.server_address
        return tuple(address[:2]) if isinstance(address, tuple) else address

    @property
    def datagram(self) -> bool:
        return self.server.listeners[0].datagram

    def connect(
        self,
        *,
        timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
    ) -> Client:
        """A client of the first listener (a DatagramClient for a datagram listener);
        closed when the server stops, if not before.

        ``tls`` (a client SSLContext trusting the server's certificate) wraps the
        connection in TLS, checking the certificate against ``server_hostname``.
        """
        timeout = self.timeout if timeout is None else timeout
        listener = self.server.listeners[0]
        sock = listener.sock
        client: Client
        if self.datagram:
            peer = socket.socket(sock.family, socket.SOCK_DGRAM)
            if sock.family == socket.AF_UNIX:
                # A Unix datagram client needs a name of its own to get replies.
                directory = self._tempdir or tempfile.gettempdir()
                peer.bind(f"{directory}/client-{id(peer):x}.sock")
            peer.connect(self.address)
            client = DatagramClient(peer, timeout, url=self.url)
        else:
            peer = socket.socket(sock.family, socket.SOCK_STREAM)
            peer.settimeout(timeout)
            try:
                peer.connect(self.address)
                if tls is not None:
                    peer = tls.wrap_socket(peer, server_hostname=server_hostname)
            except BaseException:
                peer.close()
                raise
            framing = getattr(self.handler_class, "framing", None)
            client = Client(
                peer,
                timeout,
                url=self.url,
                framing=framing if isinstance(framing, Framing) else None,
            )
        self._clients.append(client)
        return client

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` in the server's event loop thread and return its result."""
        if not self._thread.is_alive():
            raise RuntimeError("the server is stopped")

        async def run() -> Any:
            return func(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self.timeout)

    def stop(self) -> None:
        """Close the clients, stop the server gracefully and wait for its thread to end."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._thread.is_alive() and self._started.is_set() and not self._start_error:
            future = asyncio.run_coroutine_threadsafe(
                self.server.shutdown(self.stop_timeout), self._loop
            )
            future.result(self.stop_timeout + 10.0)
        self._thread.join(self.stop_timeout + 10.0)
        self._remove_tempdir()
        if self._thread.is_alive():
            raise RuntimeError("the server thread did not stop")

    def _remove_tempdir(self) -> None:
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


@contextlib.contextmanager
def serve(
    handler: type,
    *,
    unix: bool = False,
    raise_errors: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
    **settings: Any,
) -> Iterator[RunningServer]:
    """Serve ``handler`` in a background thread for the duration of the ``with`` block.

    It listens on an ephemeral port of 127.0.0.1 (UDP for datagram handlers), or on a
    Unix socket in a temporary directory with ``unix=True``, unless ``bind`` is given.
    Other keywords are sockserve settings. On exit the clients are closed, the server
    stops (connections get ``stop_timeout`` seconds to finish) and its thread, sockets
    and files are gone. The first exception the handler raised is then re-raised,
    unless ``raise_errors=False`` (all of them are in ``server.errors``).
    """
    running = RunningServer(
        handler, unix=unix, timeout=timeout, stop_timeout=stop_timeout, **settings
    )
    try:
        yield running
    finally:
        running.stop()
    if raise_errors and running.errors:
        raise running.errors[0]


def _deadline_error(what: str, url: str, timeout: float, got: bytes = b"") -> TimeoutError:
    so_far = f" (got {got[:200]!r} so far)" if got else ""
    return TimeoutError(f"no {what} from {url} within {timeout} s{so_far}")


class Client:
    """A blocking stream client; each read waits at most ``timeout`` seconds.

    Reads return ``b""`` (or what was left) at the end of the stream and raise
    TimeoutError when the server says nothing in time. ``framing`` (a
    ``sockserve.framing.Framing``, by default the handler's) is what ``read_message``,
    ``send_message`` and ``request`` use; without one a message is a line.
    """

    def __init__(
        self,
        sock: socket.socket,
        timeout: float = DEFAULT_TIMEOUT,
        url: str = "",
        framing: Framing | None = None,
    ) -> None:
        self.sock = sock
        self.timeout = timeout
        self.url = url or repr(sock.getpeername())
        # A message handler's framing; lines that keep their newline are plain lines.
        lines = isinstance(framing, Lines) and framing.keep and framing.delimiters == (b"\n",)
        self.framing = None if lines else framing
        self._buffer = bytearray()
        self._eof = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Send all of ``data``."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def _fill(self, deadline: float, what: str, timeout: float) -> bool:
        """Read more into the buffer; False at the end of the stream."""
        if self._eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _deadline_error(what, self.url, timeout, bytes(self._buffer))
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise _deadline_error(what, self.url, timeout, bytes(self._buffer)) from None
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def _take(self, size: int) -> bytes:
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, *, timeout: float | None = None) -> bytes:
        """The next line with its ``b"\\n"``; at the end of the stream what is left."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        searched = 0
        while (end := self._buffer.find(b"\n", searched)) < 0:
            searched = len(self._buffer)
            if not self._fill(deadline, "line", timeout):
                return self._take(len(self._buffer))
        return self._take(end + 1)

    def read(self, n: int = -1, *, timeout: float | None = None) -> bytes:
        """Exactly ``n`` bytes (fewer only at the end of the stream); -1 reads to the end."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while n < 0 or len(self._buffer) < n:
            if not self._fill(deadline, f"{n} bytes" if n >= 0 else "end of stream", timeout):
                break
        return self._take(len(self._buffer) if n < 0 else n)

    def read_message(self, *, timeout: float | None = None) -> bytes:
        """The next message in ``framing`` (its payload), or the next line without one.

        At the end of the stream: ``b""``, or MalformedFrame if it ended inside a message.
        """
        if self.framing is None:
            return self.readline(timeout=timeout)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        framer = self.framing.framer()
        try:
            while True:
                framer.feed(self._take(len(self._buffer)))
                if (message := framer.next_message()) is not None:
                    return message
                if not self._fill(deadline, "message", timeout):
                    return framer.end() or b""
        finally:
            self._buffer[:0] = framer.take_buffer()  # unread bytes stay for the next read

    def send_message(self, payload: bytes) -> None:
        """Send ``payload`` framed in ``framing`` (as a line without one)."""
        if self.framing is None:
            self.send(payload if payload.endswith(b"\n") else payload + b"\n")
        else:
            self.send(self.framing.encode(payload))

    def request(self, line: bytes, *, timeout: float | None = None) -> bytes:
        """Send one message and return the reply: with no framing (line and stream
        handlers), ``line`` gets a newline if it lacks one and the reply is a line."""
        self.send_message(line)
        return self.read_message(timeout=timeout)

    def shutdown_write(self) -> None:
        """Half-close: the server sees the end of the stream; replies can still be read."""
        self.sock.shutdown(socket.SHUT_WR)

    def wait_closed(self, *, timeout: float | None = None) -> bytes:
        """Wait until the server closes the connection (end of stream or reset).

        Returns what the server sent before closing; TimeoutError if it stays open.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline, "end of stream", timeout):
                pass
        except ConnectionResetError:
            self._eof = True
        return self._take(len(self._buffer))

    def close(self) -> None:
        self.sock.close()


class DatagramClient(Client):
    """A client of a datagram listener: each message is one datagram, there is no stream.

    ``send`` sends one datagram; ``readline``, ``read_message`` and ``read`` return the
    next datagram; ``request`` sends one and returns the reply. ``wait_closed`` and
    ``shutdown_write`` have no meaning here and raise TypeError.
    """

    def __init__(
        self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT, url: str = ""
    ) -> None:
        super().__init__(sock, timeout, url)
        # A Unix datagram client's own socket file, removed on close.
        self._path = sock.getsockname() if sock.family == socket.AF_UNIX else None

    def send(self, data: bytes) -> None:
        """Send ``data`` as one datagram."""
        self.sock.send(data)

    def read_message(self, *, timeout: float | None = None) -> bytes:
        """The next datagram from the server."""
        timeout = self.timeout if timeout is None else timeout
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise _deadline_error("datagram", self.url, timeout) from None

    def readline(self, *, timeout: float | None = None) -> bytes:
        """The next datagram from the server."""
        return self.read_message(timeout=timeout)

    def read(self, n: int = -1, *, timeout: float | None = None) -> bytes:
        """The next datagram, cut to ``n`` bytes if ``n`` >= 0."""
        data = self.read_message(timeout=timeout)
        return data if n < 0 else data[:n]

    def request(self, line: bytes, *, timeout: float | None = None) -> bytes:
        """Send one datagram (as given, no newline added) and return the reply datagram."""
        self.send(line)
        return self.read_message(timeout=timeout)

    def shutdown_write(self) -> None:
        raise TypeError("a datagram socket has no stream to end")

    def wait_closed(self, *, timeout: float | None = None) -> bytes:
        raise TypeError("a datagram server does not close connections")

    def close(self) -> None:
        self.sock.close()
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None


# -- the fault proxy -------------------------------------------------------------------

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
        with the proxy if not before."""
        timeout = self.timeout if timeout is None else timeout
        sock = socket.create_connection(self.address, timeout=timeout)
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


# -- the pytest plugin -------------------------------------------------------------------

try:
    import pytest
except ImportError:  # serve() and FaultProxy work without pytest
    pass
else:

    @pytest.fixture
    def sockserve_server() -> Iterator[Callable[..., RunningServer]]:
        """``sockserve_server(Handler, **settings)`` serves a handler until the test ends.

        Takes ``serve()``'s arguments. Every server started is stopped at teardown, which
        fails the test with the first exception a handler raised (unless the server was
        started with ``raise_errors=False``).
        """
        with contextlib.ExitStack() as stack:

            def start(handler: type, **kwargs: Any) -> RunningServer:
                return stack.enter_context(serve(handler, **kwargs))

            yield start
