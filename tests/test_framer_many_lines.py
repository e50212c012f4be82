"""Many short lines under several delimiters cost work linear in the bytes fed."""

from __future__ import annotations

from typing import SupportsIndex

import pytest

from sockserve.framers import LineFramer


class CountingBuffer(bytearray):
    """A bytearray that adds up how many bytes its ``find`` calls looked at."""

    searched = 0

    def find(  # type: ignore[override]
        self, sub: bytes, start: SupportsIndex | None = None, end: SupportsIndex | None = None
    ) -> int:
        first = 0 if start is None else int(start)
        last = len(self) if end is None else min(int(end), len(self))
        at = super().find(sub, start, end)
        CountingBuffer.searched += max((last if at < 0 else at + len(sub)) - first, 0)
        return at


def lines_out(framer: LineFramer, chunks: list[bytes]) -> list[bytes]:
    framer._buffer = CountingBuffer()
    CountingBuffer.searched = 0
    got = []
    for chunk in chunks:
        framer.feed(chunk)
        while (line := framer.next_message()) is not None:
            got.append(line)
    return got


@pytest.mark.parametrize("chunk", [1 << 18, 4096, 1])
def test_short_lines_under_two_delimiters_are_searched_once(chunk: int) -> None:
    """256 KiB of ``a\\n`` with ``\\r\\n`` also a delimiter: searching each delimiter
    to the buffer's end once per line made this quadratic (23 s); it is linear."""
    wire = b"a\n" * (1 << 17)
    got = lines_out(
        LineFramer(1 << 30, (b"\r\n", b"\n")),
        [wire[i : i + chunk] for i in range(0, len(wire), chunk)],
    )
    assert got == [b"a\n"] * (1 << 17)
    assert CountingBuffer.searched <= 4 * len(wire)


def test_mixed_delimiters_split_as_before() -> None:
    framer = LineFramer(1 << 10, (b"\r\n", b"\n", b"\0"), keep=False)
    got = lines_out(framer, [b"a\r\nb\nc\0d\r", b"\ne\n\r\0", b"f"])
    assert got == [b"a", b"b", b"c", b"d", b"e", b"\r"]
    assert framer.partial == b"f"
