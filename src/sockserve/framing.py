"""Sans-IO line framing: bytes in, complete lines out, with a hard length limit.

The framer never buffers more than ``max_line`` bytes of an unfinished line, and remembers
that its buffer holds no newline, so a peer dripping one byte at a time costs O(n) in
total, not O(n**2).
"""

from __future__ import annotations

from collections import deque

__all__ = ["DEFAULT_MAX_LINE", "LineFramer", "LineTooLong", "ProtocolError"]

# 64 KiB: far above any sane line of a text protocol (SMTP allows 1000 bytes, Redis inline
# commands 64 KiB, nginx's large header buffers 8 KiB), small enough that 10,000 peers
# each holding a full partial line cost at most 640 MiB.
DEFAULT_MAX_LINE = 64 * 1024


class ProtocolError(Exception):
    """The peer broke the protocol; the connection should be closed."""


class LineTooLong(ProtocolError):
    """A line (or the unfinished start of one) is longer than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"line longer than {limit} bytes")
        self.limit = limit


class LineFramer:
    """Splits a byte stream into lines ending in ``b"\\n"`` (the newline is kept).

    ``feed(data)`` then ``next_line()`` until it returns None. A line longer than
    ``max_line`` bytes, newline included, makes ``feed`` raise LineTooLong as soon as it
    is seen; the lines completed before it can still be taken with ``next_line``.
    """

    __slots__ = ("_lines", "_max_line", "_partial")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._max_line = max_line
        self._partial = bytearray()  # the start of a line; never contains b"\n"
        self._lines: deque[bytes] = deque()

    @property
    def max_line(self) -> int:
        return self._max_line

    @property
    def buffered(self) -> int:
        """Bytes held: complete lines not yet taken plus the unfinished line."""
        return len(self._partial) + sum(map(len, self._lines))

    @property
    def empty(self) -> bool:
        return not self._partial and not self._lines

    @property
    def partial(self) -> bytes:
        """The unfinished line so far (what a peer sent after its last newline)."""
        return bytes(self._partial)

    def feed(self, data: bytes) -> None:
        """Add bytes from the peer. Raises LineTooLong for an over-long line."""
        start = 0
        limit = self._max_line
        partial = self._partial
        while (end := data.find(b"\n", start)) >= 0:
            if len(partial) + end + 1 - start > limit:
                raise LineTooLong(limit)
            if partial:
                partial += data[start : end + 1]
                self._lines.append(bytes(partial))
                partial.clear()
            else:
                self._lines.append(data[start : end + 1])
            start = end + 1
        if len(partial) + len(data) - start > limit:
            raise LineTooLong(limit)
        partial += data[start:]

    def next_line(self) -> bytes | None:
        """The next complete line, or None when more data is needed."""
        return self._lines.popleft() if self._lines else None

    def take_buffer(self) -> bytes:
        """Everything buffered, in order, emptying the framer (to switch to raw reads)."""
        data = b"".join(self._lines) + bytes(self._partial)
        self._lines.clear()
        self._partial.clear()
        return data
