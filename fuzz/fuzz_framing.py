"""Fuzz harness for the line framer (atheris / libFuzzer).

The first input byte picks the line limit, the second the chunk size; the rest is fed to
``LineFramer`` in those chunks and compared with a one-shot reference split. Only
LineTooLong may escape the framer, and its unfinished line never passes the limit.
``tests/test_fuzz.py`` runs this under atheris for a bounded time.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # under atheris: instrument sockserve's code (fast: not all modules)
    import atheris

    with atheris.instrument_imports(include=["sockserve"]):
        import sockserve.framing  # noqa: F401  (loaded instrumented; used below)

from sockserve.framing import LineFramer, LineTooLong


def reference(data: bytes, limit: int) -> tuple[list[bytes], bool]:
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
    limit, step, body = data[0] + 1, data[1] % 16 + 1, data[2:]
    want, too_long = reference(body, limit)
    framer = LineFramer(limit)
    got: list[bytes] = []
    raised = False
    for start in range(0, len(body), step):
        try:
            framer.feed(body[start : start + step])
        except LineTooLong:  # the unfinished line is too long; the lines before it count
            raised = True
        try:
            while (line := framer.next_line()) is not None:
                got.append(line)
        except LineTooLong:  # a complete line is too long
            raised = True
        if raised:
            break
        assert len(framer.partial) <= limit
        assert framer.buffered == len(framer.partial)  # every complete line was taken
    assert raised == too_long, (raised, too_long)
    assert got == want


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
