"""The sockets a blocking handler is given.

A stream handler's reads wait through the ``ReadyQueue`` (``ready_queue.py``) rather
than in the kernel, and its socket counts the bytes it moves; a datagram handler's
``sendto`` waits for room on the event loop's non-blocking listener socket.
"""

from __future__ import annotations

import builtins
import select
import socket
import ssl
import struct
from typing import Any

from sockserve.ready_queue import Idle, IdleTimeout

__all__ = ["BlockingDatagramSocket", "HandlerSSLSocket", "HandlerSocket", "set_kernel_timeouts"]

# A blocking datagram handler's sendto waits for room in slices this long.
SEND_WAIT = 1.0

_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_send = socket.socket.send
_sendall = socket.socket.sendall
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_WAITALL = getattr(socket, "MSG_WAITALL", 0)


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Idle timeout kept by the kernel (SO_RCVTIMEO/SO_SNDTIMEO) for a blocking socket.

    It bounds a send to a client that stopped reading, and any read a handler makes
    around the ``ReadyQueue`` (``os.read`` on the descriptor): the expired call fails
    with EAGAIN. ``settimeout`` would make Python poll() before every send instead.
    """
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class HandlerSocket(socket.socket):
    """The blocking socket a stream handler gets: reads wait through the ReadyQueue.

    Otherwise an ordinary blocking socket (sends block; a timeout the handler sets is
    Python's own), and it counts the bytes it moves for the access log and metrics.
    """

    __slots__ = ("_idle", "bytes_in", "bytes_out")

    _idle: Idle
    bytes_in: int
    bytes_out: int

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.gettimeout() is not None or flags & _WAITALL:
            data = _recv(self, bufsize, flags)
        elif self._idle.direct():
            try:
                data = _recv(self, bufsize, flags)
            except BlockingIOError:
                self._idle.expire()
                raise
        else:
            while True:
                try:
                    data = _recv(self, bufsize, flags | _DONTWAIT)
                    break
                except BlockingIOError:
                    self._idle.wait(self.fileno(), None)
        self.bytes_in += len(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self.gettimeout() is not None or flags & _WAITALL:
            n = _recv_into(self, buffer, nbytes, flags)
        elif self._idle.direct():
            try:
                n = _recv_into(self, buffer, nbytes, flags)
            except BlockingIOError:
                self._idle.expire()
                raise
        else:
            while True:
                try:
                    n = _recv_into(self, buffer, nbytes, flags | _DONTWAIT)
                    break
                except BlockingIOError:
                    self._idle.wait(self.fileno(), None)
        self.bytes_in += n
        return n

    def send(self, data: Any, flags: int = 0) -> int:
        n = _send(self, data, flags)
        self.bytes_out += n
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        _sendall(self, data, flags)
        self.bytes_out += memoryview(data).nbytes


class HandlerSSLSocket(ssl.SSLSocket):
    """The TLS socket a stream handler gets: blocking to the handler, never to the thread.

    The descriptor stays non-blocking after the handshake (done in the event loop), so
    OpenSSL never sits in a kernel ``recv``: a read that wants more input waits through
    the ReadyQueue, under the handler's timeout or the idle timeout. (A blocking TLS
    socket with a kernel receive timeout retries forever: CPython turns the expired
    ``recv`` into WANT_READ and reads again.) ``settimeout`` and friends are recorded
    and honoured here, as on a blocking socket.
    """

    _idle: Idle
    _user_timeout: float | None = None
    bytes_in = 0
    bytes_out = 0

    def settimeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._user_timeout = value

    def gettimeout(self) -> float | None:
        return self._user_timeout

    def setblocking(self, flag: bool) -> None:
        self._user_timeout = None if flag else 0.0

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        while True:
            try:
                data: Any = super().read(len, buffer)
                break
            except ssl.SSLWantReadError:
                if self._user_timeout == 0.0:
                    raise
                self._idle.wait(self.fileno(), self._user_timeout)
            except ssl.SSLWantWriteError:
                if self._user_timeout == 0.0:
                    raise
                self._wait_writable()
        self.bytes_in += data if buffer is not None else builtins.len(data)
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        while True:
            try:
                n = super().send(data, flags)
                break
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as exc:
                if self._user_timeout == 0.0:
                    raise
                if isinstance(exc, ssl.SSLWantReadError):
                    self._idle.wait(self.fileno(), self._user_timeout)
                else:
                    self._wait_writable()
        self.bytes_out += n
        return n

    def _wait_writable(self) -> None:
        limit = self._user_timeout if self._user_timeout is not None else self._idle.idle_timeout
        poller = select.poll()
        poller.register(self.fileno(), select.POLLOUT)
        if not poller.poll(None if limit is None else limit * 1000):
            if self._user_timeout is not None:
                raise TimeoutError("timed out")
            self._idle.expired = True
            raise IdleTimeout(f"send blocked for {limit:.1f} s")


class BlockingDatagramSocket:
    """The listener socket as a blocking DatagramRequestHandler expects it.

    The real socket is non-blocking (the event loop reads it); ``sendto`` waits for room
    instead of raising BlockingIOError. Everything else is the socket's own.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendto(self, data: Any, *args: Any) -> int:
        while True:
            try:
                return self._sock.sendto(data, *args)
            except BlockingIOError:
                select.select([], [self._sock], [], SEND_WAIT)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
