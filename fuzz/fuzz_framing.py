"""Fuzz harness for the framers (atheris / libFuzzer).

The first input byte picks a framing and its limit, the second the chunk size; the rest
is fed to that framing's framer in those chunks, taking every message after each chunk,
and compared with feeding it at once (and, for lines, with a one-shot reference split);
``check`` ahead of the reader must find the same error reading finds.
Only ProtocolError may escape; a framer never holds an unfinished line past its limit,
and re-encoding the messages gives back the bytes they came from.
``tests/test_fuzz.py`` runs this under atheris for a bounded time.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # under atheris: instrument sockserve's code (fast: not all modules)
    import atheris

    with atheris.instrument_imports(include=["sockserve"]):
        import sockserve.framing  # noqa: F401  (loaded instrumented; used below)

from sockserve.framing import (
    FixedSize,
    Framer,
    Framing,
    LengthPrefixed,
    LineFramer,
    Lines,
    LineTooLong,
    Netstring,
    ProtocolError,
)

Outcome = tuple[list[bytes], str | None, bytes]


def framing_for(choice: int) -> Framing:
    """One of several framings, with a small limit so limits are hit often."""
    limit = choice // 8 + 1  # 1..32
    kind = choice % 8
    if kind == 0:
        return Lines(b"\r\n", max_size=limit + 1)
    if kind == 1:
        return Lines((b"\r\n", b"\n", b"\0"), max_size=limit + 1)
    if kind == 2:
        return LengthPrefixed("!B", max_size=limit)
    if kind == 3:
        return LengthPrefixed("<H", max_size=limit * 8, includes_header=True)
    if kind == 4:
        return LengthPrefixed("!I", max_size=limit)
    if kind == 5:
        return Netstring(max_size=limit * 4)
    if kind == 6:
        return FixedSize(limit)
    return Lines(b"\n", max_size=limit, keep=True)


def run(framer: Framer, body: bytes, step: int) -> Outcome:
    got: list[bytes] = []
    for start in range(0, len(body), step):
        framer.feed(body[start : start + step])
        try:
            while (message := framer.next_message()) is not None:
                got.append(message)
        except ProtocolError as exc:
            return got, type(exc).__name__, b""
        if isinstance(framer, LineFramer):
            assert len(framer.partial) <= framer.max_line + step
    return got, None, framer.take_buffer()


def check_ahead(framer: Framer, body: bytes, step: int) -> str | None:
    """Feed in chunks calling ``check`` and taking no message: the error check finds."""
    for start in range(0, len(body), step):
        framer.feed(body[start : start + step])
        try:
            framer.check()
        except ProtocolError as exc:
            return type(exc).__name__
    return None


def reference_lines(data: bytes, limit: int) -> tuple[list[bytes], bool]:
    """The complete lines of ``data`` and whether some line breaks the limit."""
    lines: list[bytes] = []
    start = 0
    while (end := data.find(b"\n", start)) >= 0:
        if end + 1 - start > limit:
            return lines, True
        lines.append(data[start : end + 1])
        start = end + 1
    return lines, len(data) - start > limit


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    framing, step, body = framing_for(data[0]), data[1] % 16 + 1, data[2:]
    outcome = run(framing.framer(), body, step)
    assert outcome == run(framing.framer(), body, len(body) or 1), framing
    messages, error, leftover = outcome
    if isinstance(framing, Lines) and framing.keep:
        want, too_long = reference_lines(body, framing.max_size)
        assert messages == want and (error == LineTooLong.__name__) == too_long
    checked = check_ahead(framing.framer(), body, step)
    if isinstance(framing, Lines):  # lines: only an unfinished line is checked ahead
        assert checked in (None, error), (checked, error)
    else:
        assert checked == error, (checked, error)
    if error is None and not (isinstance(framing, Lines) and len(framing.delimiters) > 1):
        assert b"".join(framing.encode(m) for m in messages) + leftover == body


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
