"""What a ``sockserve bench`` run measured, and the summary it prints.

``Results`` is filled in by the load generator in ``sockserve.bench``; latencies go into
a ``LatencyHistogram`` of log buckets, so memory stays bounded however long the run.
``summary`` gives the numbers (``--json``), ``format_summary`` the text table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sockserve.bench import Options

__all__ = ["Errors", "LatencyHistogram", "Results", "format_summary", "summary"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class LatencyHistogram:
    """Nanosecond latencies in log buckets: 64 per power of two, under 1.6% error.

    Values below 128 ns get a bucket each; above, a bucket spans 1/64 of its power
    of two, so memory is a few thousand counters whatever the run's length.
    """

    SUB_BITS = 7
    _HALF = 1 << (SUB_BITS - 1)

    def __init__(self) -> None:
        self.counts: list[int] = [0] * ((64 - self.SUB_BITS + 2) * self._HALF)
        self.count = 0
        self.max = 0
        self.min = 0

    def _index(self, value: int) -> int:
        shift = value.bit_length() - self.SUB_BITS
        if shift <= 0:
            return value
        return (1 << self.SUB_BITS) + (shift - 1) * self._HALF + (value >> shift) - self._HALF

    def _upper(self, index: int) -> int:
        """The largest value that falls in bucket ``index``."""
        if index < (1 << self.SUB_BITS):
            return index
        shift, offset = divmod(index - (1 << self.SUB_BITS), self._HALF)
        shift += 1
        return ((offset + self._HALF + 1) << shift) - 1

    def record(self, value: int) -> None:
        value = max(value, 0)
        self.counts[self._index(value)] += 1
        if self.count == 0 or value < self.min:
            self.min = value
        self.count += 1
        self.max = max(self.max, value)

    def percentile(self, p: float) -> int:
        """The value at or below which ``p`` percent of the records fall (0 when empty)."""
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(p / 100.0 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return max(self.min, min(self._upper(index), self.max))
        return self.max


@dataclass
class Errors:
    connect: int = 0
    closed: int = 0
    mismatch: int = 0
    unexpected: int = 0  # a reply with no request in flight
    timeout: int = 0

    @property
    def total(self) -> int:
        return self.connect + self.closed + self.mismatch + self.unexpected + self.timeout


@dataclass
class Results:
    connections: int
    connected: int = 0
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    elapsed: float = 0.0
    errors: Errors = field(default_factory=Errors)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    first_connect_error: str | None = None
    first_close_reason: str | None = None
    interrupted: bool = False


def summary(results: Results, options: Options) -> dict[str, Any]:
    """The run's numbers, as printed with --json."""
    elapsed = results.elapsed or 1e-9
    errors = results.errors
    latency = results.latency
    return {
        "address": options.url,
        "connections": options.connections,
        "connected": results.connected,
        "size": options.size,
        "pipeline": options.pipeline,
        "framing": options.framing_name,
        "expect": options.expect,
        "duration": round(results.elapsed, 3),
        "requests": results.requests,
        "throughput": round(results.requests / elapsed, 1),
        "bytes_sent": results.bytes_sent,
        "bytes_received": results.bytes_received,
        "bytes_per_second": round((results.bytes_sent + results.bytes_received) / elapsed, 1),
        "errors": errors.total,
        "error_counts": {
            "connect": errors.connect,
            "closed": errors.closed,
            "mismatch": errors.mismatch,
            "unexpected": errors.unexpected,
            "timeout": errors.timeout,
        },
        # No reply, no latency: null, not a row of zeros that reads as "instant".
        "latency_ms": {
            **{f"p{p:g}": round(latency.percentile(p) / 1e6, 4) for p in PERCENTILES},
            "max": round(latency.max / 1e6, 4),
        }
        if latency.count
        else None,
        "interrupted": results.interrupted,
    }


def _human_bytes(rate: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if rate < 1024:
            return f"{rate:.1f} {unit}"
        rate /= 1024
    return f"{rate:.1f} GiB"


def format_summary(data: dict[str, Any]) -> str:
    counts = data["error_counts"]
    latency = data["latency_ms"]
    shown = ", ".join(f"{name} {n}" for name, n in counts.items() if n)
    lines = [
        f"address      {data['address']}",
        f"connections  {data['connections']} ({data['connected']} connected), "
        f"pipeline {data['pipeline']}, "
        + (
            f"{data['size']}-byte lines"
            if data["framing"] == "line"
            else f"{data['size']}-byte {data['framing']} messages"
        )
        + f", expect {data['expect']}",
        f"duration     {data['duration']:.2f} s"
        + (" (interrupted)" if data["interrupted"] else ""),
        f"requests     {data['requests']}",
        f"throughput   {data['throughput']:.1f} req/s, "
        f"{_human_bytes(data['bytes_per_second'])}/s in and out",
        f"errors       {data['errors']}" + (f" ({shown})" if shown else ""),
        "latency ms   "
        + (
            "  ".join(f"{name} {value:.3f}" for name, value in latency.items())
            if latency is not None
            else "- (no replies)"
        ),
    ]
    return "\n".join(lines) + "\n"
