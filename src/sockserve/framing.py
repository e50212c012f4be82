"""Sans-IO framing: bytes in, complete messages out, with a hard size limit per message.

A *framing* (``Lines``, ``LengthPrefixed``, ``Netstring``, ``FixedSize``) describes how
messages travel: it is immutable, shared by every connection of a handler class, and
offers ``encode(payload)`` for replies and ``framer()`` for a connection's receive side.
A *framer* is ``feed(data)`` then ``next_message()`` until it returns None, as h11's
receive buffer. It never touches a socket, a clock or a logger.

The framers are in ``sockserve.framers``; their names are importable from here too.

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

from sockserve.framers import (
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_MESSAGE,
    FixedFramer,
    Framer,
    FrameTooLong,
    LengthFramer,
    LineFramer,
    LineTooLong,
    MalformedFrame,
    NetstringFramer,
    ProtocolError,
    delimiters_of,
)

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
        self.delimiters = delimiters_of(delimiter)
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
