"""benchmarks/idle_memory.py: where an idle connection's bytes go, per line of our code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import require_program

ROOT = Path(__file__).resolve().parent.parent


def test_idle_memory_names_the_handler_object_line() -> None:
    require_program("cc")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.idle_memory", "--conns", "200",
         "--only", "sockserve-line", "--min", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    total = re.search(r"sockserve-line: (\d+) bytes traced per idle connection", done.stdout)
    assert total is not None, done.stdout
    assert 500 < int(total.group(1)) < 20000
    # The handler object is made where the kind serves the accepted connection.
    assert re.search(r"^\s+\d+\.\d B\s+1\.00 blocks  src/sockserve/kinds\.py:\d+$",
                     done.stdout, re.M), done.stdout  # fmt: skip
