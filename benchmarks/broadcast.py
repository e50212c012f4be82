"""Broadcast to many connected clients: messages per second and server CPU per delivery.

Starts ``sockserve run benchmarks.servers.fanout:Fanout`` on port 0 (pinned to the first
core when there are two), connects ``--clients`` subscribers and one publisher (this
process, on the other core), then publishes ``--messages`` lines of ``--size`` bytes in
batches of ``--batch``: a batch is published, then every subscriber must have received
it before the next (so no subscriber falls behind and none is cut as a slow consumer).
Server CPU is its utime+stime from /proc over the measured window. Loopback only.

    .venv/bin/python benchmarks/broadcast.py [--clients 10000] [--messages 200]
        [--batch 10] [--size 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEADLINE = 300.0  # seconds for the whole run, connecting included


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(pid)


def start_server(clients: int) -> tuple[subprocess.Popen[bytes], int]:
    """The fanout server on port 0 and its port, pinned to the first core if there are two."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sockserve",
            "run",
            "benchmarks.servers.fanout:Fanout",
            "--bind",
            "127.0.0.1:0",
            "--max-connections",
            str(clients + 100),
            "--idle-timeout",
            "0",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sel.select(deadline - time.monotonic()):
            line = proc.stderr.readline().decode()
            if match := LISTENING.search(line):
                break
            if not line:
                raise RuntimeError("the server exited before listening")
        else:
            proc.kill()
            raise RuntimeError("the server did not say it was listening within 30 s")
    if len(os.sched_getaffinity(0)) >= 2:
        first, second, *_ = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(proc.pid, {first})
        os.sched_setaffinity(0, {second})
    return proc, int(match.group(1))


def connect_all(port: int, count: int, deadline: float) -> list[socket.socket]:
    """``count`` connected, non-blocking sockets, opened 256 at a time."""
    socks: list[socket.socket] = []
    while len(socks) < count:
        assert time.monotonic() < deadline, f"connected only {len(socks)} in time"
        batch = []
        for _ in range(min(256, count - len(socks))):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            batch.append(sock)
        with selectors.DefaultSelector() as sel:
            for sock in batch:
                sel.register(sock, selectors.EVENT_WRITE)
            pending = len(batch)
            while pending:
                events = sel.select(max(0.0, deadline - time.monotonic()))
                assert events, "connecting timed out"
                for key, _ in events:
                    sel.unregister(key.fileobj)
                    pending -= 1
        for sock in batch:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert error == 0, os.strerror(error)
        socks.extend(batch)
    return socks


def run(clients: int, messages: int, batch: int, size: int) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    deadline = time.monotonic() + DEADLINE
    proc, port = start_server(clients)
    socks: list[socket.socket] = []
    try:
        subscribers = connect_all(port, clients, deadline)
        socks.extend(subscribers)
        publisher = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(publisher)
        replies = publisher.makefile("rb")
        line = b"m" * (size - 1) + b"\n"
        # Connected is not yet accepted: ask until the server has every subscriber.
        while True:
            assert time.monotonic() < deadline, "subscribers never all joined"
            publisher.sendall(b"?\n")
            if int(replies.readline()) == clients:
                break
        publisher.sendall(line)  # a warm-up line, not measured
        assert int(replies.readline()) == clients
        expected = [size] * clients
        received = [0] * clients
        sel = selectors.DefaultSelector()
        for index, sock in enumerate(subscribers):
            sel.register(sock, selectors.EVENT_READ, index)
        buffer = bytearray(1 << 16)

        def drain_until_all_have(target: list[int]) -> None:
            behind = sum(1 for have, want in zip(received, target, strict=True) if have < want)
            while behind:
                left = deadline - time.monotonic()
                assert left > 0, f"{behind} subscribers still behind at the deadline"
                for key, _ in sel.select(left):
                    index = key.data
                    got = key.fileobj.recv_into(buffer)  # type: ignore[union-attr]
                    assert got, "the server closed a subscriber"
                    was_behind = received[index] < target[index]
                    received[index] += got
                    if was_behind and received[index] >= target[index]:
                        behind -= 1

        drain_until_all_have(expected)
        rss_connected = rss_kib(proc.pid)
        cpu_start = cpu_seconds(proc.pid)
        started = time.perf_counter()
        published = 0
        while published < messages:
            n = min(batch, messages - published)
            publisher.sendall(line * n)
            for _ in range(n):
                assert int(replies.readline()) == clients, "a subscriber was cut"
            published += n
            expected = [want + n * size for want in expected]
            drain_until_all_have(expected)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(proc.pid) - cpu_start
        rss_end = rss_kib(proc.pid)
        sel.close()
        replies.close()
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()
    deliveries = messages * clients
    return {
        "clients": clients,
        "messages": messages,
        "batch": batch,
        "size": size,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(messages / elapsed, 1),
        "deliveries_per_s": round(deliveries / elapsed),
        "server_cpu_s": round(cpu, 2),
        "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 3),
        "server_rss_connected_mib": round(rss_connected / 1024, 1),
        "server_rss_end_mib": round(rss_end / 1024, 1),
    }


def table(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| clients | message | messages/s | deliveries/s | server CPU per delivery"
            " | server RSS |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {result['clients']:,} | {result['size']} B | {result['messages_per_s']:,}"
            f" | {result['deliveries_per_s']:,} | {result['server_cpu_us_per_delivery']} µs"
            f" | {result['server_rss_end_mib']} MiB |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = run(args.clients, args.messages, args.batch, args.size)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
