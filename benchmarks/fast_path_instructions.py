"""Instructions per request on the fast path of the line handler and of a u32
length-prefixed message handler: each is fed 64-byte requests through data_received
with a stub transport and an uppercasing handler, under valgrind's callgrind (counts do
not depend on the machine's load). The figure is the difference between a run of
21,000 requests and one of 1,000, divided by 20,000, with PYTHONHASHSEED=0.

    .venv/bin/python benchmarks/fast_path_instructions.py [--requests 20000]

A u32 request carries the same 64 bytes on the wire as a line: a 4-byte length, then
60 bytes. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable

import sockserve

BASE = 1000


class _Transport:
    __slots__ = ("last",)

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return False


class Line(sockserve.LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


class U32(sockserve.MessageHandler):
    framing = sockserve.LengthPrefixed("!I", max_size=1 << 20)

    def handle_message(self, message: bytes) -> bytes:
        return message.upper()


REQUESTS = {"line": b"x" * 63 + b"\n", "u32": (60).to_bytes(4, "big") + b"x" * 60}


def _loop(receive: Callable[[bytes], None], data: bytes, n: int) -> None:
    for _ in range(n):
        receive(data)


def drive(kind: str, n: int) -> None:
    """Feed n requests to one connection of the kind's handler."""
    conn = Line() if kind == "line" else U32()
    ledger = types.SimpleNamespace(max_line=65536, read_ahead=65536, stopping=False)
    conn._attach(ledger, ("127.0.0.1", 1), "tcp")  # type: ignore[arg-type]
    transport = _Transport()
    conn._transport = transport  # type: ignore[assignment]
    _loop(conn.data_received, REQUESTS[kind], n)
    assert transport.last == REQUESTS[kind].upper() and conn.bytes_out == 64 * n


def instructions(kind: str, n: int) -> int:
    """Instructions valgrind counts for a whole interpreter that drives n requests."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [
                *("valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out"),
                *(sys.executable, __file__, "--drive", kind, str(n)),
            ],
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=True,
        )
    match = re.search(r"refs:\s*([\d,]+)", run.stderr)
    assert match, run.stderr
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--drive", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive[0], int(args.drive[1]))
        return
    per = {
        kind: (instructions(kind, BASE + args.requests) - instructions(kind, BASE)) / args.requests
        for kind in REQUESTS
    }
    print("| | instructions per request | vs line |")
    print("|---|---:|---:|")
    for kind, count in per.items():
        print(f"| {kind} | {count:,.0f} | {count / per['line']:.3f}x |")


if __name__ == "__main__":
    main()
