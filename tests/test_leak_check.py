"""The leak check itself: a test that leaves something behind fails, and says what and
where it was made; a test that cleans up passes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from helpers import TESTS, child_environment

LEAKY = textwrap.dedent(
    """
    import socket, subprocess, sys, threading

    import leakcheck

    leakcheck.JOIN_GRACE = 0.2  # the leaked thread below would end in a minute
    kept = []
    stop = threading.Event()


    def test_keeps_a_socket_open():
        kept.append(socket.socket())


    def test_drops_a_socket_in_a_cycle():
        cycle = [socket.socket()]
        cycle.append(cycle)


    def test_leaves_a_thread_running():
        threading.Thread(target=stop.wait, args=(60,), name="forgotten").start()


    def test_leaves_a_child_running():
        kept.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))


    def test_leaves_a_socket_file(tmp_path):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(tmp_path / "left.sock"))


    def test_cleans_up(tmp_path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
        thread = threading.Thread(target=stop.wait, args=(0,))
        thread.start()
        thread.join()
        subprocess.run([sys.executable, "-c", "pass"], check=True)


    def test_zz_last():
        stop.set()  # lets the forgotten thread end before the run does
    """
)


def test_each_kind_of_leak_fails_the_test_that_left_it(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    pytest = [sys.executable, "-m", "pytest", "-p", "leakcheck", "-p", "no:cacheprovider"]
    # A short base directory: a Unix socket path has room for about 100 bytes, and this
    # test's own tmp_path is deep already under pytest-xdist.
    base = tempfile.mkdtemp(prefix="leaky-")
    try:
        result = subprocess.run(
            [*pytest, "-q", "-rE", "--basetemp", base, "test_leaky.py"],
            cwd=tmp_path,
            env=child_environment({"PYTHONPATH": str(TESTS)}),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = result.stdout
    assert "7 passed, 5 errors" in out, out  # a leak is an error at its test's teardown
    for test, leak, line in [
        ("test_keeps_a_socket_open", "<socket.socket fd=", "kept.append(socket.socket())"),
        ("test_drops_a_socket_in_a_cycle", "unclosed <socket.socket", "cycle = [socket."),
        ("test_leaves_a_thread_running", "thread 'forgotten'", "threading.Thread(target="),
        ("test_leaves_a_child_running", "time.sleep(60)) still running", "subprocess.Popen("),
        ("test_leaves_a_socket_file", "Unix socket file left behind", ""),
    ]:
        report = out.split(f"test_leaky.py::{test} left 1 thing(s) behind:", 1)[1]
        report = report.split("test_leaky.py::", 1)[0]
        assert leak in report, (test, report)
        assert line in report, (test, report)  # where it was made
