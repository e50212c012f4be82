"""The sans-IO framers: any split of any input gives the same messages and the same error."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockserve.framing import (
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_MESSAGE,
    FixedSize,
    Framer,
    FrameTooLong,
    Framing,
    LengthPrefixed,
    LineFramer,
    Lines,
    LineTooLong,
    MalformedFrame,
    Netstring,
    ProtocolError,
    parse_framing,
)

Outcome = tuple[list[bytes], type[ProtocolError] | None, bytes]


def run(framer: Framer, parts: list[bytes]) -> Outcome:
    """Feed ``parts`` one by one, taking every message after each: messages, error, leftover."""
    got: list[bytes] = []
    for part in parts:
        framer.feed(part)
        try:
            while (message := framer.next_message()) is not None:
                got.append(message)
        except ProtocolError as exc:
            return got, type(exc), b""
    return got, None, framer.take_buffer()


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


FRAMINGS: list[Framing] = [
    Lines(),
    Lines(max_size=8),
    Lines(b"\r\n", max_size=10),
    Lines(b"\0", keep=True, max_size=6),
    Lines((b"\r\n", b"\n"), max_size=9),
    Lines((b"xyz", b"y"), max_size=12),
    Lines(b"aa", max_size=7),
    LengthPrefixed("!B", max_size=20),
    LengthPrefixed("!H", max_size=12),
    LengthPrefixed("<H", max_size=300),
    LengthPrefixed("!I", max_size=9),
    LengthPrefixed(">I", max_size=9, includes_header=True),
    LengthPrefixed("<Q", max_size=16),
    Netstring(max_size=12),
    Netstring(max_size=100),
    FixedSize(1),
    FixedSize(3),
]
IDS = [repr(f) for f in FRAMINGS]

# Bytes that are meaningful to some framing, so random inputs hit delimiters and digits.
ALPHABET = b"\n\r\0axyz0123456789:,\x00\x01\x02\x05\x09\x10\xff"
noise = st.lists(st.sampled_from(list(ALPHABET)), max_size=60).map(bytes)
payload = st.binary(max_size=10)


def valid_stream(framing: Framing, payloads: list[bytes]) -> tuple[list[bytes], bytes]:
    """The payloads this framing can carry, and their encoding back to back."""
    carried: list[bytes] = []
    for given_payload in payloads:
        p = given_payload
        if isinstance(framing, FixedSize):
            p = (p * framing.max_size)[: framing.max_size] or b"\x00" * framing.max_size
        try:
            carried.append(framing.encode(p))
        except ValueError:
            continue
    if isinstance(framing, Lines) and framing.keep:  # the message is the line as sent
        carried = [c + framing.delimiters[0] for c in carried if framing.delimiters[0] not in c]
        carried = [c for c in carried if len(c) <= framing.max_size]
        return carried, b"".join(carried)
    messages = [run(framing.framer(), [c])[0][0] for c in carried]
    return messages, b"".join(carried)


@pytest.mark.parametrize("framing", FRAMINGS, ids=IDS)
@settings(max_examples=60, derandomize=True)
@given(payloads=st.lists(payload, max_size=6), cuts=st.lists(st.integers(0, 80), max_size=8))
def test_encoded_messages_come_back_at_any_split(
    framing: Framing, payloads: list[bytes], cuts: list[int]
) -> None:
    messages, data = valid_stream(framing, payloads)
    assert run(framing.framer(), splits(data, cuts)) == (messages, None, b"")


@pytest.mark.parametrize("framing", FRAMINGS, ids=IDS)
@settings(max_examples=80, derandomize=True)
@given(data=noise)
def test_every_split_point_gives_the_same_outcome(framing: Framing, data: bytes) -> None:
    """Messages, error and leftover are the same whole, cut at any one byte, or dripped."""
    whole = run(framing.framer(), [data])
    for cut in range(len(data) + 1):
        assert run(framing.framer(), [data[:cut], data[cut:]]) == whole, cut
    assert run(framing.framer(), [data[i : i + 1] for i in range(len(data))]) == whole


@pytest.mark.parametrize("framing", FRAMINGS, ids=IDS)
@settings(max_examples=60, derandomize=True)
@given(data=noise, cuts=st.lists(st.integers(0, 60), max_size=10))
def test_any_chunking_gives_the_same_outcome(
    framing: Framing, data: bytes, cuts: list[int]
) -> None:
    assert run(framing.framer(), splits(data, cuts)) == run(framing.framer(), [data])


@pytest.mark.parametrize("framing", FRAMINGS, ids=IDS)
@settings(max_examples=60, derandomize=True)
@given(payloads=st.lists(payload, max_size=5), tail=noise)
def test_unfinished_is_what_follows_the_complete_messages(
    framing: Framing, payloads: list[bytes], tail: bytes
) -> None:
    """What a message deadline watches, even while complete messages wait to be taken."""
    messages, data = valid_stream(framing, payloads)
    framer = framing.framer()
    framer.feed(data + tail)
    assert framer.buffered == len(data) + len(tail)
    finished = framer.buffered - framer.unfinished
    try:
        taken = 0
        while framer.next_message() is not None:
            taken += 1
    except ProtocolError:
        return  # the tail is broken; what is unfinished is not defined then
    assert taken >= len(messages)
    if not isinstance(framing, Lines) or framing.delimiters != (b"aa",):  # overlapping
        assert framer.unfinished == framer.buffered
        assert finished == len(data) + len(tail) - framer.buffered


@pytest.mark.parametrize("framing", FRAMINGS, ids=IDS)
@settings(max_examples=60, derandomize=True)
@given(payloads=st.lists(payload, max_size=4), tail=noise)
def test_raw_reads_share_the_buffer(framing: Framing, payloads: list[bytes], tail: bytes) -> None:
    """Messages, then raw bytes: ``read``, ``read_exactly`` and ``take_buffer`` see the rest."""
    messages, data = valid_stream(framing, payloads)
    framer = framing.framer()
    framer.feed(data)
    assert [framer.next_message() for _ in messages] == messages
    framer.feed(tail)
    assert framer.read_exactly(len(tail) + 1) is None
    half = len(tail) // 2
    assert framer.read(half) == tail[:half]
    assert framer.read_exactly(1) == tail[half : half + 1] or half == len(tail)
    assert framer.take_buffer() == tail[half + 1 :]
    assert framer.empty and framer.read(5) == b""


def test_a_huge_length_header_is_refused_before_its_body() -> None:
    """A 4-byte header announcing 1 GiB: refused at once, nothing but the header held."""
    framer = LengthPrefixed("!I").framer()
    framer.feed(struct.pack("!I", 1 << 30))
    with pytest.raises(FrameTooLong, match=f"longer than {DEFAULT_MAX_MESSAGE} bytes"):
        framer.next_message()
    assert framer.buffered == 4


def test_a_huge_netstring_length_is_refused_before_its_colon() -> None:
    framer = Netstring(max_size=1000).framer()
    framer.feed(b"100")
    assert framer.next_message() is None
    framer.feed(b"0")  # 1000 fits, and the colon may still come
    assert framer.next_message() is None
    framer.feed(b"0")
    with pytest.raises(FrameTooLong):
        framer.next_message()


@pytest.mark.parametrize(
    ("framing", "data", "error"),
    [
        (Netstring(), b"x:", MalformedFrame),
        (Netstring(), b":abc,", MalformedFrame),
        (Netstring(), b"05:hello,", MalformedFrame),
        (Netstring(), b"5:hello;", MalformedFrame),
        (Netstring(), b"-1:", MalformedFrame),
        (Netstring(max_size=4), b"5:hello,", FrameTooLong),
        (LengthPrefixed("!H", includes_header=True), b"\x00\x01", MalformedFrame),
        (LengthPrefixed("!H", max_size=4), b"\x00\x05hello", FrameTooLong),
        (Lines(max_size=4), b"hello", LineTooLong),
        (Lines(max_size=4), b"hell\n", LineTooLong),
    ],
)
def test_broken_frames_raise_the_peer_error(
    framing: Framing, data: bytes, error: type[ProtocolError]
) -> None:
    assert run(framing.framer(), [data])[1] is error
    assert run(framing.framer(), [data[i : i + 1] for i in range(len(data))])[1] is error


@pytest.mark.parametrize(
    ("framing", "payload", "wire"),
    [
        (Lines(), b"hi", b"hi\n"),
        (Lines(b"\r\n"), b"hi", b"hi\r\n"),
        (Lines((b"\0", b"\n")), b"hi", b"hi\0"),
        (Lines(keep=True), b"as is", b"as is"),
        (LengthPrefixed(), b"hi", b"\x00\x00\x00\x02hi"),
        (LengthPrefixed("<H"), b"hi", b"\x02\x00hi"),
        (LengthPrefixed("B", includes_header=True), b"hi", b"\x03hi"),
        (LengthPrefixed("!Q"), b"", b"\x00" * 8),
        (Netstring(), b"hello", b"5:hello,"),
        (Netstring(), b"", b"0:,"),
        (FixedSize(2), b"hi", b"hi"),
    ],
)
def test_encode(framing: Framing, payload: bytes, wire: bytes) -> None:
    assert framing.encode(payload) == wire
    if not (isinstance(framing, Lines) and framing.keep):
        assert run(framing.framer(), [wire]) == ([payload], None, b"")
        assert framing.whole(wire) in (payload, None)


def test_whole_is_the_one_message_fast_path() -> None:
    assert Lines().whole(b"hi\n") == b"hi"
    assert Lines(keep=True).whole(b"hi\n") == b"hi\n"
    assert Lines().whole(b"a\nb\n") is None and Lines().whole(b"hi") is None
    assert Lines(max_size=2).whole(b"hi\n") is None
    assert LengthPrefixed().whole(b"\x00\x00\x00\x02hi") == b"hi"
    assert LengthPrefixed().whole(b"\x00\x00\x00\x03hi") is None
    assert LengthPrefixed().whole(b"\x00\x00") is None
    assert LengthPrefixed("B", includes_header=True).whole(b"\x03hi") == b"hi"
    assert LengthPrefixed("B", max_size=1).whole(b"\x02hi") is None
    assert FixedSize(2).whole(b"hi") == b"hi" and FixedSize(2).whole(b"h") is None
    assert Netstring().whole(b"2:hi,") is None  # always the framer


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Lines(b""), "delimiter"),
        (lambda: Lines(()), "delimiter"),
        (lambda: Lines(b"\r\n", max_size=1), "room"),
        (lambda: LengthPrefixed("I"), "length format"),
        (lambda: LengthPrefixed("!i"), "length format"),
        (lambda: LengthPrefixed("!B", max_size=256), "between 0 and 255"),
        (lambda: LengthPrefixed("!B", max_size=255, includes_header=True), "0 and 254"),
        (lambda: Netstring(-1), "at least 0"),
        (lambda: FixedSize(0), "at least 1"),
        (lambda: Lines().encode(b"a\nb"), "delimiter"),
        (lambda: Lines(max_size=3).encode(b"abc"), "over max_size"),
        (lambda: LengthPrefixed(max_size=1).encode(b"ab"), "over max_size"),
        (lambda: Netstring(1).encode(b"ab"), "over max_size"),
        (lambda: FixedSize(3).encode(b"ab"), "cannot be 2 bytes"),
    ],
)
def test_misuse_is_a_value_error(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_defaults_and_their_reprs() -> None:
    assert Lines().max_size == DEFAULT_MAX_LINE
    assert LengthPrefixed().max_size == DEFAULT_MAX_MESSAGE
    assert LengthPrefixed("!B").max_size == 255
    assert LengthPrefixed("<H", includes_header=True).max_size == 65533
    assert Netstring().max_size == DEFAULT_MAX_MESSAGE
    assert (
        repr(LengthPrefixed("!H", 9, True))
        == "LengthPrefixed('!H', max_size=9, includes_header=True)"
    )
    assert repr(Lines()) == "Lines(b'\\n', max_size=65536, keep=False)"
    assert repr(Netstring(3)) == "Netstring(max_size=3)" and repr(FixedSize(2)) == "FixedSize(2)"


def test_end_of_stream() -> None:
    """A last line may lack its delimiter; any other message cut short is malformed."""
    lines = Lines().framer()
    lines.feed(b"a\nlast")
    assert lines.next_message() == b"a"
    assert lines.end() == b"last" and lines.end() is None
    long = Lines(max_size=3).framer()
    long.feed(b"abcd")
    with pytest.raises(LineTooLong):
        long.end()
    for framing in (LengthPrefixed(), Netstring(), FixedSize(4)):
        framer = framing.framer()
        assert framer.end() is None
        framer.feed(b"1")
        with pytest.raises(MalformedFrame, match="ended inside a message"):
            framer.end()


@pytest.mark.parametrize(
    ("spec", "framing"),
    [
        ("line", Lines()),
        ("crlf", Lines(b"\r\n")),
        ("delim:00", Lines(b"\0")),
        ("DELIM:0d0a", Lines(b"\r\n")),
        ("u8", LengthPrefixed("!B")),
        ("u16", LengthPrefixed("!H")),
        ("u32", LengthPrefixed("!I")),
        ("u64", LengthPrefixed("!Q")),
        ("u16le", LengthPrefixed("<H")),
        ("u32le", LengthPrefixed("<I")),
        ("u64le", LengthPrefixed("<Q")),
        ("netstring", Netstring()),
        ("fixed:16", FixedSize(16)),
    ],
)
def test_framing_specs(spec: str, framing: Framing) -> None:
    assert repr(parse_framing(spec)) == repr(framing)


@pytest.mark.parametrize("spec", ["", "u24", "delim:", "delim:zz", "fixed:0", "fixed:x", "json"])
def test_bad_framing_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="framing"):
        parse_framing(spec)


def test_framing_spec_with_a_size() -> None:
    assert parse_framing("u32", max_size=10).max_size == 10
    assert parse_framing("line", max_size=10).max_size == 10


@pytest.mark.parametrize(
    "framing", [LengthPrefixed("!I", 1 << 21), Netstring(1 << 21), Lines((b"\r\n", b"\0"), 1 << 21)]
)
def test_one_byte_drip_is_linear(framing: Framing) -> None:
    """A peer dripping a message a byte at a time costs O(n), not O(n**2)."""
    payload = b"z" * 200_000
    wire = framing.encode(payload)
    framer = framing.framer()
    started = time.thread_time()  # CPU time: other processes' load does not count
    got = []
    for i in range(len(wire)):
        framer.feed(wire[i : i + 1])
        if (message := framer.next_message()) is not None:
            got.append(message)
    assert got == [payload]
    assert time.thread_time() - started < 5  # quadratic would copy ~20 GB


Read = tuple[str, int]  # ("line", 0), ("exactly", n), ("message", 0)
reads = st.lists(
    st.tuples(st.sampled_from(["line", "exactly", "message"]), st.integers(0, 6)),
    min_size=1,
    max_size=8,
)


def stream_reads(data: list[bytes], script: list[Read]) -> list[object]:
    """What a stream handler's reads get, each read waiting for more data as it must:
    lines (``readline``), exactly n bytes and u16 messages on one connection, each
    framer taking over the bytes the one before left. (``read(n)`` returns what is
    there, so it depends on the split by design.)"""
    lines = LineFramer(8)
    messages = LengthPrefixed("!H", max_size=5).framer()
    active: Framer = lines
    chunks = iter(data)
    got: list[object] = []
    for kind, n in script:
        wanted: Framer = messages if kind == "message" else lines
        if wanted is not active:
            wanted.feed(active.take_buffer())
            active = wanted
        while True:
            try:
                if kind in ("line", "message"):
                    result = active.next_message()
                else:
                    result = active.read_exactly(n)
            except ProtocolError as exc:
                got.append(type(exc))
                return got
            if result is not None:
                got.append(result)
                break
            chunk = next(chunks, None)
            if chunk is None:
                got.append("wait")
                return got
            active.feed(chunk)
    for chunk in chunks:  # what the reads left, read or not yet
        active.feed(chunk)
    got.append(active.take_buffer())
    return got


@settings(max_examples=150, derandomize=True)
@given(data=noise, script=reads)
def test_stream_reads_at_every_split_point(data: bytes, script: list[Read]) -> None:
    """The stream handler's reads through the framers give the same at any split."""
    whole = stream_reads([data], script)
    for cut in range(len(data) + 1):
        assert stream_reads([data[:cut], data[cut:]], script) == whole, cut


def run_checked(framer: Framer, parts: list[bytes], take: int) -> type[ProtocolError] | None:
    """Feed ``parts``, taking at most ``take`` messages in all and calling ``check`` after
    each feed, as an async handler that is behind does: the first error, if any."""
    for part in parts:
        framer.feed(part)
        try:
            framer.check()
            while take and framer.next_message() is not None:
                take -= 1
        except ProtocolError as exc:
            return type(exc)
    return None


@pytest.mark.parametrize("framing", FRAMINGS, ids=IDS)
@settings(max_examples=60, derandomize=True)
@given(data=noise, cuts=st.lists(st.integers(0, 60), max_size=6), take=st.integers(0, 3))
def test_check_raises_only_what_reading_on_would_raise(
    framing: Framing, data: bytes, cuts: list[int], take: int
) -> None:
    """``check`` ahead of the reader: the error reading every message would meet, and
    none where reading meets none (so a behind reader refuses the same streams)."""
    error = run(framing.framer(), [data])[1]
    checked = run_checked(framing.framer(), splits(data, cuts), take)
    if isinstance(framing, Lines):  # lines: only an unfinished line is checked ahead
        assert checked in (None, error)
    else:
        assert checked == error


def test_check_refuses_a_huge_header_behind_queued_messages() -> None:
    framing = LengthPrefixed("!H", max_size=100)
    framer = framing.framer()
    framer.feed(framing.encode(b"a") * 1000 + b"\xff\xff")
    with pytest.raises(FrameTooLong):
        framer.check()
    netstrings = Netstring(100).framer()
    netstrings.feed(b"1:a," * 1000 + b"1:a;")
    with pytest.raises(MalformedFrame):
        netstrings.check()
    lines = Lines(max_size=4).framer()
    lines.feed(b"a\n" * 1000 + b"abcde")
    with pytest.raises(LineTooLong):
        lines.check()
