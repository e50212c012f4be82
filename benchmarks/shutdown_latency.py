"""How long ``shutdown()`` takes to return: stdlib socketserver vs sockserve.socketserver.

Each repetition starts an idle TCPServer with ``serve_forever()`` (default 0.5 s poll) in a
thread, waits a seeded random part of the poll interval, and times ``shutdown()``.

    python benchmarks/shutdown_latency.py [-n 20] [--output FILE]
"""

from __future__ import annotations

import argparse
import random
import socketserver as stdlib_socketserver
import statistics
import threading
import time
from types import ModuleType

import sockserve.socketserver as sockserve_socketserver

POLL_INTERVAL = 0.5


def measure(module: ModuleType, repetitions: int, rng: random.Random) -> list[float]:
    """Seconds each shutdown() took, one per repetition."""
    timings = []
    for _ in range(repetitions):
        server = module.TCPServer(("127.0.0.1", 0), module.BaseRequestHandler)
        thread = threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL,))
        thread.start()
        threading.Event().wait(rng.uniform(0.01, POLL_INTERVAL + 0.01))  # idle, at a random phase
        started = time.perf_counter()
        server.shutdown()
        timings.append(time.perf_counter() - started)
        thread.join()
        server.server_close()
    return timings


def table(results: dict[str, list[float]]) -> str:
    lines = [
        "| implementation | runs | median (ms) | max (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, timings in results.items():
        median = statistics.median(timings) * 1000
        worst = max(timings) * 1000
        lines.append(f"| {name} | {len(timings)} | {median:.3f} | {worst:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--repetitions", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args()
    results = {
        "stdlib socketserver": measure(
            stdlib_socketserver, args.repetitions, random.Random(args.seed)
        ),
        "sockserve.socketserver": measure(
            sockserve_socketserver, args.repetitions, random.Random(args.seed)
        ),
    }
    report = table(results)
    print(report, end="")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(report)


if __name__ == "__main__":
    main()
