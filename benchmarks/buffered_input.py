"""Memory of input buffered for handlers that do not read: N peers each push as much as
the server will take into a StreamHandler that never reads, and the server's resident
memory is read before and after, for each --max-connections given (the budget,
--max-buffered-input, is shared by that many connections).

    .venv/bin/python benchmarks/buffered_input.py [--peers 1000] [--budget 1g]
        [--max-connections 1000 --max-connections 10000]

With --max-connections 1000 and the default budget each connection gets the 256 KiB
cap past its line, as every connection did before the setting existed. Traffic goes to
127.0.0.1 only; each peer pushes for at most --seconds, and at most 4 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sockserve

ROOT = Path(__file__).resolve().parent.parent
PUSH_LIMIT = 4 << 20


class NeverReads(sockserve.StreamHandler):
    async def handle(self) -> None:
        await asyncio.Event().wait()


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1))


def start(budget: str, loop: str, cap: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sockserve",
                "run",
                "benchmarks.buffered_input:NeverReads",
                "--bind",
                "127.0.0.1:0",
                "--loop",
                loop,
                "--max-connections",
                str(cap),
                "--max-buffered-input",
                budget,
                "--graceful-timeout",
                "0.1",
            ],
            cwd=ROOT,
            stderr=stderr,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if match := re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", log.read_text()):
            return proc, int(match.group(1))
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def measure(budget: str, loop: str, cap: int, peers: int, seconds: float) -> tuple[float, float]:
    """Server RSS growth per peer (KiB), and what each peer got to push (KiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _measure(budget, loop, cap, peers, seconds, Path(tmp) / "server.log")


def _measure(
    budget: str, loop: str, cap: int, peers: int, seconds: float, log: Path
) -> tuple[float, float]:
    proc, port = start(budget, loop, cap, log)
    try:
        before = rss_kib(proc.pid)
        after, sent = push_and_measure(port, peers, seconds, proc.pid)
        return (after - before) / peers, sent / peers / 1024
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push_and_measure(port: int, peers: int, seconds: float, pid: int) -> tuple[int, int]:
    """Open ``peers`` connections and push on each until the server stops taking bytes;
    then the server's RSS (KiB) and the bytes pushed in all."""
    chunk = b"x" * 65536
    socks = []
    sent = 0
    try:
        with selectors.DefaultSelector() as selector:
            for _ in range(peers):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.setblocking(False)
                socks.append(sock)
                selector.register(sock, selectors.EVENT_WRITE, [0])
            deadline = time.monotonic() + seconds
            while selector.get_map() and (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(min(left, 0.5)):
                    counter = key.data
                    try:
                        n = key.fileobj.send(chunk)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    counter[0] += n
                    sent += n
                    if counter[0] >= PUSH_LIMIT:
                        selector.unregister(key.fileobj)
        time.sleep(1.0)  # let the server read what the kernel still holds for it
        return rss_kib(pid), sent
    finally:
        for sock in socks:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--budget", default="1g")
    parser.add_argument("--max-connections", type=int, action="append", dest="caps")
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(
        "| --max-buffered-input | --max-connections | peers | server RSS per peer (KiB)"
        " | pushed per peer (KiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for cap in args.caps or [1000, 10_000]:
        per_peer, pushed = measure(args.budget, args.loop, cap, args.peers, args.seconds)
        print(f"| {args.budget} | {cap} | {args.peers} | {per_peer:.0f} | {pushed:.0f} |")


if __name__ == "__main__":
    main()
