"""sockserve.patch(): stdlib modules built on socketserver get sockserve's classes."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import pathlib
import sys
import threading
import time
import urllib.request
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import pytest

import sockserve.socketserver
from sockserve.patch import is_patched, patch, unpatch

TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def restore_socketserver() -> Iterator[None]:
    """Leave sys.modules["socketserver"] as the test found it, whatever happens."""
    before = sys.modules.get("socketserver")
    yield
    unpatch()
    if before is None:
        sys.modules.pop("socketserver", None)
    else:
        sys.modules["socketserver"] = before


@contextlib.contextmanager
def fresh_import(name: str) -> Iterator[Any]:
    """Import ``name`` anew; afterwards put back every module as it was before."""
    saved = dict(sys.modules)
    saved.pop("socketserver", None)  # restore_socketserver takes care of that one
    for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
        del sys.modules[loaded]
    try:
        yield importlib.import_module(name)
    finally:
        for loaded in [n for n in sys.modules if n not in saved and n != "socketserver"]:
            del sys.modules[loaded]
        for loaded, module in saved.items():
            if sys.modules.get(loaded) is not module:
                sys.modules[loaded] = module
        for loaded, module in saved.items():  # package attributes rebound by the import
            package, _, attr = loaded.rpartition(".")
            if package in saved and getattr(saved[package], attr, None) is not module:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(saved[package], attr, module)


@contextlib.contextmanager
def serving(server: Any) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield
    finally:
        started = time.perf_counter()
        server.shutdown()
        elapsed = time.perf_counter() - started
        thread.join(TIMEOUT)
        server.server_close()
        assert not thread.is_alive()
        assert elapsed < 0.05, f"shutdown took {elapsed * 1000:.1f} ms"


def test_patch_and_unpatch_are_idempotent() -> None:
    before = sys.modules.get("socketserver")
    patch()
    patch()
    assert is_patched()
    import socketserver

    assert socketserver is sockserve.socketserver
    unpatch()
    unpatch()
    assert not is_patched()
    assert sys.modules.get("socketserver") is before


def test_unpatch_restores_an_absent_module() -> None:
    saved = sys.modules.pop("socketserver", None)
    try:
        patch()
        assert sys.modules["socketserver"] is sockserve.socketserver
        unpatch()
        assert "socketserver" not in sys.modules
    finally:
        if saved is not None:
            sys.modules["socketserver"] = saved


def test_http_server_serves_a_get(tmp_path: pathlib.Path) -> None:
    (tmp_path / "hello.txt").write_bytes(b"hello from sockserve\n")
    patch()
    with fresh_import("http.server") as http_server:
        assert http_server.socketserver is sockserve.socketserver
        bases = http_server.ThreadingHTTPServer.__mro__
        assert sockserve.socketserver.ThreadingMixIn in bases
        assert sockserve.socketserver.TCPServer in bases

        handler = functools.partial(http_server.SimpleHTTPRequestHandler, directory=str(tmp_path))
        server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        with serving(server):
            host, port = server.server_address[:2]
            url = f"http://{host}:{port}/hello.txt"
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                assert response.status == 200
                assert response.read() == b"hello from sockserve\n"
    unpatch()
    with fresh_import("http.server") as http_server:
        assert http_server.socketserver is not sockserve.socketserver


def test_xmlrpc_server_serves_a_call() -> None:
    patch()
    with fresh_import("xmlrpc.server") as xmlrpc_server:
        server = xmlrpc_server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
        assert sockserve.socketserver.TCPServer in type(server).__mro__
        server.register_function(pow)
        with serving(server):
            host, port = server.server_address[:2]
            with xmlrpc.client.ServerProxy(f"http://{host}:{port}/") as proxy:
                assert proxy.pow(2, 10) == 1024


def test_warns_about_modules_imported_before(caplog: pytest.LogCaptureFixture) -> None:
    with fresh_import("http.server") as http_server:  # unpatched: the stdlib's classes
        assert http_server.socketserver is not sockserve.socketserver
        caplog.set_level(logging.WARNING, logger="sockserve.patch")
        patch()
        [record] = [r for r in caplog.records if r.name == "sockserve.patch"]
        assert "http.server" in record.getMessage()


def test_no_warning_when_nothing_depends_on_it(caplog: pytest.LogCaptureFixture) -> None:
    saved = sys.modules.pop("socketserver", None)
    try:
        caplog.set_level(logging.WARNING, logger="sockserve.patch")
        patch()
        assert not [r for r in caplog.records if r.name == "sockserve.patch"]
    finally:
        unpatch()
        if saved is not None:
            sys.modules["socketserver"] = saved
