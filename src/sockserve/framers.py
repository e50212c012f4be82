"""Sans-IO framers: a connection's receive side, bytes in, complete messages out.

A framer is ``feed(data)`` then ``next_message()`` until it returns None, as h11's
receive buffer; it never touches a socket, a clock or a logger. Each holds at most one
message past its limit's check: ``next_message`` raises ProtocolError (FrameTooLong,
MalformedFrame) as soon as the buffered bytes show the next message is broken, and a
length header announcing more than ``max_size`` is refused before any of its body.
Messages are cut out of one buffer lazily and every framer remembers how far it looked,
so a peer dripping one byte at a time costs O(n) in total, not O(n**2).

The framings that make them (``Lines``, ``LengthPrefixed``, ...) are in
``sockserve.framing``, which exports these names too.
"""

from __future__ import annotations

import struct

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_MESSAGE",
    "FixedFramer",
    "FrameTooLong",
    "Framer",
    "LengthFramer",
    "LineFramer",
    "LineTooLong",
    "MalformedFrame",
    "NetstringFramer",
    "ProtocolError",
    "delimiters_of",
]

# 64 KiB: far above any sane line of a text protocol (SMTP allows 1000 bytes, Redis inline
# commands 64 KiB, nginx's large header buffers 8 KiB), small enough that 10,000 peers
# each holding a full partial line cost at most 640 MiB.
DEFAULT_MAX_LINE = 64 * 1024

# 1 MiB for binary messages: Kafka's default message.max.bytes and NATS's max_payload are
# 1 MB, gRPC's default receive limit 4 MiB. A framer holds a whole message before handing
# it out, so this is also the memory one peer can make a connection hold.
DEFAULT_MAX_MESSAGE = 1024 * 1024


class ProtocolError(Exception):
    """The peer broke the protocol; the connection should be closed."""


class FrameTooLong(ProtocolError):
    """A message is (or announces itself as) longer than the framing's limit."""

    def __init__(self, limit: int, what: str = "message") -> None:
        super().__init__(f"{what} longer than {limit} bytes")
        self.limit = limit


class LineTooLong(FrameTooLong):
    """A line (or the unfinished start of one) is longer than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit, "line")


class MalformedFrame(ProtocolError):
    """Bytes that no message of this framing can start with (a bad netstring, say)."""


class Framer:
    """A connection's receive buffer: ``feed`` bytes, take messages or raw bytes out.

    Subclasses define ``next_message``; the raw reads (``read``, ``read_exactly``,
    ``take_buffer``) serve handlers that mix framed and unframed reads.
    """

    __slots__ = ("_buffer", "_start")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # the first byte not yet handed out

    @property
    def buffered(self) -> int:
        """Bytes held: complete messages not yet taken plus an unfinished one."""
        return len(self._buffer) - self._start

    @property
    def empty(self) -> bool:
        return self._start == len(self._buffer)

    @property
    def unfinished(self) -> int:
        """Bytes of a message begun and not complete (what a message deadline watches)."""
        return self.buffered

    def feed(self, data: bytes) -> None:
        """Add bytes from the peer. Never raises: ``next_message`` judges them."""
        if self._start:  # drop what was handed out (cheap: bytearray trims its front)
            self._compact()
        self._buffer += data

    def _compact(self) -> None:
        del self._buffer[: self._start]
        self._start = 0

    def next_message(self) -> bytes | None:
        """The next complete message, or None when more data is needed."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise the ProtocolError ``next_message`` will raise once it gets there, if the
        bytes fed already show it, however many messages wait before it: what a reader
        that is behind calls after each ``feed`` to refuse an over-long message before
        its body arrives. Each byte is looked at once over all calls."""

    def end(self) -> bytes | None:
        """At the end of the stream: a last message the unfinished bytes make, if any.

        MalformedFrame when the stream stopped inside a message that cannot end there.
        """
        if self.empty:
            return None
        raise MalformedFrame(f"the stream ended inside a message ({self.buffered} bytes)")

    def read(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes, unframed (``b""`` when nothing is buffered)."""
        start = self._start
        stop = min(start + n, len(self._buffer))
        self._start = stop
        return bytes(self._buffer[start:stop])

    def read_exactly(self, n: int) -> bytes | None:
        """Exactly ``n`` unframed bytes, or None (nothing taken) until that many are here."""
        start = self._start
        if len(self._buffer) - start < n:
            return None
        self._start = start + n
        return bytes(self._buffer[start : start + n])

    def take_buffer(self) -> bytes:
        """Everything not yet handed out, emptying the framer (the leftover bytes)."""
        data = bytes(self._buffer[self._start :])
        self._buffer.clear()
        self._start = 0
        self._reset()
        return data

    def _reset(self) -> None:
        """Forget positions into the buffer after ``take_buffer``."""


def delimiters_of(delimiter: bytes | tuple[bytes, ...]) -> tuple[bytes, ...]:
    """A line delimiter or several as a tuple; ValueError unless each is non-empty bytes."""
    found = (delimiter,) if isinstance(delimiter, bytes) else tuple(delimiter)
    if not found or not all(isinstance(d, bytes) and d for d in found):
        raise ValueError("a delimiter is non-empty bytes, or a tuple of them")
    return found


class LineFramer(Framer):
    """Splits a byte stream at a delimiter (``b"\\n"`` by default) or at any of several.

    With several delimiters a message ends at the first place any of them ends (the
    shortest message, as asyncio's ``readuntil``); where two end at once the longer is
    the delimiter. ``keep`` leaves the delimiter on the message. A line longer than
    ``max_line`` bytes, delimiter included, raises LineTooLong: when it is complete, or
    as soon as its unfinished start is longer than that.
    """

    __slots__ = (
        "_delimiter",
        "_delimiters",
        "_found",
        "_keep",
        "_max_line",
        "_resume",
        "_scan",
        "_tail",
        "_width",
    )

    def __init__(
        self,
        max_line: int = DEFAULT_MAX_LINE,
        delimiter: bytes | tuple[bytes, ...] = b"\n",
        keep: bool = True,
    ) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        super().__init__()
        self._delimiters = delimiters_of(delimiter)
        self._delimiter = self._delimiters[0] if len(self._delimiters) == 1 else None
        self._width = max(len(d) for d in self._delimiters)
        self._keep = keep
        self._max_line = max_line
        self._scan = 0  # no delimiter ends before this offset past ``_start``
        self._tail = 0  # where the unfinished line starts: just after the last delimiter
        # With several delimiters, each one's next place (-1: none in the buffer) and
        # where a search for it resumes, so no byte is searched twice for one delimiter.
        self._found = [-1] * len(self._delimiters)
        self._resume = [0] * len(self._delimiters)

    @property
    def max_line(self) -> int:
        return self._max_line

    @property
    def unfinished(self) -> int:
        """Bytes after the last delimiter fed (what a peer sent after its last line)."""
        return len(self._buffer) - max(self._tail, self._start)

    @property
    def partial(self) -> bytes:
        """The unfinished line so far."""
        return bytes(self._buffer[max(self._tail, self._start) :])

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        start = self._start
        if start:
            del buffer[:start]
            self._scan = max(self._scan - start, 0)
            self._tail = max(self._tail - start, 0)
            self._start = 0
            self._found = [at - start if at >= start else -1 for at in self._found]
            self._resume = [max(at - start, 0) for at in self._resume]
        base = len(buffer)
        buffer += data
        if (delimiter := self._delimiter) is not None and len(delimiter) == 1:
            last = data.rfind(delimiter)
            if last >= 0:
                self._tail = base + last + 1
            return
        since = max(base - self._width + 1, self._tail)
        for delimiter in self._delimiters:
            last = buffer.rfind(delimiter, since)
            if last >= 0:
                self._tail = max(self._tail, last + len(delimiter))

    def next_message(self) -> bytes | None:
        buffer = self._buffer
        start = self._start
        delimiter = self._delimiter
        if delimiter is not None:
            end = buffer.find(delimiter, max(self._scan, start))
            stop = end + len(delimiter)
        else:
            end = stop = -1
            since = max(self._scan, start)
            found, resume = self._found, self._resume
            for i, candidate in enumerate(self._delimiters):
                at = found[i]
                if at < since:
                    at = found[i] = buffer.find(candidate, max(since, resume[i]))
                    if at < 0:
                        resume[i] = len(buffer) - len(candidate) + 1
                if at >= 0 and (
                    stop < 0
                    or at + len(candidate) < stop
                    or (at + len(candidate) == stop and at < end)
                ):
                    end, stop = at, at + len(candidate)
        if end < 0:
            self._scan = max(len(buffer) - self._width + 1, start)
            if len(buffer) - start > self._max_line:
                raise LineTooLong(self._max_line)
            return None
        if stop - start > self._max_line:
            raise LineTooLong(self._max_line)
        self._start = self._scan = stop
        return bytes(buffer[start : stop if self._keep else end])

    def next_line(self) -> bytes | None:
        """``next_message``, by the name line handlers know it."""
        return self.next_message()

    def check(self) -> None:
        if self.unfinished > self._max_line:
            raise LineTooLong(self._max_line)

    def end(self) -> bytes | None:
        """The last line of a stream may lack its delimiter; it is still a line."""
        if self.empty:
            return None
        if self.buffered > self._max_line:
            raise LineTooLong(self._max_line)
        return self.take_buffer()

    def _reset(self) -> None:
        self._scan = self._tail = 0
        self._found = [-1] * len(self._delimiters)
        self._resume = [0] * len(self._delimiters)


class LengthFramer(Framer):
    """Messages behind an unsigned length header (see ``LengthPrefixed``)."""

    __slots__ = ("_adjust", "_checked", "_header", "_max_size", "_unpack")

    def __init__(self, header: struct.Struct, max_size: int, includes_header: bool) -> None:
        super().__init__()
        self._checked = 0  # where the first header ``check`` has not read starts
        self._header = header.size
        self._unpack = header.unpack_from
        self._adjust = header.size if includes_header else 0
        self._max_size = max_size

    def _length(self, at: int) -> int:
        """The payload length announced by the header at ``at``, checked."""
        length: int = self._unpack(self._buffer, at)[0] - self._adjust
        if length < 0:
            raise MalformedFrame(f"length {length + self._adjust} is shorter than its header")
        if length > self._max_size:
            raise FrameTooLong(self._max_size)
        return length

    @property
    def unfinished(self) -> int:
        at, size = self._start, len(self._buffer)
        try:
            while at + self._header <= size:
                stop = at + self._header + self._length(at)
                if stop > size:
                    break
                at = stop
        except ProtocolError:
            pass
        return size - at

    def check(self) -> None:
        at, size = max(self._checked, self._start), len(self._buffer)
        while at + self._header <= size:
            at += self._header + self._length(at)
        self._checked = at

    def _compact(self) -> None:
        self._checked = max(self._checked - self._start, 0)
        super()._compact()

    def _reset(self) -> None:
        self._checked = 0

    def next_message(self) -> bytes | None:
        start = self._start
        body = start + self._header
        if len(self._buffer) < body:
            return None
        stop = body + self._length(start)
        if stop > len(self._buffer):
            return None
        self._start = stop
        return bytes(self._buffer[body:stop])


class NetstringFramer(Framer):
    """Messages as netstrings, ``5:hello,`` (see ``Netstring``)."""

    __slots__ = ("_checked", "_digits", "_max_size")

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self._checked = 0  # where the first netstring ``check`` has not read starts
        self._max_size = max_size
        self._digits = len(str(max_size))

    def _frame(self, start: int) -> tuple[int, int] | None:
        """Where the payload at ``start`` begins and ends, or None to wait for more."""
        buffer = self._buffer
        colon = buffer.find(b":", start, start + self._digits + 1)
        if colon < 0:
            head = buffer[start : start + self._digits + 1]
            if head and not head.isdigit():
                raise MalformedFrame("a netstring starts with its length in digits")
            if len(head) > self._digits:
                raise FrameTooLong(self._max_size)
            return None
        digits = buffer[start:colon]
        if not digits.isdigit() or (digits[0] == 0x30 and len(digits) > 1):
            raise MalformedFrame("a netstring length is digits without leading zeros")
        length = int(digits)
        if length > self._max_size:
            raise FrameTooLong(self._max_size)
        return colon + 1, colon + 1 + length

    @property
    def unfinished(self) -> int:
        at, size = self._start, len(self._buffer)
        try:
            while (frame := self._frame(at)) is not None and frame[1] < size:
                at = frame[1] + 1
        except ProtocolError:
            pass
        return size - at

    def check(self) -> None:
        at, size = max(self._checked, self._start), len(self._buffer)
        while at < size and (frame := self._frame(at)) is not None and frame[1] < size:
            if self._buffer[frame[1]] != 0x2C:  # b","
                raise MalformedFrame("a netstring ends with a comma")
            at = frame[1] + 1
        self._checked = at

    def _compact(self) -> None:
        self._checked = max(self._checked - self._start, 0)
        super()._compact()

    def _reset(self) -> None:
        self._checked = 0

    def next_message(self) -> bytes | None:
        frame = self._frame(self._start)
        if frame is None:
            return None
        body, stop = frame
        if stop >= len(self._buffer):
            return None
        if self._buffer[stop] != 0x2C:  # b","
            raise MalformedFrame("a netstring ends with a comma")
        self._start = stop + 1
        return bytes(self._buffer[body:stop])


class FixedFramer(Framer):
    """Messages of one size, back to back (see ``FixedSize``)."""

    __slots__ = ("_size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    @property
    def unfinished(self) -> int:
        return self.buffered % self._size

    def next_message(self) -> bytes | None:
        return self.read_exactly(self._size)
