"""CPython's own ``test.test_socketserver``, run against sockserve.socketserver."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import subprocess
import sys
import types
import unittest
import warnings
from collections.abc import Iterator

import pytest

import sockserve.socketserver

# Deliberate differences, each excluded by exact name.
EXCLUDED = {
    # Lists the names whose __module__ is "socketserver"; ours live in
    # "sockserve.socketserver". test_socketserver.py::test_all checks __all__ against the
    # stdlib's and against our own module's public classes instead.
    "test_all",
}


@contextlib.contextmanager
def stdlib_suite_on_sockserve() -> Iterator[types.ModuleType]:
    """Import test.test_socketserver fresh with ``socketserver`` being ours; restore after."""
    saved = {name: sys.modules.get(name) for name in ("socketserver", "test.test_socketserver")}
    sys.modules["socketserver"] = sockserve.socketserver
    sys.modules.pop("test.test_socketserver", None)
    try:
        yield importlib.import_module("test.test_socketserver")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def without_excluded(suite: unittest.TestSuite) -> unittest.TestSuite:
    kept = unittest.TestSuite()
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            kept.addTest(without_excluded(test))
        elif getattr(test, "_testMethodName", None) not in EXCLUDED:
            kept.addTest(test)
    return kept


def test_cpython_socketserver_suite_passes() -> None:
    pytest.importorskip("test.support", reason="CPython's test package is not installed")
    try:
        importlib.util.find_spec("test.test_socketserver")
    except ModuleNotFoundError:
        pytest.skip("test.test_socketserver is not installed")
    with stdlib_suite_on_sockserve() as module, warnings.catch_warnings():
        # The suite forks while other threads run (a DeprecationWarning on 3.12+) and its
        # helpers warn about leftover threads and children; none of it is ours to fix.
        warnings.simplefilter("ignore")
        assert module.socketserver is sockserve.socketserver
        suite = without_excluded(unittest.defaultTestLoader.loadTestsFromModule(module))
        stream = io.StringIO()
        result = unittest.TextTestRunner(stream=stream, verbosity=2).run(suite)
    report = "\n".join(
        f"{kind} {test.id()}:\n{trace}"
        for kind, pairs in (("FAIL", result.failures), ("ERROR", result.errors))
        for test, trace in pairs
    )
    assert result.wasSuccessful(), report + "\n" + stream.getvalue()
    assert result.testsRun >= 20, stream.getvalue()
    if sys.platform == "linux":  # fork and Unix sockets exist: nothing may be skipped
        assert not result.skipped, result.skipped


PATCHED_SUITE = """
import sys, unittest, importlib
import sockserve, sockserve.socketserver
sockserve.patch()
module = importlib.import_module(sys.argv[1])
server = importlib.import_module(sys.argv[2])
assert issubclass(getattr(server, sys.argv[3]), sockserve.socketserver.TCPServer), sys.argv[3]
suite = unittest.defaultTestLoader.loadTestsFromModule(module)
result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
sys.exit(0 if result.wasSuccessful() and result.testsRun >= 20 else 1)
"""


@pytest.mark.parametrize(
    ("suite", "server", "server_class"),
    [
        ("test.test_httpservers", "http.server", "HTTPServer"),
        ("test.test_wsgiref", "wsgiref.simple_server", "WSGIServer"),
    ],
)
def test_stdlib_users_pass_their_own_suites_when_patched(
    suite: str, server: str, server_class: str
) -> None:
    """CPython's tests for modules built on socketserver, with patch() applied first, in
    a fresh interpreter so nothing imported the stdlib module before."""
    try:
        importlib.util.find_spec(suite)
    except ModuleNotFoundError:
        pytest.skip(f"{suite} is not installed")
    result = subprocess.run(
        [sys.executable, "-c", PATCHED_SUITE, suite, server, server_class],
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
