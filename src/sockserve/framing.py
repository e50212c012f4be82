"""Sans-IO line framing: bytes in, complete lines out, with a hard length limit.

The framer never holds more than ``max_line`` bytes of an unfinished line; it looks for
newlines only in the bytes just fed, so a peer dripping one byte at a time costs O(n) in
total, not O(n**2); and it cuts lines out of its buffer lazily, so a chunk of many short
lines costs its bytes, not an object per line, until each line is asked for.
"""

from __future__ import annotations

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

    ``feed(data)`` then ``next_line()`` until it returns None. Lines are cut out of one
    buffer only when asked for, so what the framer holds is the bytes the peer sent and
    nothing more, however many lines that makes. A line longer than ``max_line`` bytes,
    newline included, raises LineTooLong: from ``feed`` as soon as the unfinished line
    is too long, from ``next_line`` when a complete one is reached (the lines before it
    are taken first). After that the framer is unusable.
    """

    __slots__ = ("_buffer", "_max_line", "_start", "_tail")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._max_line = max_line
        self._buffer = bytearray()
        self._start = 0  # the first byte not yet handed out
        self._tail = 0  # where the unfinished line starts: just after the last newline

    @property
    def max_line(self) -> int:
        return self._max_line

    @property
    def buffered(self) -> int:
        """Bytes held: complete lines not yet taken plus the unfinished line."""
        return len(self._buffer) - self._start

    @property
    def empty(self) -> bool:
        return self._start == len(self._buffer)

    @property
    def unfinished(self) -> int:
        """Bytes of the unfinished line (what a peer sent after its last newline)."""
        return len(self._buffer) - max(self._tail, self._start)

    @property
    def partial(self) -> bytes:
        """The unfinished line so far (what a peer sent after its last newline)."""
        return bytes(self._buffer[max(self._tail, self._start) :])

    def feed(self, data: bytes) -> None:
        """Add bytes from the peer. Raises LineTooLong for an over-long unfinished line."""
        buffer = self._buffer
        if self._start:  # drop what was handed out (cheap: bytearray trims its front)
            del buffer[: self._start]
            self._tail = max(self._tail - self._start, 0)
            self._start = 0
        base = len(buffer)
        buffer += data
        last = data.rfind(b"\n")
        if last >= 0:
            self._tail = base + last + 1
        if len(buffer) - self._tail > self._max_line:
            raise LineTooLong(self._max_line)

    def next_line(self) -> bytes | None:
        """The next complete line, or None when more data is needed."""
        start = self._start
        if start >= self._tail:
            return None
        end = self._buffer.find(b"\n", start, self._tail) + 1
        if end - start > self._max_line:
            raise LineTooLong(self._max_line)
        self._start = end
        return bytes(self._buffer[start:end])

    def take_buffer(self) -> bytes:
        """Everything not yet handed out, emptying the framer (to switch to raw reads)."""
        data = bytes(self._buffer[self._start :])
        self._buffer.clear()
        self._start = self._tail = 0
        return data
