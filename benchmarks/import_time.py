"""Import cost of the drop-in: ``import sockserve.socketserver`` against the stdlib's.

Each import runs in a fresh interpreter under ``-X importtime`` (byte code cached, as
for an installed package), alternating the two modules; the medians are compared.
The target is a ratio of at most 1.5. Usage::

    .venv/bin/python benchmarks/import_time.py [--runs 30] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from typing import Any

MODULES = ("socketserver", "sockserve.socketserver")
TARGET = 1.5


def import_us(module: str) -> int:
    """Microseconds ``import module`` took in a fresh interpreter (cumulative)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    last = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(rf"import time:\s+\d+ \|\s+(\d+) \| {re.escape(module)}", last)
    assert match, last
    return int(match.group(1))


def loaded_beyond_stdlib() -> list[str]:
    """Modules ``import sockserve.socketserver`` loads that ``import socketserver`` does not."""
    code = "import json, sys, {}; print(json.dumps(sorted(sys.modules)))"
    seen = []
    for module in MODULES:
        out = subprocess.run(
            [sys.executable, "-c", code.format(module)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        seen.append(set(json.loads(out)))
    return sorted(seen[1] - seen[0])


def measure(runs: int) -> dict[str, Any]:
    """Median import times of both modules over ``runs`` interleaved runs, and their ratio."""
    for module in MODULES:  # write the byte-code caches once
        import_us(module)
    times: dict[str, list[int]] = {m: [] for m in MODULES}
    for _ in range(runs):
        for module in MODULES:
            times[module].append(import_us(module))
    stdlib, ours = (statistics.median(times[m]) / 1000 for m in MODULES)
    return {
        "runs": runs,
        "stdlib_ms": stdlib,
        "sockserve_ms": ours,
        "ratio": ours / stdlib,
        "extra": loaded_beyond_stdlib(),
    }


def table(figures: dict[str, Any]) -> list[str]:
    """The Markdown table of a ``measure()`` result."""
    return [
        "| import | ms (median) | ratio |",
        "|---|---|---|",
        f"| `socketserver` (stdlib) | {figures['stdlib_ms']:.1f} | 1.00 |",
        f"| `sockserve.socketserver` | {figures['sockserve_ms']:.1f} | {figures['ratio']:.2f} |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="imports of each module")
    parser.add_argument("--check", action="store_true", help="exit 1 above the target")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    figures = measure(args.runs)
    if args.json:
        print(json.dumps(figures))
    else:
        print("\n".join(table(figures)))
        print(f"target: ratio <= {TARGET}; median of {args.runs} fresh interpreters each")
        print("modules loaded beyond the stdlib's:", ", ".join(figures["extra"]) or "none")
    return 1 if args.check and figures["ratio"] > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
