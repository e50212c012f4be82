"""The leak check, a pytest plugin: after each test's teardown, collect garbage and fail
that test if it left behind a socket, a thread, a child process or a Unix socket file in
a temporary directory, naming each and the lines that created it.

Sockets, threads and subprocesses record where they were created (a cheap stack summary:
tracemalloc on every object made the suite many times slower). conftest.py loads it for
the whole suite; ``pytest -p leakcheck`` loads it anywhere tests/ is on the path.
"""

from __future__ import annotations

import functools
import gc
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import pytest

TRACE_FRAMES = 25
JOIN_GRACE = 5.0  # how long a thread or child left running gets to end by itself


def pytest_configure(config: pytest.Config) -> None:
    for cls in (socket.socket, threading.Thread, subprocess.Popen):
        record_creation(cls)
    # Temporary files of this run, the test processes' included, go to a directory of its
    # own: a socket file left there is this run's, whatever else runs on the machine.
    # pytest's tmp_path stays where it was: Unix socket paths there are near their limit.
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    private = tempfile.mkdtemp(prefix="ss-tests-")
    os.chmod(private, 0o755)  # tests that drop privileges make world-readable dirs in it
    os.environ["TMPDIR"] = tempfile.tempdir = private
    config.stash[_private_tmp] = private


def pytest_collection_finish(session: pytest.Session) -> None:
    # What collection made lives for the whole run: keep it out of the collections the
    # leak check makes after every test, which then only look at what tests made.
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    private = config.stash.get(_private_tmp, None)
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


_private_tmp = pytest.StashKey[str]()
_before = pytest.StashKey["Snapshot"]()


@dataclass
class Snapshot:
    sockets: dict[int, str]  # fd -> "socket:[inode]"
    threads: set[threading.Thread]
    children: set[int]
    socket_files: set[str]  # in the run's temporary directory


def socket_fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.startswith("socket:"):
            found[int(name)] = target
    return found


def child_processes() -> set[int]:
    children: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                children.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return children


def socket_files(directories: list[str]) -> set[str]:
    found = set()
    for top in directories:
        for root, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                with_mode = os.lstat(path).st_mode if os.path.lexists(path) else 0
                if stat.S_ISSOCK(with_mode):
                    found.add(path)
    return found


_created: dict[int, traceback.StackSummary] = {}  # id(object) -> where it was made
_dead: dict[int, traceback.StackSummary] = {}  # ... for objects being finalized
_refs: dict[int, weakref.ref[Any]] = {}


def record_creation(cls: type) -> None:
    """Make ``cls`` remember the stack each instance was created from."""
    original = cls.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def __init__(self: object, *args: Any, **kwargs: Any) -> None:
        key = id(self)
        if key not in _created:  # SSLSocket runs socket.__init__ inside its own
            frames = traceback.walk_stack(sys._getframe(1))
            _created[key] = traceback.StackSummary.extract(
                frames, limit=TRACE_FRAMES, lookup_lines=False
            )
            # Weak references are cleared before a collected object's finalizer runs (the
            # one that warns "unclosed"): keep the stack a little longer for that warning.
            _refs[key] = weakref.ref(self, functools.partial(_dying, key))
        original(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]


def _dying(key: int, _ref: object) -> None:
    _refs.pop(key, None)
    if (stack := _created.pop(key, None)) is not None:
        _dead[key] = stack


def where(obj: object) -> str:
    stack = _created.get(id(obj)) or _dead.get(id(obj))
    if stack is None:
        return "    (not recorded)"
    lines = []
    for frame, line in zip(stack, stack.format(), strict=True):  # innermost call first
        if "/_pytest/" in frame.filename or "/pluggy/" in frame.filename:
            break  # the test function was the frame before
        lines.append("    " + line.rstrip())
    return "\n".join(lines)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    private = item.config.stash[_private_tmp]
    item.stash[_before] = Snapshot(
        socket_fds(), set(threading.enumerate()), child_processes(), socket_files([private])
    )


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """After the test's fixtures are torn down: fail it if it left anything behind."""
    before = item.stash.get(_before, None)
    if before is None:
        return
    failed = item.stash.get(_call_failed, False)
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    for warning in caught:
        if issubclass(warning.category, ResourceWarning):
            problems.append(
                f"{warning.message}, collected by gc; created at:\n{where(warning.source)}"
            )
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    _dead.clear()
    problems += leaked_threads(before.threads)
    problems += leaked_children(before.children)
    problems += leaked_sockets(before.sockets)
    directories = [item.config.stash[_private_tmp]]
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if tmp_path is not None:
        directories.append(str(tmp_path))
    for path in sorted(socket_files(directories) - before.socket_files):
        problems.append(f"Unix socket file left behind: {path}")
        os.unlink(path)
    if problems and not failed:
        pytest.fail(
            f"{item.nodeid} left {len(problems)} thing(s) behind:\n\n" + "\n\n".join(problems),
            pytrace=False,
        )


_call_failed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if call.when == "call" and report.failed:
        item.stash[_call_failed] = True  # what it holds may be kept alive by the traceback
    return report


def leaked_threads(before: set[threading.Thread]) -> list[str]:
    new = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    deadline = time.monotonic() + JOIN_GRACE
    for thread in new:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [
        f"thread {thread.name!r} (daemon={thread.daemon}) still running; created at:\n"
        f"{where(thread)}"
        for thread in new
        if thread.is_alive()
    ]


def popen_for(pid: int) -> subprocess.Popen[Any] | None:
    for obj in gc.get_objects():
        if isinstance(obj, subprocess.Popen) and obj.pid == pid:
            return obj
    return None


def describe_process(pid: int) -> tuple[str, str]:
    """The command line and state letter of a process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "?", "gone"
    return cmdline, state


def leaked_children(before: set[int]) -> list[str]:
    new = child_processes() - before
    deadline = time.monotonic() + JOIN_GRACE
    problems = []
    for pid in sorted(new):
        cmdline, state = describe_process(pid)
        if state not in ("Z", "gone"):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
            finally:
                os.close(pidfd)
            _, state = describe_process(pid)
        if state == "gone":
            continue  # reaped by its owner meanwhile
        popen = popen_for(pid)
        if popen is not None:  # /proc shows no command line while a child is still in exec
            args = popen.args
            cmdline = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
        what = "exited but never waited for" if state == "Z" else "still running"
        created = where(popen) if popen is not None else "    (not started by subprocess)"
        problems.append(f"child process {pid} ({cmdline}) {what}; created at:\n{created}")
        if popen is not None:
            popen.kill()
            popen.wait(10)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return problems


def leaked_sockets(before: dict[int, str]) -> list[str]:
    new = {fd: inode for fd, inode in socket_fds().items() if before.get(fd) != inode}
    if not new:
        return []
    objects = {
        obj.fileno(): obj
        for obj in gc.get_objects()
        if isinstance(obj, socket.socket) and obj.fileno() in new
    }
    problems = []
    for fd, inode in sorted(new.items()):
        if (sock := objects.get(fd)) is not None:
            problems.append(f"{sock!r} still open; created at:\n{where(sock)}")
            sock.close()
        else:
            problems.append(f"fd {fd} ({inode}, {describe_fd(fd)}) still open, held by no")
            problems[-1] += " Python socket object (an event loop's transport?)"
    return problems


def describe_fd(fd: int) -> str:
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        return repr(exc)
    with dup:
        try:
            return f"{dup.family.name} {dup.type.name} {dup.getsockname()!r} -> {peer(dup)}"
        except OSError as exc:
            return repr(exc)


def peer(sock: socket.socket) -> str:
    try:
        return repr(sock.getpeername())
    except OSError:
        return "no peer"
