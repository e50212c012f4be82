"""Instructions per request on the fast path of the line handler and of a u32
length-prefixed message handler, with an uppercasing handler, under valgrind's callgrind
(counts do not depend on the machine's load): fed 64-byte requests through
data_received with a stub transport ("stub"), and served by uvloop on one end of a
socketpair to a forked peer that sends a request and reads its reply, one at a time
("uvloop", the server process's count only; the kernel's work is not counted). Each
figure is the difference between a run of BASE + N requests and one of BASE, divided by
N, with PYTHONHASHSEED=0.

    .venv/bin/python benchmarks/fast_path_instructions.py [--requests 20000]

A u32 request carries the same 64 bytes on the wire as a line: a 4-byte length, then
60 bytes. Needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
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


def _peer(sock: socket.socket, request: bytes, n: int) -> None:
    for _ in range(n):
        sock.sendall(request)
        got = b""
        while len(got) < len(request):
            got += sock.recv(4096)


def serve(kind: str, n: int) -> None:
    """Serve n requests from a forked peer on one uvloop connection."""
    import uvloop

    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        mine.close()
        _peer(theirs, REQUESTS[kind], n)
        os._exit(0)
    theirs.close()
    base = Line if kind == "line" else U32
    ledger = types.SimpleNamespace(max_line=65536, read_ahead=65536, stopping=False)

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        class Served(base):  # type: ignore[valid-type,misc]
            __slots__ = ()

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self._transport = transport  # type: ignore[misc]  # a slot of the base

            def connection_lost(self, exc: Exception | None) -> None:
                done.set_result(None)

        def accepted() -> Served:
            conn = Served()
            conn._attach(ledger, ("127.0.0.1", 1), "tcp")
            return conn

        await asyncio.get_running_loop().connect_accepted_socket(accepted, mine)
        await done

    uvloop.install()
    asyncio.run(main())
    os.waitpid(pid, 0)


def instructions(mode: str, kind: str, n: int) -> int:
    """Instructions valgrind counts for a whole interpreter that handles n requests (the
    forked peer reports its own count under its own pid)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [
                *("valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out"),
                *(sys.executable, __file__, "--" + mode, kind, str(n)),
            ],
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=True,
        )
    pid = re.search(r"==(\d+)== Command:", run.stderr)
    count = pid and re.search(rf"=={pid.group(1)}== I\s+refs:\s*([\d,]+)", run.stderr)
    assert count, run.stderr
    return int(count.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--uvloop-requests", type=int, default=10000)
    parser.add_argument("--stub", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--uvloop", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub:
        drive(args.stub[0], int(args.stub[1]))
        return
    if args.uvloop:
        serve(args.uvloop[0], int(args.uvloop[1]))
        return
    print("| path | server | instructions per request | vs line |")
    print("|---|---|---:|---:|")
    for mode, n in (("stub", args.requests), ("uvloop", args.uvloop_requests)):
        per = {
            kind: (instructions(mode, kind, BASE + n) - instructions(mode, kind, BASE)) / n
            for kind in REQUESTS
        }
        for kind, count in per.items():
            print(f"| {mode} | {kind} | {count:,.0f} | {count / per['line']:.3f}x |")


if __name__ == "__main__":
    main()
