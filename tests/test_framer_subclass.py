"""A Framer subclass that defines only ``next_message`` (the documented extension point)
gets the base class's defaults."""

from __future__ import annotations

from sockserve.framing import Framer


class Pairs(Framer):
    """Two-byte messages; what counts as unfinished is left to the base class."""

    __slots__ = ()

    def next_message(self) -> bytes | None:
        return self.read_exactly(2)


def test_by_default_everything_held_is_unfinished() -> None:
    framer = Pairs()
    assert framer.unfinished == 0 and framer.empty
    framer.feed(b"abc")
    assert framer.unfinished == framer.buffered == 3
    assert framer.next_message() == b"ab"
    assert framer.unfinished == 1
    assert framer.next_message() is None
