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
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from sockserve.blocking import is_blocking_handler
from sockserve.faultproxy import FaultProxy
from sockserve.framing import Framing
from sockserve.handlers import DatagramHandler
from sockserve.process import new_event_loop
from sockserve.server import Server
from sockserve.settings import Settings, SettingsError, describe
from sockserve.testclient import DEFAULT_TIMEOUT, Client, DatagramClient

if TYPE_CHECKING:
    import ssl

__all__ = [
    "Client",
    "DatagramClient",
    "FaultProxy",
    "RunningServer",
    "serve",
]

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
