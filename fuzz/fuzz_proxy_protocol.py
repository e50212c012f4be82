"""Fuzz harness for the PROXY protocol parser (atheris / libFuzzer).

Run: ``python fuzz/fuzz_proxy_protocol.py -max_total_time=60 fuzz/corpus/proxy``
(see fuzz/README.md). ``TestOneInput`` is plain Python, so tests/test_fuzz_smoke.py runs it
without atheris.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # under atheris: instrument sockserve's code (fast: not all modules)
    import atheris

    with atheris.instrument_imports(include=["sockserve"]):
        import sockserve.proxy_protocol  # noqa: F401  (loaded instrumented; used below)

from sockserve.proxy_protocol import (
    NEED_DATA,
    Accept,
    ProxyHeader,
    ProxyParser,
    ProxyProtocolError,
    parse_prefix,
)

ACCEPTS: tuple[Accept, ...] = ("any", "v1", "v2")


def _feed(data: bytes, accept: Accept, step: int) -> ProxyHeader | str | None:
    """Feed ``data`` in chunks of ``step`` bytes: the header, an error message or None."""
    parser = ProxyParser(accept)
    pos = 0
    while pos < len(data):
        parser.feed(data[pos : pos + step])
        pos += step
        try:
            event = parser.next_event()
        except ProxyProtocolError as exc:
            return str(exc)
        if event is not NEED_DATA:
            break
    parser.feed(data[pos:])  # the rest at once, after the header (or nothing)
    try:
        event = parser.next_event()
    except ProxyProtocolError as exc:
        return str(exc)
    if event is NEED_DATA:
        return None
    assert parser.consumed == event.length
    assert event.length + len(parser.leftover) == len(data), "header + leftover != input"
    assert parser.leftover == data[event.length :]
    return event


def TestOneInput(data: bytes) -> None:
    """Any input: only ProxyProtocolError may escape, and every byte is accounted for."""
    for accept in ACCEPTS:
        whole = _feed(data, accept, max(len(data), 1))
        try:
            prefix = parse_prefix(data, accept)
        except ProxyProtocolError as exc:
            assert isinstance(whole, str), "parse_prefix raised, the parser did not"
            assert str(exc) == whole
        else:
            assert prefix == whole, "parse_prefix and the parser disagree"
        # The same input dripped in small pieces gives the same header (error messages may
        # quote fewer bytes, as they are raised as soon as the bytes show the problem).
        step = 1 + (data[-1] % 7 if data else 0)
        dripped = _feed(data, accept, step)
        if isinstance(whole, ProxyHeader) or whole is None:
            assert dripped == whole, "chunking changed the result"
        else:
            assert isinstance(dripped, str), "chunking hid an error"


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
