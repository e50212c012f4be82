"""The sans-IO line framer: any split of any input gives the same lines; limits hold."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockserve.framing import LineFramer, LineTooLong


def lines_of(framer: LineFramer, out: list[bytes] | None = None) -> list[bytes]:
    """Every complete line; with ``out``, lines taken before an error are kept there."""
    out = [] if out is None else out
    while (line := framer.next_line()) is not None:
        out.append(line)
    return out


def reference(data: bytes, limit: int) -> tuple[list[bytes], bytes, bool]:
    """What framing must give: complete lines, the unfinished rest, whether the limit broke."""
    lines: list[bytes] = []
    start = 0
    while (end := data.find(b"\n", start)) >= 0:
        if end + 1 - start > limit:
            return lines, b"", True
        lines.append(data[start : end + 1])
        start = end + 1
    rest = data[start:]
    return lines, rest, len(rest) > limit


chunks = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"x", b"\n")), max_size=30)


@settings(max_examples=400, derandomize=True)
@given(chunks, st.integers(min_value=1, max_value=50))
def test_any_split_gives_the_same_lines(parts: list[bytes], limit: int) -> None:
    data = b"".join(parts)
    want_lines, want_rest, want_error = reference(data, limit)
    framer = LineFramer(limit)
    got: list[bytes] = []
    error = False
    for part in parts:
        try:
            framer.feed(part)
        except LineTooLong:  # the unfinished line is too long; the lines before it count
            error = True
        try:
            lines_of(framer, got)
        except LineTooLong:  # a complete line is too long
            error = True
        if error:
            break
    assert error == want_error
    assert got == want_lines
    if not error:
        assert framer.partial == want_rest
        assert framer.unfinished == len(want_rest)
        assert framer.buffered == len(want_rest)


@settings(max_examples=100, derandomize=True)
@given(chunks, st.integers(min_value=0, max_value=5))
def test_unfinished_counts_the_bytes_after_the_last_newline(parts: list[bytes], take: int) -> None:
    """What the line timeout watches: the unfinished line, however many lines are queued."""
    framer = LineFramer(1 << 20)
    for part in parts:
        framer.feed(part)
    for _ in range(take):
        framer.next_line()
    data = b"".join(parts)
    assert framer.unfinished == len(data) - (data.rfind(b"\n") + 1)


@given(st.integers(min_value=1, max_value=300))
def test_never_buffers_past_the_limit(limit: int) -> None:
    """Asked after each byte, the framer refuses the line one byte past the limit."""
    framer = LineFramer(limit)
    with pytest.raises(LineTooLong):
        for _ in range(limit + 1):
            assert framer.buffered <= limit
            framer.feed(b"a")
            assert framer.next_line() is None
    assert framer.buffered == limit + 1


def test_line_of_exactly_the_limit_is_fine() -> None:
    framer = LineFramer(4)
    framer.feed(b"abc\nabcd")
    assert framer.next_line() == b"abc\n"
    framer.feed(b"\n")  # complete now, and one byte too long: raised when reached
    with pytest.raises(LineTooLong, match="longer than 4 bytes"):
        framer.next_line()


def test_lines_before_an_over_long_one_are_kept() -> None:
    framer = LineFramer(5)
    framer.feed(b"ok\n" + b"y" * 10 + b"\n")
    assert framer.next_line() == b"ok\n"
    with pytest.raises(LineTooLong):
        framer.next_line()


def test_many_short_lines_cost_their_bytes_only() -> None:
    """Lines are cut out lazily: a chunk of 100,000 lines is one buffer, not 100,000 objects."""
    framer = LineFramer()
    framer.feed(b"x\n" * 100_000)
    assert framer.buffered == 200_000
    assert framer.next_line() == b"x\n"
    assert framer.buffered == 199_998


def test_take_buffer_and_empty() -> None:
    framer = LineFramer()
    assert framer.empty and framer.max_line == 64 * 1024
    framer.feed(b"a\nb")
    assert framer.buffered == 3
    assert framer.take_buffer() == b"a\nb"
    assert framer.next_line() is None
    assert framer.empty


def test_bad_limit_is_a_usage_error() -> None:
    with pytest.raises(ValueError):
        LineFramer(0)


def test_one_byte_drip_is_linear() -> None:
    """A peer dripping a byte at a time up to the limit costs O(n), not O(n**2)."""
    import time

    framer = LineFramer(1 << 20)
    line: bytes | None
    started = time.thread_time()  # CPU time: other processes' load does not count
    for _ in range(200_000):
        framer.feed(b"z")
    framer.feed(b"\n")
    line = framer.next_line()
    assert line is not None and len(line) == 200_001
    assert time.thread_time() - started < 5  # quadratic would copy ~20 GB
