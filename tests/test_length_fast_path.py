"""The length-prefixed one-message fast path answers exactly as the generic path does:
same replies, counters and errors for any chunk, format, limit and reply size."""

from __future__ import annotations

import types
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import sockserve
from sockserve.handlers import SMALL_MESSAGE, MessageHandler


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def _run(
    chosen: sockserve.LengthPrefixed, chunk: bytes, reply_size: int, fast: bool
) -> tuple[list[bytes], int, int, list[str]]:
    errors: list[str] = []

    class Handler(sockserve.MessageHandler):
        framing = chosen

        def handle_message(self, message: bytes) -> bytes | None:
            assert isinstance(message, bytes)
            return None if reply_size < 0 else (message * (reply_size + 1))[:reply_size]

        def _handler_error(self, exc: BaseException) -> None:
            errors.append(type(exc).__name__)

        def _protocol_error(self, exc: Any) -> None:
            errors.append(type(exc).__name__)

    conn = Handler()
    ledger = types.SimpleNamespace(max_line=65536, read_ahead=65536, stopping=False)
    conn._attach(ledger, ("127.0.0.1", 1), "tcp")  # type: ignore[arg-type]
    transport = _Transport()
    conn._transport = transport  # type: ignore[assignment]
    if fast:
        conn.data_received(chunk)
    else:
        MessageHandler._any_data_received(conn, chunk)
    return transport.written, conn.bytes_in, conn.bytes_out, errors


@settings(max_examples=300)
@given(
    fmt=st.sampled_from(["!B", ">H", "<H", "!I", "<I", "!Q", "<Q"]),
    includes_header=st.booleans(),
    max_size=st.sampled_from([0, 1, 3, 60, SMALL_MESSAGE, SMALL_MESSAGE + 10]),
    payload_size=st.integers(0, 3) | st.integers(0, SMALL_MESSAGE + 12),
    announced_delta=st.sampled_from([0, 0, 0, -1, 1, 1 << 20]),
    truncate=st.integers(0, 3),
    reply_size=st.sampled_from([-1, 0, 1, 60, SMALL_MESSAGE, SMALL_MESSAGE + 1, 5000]),
)
def test_fast_path_matches_generic_path(
    fmt: str,
    includes_header: bool,
    max_size: int,
    payload_size: int,
    announced_delta: int,
    truncate: int,
    reply_size: int,
) -> None:
    if fmt[-1] == "B":  # a 1-byte length cannot announce more
        max_size = min(max_size, 200)
    framing = sockserve.LengthPrefixed(fmt, max_size=max_size, includes_header=includes_header)
    header = framing.header
    announced = payload_size + (header.size if includes_header else 0) + announced_delta
    announced = max(0, min(announced, (1 << (8 * header.size)) - 1))
    chunk = header.pack(announced) + b"x" * payload_size
    chunk = chunk[: len(chunk) - truncate] if truncate else chunk
    assert _run(framing, chunk, reply_size, fast=True) == _run(
        framing, chunk, reply_size, fast=False
    )
