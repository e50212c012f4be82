"""Drop-in replacement for the standard library's ``socketserver``.

Same names (``__all__`` matches the running Python's), classes, attributes, hooks and hook
order, so ``import sockserve.socketserver as socketserver`` runs stdlib-style programs
unchanged. What differs is listed in docs/compatibility.md; in short:

- ``shutdown()`` returns within milliseconds: a wake-up socket pair sits in the selector
  beside the server. It never deadlocks when called from a handler on the serving thread
  or before ``serve_forever()`` has started.
- ``ThreadingMixIn.max_threads`` bounds the handler threads: at the bound the server stops
  accepting (the kernel backlog holds clients) until a thread ends. Finished threads are
  not kept.
- ``ForkingMixIn`` reaps children as they exit (pidfd where available) and at
  ``max_children`` stops accepting instead of blocking in ``waitpid``.
- ``handle_error`` logs through the ``sockserve.socketserver`` logger with the traceback.
- EMFILE/ENFILE/ENOBUFS/ENOMEM on accept are logged (rate-limited) and accepting backs off
  for 100 ms instead of spinning.
- ``request_queue_size`` defaults to ``socket.SOMAXCONN`` instead of 5.
"""

from __future__ import annotations

import errno
import io
import os
import selectors
import socket
import sys
import threading
from collections.abc import Callable
from time import monotonic

TYPE_CHECKING = False  # typing itself costs more to import than this module
if TYPE_CHECKING:
    import logging
    from typing import Any

__version__ = "0.4"

__all__ = [  # noqa: RUF022 (the stdlib's order)
    "BaseServer",
    "TCPServer",
    "UDPServer",
    "ThreadingUDPServer",
    "ThreadingTCPServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "ThreadingMixIn",
]
if hasattr(os, "fork"):
    __all__.extend(["ForkingUDPServer", "ForkingTCPServer", "ForkingMixIn"])  # noqa: RUF022
if hasattr(socket, "AF_UNIX"):
    __all__.extend(
        [  # noqa: RUF022
            "UnixStreamServer",
            "UnixDatagramServer",
            "ThreadingUnixStreamServer",
            "ThreadingUnixDatagramServer",
        ]
    )
    if hasattr(os, "fork") and sys.version_info >= (3, 12):
        __all__.extend(["ForkingUnixStreamServer", "ForkingUnixDatagramServer"])  # noqa: RUF022


def _logger() -> logging.Logger:
    """Our logger; logging is imported on first use, as the stdlib module never needs it."""
    import logging

    return logging.getLogger(__name__)


_ServerSelector: type[selectors.BaseSelector]
if hasattr(selectors, "PollSelector"):
    _ServerSelector = selectors.PollSelector
else:
    _ServerSelector = selectors.SelectSelector

# accept() errors that mean "out of resources", not "this one client failed" (as trio does).
_OVERLOAD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF = 0.1  # seconds without accepting after an overload error
_OVERLOAD_LOG_INTERVAL = 5.0  # at most one log line per this many seconds
_CAPACITY_POLL = 0.05  # re-check interval for children that cannot be watched by pidfd

_SERVER = "server"  # selector key data: the listening socket
_WAKE = "wake"  # selector key data: the wake-up socket pair


class _Waker:
    """A socket pair: writing one byte makes a selector waiting on the read end return."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:  # full (a wake-up is already pending) or closed
            pass

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class _Loop:
    """The selector and waker of one serve_forever() or handle_request() call."""

    def __init__(self, extra: dict[int, Callable[[], None]]) -> None:
        self.selector = _ServerSelector()
        self.waker = _Waker()
        self.selector.register(self.waker.fileno(), selectors.EVENT_READ, _WAKE)
        for fd, callback in extra.items():
            self.selector.register(fd, selectors.EVENT_READ, callback)
        self.listening_fd: int | None = None

    def close(self) -> None:
        self.selector.close()
        self.waker.close()


class BaseServer:
    """Base class for server classes.

    Methods for the caller: ``__init__(server_address, RequestHandlerClass)``,
    ``serve_forever(poll_interval=0.5)``, ``shutdown()``, ``handle_request()``,
    ``fileno()``. Methods that may be overridden: ``server_bind``, ``server_activate``,
    ``get_request``, ``handle_timeout``, ``verify_request``, ``server_close``,
    ``process_request``, ``shutdown_request``, ``close_request``, ``service_actions``,
    ``handle_error``. For derived classes: ``finish_request``. Class variables:
    ``timeout``, ``address_family``, ``socket_type``, ``allow_reuse_address``,
    ``allow_reuse_port``.
    """

    timeout: float | None = None
    socket: socket.socket

    if TYPE_CHECKING:  # defined by the socket-based subclasses

        def fileno(self) -> int: ...

        def get_request(self) -> tuple[Any, Any]: ...

    def __init__(self, server_address: Any, RequestHandlerClass: Callable[..., Any]) -> None:
        """Constructor.  May be extended, do not override."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__lock = threading.Lock()
        self.__is_shut_down = threading.Event()
        self.__is_shut_down.set()
        self.__shutdown_request = False
        self.__serving: int | None = None  # ident of the thread in serve_forever()
        self.__loop: _Loop | None = None
        self.__watched: dict[int, Callable[[], None]] = {}
        self.__resume_accept_at = 0.0
        self.__last_overload_log = -_OVERLOAD_LOG_INTERVAL
        self.__overloads_unlogged = 0

    def server_activate(self) -> None:
        """Called by constructor to activate the server.  May be overridden."""

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle one request at a time until shutdown.

        ``shutdown()`` wakes the loop at once; ``service_actions()`` runs after every
        request and at least every ``poll_interval`` seconds. Ignores ``self.timeout``.
        A shutdown requested while not serving makes this return at once.
        """
        with self.__lock:
            if self.__shutdown_request:
                self.__shutdown_request = False
                return
            self.__serving = threading.get_ident()
            self.__is_shut_down.clear()
        try:
            with self.__running_loop() as loop:
                while not self.__stopping():
                    ready = self.__select(loop, poll_interval)
                    if self.__stopping():
                        break
                    if ready:
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            with self.__lock:
                self.__shutdown_request = False
                self.__serving = None
                self.__is_shut_down.set()

    def shutdown(self) -> None:
        """Stop the serve_forever() loop; return once it has stopped.

        From a handler on the serving thread it only requests the stop. Before
        serve_forever() has started it leaves the request pending and returns.
        """
        with self.__lock:
            self.__shutdown_request = True
            serving = self.__serving
            if self.__loop is not None:
                self.__loop.waker.wake()
        if serving is None or serving == threading.get_ident():
            return
        self.__is_shut_down.wait()

    def service_actions(self) -> None:
        """Called by the serve_forever() loop.  May be overridden by a subclass or mix-in."""

    def handle_request(self) -> None:
        """Handle one request, possibly blocking.  Respects ``self.timeout``."""
        timeout = self.socket.gettimeout()
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        deadline = None if timeout is None else monotonic() + timeout
        with self.__running_loop() as loop:
            while True:
                if self.__select(loop, timeout):
                    return self._handle_request_noblock()
                if deadline is not None:
                    timeout = deadline - monotonic()
                    if timeout < 0:
                        return self.handle_timeout()

    def _handle_request_noblock(self) -> None:
        """Accept and handle one request; the socket is known to be readable."""
        try:
            request, client_address = self.get_request()
        except OSError as exc:
            if exc.errno in _OVERLOAD_ERRNOS:
                self.__accept_overloaded(exc)
            return
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def handle_timeout(self) -> None:
        """Called if no new request arrives within ``self.timeout``."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return True to go on with this request.  May be overridden."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Call finish_request, then shutdown_request.  Overridden by the mix-ins."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Called to clean up the server.  May be overridden."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating RequestHandlerClass."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: Any) -> None:
        """Called to shut down and close an individual request."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Called to clean up an individual request."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the current exception with its traceback and go on.  May be overridden."""
        # Called from inside the except block that caught the handler's exception.
        _logger().exception(
            "Exception occurred during processing of request from %s", client_address
        )

    def __enter__(self) -> BaseServer:
        return self

    def __exit__(self, *args: object) -> None:
        self.server_close()

    # Internals shared with the mix-ins.

    def _can_accept(self) -> bool:
        """Whether the loop should select on the listening socket now."""
        return monotonic() >= self.__resume_accept_at

    def _recheck_after(self) -> float | None:
        """Seconds after which _can_accept() may change without a wake-up (None: never)."""
        remaining = self.__resume_accept_at - monotonic()
        return remaining if remaining > 0 else None

    def _wake(self) -> None:
        """Wake the running loop, if any, so it re-checks _can_accept()."""
        with self.__lock:
            if self.__loop is not None:
                self.__loop.waker.wake()

    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the loop when ``fd`` becomes readable."""
        self.__watched[fd] = callback
        if self.__loop is not None:
            self.__loop.selector.register(fd, selectors.EVENT_READ, callback)

    def _unwatch(self, fd: int) -> None:
        """Stop watching ``fd``; call before closing it."""
        if self.__watched.pop(fd, None) is not None and self.__loop is not None:
            try:
                self.__loop.selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def __stopping(self) -> bool:
        return self.__shutdown_request

    def __running_loop(self) -> _LoopContext:
        return _LoopContext(self)

    def _enter_loop(self) -> tuple[_Loop, bool]:
        with self.__lock:
            if self.__loop is not None:  # handle_request() from inside serve_forever()
                return self.__loop, False
            self.__loop = _Loop(self.__watched)
            return self.__loop, True

    def _exit_loop(self, loop: _Loop) -> None:
        with self.__lock:
            self.__loop = None
        loop.close()

    def __select(self, loop: _Loop, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for a request; run wake-ups and watch callbacks."""
        want = self._can_accept()
        if want and loop.listening_fd is None:
            loop.listening_fd = self.fileno()
            loop.selector.register(loop.listening_fd, selectors.EVENT_READ, _SERVER)
        elif not want and loop.listening_fd is not None:
            loop.selector.unregister(loop.listening_fd)
            loop.listening_fd = None
        recheck = self._recheck_after()
        if recheck is not None:
            timeout = recheck if timeout is None else min(timeout, recheck)
        ready = False
        for key, _events in loop.selector.select(timeout):
            if key.data is _SERVER:
                ready = True
            elif key.data is _WAKE:
                loop.waker.drain()
            else:
                key.data()
        return ready

    def __accept_overloaded(self, exc: OSError) -> None:
        now = monotonic()
        self.__resume_accept_at = now + _ACCEPT_BACKOFF
        self.__overloads_unlogged += 1
        if now - self.__last_overload_log >= _OVERLOAD_LOG_INTERVAL:
            _logger().warning(
                "accept failed (%s), %d time(s) since the last report; pausing accepts for %d ms",
                exc,
                self.__overloads_unlogged,
                _ACCEPT_BACKOFF * 1000,
            )
            self.__last_overload_log = now
            self.__overloads_unlogged = 0


class _LoopContext:
    """Context manager giving a server its loop for the length of one serving call."""

    def __init__(self, server: BaseServer) -> None:
        self._server = server
        self._owned = False
        self._loop: _Loop | None = None

    def __enter__(self) -> _Loop:
        self._loop, self._owned = self._server._enter_loop()
        return self._loop

    def __exit__(self, *args: object) -> None:
        if self._owned and self._loop is not None:
            self._server._exit_loop(self._loop)


class TCPServer(BaseServer):
    """Server on a stream socket, TCP by default.

    Adds ``__init__(server_address, RequestHandlerClass, bind_and_activate=True)`` and the
    class variable ``request_queue_size`` (the listen backlog, ``socket.SOMAXCONN``).
    """

    address_family: int = socket.AF_INET
    socket_type: int = socket.SOCK_STREAM
    request_queue_size: int = socket.SOMAXCONN
    allow_reuse_address: bool = False
    allow_reuse_port: bool = False

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Callable[..., Any],
        bind_and_activate: bool = True,
    ) -> None:
        """Constructor.  May be extended, do not override."""
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Set the reuse options, bind the socket and record the real address."""
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listen with a backlog of ``request_queue_size``."""
        self.socket.listen(self.request_queue_size)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()

    def fileno(self) -> int:
        """The socket's file descriptor, for selectors."""
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection: ``(socket, client_address)``."""
        return self.socket.accept()

    def shutdown_request(self, request: Any) -> None:
        """Shut down the write side (the peer sees EOF), then close."""
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:  # ENOTCONN on some platforms
            pass
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        request.close()


class UDPServer(TCPServer):
    """Datagram server: each request is ``(data, socket)``."""

    allow_reuse_address = False
    allow_reuse_port = False
    socket_type = socket.SOCK_DGRAM
    max_packet_size = 8192

    def get_request(self) -> tuple[Any, Any]:
        data, client_addr = self.socket.recvfrom(self.max_packet_size)
        return (data, self.socket), client_addr

    def server_activate(self) -> None:
        """Datagram sockets do not listen."""

    def shutdown_request(self, request: Any) -> None:
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """The socket is shared by all requests: nothing to close."""


# The mix-ins are plain classes at run time; for the type checker they extend BaseServer.
if TYPE_CHECKING:
    _MixInBase = TCPServer
else:
    _MixInBase = object


if hasattr(os, "fork"):

    class ForkingMixIn(_MixInBase):
        """Mix-in class to handle each request in a new process."""

        timeout: float | None = 300
        active_children: set[int] | None = None
        max_children: int = 40
        block_on_close: bool = True

        def collect_children(self, *, blocking: bool = False) -> None:
            """Reap children that have exited; with ``blocking``, wait for all of them."""
            if self.active_children is None:
                return
            flags = 0 if blocking else os.WNOHANG
            for pid in list(self.active_children):
                try:
                    done, _status = os.waitpid(pid, flags)
                except ChildProcessError:
                    done = pid
                except OSError:
                    continue
                if done:
                    self._forget_child(pid)

        def handle_timeout(self) -> None:
            """Reap children after ``self.timeout`` seconds without a request."""
            self.collect_children()

        def service_actions(self) -> None:
            """Reap children that exited (those without a pidfd are found only here)."""
            self.collect_children()

        def process_request(self, request: Any, client_address: Any) -> None:
            """Fork a new subprocess to process the request."""
            pid = os.fork()
            if pid:
                if self.active_children is None:
                    self.active_children = set()
                self.active_children.add(pid)
                self._watch_child(pid)
                self.close_request(request)
                return
            status = 1
            try:
                self.finish_request(request, client_address)
                status = 0
            except Exception:
                self.handle_error(request, client_address)
            finally:
                try:
                    self.shutdown_request(request)
                finally:
                    os._exit(status)

        def server_close(self) -> None:
            super().server_close()
            self.collect_children(blocking=self.block_on_close)
            for pid in list(self._child_pidfds()):
                self._close_pidfd(pid)

        def _child_pidfds(self) -> dict[int, int]:
            pidfds: dict[int, int] = vars(self).setdefault("_pidfds", {})
            return pidfds

        def _watch_child(self, pid: int) -> None:
            """Reap ``pid`` as soon as it exits, through a pidfd where the OS has them."""
            pidfd_open = getattr(os, "pidfd_open", None)
            if pidfd_open is None:
                return
            try:
                fd: int = pidfd_open(pid)
            except OSError:
                return
            self._child_pidfds()[pid] = fd
            self._watch(fd, lambda: self._child_exited(pid))

        def _child_exited(self, pid: int) -> None:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._forget_child(pid)

        def _forget_child(self, pid: int) -> None:
            if self.active_children is not None:
                self.active_children.discard(pid)
            self._close_pidfd(pid)

        def _close_pidfd(self, pid: int) -> None:
            fd = self._child_pidfds().pop(pid, None)
            if fd is not None:
                self._unwatch(fd)
                os.close(fd)

        def _at_capacity(self) -> bool:
            return self.active_children is not None and (
                len(self.active_children) >= self.max_children
            )

        def _can_accept(self) -> bool:
            if self._at_capacity():
                if len(self._child_pidfds()) < len(self.active_children or ()):
                    self.collect_children()
                if self._at_capacity():
                    return False
            return super()._can_accept()

        def _recheck_after(self) -> float | None:
            base = super()._recheck_after()
            unwatched = len(self._child_pidfds()) < len(self.active_children or ())
            if self._at_capacity() and unwatched:
                return _CAPACITY_POLL if base is None else min(base, _CAPACITY_POLL)
            return base


class _Threads:
    """Live handler threads; each removes itself as it ends, so none is kept afterwards."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[threading.Thread] = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def append(self, thread: threading.Thread) -> None:
        with self._lock:
            self._live.add(thread)

    def remove(self, thread: threading.Thread) -> None:
        with self._lock:
            self._live.discard(thread)

    def join(self) -> None:
        """Wait for the non-daemon threads (not the calling one)."""
        me = threading.current_thread()
        with self._lock:
            pending = [t for t in self._live if not t.daemon and t is not me]
        for thread in pending:
            thread.join()


class _NoThreads(_Threads):
    """What a server that never started a thread has: nothing to count or join."""

    def __init__(self) -> None:
        pass

    def __len__(self) -> int:
        return 0

    def append(self, thread: threading.Thread) -> None:
        pass

    def remove(self, thread: threading.Thread) -> None:
        pass

    def join(self) -> None:
        pass


class ThreadingMixIn(_MixInBase):
    """Mix-in class to handle each request in a new thread.

    ``max_threads`` (None: unbounded) bounds the handler threads: at the bound the server
    stops accepting until one ends.
    """

    daemon_threads: bool = False
    block_on_close: bool = True
    max_threads: int | None = None
    _threads: _Threads = _NoThreads()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Same as BaseServer.process_request, in a thread, with exception handling."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a new thread to process the request."""
        threads = self._live_threads()
        thread = threading.Thread(
            target=self._run_request_thread, args=(threads, request, client_address)
        )
        thread.daemon = self.daemon_threads
        threads.append(thread)
        try:
            thread.start()
        except BaseException:
            threads.remove(thread)
            raise

    def server_close(self) -> None:
        super().server_close()
        if self.block_on_close:
            self._threads.join()

    def _live_threads(self) -> _Threads:
        threads: _Threads = vars(self).setdefault("_threads", _Threads())
        return threads

    def _run_request_thread(self, threads: _Threads, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            threads.remove(threading.current_thread())
            self._wake()

    def _can_accept(self) -> bool:
        if self.max_threads is not None and len(self._threads) >= self.max_threads:
            return False
        return super()._can_accept()


if hasattr(os, "fork"):

    class ForkingUDPServer(ForkingMixIn, UDPServer):
        pass

    class ForkingTCPServer(ForkingMixIn, TCPServer):
        pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer):
        address_family = socket.AF_UNIX

    class UnixDatagramServer(UDPServer):
        address_family = socket.AF_UNIX

    class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
        pass

    class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
        pass

    if hasattr(os, "fork") and sys.version_info >= (3, 12):

        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
            pass

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
            pass


class BaseRequestHandler:
    """Base class for request handlers: one instance per request.

    The constructor sets ``request``, ``client_address`` and ``server``, then calls
    ``setup()``, ``handle()`` and (always) ``finish()``.
    """

    def __init__(self, request: Any, client_address: Any, server: BaseServer) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        pass

    def handle(self) -> None:
        pass

    def finish(self) -> None:
        pass


class StreamRequestHandler(BaseRequestHandler):
    """Define ``self.rfile`` and ``self.wfile`` for stream sockets.

    ``rbufsize``/``wbufsize`` are the file buffer sizes (``wbufsize = 0``: every write is
    sent at once); ``timeout`` is set on the connection; ``disable_nagle_algorithm`` sets
    TCP_NODELAY.
    """

    rbufsize: int = -1
    wbufsize: int = 0
    timeout: float | None = None
    disable_nagle_algorithm: bool = False

    connection: Any
    rfile: Any
    wfile: Any

    def setup(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            self.wfile = _SocketWriter(self.connection)
        else:
            self.wfile = self.connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:  # the peer went away
                pass
        self.wfile.close()
        self.rfile.close()


class _SocketWriter(io.BufferedIOBase):
    """Unbuffered writable file over a socket: every write() is a sendall()."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class DatagramRequestHandler(BaseRequestHandler):
    """Define ``self.rfile`` (the datagram) and ``self.wfile`` (the reply, sent in finish)."""

    packet: bytes
    socket: socket.socket
    rfile: io.BytesIO
    wfile: io.BytesIO

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        self.socket.sendto(self.wfile.getvalue(), self.client_address)
