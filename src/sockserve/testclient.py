"""The test kit's blocking clients: every read bounded by a timeout.

``Client`` (stream) and ``DatagramClient`` are what ``RunningServer.connect()`` and
``FaultProxy.connect()`` return; ``sockserve.testing`` re-exports both.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from sockserve.framing import Framing, Lines

__all__ = ["DEFAULT_TIMEOUT", "Client", "DatagramClient"]

DEFAULT_TIMEOUT = 5.0  # seconds any single read, connect or start may take


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
