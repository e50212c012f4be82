"""Side-by-side benchmark of sockserve and reference servers; writes docs/benchmarks.md.

Each server runs as a child pinned to one core, the C load generator (built here with
``cc -O2`` on first use) on the other. Every point runs all servers one after another,
repetitions interleaved (A B C A B C ...), and reports medians. Loopback only.

    .venv/bin/python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--duration S]
        [--repeat N] [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BENCH / "build" / "loadgen"
LISTENING = re.compile(r"listening on (tcp|udp)://\[?([^\]\s]+?)\]?:(\d+)")
LOADGEN_BUSY_LIMIT = 0.9  # a load generator core busier than this may be the bottleneck

# ---- servers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    """One server under test: how to start it on port 0, and what it is for."""

    name: str
    proto: str  # "tcp" or "udp"
    argv: tuple[str, ...]  # after ``python``
    description: str
    burst_only: bool = False
    loadgen: tuple[str, ...] = ()  # extra load generator options, such as its framing


def _mod(module: str, *args: str) -> tuple[str, ...]:
    return ("-m", f"benchmarks.servers.{module}", "--bind", "127.0.0.1:0", *args)


def _sockserve(*args: str) -> tuple[str, ...]:
    return ("-m", "sockserve", *args)


SERVERS = [
    ServerSpec("raw-uvloop", "tcp", _mod("raw_uvloop"), "hand-written asyncio.Protocol on uvloop"),
    ServerSpec(
        "raw-asyncio",
        "tcp",
        _mod("raw_asyncio", "--loop", "asyncio"),
        "the same Protocol on plain asyncio",
    ),
    ServerSpec(
        "asyncio-streams",
        "tcp",
        _mod("asyncio_streams"),
        "asyncio.start_server streams on uvloop (reference)",
    ),
    ServerSpec(
        "stdlib-threading",
        "tcp",
        _mod("stdlib_threading"),
        "socketserver.ThreadingTCPServer + StreamRequestHandler, stdlib backlog 5",
    ),
    ServerSpec(
        "stdlib-threading-b4096",
        "tcp",
        _mod("stdlib_threading", "--backlog", "4096"),
        "the same with request_queue_size = 4096 (the blocking servers' peer from 1000"
        " clients on: with a backlog of 5 most of them never get in)",
    ),
    ServerSpec(
        "dropin-threading",
        "tcp",
        _mod("stdlib_threading", "--dropin"),
        "the same program on sockserve.socketserver (the drop-in; backlog SOMAXCONN)",
    ),
    ServerSpec(
        "sockserve-line",
        "tcp",
        _sockserve("demo", "--bind", "127.0.0.1:0", "--max-connections", "20000"),
        "sockserve demo: LineHandler fast path",
    ),
    ServerSpec(
        "sockserve-message-u32",
        "tcp",
        _sockserve(
            "run",
            "benchmarks.servers.handlers:UpperU32",
            "--bind",
            "127.0.0.1:0",
            "--max-connections",
            "20000",
        ),
        "sockserve run: MessageHandler with a 4-byte length prefix (the same bytes on the"
        " wire: a 4-byte header instead of the newline)",
        loadgen=("--framing", "u32"),
    ),
    ServerSpec(
        "sockserve-stream",
        "tcp",
        _sockserve(
            "run",
            "benchmarks.servers.handlers:UpperStream",
            "--bind",
            "127.0.0.1:0",
            "--max-connections",
            "20000",
        ),
        "sockserve run: async StreamHandler (readline/write/drain)",
    ),
    ServerSpec(
        "sockserve-blocking",
        "tcp",
        _sockserve(
            "run",
            "benchmarks.servers.handlers:UpperBlocking",
            "--bind",
            "127.0.0.1:0",
            "--max-connections",
            "20000",
        ),
        "sockserve run: the stdlib StreamRequestHandler, a thread per connection (above 128"
        " connections woken in turn through the ReadyQueue)",
    ),
    ServerSpec("raw-udp-uvloop", "udp", _mod("raw_udp"), "hand-written DatagramProtocol on uvloop"),
    ServerSpec(
        "raw-udp-asyncio",
        "udp",
        _mod("raw_udp", "--loop", "asyncio"),
        "the same DatagramProtocol on plain asyncio",
    ),
    ServerSpec("stdlib-udp", "udp", _mod("stdlib_udp"), "socketserver.UDPServer"),
    ServerSpec(
        "sockserve-udp",
        "udp",
        _sockserve("demo", "--bind", "udp://127.0.0.1:0"),
        "sockserve demo on UDP (uvloop)",
    ),
    ServerSpec(
        "sockserve-udp-asyncio",
        "udp",
        _sockserve("demo", "--bind", "udp://127.0.0.1:0", "--loop", "asyncio"),
        "sockserve demo on UDP, --loop asyncio",
    ),
]

# ---- points ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One load shape: a loadgen mode and its parameters."""

    name: str
    mode: str  # tcp, udp, burst, idle
    conns: int
    size: int

    @property
    def proto(self) -> str:
        return "udp" if self.mode == "udp" else "tcp"


def all_points() -> list[Point]:
    points = [Point(f"tcp-c{c}-s{s}", "tcp", c, s) for c in (1, 64, 1000) for s in (64, 1024)]
    points += [
        Point("udp-c32-s64", "udp", 32, 64),
        Point("burst-1000", "burst", 1000, 64),
        Point("idle-10000", "idle", 10000, 64),
    ]
    return points


def quick_points() -> list[Point]:
    return [Point("tcp-c64-s64", "tcp", 64, 64), Point("udp-c32-s64", "udp", 32, 64)]


# ---- processes ---------------------------------------------------------------------------


def _pick_cores() -> tuple[int | None, int | None]:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


# Chosen once, before this process pins itself to the load generator's core.
_CORES = _pick_cores()


def cores() -> tuple[int | None, int | None]:
    """(server core, load generator core), or (None, None) with fewer than two cores."""
    return _CORES


def raise_nofile() -> None:
    """Raise the open-file soft limit to the hard one; the children inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def build_loadgen() -> Path:
    """Compile benchmarks/loadgen.c if the binary is missing or older than the source."""
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return LOADGEN
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("no C compiler (cc) found: install gcc to build the load generator")
    LOADGEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = LOADGEN.with_suffix(".tmp")
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(LOADGEN_SRC)],
        check=True,
        timeout=120,
    )
    tmp.replace(LOADGEN)
    return LOADGEN


@dataclass
class Server:
    """A running server child; its output is drained by a thread into ``lines``."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    port: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    def drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if len(self.lines) < 1000:
                self.lines.append(line)
            if not self.port and (match := LISTENING.search(line)):
                self.port = int(match.group(3))
                self.ready.set()
        self.ready.set()  # exited: unblock the waiter

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) if match else 0

    def tail(self) -> str:
        return "".join(self.lines[-5:]).strip()


class ServerFailed(Exception):
    """The server did not start (its last output lines are the message)."""


@contextmanager
def running(spec: ServerSpec, core: int | None) -> Iterator[Server]:
    """Start ``spec`` on port 0, wait for its ``listening on`` line, stop it afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, *spec.argv],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if core is not None:
        # Before the interpreter has started any thread, so all of them inherit it.
        os.sched_setaffinity(proc.pid, {core})
    server = Server(proc)
    reader = threading.Thread(target=server.drain, daemon=True)
    reader.start()
    try:
        if not server.ready.wait(20) or not server.port:
            raise ServerFailed(server.tail() or f"no 'listening on' line (exit {proc.poll()})")
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        reader.join(5)
        assert proc.stdout is not None
        proc.stdout.close()


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise ValueError(f"load generator printed no JSON: {text!r}")


def loadgen_argv(
    point: Point, port: int, pid: int, duration: float, extra: Sequence[str] = ()
) -> list[str]:
    argv = [str(LOADGEN), point.mode, "--port", str(port), "--conns", str(point.conns)]
    argv += ["--size", str(point.size), "--cpu-pid", str(pid), *extra]
    if point.mode in ("tcp", "udp"):
        argv += ["--duration", str(duration)]
    else:
        argv += ["--timeout", "5" if point.mode == "burst" else "10"]
    return argv


def measure(point: Point, spec: ServerSpec, duration: float) -> dict[str, Any]:
    """One run of one server on one point: the load generator's JSON plus derived figures."""
    with running(spec, cores()[0]) as server:
        argv = loadgen_argv(point, server.port, server.proc.pid, duration, spec.loadgen)
        if point.mode != "idle":
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=duration + 120,
                check=False,
            )
            result = last_json(done.stdout)
        else:
            result = measure_idle(server, argv)
        if server.proc.poll() is not None:
            result["errors"] = result.get("errors", 0) + 1
            result["note"] = f"server exited: {server.tail()}"
    requests = result.get("requests", 0)
    if requests and result.get("server_cpu_s", -1) >= 0:
        result["cpu_us_per_rt"] = result["server_cpu_s"] / requests * 1e6
    if result.get("seconds") and "loadgen_cpu_s" in result:
        result["loadgen_busy"] = result["loadgen_cpu_s"] / result["seconds"]
    return result


def settled_rss(server: Server, timeout: float = 20.0) -> int:
    """The server's RSS once it stops growing (it may still be accepting and starting
    threads a second after the clients connected): two reads 0.5 s apart within 0.5%."""
    deadline = time.monotonic() + timeout
    last = server.rss_kib()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = server.rss_kib()
        if abs(now - last) <= last * 0.005:
            return now
        last = now
    return last


def measure_idle(server: Server, argv: list[str]) -> dict[str, Any]:
    """Hold K idle connections, opened in two halves; then one line on each.

    KiB per connection is the RSS growth from K/2 to K connections over K/2: the marginal
    cost of a connection. Measured from the fresh process instead, whatever the server
    left free at start-up would be filled by the first connections and counted as less.
    """
    conns = int(argv[argv.index("--conns") + 1])
    half = list(argv)
    half[argv.index("--conns") + 1] = str(conns // 2)
    time.sleep(0.5)  # let the fresh server finish its start-up allocations
    rss = [server.rss_kib()]
    gens: list[subprocess.Popen[str]] = []
    firsts = []
    try:
        for _ in range(2):
            gen = subprocess.Popen(half, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            gens.append(gen)
            assert gen.stdout is not None
            firsts.append(json.loads(gen.stdout.readline() or "{}"))
            rss.append(settled_rss(server))  # accepts (and threads) are asynchronous
        for gen in gens:
            assert gen.stdin is not None
            gen.stdin.write("go\n")
            gen.stdin.flush()
        results = [last_json(gen.stdout.read()) for gen in gens if gen.stdout is not None]
        after = server.rss_kib()
    finally:
        for gen in gens:
            if gen.poll() is None:
                gen.kill()
            gen.wait(10)
            for stream in (gen.stdin, gen.stdout):
                if stream is not None:
                    stream.close()
    result = dict(results[0])
    for key, value in results[1].items():
        if key.endswith(("_us", "_s")) or key == "seconds":
            result[key] = max(result.get(key, 0), value)
        elif isinstance(value, int) and key in result:
            result[key] += value
    before, mid, idle = rss
    second = max(firsts[1].get("connected", 0), 1)
    total = max(sum(f.get("connected", 0) for f in firsts), 1)
    result.update(
        rss_before_kib=before,
        rss_half_kib=mid,
        rss_idle_kib=idle,
        rss_after_kib=after,
        kib_per_conn=(idle - mid) / second,
        kib_per_conn_after=(idle - mid) / second + (after - idle) / total,
    )
    return result


# ---- the run ---------------------------------------------------------------------------


def servers_for(point: Point, only: Sequence[str]) -> list[ServerSpec]:
    chosen = [s for s in SERVERS if s.proto == point.proto]
    if point.mode != "burst":
        chosen = [s for s in chosen if not s.burst_only]
    if only:
        chosen = [s for s in chosen if any(name in s.name for name in only)]
    return chosen


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    points = quick_points() if args.quick else all_points()
    if args.points:
        points = [p for p in points if p.name in args.points.split(",")]
    only = [n for n in args.only.split(",") if n] if args.only else []
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    notes: dict[str, dict[str, str]] = {}
    loads = [os.getloadavg()[0]]  # sampled after every run: other work on the machine
    for point in points:
        specs = servers_for(point, only)
        if not specs:
            continue
        runs[point.name] = {s.name: [] for s in specs}
        notes[point.name] = {}
        for rep in range(args.repeat):
            for spec in specs:
                if spec.name in notes[point.name]:
                    continue  # failed to start before: skip its other repetitions
                label = f"{point.name} {spec.name} #{rep + 1}"
                try:
                    result = measure(point, spec, args.duration)
                except ServerFailed as exc:
                    notes[point.name][spec.name] = f"skipped: did not start ({exc})"
                    print(f"{label}: skipped, did not start: {exc}", file=sys.stderr)
                    continue
                runs[point.name][spec.name].append(result)
                loads.append(os.getloadavg()[0])
                print(f"{label}: {summary_line(result)}", file=sys.stderr)
    imports = json.loads(
        subprocess.run(
            [sys.executable, str(BENCH / "import_time.py"), "--runs", "20", "--json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout
    )
    # Fan-out to 10,000 clients: about 30 s, left out of --quick.
    broadcast = None
    if not args.quick:
        broadcast = json.loads(
            subprocess.run(
                [sys.executable, str(BENCH / "broadcast.py"), "--json"],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            ).stdout
        )
    info = machine()
    info["load"] = (
        f"1-min load average {loads[0]:.1f} at the start, up to {max(loads):.1f} during the run"
    )
    return {
        "machine": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "duration": args.duration,
        "repeat": args.repeat,
        "points": {p.name: {"mode": p.mode, "conns": p.conns, "size": p.size} for p in points},
        "servers": {s.name: s.description for s in SERVERS},
        "runs": runs,
        "notes": notes,
        "import_time": imports,
        "broadcast": broadcast,
    }


def summary_line(r: dict[str, Any]) -> str:
    keys = (
        "rps",
        "p99_us",
        "cpu_us_per_rt",
        "loadgen_busy",
        "all_served_s",
        "served",
        "kib_per_conn",
        "errors",
        "timeouts",
    )
    return " ".join(
        f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r
    )


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        uvloop_version = str(getattr(uvloop, "__version__", "unknown"))
    except ImportError:
        uvloop_version = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "commit": commit or "unknown",
        "pinning": "server on core {}, load generator on core {}".format(*cores()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# ---- the report ------------------------------------------------------------------------


def median(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if isinstance(r.get(key), (int, float)) and r[key] >= 0]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


TCP_BASELINE = "raw-uvloop"
UDP_BASELINE = "raw-udp-uvloop"
# Each server's second comparison, where the first one is not the fair one.
PEERS = {
    "sockserve-blocking": "stdlib-threading-b4096",
    "dropin-threading": "stdlib-threading-b4096",
    "sockserve-udp-asyncio": "stdlib-udp",
    "raw-udp-asyncio": "stdlib-udp",
}


def errors_of(results: list[dict[str, Any]]) -> int:
    """Wrong replies, resets, refusals, timeouts and (tcp, idle) connections never made."""
    total = 0
    for r in results:
        total += sum(int(r.get(k, 0)) for k in ("errors", "timeouts", "resets", "refused"))
        if r.get("mode") in ("tcp", "idle"):
            total += max(0, int(r.get("conns", 0)) - int(r.get("connected", 0)))
    return total


def flags(results: list[dict[str, Any]], note: str | None) -> str:
    out = []
    busy = median(results, "loadgen_busy")
    if busy is not None and busy > LOADGEN_BUSY_LIMIT:
        out.append(f"loadgen-bound ({busy:.0%})")
    starved = median(results, "starved")
    if starved:
        out.append(f"{starved:.0f} connections never answered in the window")
    stalled = median(results, "stalled_1s")
    if stalled:
        out.append(f"{stalled:.0f} connections went more than 1 s without an answer")
    if any("note" in r for r in results):
        out.append(next(r["note"] for r in results if "note" in r).replace("\n", " ")[:120])
    if note:
        out.append(note.replace("\n", " ").replace("|", "/")[:160])
    return "; ".join(out)


def throughput_table(data: dict[str, Any], point: str, baseline: str) -> list[str]:
    runs = data["runs"][point]
    notes = data["notes"][point]
    base = runs.get(baseline, [])
    base_rps, base_cpu = median(base, "rps"), median(base, "cpu_us_per_rt")
    rows = [
        f"| server | rps | p99 µs | server CPU µs/rt | rps vs {baseline} "
        f"| CPU vs {baseline} | vs peer | errors | notes |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, results in runs.items():
        rps, cpu = median(results, "rps"), median(results, "cpu_us_per_rt")
        peer = PEERS.get(name)
        peer_text = "-"
        if peer and peer in runs:
            peer_ratio = ratio(rps, median(runs[peer], "rps"))
            peer_text = f"{fmt_ratio(peer_ratio)} {peer} rps" if peer_ratio else "-"
        lost = ""
        if data["points"][point]["mode"] == "udp" and results:
            lost = f" ({int(sum(r.get('lost', 0) for r in results))} lost)"
        rows.append(
            f"| {name} | {fmt(rps)} | {fmt(median(results, 'p99_us'))} | {fmt(cpu, 2)} "
            f"| {fmt_ratio(ratio(rps, base_rps))} | {fmt_ratio(ratio(cpu, base_cpu))} "
            f"| {peer_text} | {errors_of(results)}{lost} | {flags(results, notes.get(name))} |"
        )
    return rows


def burst_table(data: dict[str, Any], point: str) -> list[str]:
    rows = [
        "| server | all 1,000 served in s | served | refused | resets | timeouts "
        "| p50 µs | p99 µs | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, results in data["runs"][point].items():
        all_served = [r["all_served_s"] for r in results]
        shown = (
            "not all" if any(v < 0 for v in all_served) else fmt(median(results, "all_served_s"), 3)
        )
        rows.append(
            f"| {name} | {shown} | {fmt(median(results, 'served'))} "
            f"| {sum(r['refused'] for r in results)} | {sum(r['resets'] for r in results)} "
            f"| {sum(r['timeouts'] for r in results)} | {fmt(median(results, 'p50_us'))} "
            f"| {fmt(median(results, 'p99_us'))} "
            f"| {flags(results, data['notes'][point].get(name))} |"
        )
    return rows


def idle_table(data: dict[str, Any], point: str) -> list[str]:
    runs = data["runs"][point]
    base = median(runs.get(TCP_BASELINE, []), "kib_per_conn")
    rows = [
        f"| server | KiB/conn idle | vs {TCP_BASELINE} | KiB/conn after one line "
        "| RSS before KiB | connected | served | errors | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    conns = data["points"][point]["conns"]
    for name, results in runs.items():
        # A server that could not hold them all (the blocking pool) has no such figure.
        held = median(results, "connected") == conns
        kib = median(results, "kib_per_conn") if held else None
        after = median(results, "kib_per_conn_after") if held else None
        rows.append(
            f"| {name} | {fmt(kib, 2)} | {fmt_ratio(ratio(kib, base))} "
            f"| {fmt(after, 2)} "
            f"| {fmt(median(results, 'rss_before_kib'))} | {fmt(median(results, 'connected'))} "
            f"| {fmt(median(results, 'served'))} "
            f"| {errors_of(results)} | {flags(results, data['notes'][point].get(name))} |"
        )
    return rows


TARGETS_QUOTED = (
    "line handler >= 0.95x raw uvloop Protocol rps at <= 1.1x its server CPU per round trip;",
    "async stream handler >= 0.8x raw uvloop;",
    "message handler with a 4-byte length prefix >= 0.95x the line handler's rps at <= 1.05x"
    " its server CPU per round trip, at 64 and 1000 connections with 64-byte requests;",
    "blocking handler under sockserve run >= 0.9x stdlib ThreadingTCPServer at 64 conns;",
    "blocking handlers at 1000 clients (64-byte lines): every client answered within every"
    " second; `sockserve run` >= 1.2x the stdlib ThreadingTCPServer's (backlog 4096) round"
    " trips/s and p99 <= 0.25x its p99; the drop-in >= 1.0x and p99 <= 1.0x; at 64 clients"
    " `sockserve run` >= 1.0x; 10,000 idle blocking connections at <= 16 KiB each;",
    "10,000 idle connections at <= 1.5x the raw uvloop server's memory per connection;",
    "1,000 simultaneous clients all served within 0.5 s;",
    "UDP >= 0.9x raw uvloop DatagramProtocol, and on plain asyncio (`--loop asyncio`) >= stdlib"
    " UDPServer.",
)


@dataclass
class Target:
    text: str
    measured: str
    shortfall: float | None  # None: not measured; <= 0: met; > 0: missed by this fraction


def at_least(value: float | None, goal: float) -> float | None:
    return None if value is None else (goal - value) / goal


def at_most(value: float | None, goal: float) -> float | None:
    return None if value is None else (value - goal) / goal


def point_ratios(
    data: dict[str, Any], server: str, peer: str, key: str, prefix: str = "tcp-"
) -> list[tuple[str, float]]:
    out = []
    for point, runs in data["runs"].items():
        if point.startswith(prefix) and server in runs and peer in runs:
            value = ratio(median(runs[server], key), median(runs[peer], key))
            if value is not None:
                out.append((point, value))
    return out


def worst(pairs: list[tuple[str, float]], lowest: bool = True) -> tuple[str, float] | None:
    if not pairs:
        return None
    return (min if lowest else max)(pairs, key=lambda p: p[1])


def typical(pairs: list[tuple[str, float]]) -> str:
    """``; median 0.97x`` over several points, else nothing."""
    if len(pairs) < 2:
        return ""
    return f"; median {statistics.median(v for _, v in pairs):.2f}x"


def targets(data: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    runs = data["runs"]

    def ratio_target(text: str, server: str, peer: str, goal: float, prefix: str) -> None:
        pairs = point_ratios(data, server, peer, "rps", prefix)
        found = worst(pairs)
        if found is None:
            out.append(Target(text, "not measured", None))
        else:
            point, value = found
            measured = f"{value:.2f}x (worst: {point}{typical(pairs)})"
            out.append(Target(text, measured, at_least(value, goal)))

    # Line handler: rps and CPU per round trip, both against the raw uvloop Protocol.
    rps_pairs = point_ratios(data, "sockserve-line", TCP_BASELINE, "rps")
    cpu_pairs = point_ratios(data, "sockserve-line", TCP_BASELINE, "cpu_us_per_rt")
    rps_w, cpu_w = worst(rps_pairs), worst(cpu_pairs, lowest=False)
    if rps_w is None or cpu_w is None:
        out.append(Target("line handler ≥ 0.95x raw uvloop rps", "not measured", None))
    else:
        miss = max(at_least(rps_w[1], 0.95) or 0.0, at_most(cpu_w[1], 1.1) or 0.0)
        out.append(
            Target(
                "line handler ≥ 0.95x raw uvloop Protocol rps at ≤ 1.1x its server CPU per "
                "round trip",
                f"rps {rps_w[1]:.2f}x (worst: {rps_w[0]}{typical(rps_pairs)}), "
                f"CPU {cpu_w[1]:.2f}x (worst: {cpu_w[0]}{typical(cpu_pairs)})",
                miss,
            )
        )
    ratio_target(
        "async stream handler ≥ 0.8x raw uvloop rps", "sockserve-stream", TCP_BASELINE, 0.8, "tcp-"
    )
    # Message handler (u32) against the line handler, 64-byte requests, 64 and 1000 conns.
    pairs = {
        key: [
            pair
            for pair in point_ratios(data, "sockserve-message-u32", "sockserve-line", key)
            if pair[0] in ("tcp-c64-s64", "tcp-c1000-s64")
        ]
        for key in ("rps", "cpu_us_per_rt")
    }
    rps_w, cpu_w = worst(pairs["rps"]), worst(pairs["cpu_us_per_rt"], lowest=False)
    text = (
        "message handler (u32) ≥ 0.95x the line handler's rps at ≤ 1.05x its server CPU per"
        " round trip (64 and 1000 conns, 64 B)"
    )
    if rps_w is None or cpu_w is None:
        out.append(Target(text, "not measured", None))
    else:
        miss = max(at_least(rps_w[1], 0.95) or 0.0, at_most(cpu_w[1], 1.05) or 0.0)
        shown = f"rps {rps_w[1]:.2f}x (worst: {rps_w[0]}), CPU {cpu_w[1]:.2f}x (worst: {cpu_w[0]})"
        out.append(Target(text, shown, miss))
    ratio_target(
        "blocking handler under `sockserve run` ≥ 0.9x stdlib ThreadingTCPServer at 64 conns",
        "sockserve-blocking",
        "stdlib-threading",
        0.9,
        "tcp-c64-",
    )
    blocking_targets(data, out)
    idle = runs.get("idle-10000", {})
    base = median(idle.get(TCP_BASELINE, []), "kib_per_conn")
    for name in ("sockserve-line", "sockserve-stream"):
        value = ratio(median(idle.get(name, []), "kib_per_conn"), base)
        out.append(
            Target(
                f"10,000 idle connections at ≤ 1.5x raw uvloop memory per connection ({name})",
                "not measured" if value is None else f"{value:.2f}x",
                at_most(value, 1.5),
            )
        )
    burst = runs.get("burst-1000", {})
    for name in ("sockserve-line", "sockserve-stream", "sockserve-blocking"):
        results = burst.get(name, [])
        text = f"1,000 simultaneous clients all served within 0.5 s ({name})"
        if not results:
            out.append(Target(text, "not measured", None))
        elif any(r["all_served_s"] < 0 for r in results):
            served = min(r["served"] for r in results)
            out.append(Target(text, f"not all served (worst run: {served})", 1.0))
        else:
            seconds = median(results, "all_served_s")
            out.append(Target(text, f"{fmt(seconds, 3)} s", at_most(seconds, 0.5)))
    ratio_target(
        "UDP ≥ 0.9x raw uvloop DatagramProtocol", "sockserve-udp", UDP_BASELINE, 0.9, "udp"
    )
    ratio_target(
        "UDP on plain asyncio (`--loop asyncio`) ≥ stdlib UDPServer",
        "sockserve-udp-asyncio",
        "stdlib-udp",
        1.0,
        "udp",
    )
    return out


def blocking_targets(data: dict[str, Any], out: list[Target]) -> None:
    """Issue 12's targets: blocking handlers at 1000 clients, 64 clients and 10,000 idle."""
    runs = data["runs"]
    peer = "stdlib-threading-b4096"
    c1000 = runs.get("tcp-c1000-s64", {})
    for name, rps_goal, p99_goal in (
        ("sockserve-blocking", 1.2, 0.25),
        ("dropin-threading", 1.0, 1.0),
    ):
        mine, theirs = c1000.get(name, []), c1000.get(peer, [])
        text = (
            f"1000 clients: {name} ≥ {rps_goal}x {peer} rps, p99 ≤ {p99_goal}x, every"
            " client answered within every second"
        )
        if not mine or not theirs:
            out.append(Target(text, "not measured", None))
            continue
        rps = ratio(median(mine, "rps"), median(theirs, "rps"))
        p99 = ratio(median(mine, "p99_us"), median(theirs, "p99_us"))
        stalled = max(int(r.get("stalled_1s", 0)) for r in mine)
        miss = max(
            at_least(rps, rps_goal) or 0.0,
            at_most(p99, p99_goal) or 0.0,
            1.0 if stalled else 0.0,
        )
        out.append(
            Target(
                text,
                f"rps {fmt_ratio(rps)}, p99 {fmt_ratio(p99)}, clients > 1 s without an answer:"
                f" {stalled} (worst run)",
                miss,
            )
        )
    c64 = runs.get("tcp-c64-s64", {})
    rps = ratio(median(c64.get("sockserve-blocking", []), "rps"), median(c64.get(peer, []), "rps"))
    cpu = ratio(
        median(c64.get("sockserve-blocking", []), "cpu_us_per_rt"),
        median(c64.get(peer, []), "cpu_us_per_rt"),
    )
    out.append(
        Target(
            f"64 clients: sockserve-blocking ≥ 1.0x {peer} rps",
            "not measured"
            if rps is None
            else f"rps {rps:.2f}x (server CPU per round trip {fmt_ratio(cpu)})",
            at_least(rps, 1.0),
        )
    )
    idle = runs.get("idle-10000", {})
    for name in ("sockserve-blocking", "dropin-threading"):
        results = idle.get(name, [])
        held = bool(results) and median(results, "connected") == 10000
        kib = median(results, "kib_per_conn") if held else None
        out.append(
            Target(
                f"10,000 idle connections at ≤ 16 KiB each ({name})",
                "not measured" if kib is None else f"{kib:.1f} KiB",
                at_most(kib, 16.0),
            )
        )


def status(target: Target) -> str:
    if target.shortfall is None:
        return "not measured"
    if target.shortfall <= 0:
        return "met"
    return f"missed by {target.shortfall:.0%}"


def reading_the_misses(data: dict[str, Any]) -> list[str]:
    """The targets' reference point, and how much the reference server itself varied."""
    runs = data["runs"]
    lines = ["", "### Reading the results", ""]
    reference = runs.get("tcp-c64-s64", {})
    base = reference.get(TCP_BASELINE)
    if base:
        parts = []
        for server in ("sockserve-line", "sockserve-stream"):
            if server in reference:
                rps = ratio(median(reference[server], "rps"), median(base, "rps"))
                cpu = ratio(
                    median(reference[server], "cpu_us_per_rt"), median(base, "cpu_us_per_rt")
                )
                parts.append(f"{server} {fmt_ratio(rps)} rps at {fmt_ratio(cpu)} CPU")
        lines.append(
            "The targets quote 64 connections with 64-byte lines; there, against "
            f"{TCP_BASELINE}: " + "; ".join(parts) + "."
        )
    idle = runs.get("idle-10000", {})
    raw_idle = median(idle.get(TCP_BASELINE, []), "kib_per_conn")
    stream_idle = median(idle.get("sockserve-stream", []), "kib_per_conn")
    streams_idle = median(idle.get("asyncio-streams", []), "kib_per_conn")
    if raw_idle and stream_idle and streams_idle:
        lines += [
            "",
            "An async stream handler keeps a task and its coroutine frame for every"
            f" connection: {fmt_ratio(ratio(stream_idle, raw_idle))} the raw server's memory"
            f" per idle connection, against {fmt_ratio(ratio(streams_idle, raw_idle))} for"
            " asyncio streams. The line handler, which has no task per connection, is the"
            " one for many idle connections.",
        ]
    spreads = []
    for point, servers in runs.items():
        values = [r["rps"] for r in servers.get(TCP_BASELINE, []) if r.get("rps")]
        if len(values) > 1:
            spread = (max(values) - min(values)) / statistics.median(values)
            spreads.append(f"{point} {spread:.0%}")
    if spreads:
        lines += [
            "",
            f"How much {TCP_BASELINE} itself varied between its runs at each point"
            " ((max - min) / median of its rps): " + ", ".join(spreads) + ". A ratio"
            " missed by less than that spread is within the noise of this machine.",
        ]
    return lines


def report(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run.py` (`make bench`); do not edit by hand. How the",
        "numbers are taken: [benchmarks/README.md](../benchmarks/README.md).",
        "",
        f"- Machine: {m['nproc']} cores, {m['cpu']}, {m['kernel']}",
        f"- Python {m['python']}, uvloop {m['uvloop']}, sockserve at {m['commit']}",
        f"- {m['pinning']}; {data['duration']} s per run, median of {data['repeat']} "
        "interleaved runs",
        f"- Command: `{data['command']}`",
        f"- Date: {m['date']}; {m.get('load', 'load average not recorded')} (other work on"
        " the machine adds noise: compare the CPU per round trip first)",
        "",
        "Throughput points are closed loop: each connection sends one line and waits for its",
        "uppercase reply. *server CPU µs/rt* is the server's user+system time (all threads) over",
        "the measured window divided by the round trips. *loadgen-bound* marks runs where the",
        f"load generator's core was more than {LOADGEN_BUSY_LIMIT:.0%} busy: there the rps",
        "may be the load generator's limit and the CPU per round trip is the better figure.",
        "",
        "## Targets",
        "",
        "The project's performance targets:",
        "",
        *(f"> - {line}" for line in TARGETS_QUOTED),
        "",
        "Each ratio below is the worst over the points where both servers ran.",
        "",
        "| target | measured | status |",
        "|---|---|---|",
    ]
    lines += [f"| {t.text} | {t.measured} | {status(t)} |" for t in targets(data)]
    lines += reading_the_misses(data)
    lines += ["", "## Servers", "", "| name | what |", "|---|---|"]
    lines += [f"| {name} | {what} |" for name, what in data["servers"].items()]
    for point, info in data["points"].items():
        if point not in data["runs"]:
            continue
        mode = info["mode"]
        lines += ["", f"## {point}", ""]
        if mode == "tcp":
            lines.append(
                f"TCP, {info['conns']} connection(s), {info['size']}-byte lines, closed loop."
            )
            lines += ["", *throughput_table(data, point, TCP_BASELINE)]
        elif mode == "udp":
            lines.append(
                f"UDP, {info['conns']} datagrams of {info['size']} bytes in flight over 4"
                " sockets; a datagram unanswered for 200 ms counts as lost and is resent."
            )
            lines += ["", *throughput_table(data, point, UDP_BASELINE)]
        elif mode == "burst":
            lines.append(
                f"{info['conns']} connects issued at the same instant, one line sent on each as"
                " soon as it connects; time until every reply arrived (5 s limit)."
            )
            lines += ["", *burst_table(data, point)]
        else:
            lines.append(
                f"{info['conns']:,} idle connections, opened in two halves; KiB per connection"
                " is the growth of the server's RSS (VmRSS) over the second half (the marginal"
                " cost, not counting start-up memory), then after one line on each (all must"
                " be answered)."
            )
            lines += ["", *idle_table(data, point)]
    if "import_time" in data:
        figures = data["import_time"]
        lines += ["", "## import-time", ""]
        lines.append(
            "`import sockserve.socketserver` against the stdlib's `import socketserver`, each in"
            f" a fresh interpreter (median of {figures['runs']}, byte code cached); target: a"
            " ratio of at most 1.5 (`benchmarks/import_time.py`)."
        )
        lines += [
            "",
            "| import | ms (median) | ratio |",
            "|---|---|---|",
            f"| `socketserver` (stdlib) | {figures['stdlib_ms']:.1f} | 1.00 |",
            f"| `sockserve.socketserver` | {figures['sockserve_ms']:.1f}"
            f" | {figures['ratio']:.2f} |",
        ]
    if data.get("broadcast"):
        lines += ["", "## broadcast", "", *broadcast_section(data["broadcast"])]
    return "\n".join(lines) + "\n"


def broadcast_section(figures: dict[str, Any]) -> list[str]:
    """The fan-out figures of ``benchmarks/broadcast.py``."""
    return [
        f"`server.broadcast()` from a line handler to {figures['clients']:,} connected clients"
        f" ({figures['size']}-byte lines, {figures['messages']} messages published in batches"
        f" of {figures['batch']}, each batch read by every client before the next;"
        " `benchmarks/broadcast.py`). Server CPU is per delivered message (one message to"
        " one client).",
        "",
        "| clients | messages/s | deliveries/s | server CPU per delivery | server RSS |",
        "|---:|---:|---:|---:|---:|",
        f"| {figures['clients']:,} | {figures['messages_per_s']:,} |"
        f" {figures['deliveries_per_s']:,} | {figures['server_cpu_us_per_delivery']} µs |"
        f" {figures['server_rss_end_mib']} MiB |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="64 conns x 64 B and UDP only")
    parser.add_argument("--only", default="", help="servers whose name contains NAME (a,b)")
    parser.add_argument("--points", default="", help="only these points (tcp-c64-s64,...)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per point")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--from-json", type=Path, help="only rewrite the report from a saved results file"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        args.output.write_text(report(json.loads(args.from_json.read_text())))
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
    if not 0 < args.duration <= 600 or not 1 <= args.repeat <= 20:
        parser.error("--duration must be in (0, 600] and --repeat in 1..20")
    build_loadgen()
    raise_nofile()
    _, gen_core = cores()
    if gen_core is not None:
        # The load generators inherit this; it also keeps this process off the server's core.
        os.sched_setaffinity(0, {gen_core})
    data = run_all(args)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.results / f"{stamp}.json").write_text(json.dumps(data, indent=1) + "\n")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(data))
    print(f"wrote {args.output} and {args.results / (stamp + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
