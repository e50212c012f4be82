"""Where an idle connection's bytes go: each server under tracemalloc, its allocations
kept by the second half of N idle connections, per connection, grouped by the line of
our code (or the library's, if none of ours) that made them.

    .venv/bin/python -m benchmarks.idle_memory [--conns 10000] [--only raw-uvloop,sockserve-line]

The same servers as benchmarks/run.py (idle-10000 measures their RSS); the counts are
exact and do not depend on the machine's load. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from benchmarks.run import (
    LISTENING,
    ROOT,
    SERVERS,
    ServerSpec,
    build_loadgen,
    raise_nofile,
)

# Runs in the server's interpreter: tracemalloc on, then the server's own main module;
# "snap PATH" on stdin writes a snapshot and answers "snapped". A connection accepted is
# not yet set up (its transport and handler are made on a later loop pass), so the
# snapshot waits until the traced memory has stopped growing (for 10 s at most).
BOOTSTRAP = """
import gc, runpy, sys, threading, time, tracemalloc
tracemalloc.start(int(sys.argv[1]))
def settle():
    deadline = time.monotonic() + 10
    last = -1
    while time.monotonic() < deadline:
        gc.collect()
        now = tracemalloc.get_traced_memory()[0]
        if now <= last:
            return
        last = now
        time.sleep(0.2)
def control():
    for line in sys.stdin:
        if line.startswith("snap "):
            settle()
            gc.collect()
            tracemalloc.take_snapshot().dump(line[5:].strip())
            print("snapped", flush=True)
threading.Thread(target=control, daemon=True).start()
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
OURS = (str(ROOT / "src"), str(ROOT / "benchmarks"))
WAIT = 60.0  # for a half of the connections to be accepted


def sockets_of(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return count


def where(trace: tracemalloc.Traceback) -> str:
    """The innermost frame of our code that led to the allocation, else the innermost."""
    frame = next((f for f in reversed(trace) if f.filename.startswith(OURS)), trace[-1])
    return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}"


def measure(spec: ServerSpec, conns: int, depth: int, loadgen: Path) -> dict[str, list[float]]:
    """{where: [bytes, blocks]} per connection kept by the second half of ``conns``."""
    assert spec.argv[0] == "-m", spec.argv  # every server runs as a module
    argv = [sys.executable, "-c", BOOTSTRAP, str(depth), *spec.argv[1:]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.STDOUT,  # sockserve logs "listening on" to stderr
    )
    assert server.stdin is not None and server.stdout is not None
    gens: list[subprocess.Popen[str]] = []
    try:
        port = 0
        for line in server.stdout:
            if match := LISTENING.search(line):
                port = int(match.group(3))
                break
        if not port:
            raise SystemExit(f"{spec.name} did not start")
        base = sockets_of(server.pid)
        with tempfile.TemporaryDirectory() as tmp:
            snaps = []
            for half in (1, 2):
                hold = ["--conns", str(conns // 2), "--timeout", str(2 * WAIT)]  # at most
                gen = subprocess.Popen(
                    [str(loadgen), "idle", "--port", str(port), *hold],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                gens.append(gen)
                assert gen.stdout is not None
                gen.stdout.readline()  # connected
                deadline = time.monotonic() + WAIT
                while sockets_of(server.pid) < base + half * (conns // 2):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{spec.name} did not accept every connection")
                    time.sleep(0.1)
                path = f"{tmp}/{half}.snap"
                server.stdin.write(f"snap {path}\n")
                server.stdin.flush()
                while not (line := server.stdout.readline()).startswith("snapped"):
                    if not line:
                        raise SystemExit(f"{spec.name} exited (code {server.wait()})")
                snaps.append(tracemalloc.Snapshot.load(path))
    finally:
        for gen in gens:
            gen.kill()
            gen.wait(10)
        server.kill()
        server.wait(10)
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for stat in snaps[1].compare_to(snaps[0], "traceback"):
        entry = per[where(stat.traceback)]
        entry[0] += stat.size_diff / (conns // 2)
        entry[1] += stat.count_diff / (conns // 2)
    return per


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--conns", type=int, default=10000, help="idle connections, 2..40000")
    parser.add_argument("--only", default="raw-uvloop,sockserve-line", help="servers (a,b)")
    parser.add_argument("--depth", type=int, default=16, help="frames kept per allocation")
    parser.add_argument("--min", type=float, default=4.0, help="omit lines below this, bytes")
    args = parser.parse_args(argv)
    if not 2 <= args.conns <= 40000:
        parser.error("--conns must be in 2..40000")
    names = args.only.split(",")
    specs = [s for s in SERVERS if s.name in names and s.proto == "tcp"]
    if not specs:
        parser.error(f"no TCP server named {args.only!r}")
    loadgen = build_loadgen()
    raise_nofile()
    for spec in specs:
        per = measure(spec, args.conns, args.depth, loadgen)
        total = sum(size for size, _ in per.values())
        print(f"{spec.name}: {total:.0f} bytes traced per idle connection")
        for name, (size, blocks) in sorted(per.items(), key=lambda kv: -abs(kv[1][0])):
            if abs(size) >= args.min:
                print(f"  {size:7.1f} B {blocks:5.2f} blocks  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
