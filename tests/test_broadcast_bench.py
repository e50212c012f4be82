"""benchmarks/broadcast.py runs end to end on a few clients and reports consistent figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_broadcast_benchmark_runs_small() -> None:
    args = ["--clients", "50", "--messages", "30", "--batch", "7", "--json"]
    result = subprocess.run(
        [sys.executable, "benchmarks/broadcast.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(result.stdout)
    assert figures["clients"] == 50 and figures["messages"] == 30
    assert figures["deliveries_per_s"] > 0
    assert figures["server_cpu_us_per_delivery"] >= 0
    assert 0 < figures["server_rss_end_mib"] < 1024
