"""Soak test: ``sockserve demo`` under mixed load for a while, sampled every second.

    python benchmarks/soak.py --duration 60 [--output DIR] [-- EXTRA SERVER FLAGS]

Load (loopback only, every wait bounded): long-lived connections sending a line every
~100 ms, short-lived connect/request/close clients, a few peers dripping one byte a
second, and pipelining clients sending batches of 100 lines (every 10 ms). Each second it records
requests answered, p99 latency, errors and the server's RSS and descriptors; it writes
``soak.csv`` and (with matplotlib: ``.venv/bin/pip install matplotlib``) ``soak.png`` to
DIR, then prints a summary saying whether RSS drifted. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
LONG_LIVED = 50
SHORT_LIVED = 4
DRIPPERS = 5
PIPELINERS = 2
BATCH = 100
TIMEOUT = 5.0  # any single request or connect taking longer counts as an error


@dataclass
class Second:
    """What happened in one sampling interval."""

    latencies: list[float] = field(default_factory=list)  # request/reply clients
    pipelined: int = 0  # lines answered to the pipelining clients
    errors: int = 0


class Recorder:
    def __init__(self) -> None:
        self.current = Second()

    def ok(self, latency: float) -> None:
        self.current.latencies.append(latency)

    def batch(self, lines: int) -> None:
        self.current.pipelined += lines

    def error(self) -> None:
        self.current.errors += 1

    def take(self) -> Second:
        done, self.current = self.current, Second()
        return done


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def proc_figures(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open descriptors) of the server."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> float:
    line = b"soak %d\n" % n
    started = time.monotonic()
    writer.write(line)
    reply = await asyncio.wait_for(reader.readline(), TIMEOUT)
    if reply != line.upper():
        raise ValueError(f"bad reply {reply!r}")
    return time.monotonic() - started


async def long_lived(port: int, rec: Recorder, stop: float, rng: random.Random) -> None:
    n = 0
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            rec.error()
            await asyncio.sleep(0.1)
            continue
        try:
            while time.monotonic() < stop:
                n += 1
                rec.ok(await request(reader, writer, n))
                await asyncio.sleep(rng.uniform(0.05, 0.15))
        except (OSError, ValueError, asyncio.TimeoutError):
            rec.error()
        finally:
            writer.close()


async def short_lived(port: int, rec: Recorder, stop: float) -> None:
    n = 0
    while time.monotonic() < stop:
        n += 1
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), TIMEOUT)
            try:
                await request(reader, writer, n)
            finally:
                writer.close()
            rec.ok(time.monotonic() - started)
        except (OSError, ValueError, asyncio.TimeoutError):
            rec.error()
        await asyncio.sleep(0.005)


async def dripper(port: int, stop: float) -> None:
    """One byte a second, never a newline (max_line is far away: 1 byte/s)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return
    try:
        while time.monotonic() < stop:
            writer.write(b"z")
            await asyncio.sleep(1.0)
    except OSError:
        pass
    finally:
        writer.close()


async def pipeliner(port: int, rec: Recorder, stop: float) -> None:
    lines = b"".join(b"pipelined %d\n" % i for i in range(BATCH))
    expected = lines.upper()
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            rec.error()
            await asyncio.sleep(0.1)
            continue
        try:
            while time.monotonic() < stop:
                writer.write(lines)
                got = await asyncio.wait_for(reader.readexactly(len(expected)), TIMEOUT)
                if got != expected:
                    raise ValueError("bad pipelined replies")
                rec.batch(BATCH)
                await asyncio.sleep(0.01)  # leave this process time for the other clients
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            rec.error()
        finally:
            writer.close()


async def sampler(pid: int, rec: Recorder, stop: float, rows: list[dict[str, Any]]) -> None:
    started = time.monotonic()
    next_at = started + 1.0
    while next_at <= stop + 0.01:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        second = rec.take()
        rss, fds = proc_figures(pid)
        rows.append(
            {
                "second": round(next_at - started),
                "requests": len(second.latencies) + second.pipelined,
                "round_trips": len(second.latencies),
                "p99_ms": round(percentile(second.latencies, 99) * 1000, 3),
                "errors": second.errors,
                "rss_mib": round(rss, 2),
                "fds": fds,
            }
        )
        print(
            f"\r{rows[-1]['second']:4d}s {rows[-1]['requests']:7d} lines/s"
            f"  p99 {rows[-1]['p99_ms']:7.2f} ms  errors {second.errors}  RSS {rss:6.1f} MiB",
            end="",
            flush=True,
        )
        next_at += 1.0
    print()


async def soak(port: int, pid: int, duration: float) -> list[dict[str, Any]]:
    rec = Recorder()
    rows: list[dict[str, Any]] = []
    stop = time.monotonic() + duration
    rng = random.Random(42)
    tasks = [
        *(long_lived(port, rec, stop, rng) for _ in range(LONG_LIVED)),
        *(short_lived(port, rec, stop) for _ in range(SHORT_LIVED)),
        *(dripper(port, stop) for _ in range(DRIPPERS)),
        *(pipeliner(port, rec, stop) for _ in range(PIPELINERS)),
        sampler(pid, rec, stop, rows),
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), duration + 2 * TIMEOUT + 5)
    return rows


def drain(stream: Any) -> None:
    for _ in stream:
        pass


def start_server(extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockserve", "demo", "--bind", f"{HOST}:0", *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode(errors="replace")
        if not line:
            break
        if match := re.search(r"listening on tcp://[^\s]+:(\d+)", line):
            # Keep draining its log so a full pipe can never stall the server.
            threading.Thread(target=drain, args=(proc.stderr,), daemon=True).start()
            return proc, int(match.group(1))
    proc.kill()
    proc.wait()
    raise RuntimeError("the server did not start")


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return False
    seconds = [r["second"] for r in rows]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(9, 9))
    series = [
        ("requests", "lines answered / s"),
        ("p99_ms", "p99 round trip (ms)"),
        ("errors", "errors / s"),
        ("rss_mib", "server RSS (MiB)"),
    ]
    for ax, (key, label) in zip(axes, series, strict=True):
        ax.plot(seconds, [r[key] for r in rows])
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[3].set_ylim(0, max(r["rss_mib"] for r in rows) * 1.25)
    axes[-1].set_xlabel("seconds")
    fig.suptitle("sockserve demo under mixed load")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return True


def summary(rows: list[dict[str, Any]]) -> str:
    total = sum(r["requests"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    warm = rows[min(len(rows) - 1, max(1, len(rows) // 6))]  # after warm-up
    last = rows[-1]
    peak = max(r["rss_mib"] for r in rows)
    drift = last["rss_mib"] - warm["rss_mib"]
    stable = abs(drift) < max(2.0, 0.05 * warm["rss_mib"])
    p99s = [r["p99_ms"] for r in rows if not math.isnan(r["p99_ms"])]
    return "\n".join(
        [
            f"duration:    {len(rows)} s",
            f"lines:       {total} answered ({total / len(rows):.0f}/s)",
            f"errors:      {errors}",
            f"round trips: {sum(r['round_trips'] for r in rows)} (the rest were pipelined)",
            f"p99 per s:   median {percentile(p99s, 50):.2f} ms, worst {max(p99s):.2f} ms",
            f"RSS:         {warm['rss_mib']:.1f} MiB at {warm['second']} s, {last['rss_mib']:.1f}"
            f" MiB at the end, peak {peak:.1f} MiB",
            f"RSS drift:   {drift:+.2f} MiB ({'no drift' if stable else 'DRIFTED'})",
            f"descriptors: {warm['fds']} at {warm['second']} s, {last['fds']} at the end",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--output", type=Path, default=Path("."), help="directory for results")
    parser.add_argument("server_args", nargs="*", help="extra flags for sockserve demo")
    args = parser.parse_args()
    if not 1 <= args.duration <= 24 * 3600:
        parser.error("--duration must be between 1 s and 24 h")
    args.output.mkdir(parents=True, exist_ok=True)
    proc, port = start_server(args.server_args)
    try:
        rows = asyncio.run(soak(port, proc.pid, args.duration))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    csv_path = args.output / "soak.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    png = args.output / "soak.png"
    if plot(rows, png):
        print(f"wrote {png}")
    else:
        print("no plot: matplotlib is not installed (.venv/bin/pip install matplotlib)")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
