"""Sans-IO framing: bytes in, complete messages out, with a hard size limit per message.

A *framing* (``Lines``, ``LengthPrefixed``, ``Netstring``, ``FixedSize``) describes how
messages travel: it is immutable, shared by every connection of a handler class, and
offers ``encode(payload)`` for replies and ``framer()`` for a connection's receive side.
A *framer* is ``feed(data)`` then ``next_message()`` until it returns None, as h11's
receive buffer. It never touches a socket, a clock or a logger.

Two kinds of error: ValueError (or TypeError) when the API is misused (a bad format, a
payload ``encode`` cannot frame), ProtocolError when the peer broke the protocol
(FrameTooLong, MalformedFrame). ``next_message`` raises as soon as the buffered bytes
show the next message is broken: a length header announcing more than ``max_size`` is
refused when the header arrives, before any of its body. Messages are cut out of one
buffer lazily and every framer remembers how far it looked, so a chunk of many messages
costs its bytes and a peer dripping one byte at a time costs O(n) in total, not O(n**2).
"""

from __future__ import annotations

import re
import struct

__all__ = [
    "DEFAULT_MAX_LINE",
    "DEFAULT_MAX_MESSAGE",
    "FixedSize",
    "FrameTooLong",
    "Framer",
    "Framing",
    "LengthPrefixed",
    "LineFramer",
    "LineTooLong",
    "Lines",
    "MalformedFrame",
    "Netstring",
    "ProtocolError",
    "parse_framing",
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


def _delimiters(delimiter: bytes | tuple[bytes, ...]) -> tuple[bytes, ...]:
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

    __slots__ = ("_delimiter", "_delimiters", "_keep", "_max_line", "_scan", "_tail", "_width")

    def __init__(
        self,
        max_line: int = DEFAULT_MAX_LINE,
        delimiter: bytes | tuple[bytes, ...] = b"\n",
        keep: bool = True,
    ) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        super().__init__()
        self._delimiters = _delimiters(delimiter)
        self._delimiter = self._delimiters[0] if len(self._delimiters) == 1 else None
        self._width = max(len(d) for d in self._delimiters)
        self._keep = keep
        self._max_line = max_line
        self._scan = 0  # no delimiter ends before this offset past ``_start``
        self._tail = 0  # where the unfinished line starts: just after the last delimiter

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
            for candidate in self._delimiters:
                at = buffer.find(candidate, since)
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


class Framing:
    """How messages travel on a stream: ``framer()`` reads them, ``encode`` writes one."""

    __slots__ = ("max_size",)

    max_size: int

    def framer(self) -> Framer:
        """A fresh receive-side framer for one connection."""
        raise NotImplementedError

    def encode(self, payload: bytes) -> bytes:
        """``payload`` framed for the wire; ValueError if this framing cannot carry it."""
        raise NotImplementedError

    def whole(self, data: bytes) -> bytes | None:
        """The payload when ``data`` is exactly one complete message within the limit,
        else None (the fast path for one request per read; the framer decides the rest)."""
        return None

    def _check(self, payload: bytes) -> None:
        if len(payload) > self.max_size:
            raise ValueError(f"a {len(payload)}-byte message is over max_size {self.max_size}")


class Lines(Framing):
    """Messages ending in a delimiter: ``b"\\n"``, ``b"\\r\\n"``, ``b"\\0"``, or a tuple.

    The message is the line without its delimiter (``keep=True`` keeps it, and
    ``encode`` then writes payloads as given). ``max_size`` bounds a line with its
    delimiter, as ``--max-line`` does; the default's reason is at DEFAULT_MAX_LINE.
    ``encode`` adds the first delimiter.
    """

    __slots__ = ("delimiters", "keep")

    def __init__(
        self,
        delimiter: bytes | tuple[bytes, ...] = b"\n",
        max_size: int = DEFAULT_MAX_LINE,
        keep: bool = False,
    ) -> None:
        self.delimiters = _delimiters(delimiter)
        if max_size < max(len(d) for d in self.delimiters):
            raise ValueError("max_size must leave room for the delimiter")
        self.max_size = max_size
        self.keep = keep

    def __repr__(self) -> str:
        delimiter = self.delimiters[0] if len(self.delimiters) == 1 else self.delimiters
        return f"Lines({delimiter!r}, max_size={self.max_size}, keep={self.keep})"

    def framer(self) -> LineFramer:
        return LineFramer(self.max_size, self.delimiters, self.keep)

    def encode(self, payload: bytes) -> bytes:
        if self.keep:
            self._check(payload)
            return payload
        first = self.delimiters[0]
        framed = payload + first
        for delimiter in self.delimiters:  # it must read back as this one message
            if framed.find(delimiter, 0, len(framed) - 1) >= 0 or (
                len(delimiter) > len(first) and framed.endswith(delimiter)
            ):
                raise ValueError(f"a Lines message cannot contain its delimiter {delimiter!r}")
        self._check(framed)
        return framed

    def whole(self, data: bytes) -> bytes | None:
        if len(self.delimiters) > 1 or len(data) > self.max_size:
            return None
        delimiter = self.delimiters[0]
        end = data.find(delimiter)
        if end != len(data) - len(delimiter) or end < 0:
            return None
        return data if self.keep else data[:end]


_LENGTH_FORMAT = re.compile(r"[!<>]?B|[!<>][HIQ]")


class LengthPrefixed(Framing):
    """Messages behind an unsigned length: struct format ``B``, ``H``, ``I`` or ``Q``
    after ``!``/``>`` (big-endian) or ``<`` (little-endian).

    The length counts the payload, or with ``includes_header=True`` the header too.
    ``max_size`` bounds the payload; a header announcing more closes the connection
    before its body is read. The default is DEFAULT_MAX_MESSAGE (reason there), or what
    a 1- or 2-byte header can announce if that is less.
    """

    __slots__ = ("_pack", "_unpack", "fmt", "header", "includes_header")

    def __init__(
        self, fmt: str = "!I", max_size: int | None = None, includes_header: bool = False
    ) -> None:
        if not isinstance(fmt, str) or not _LENGTH_FORMAT.fullmatch(fmt):
            raise ValueError(f"length format {fmt!r} is not one of B, H, I, Q after !, > or <")
        self.fmt = fmt
        self.includes_header = includes_header
        self.header = struct.Struct(fmt)  # the length header
        self._pack = self.header.pack
        self._unpack = self.header.unpack_from
        most = (1 << (8 * self.header.size)) - 1 - (self.header.size if includes_header else 0)
        if max_size is None:
            max_size = min(DEFAULT_MAX_MESSAGE, most)
        if not 0 <= max_size <= most:
            raise ValueError(f"max_size must be between 0 and {most} for a {fmt!r} length")
        self.max_size = max_size

    def __repr__(self) -> str:
        extra = ", includes_header=True" if self.includes_header else ""
        return f"LengthPrefixed({self.fmt!r}, max_size={self.max_size}{extra})"

    def framer(self) -> LengthFramer:
        return LengthFramer(self.header, self.max_size, self.includes_header)

    def encode(self, payload: bytes) -> bytes:
        size = len(payload)
        if size > self.max_size:
            raise ValueError(f"a {size}-byte message is over max_size {self.max_size}")
        if self.includes_header:
            size += self.header.size
        return self._pack(size) + payload

    def whole(self, data: bytes) -> bytes | None:
        header = self.header.size
        if len(data) < header:
            return None
        size = self._unpack(data)[0]
        if self.includes_header:
            size -= header
        if size != len(data) - header or size > self.max_size:
            return None
        return data[header:]


class Netstring(Framing):
    """Messages as netstrings (``5:hello,``; D. J. Bernstein's spec: decimal length,
    no leading zeros, a comma after the payload). ``max_size`` bounds the payload;
    default DEFAULT_MAX_MESSAGE (reason there)."""

    __slots__ = ()

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_size < 0:
            raise ValueError("max_size must be at least 0")
        self.max_size = max_size

    def __repr__(self) -> str:
        return f"Netstring(max_size={self.max_size})"

    def framer(self) -> NetstringFramer:
        return NetstringFramer(self.max_size)

    def encode(self, payload: bytes) -> bytes:
        self._check(payload)
        return b"%d:%s," % (len(payload), payload)


class FixedSize(Framing):
    """Messages of exactly ``size`` bytes each, back to back (records)."""

    __slots__ = ()

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.max_size = size

    def __repr__(self) -> str:
        return f"FixedSize({self.max_size})"

    def framer(self) -> FixedFramer:
        return FixedFramer(self.max_size)

    def encode(self, payload: bytes) -> bytes:
        if len(payload) != self.max_size:
            raise ValueError(f"a FixedSize({self.max_size}) message cannot be {len(payload)} bytes")
        return payload

    def whole(self, data: bytes) -> bytes | None:
        return data if len(data) == self.max_size else None


_LENGTHS = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}

FRAMING_SPECS = "line, crlf, delim:HEX, u8, u16, u32, u64, u16le, u32le, u64le, netstring, fixed:N"


def parse_framing(spec: str, max_size: int | None = None) -> Framing:
    """The framing a command-line spec names (FRAMING_SPECS); ValueError if none."""
    text = spec.strip().lower()
    line_size = DEFAULT_MAX_LINE if max_size is None else max_size
    if text in ("line", "lines"):
        return Lines(max_size=line_size)
    if text == "crlf":
        return Lines(b"\r\n", max_size=line_size)
    if text.startswith("delim:"):
        try:
            delimiter = bytes.fromhex(text[6:])
        except ValueError:
            delimiter = b""
        if not delimiter:
            raise ValueError(f"framing {spec!r}: delim: takes the delimiter in hex, e.g. delim:00")
        return Lines(delimiter, max_size=line_size)
    if text in _LENGTHS or (text.endswith("le") and text[:-2] in _LENGTHS):
        little = text.endswith("le")
        return LengthPrefixed(
            ("<" if little else "!") + _LENGTHS[text.removesuffix("le")], max_size
        )
    if text == "netstring":
        return Netstring(DEFAULT_MAX_MESSAGE if max_size is None else max_size)
    if text.startswith("fixed:") and text[6:].isdigit() and int(text[6:]) > 0:
        return FixedSize(int(text[6:]))
    raise ValueError(f"framing {spec!r} is not one of {FRAMING_SPECS}")
