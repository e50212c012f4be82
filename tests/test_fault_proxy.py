"""sockserve.testing.FaultProxy: each fault, seen from the server's side over real sockets."""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import pytest

from sockserve import LineHandler, StreamHandler
from sockserve.process import new_event_loop
from sockserve.testing import FaultProxy, serve

WAIT = 10.0  # bound on every wait for the server's report


class Upper(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        return line.upper()


def reporting(reports: queue.Queue[Any]) -> type[StreamHandler]:
    """A stream handler that reports each chunk it reads, then "eof"."""

    class Report(StreamHandler):
        async def handle(self) -> None:
            while chunk := await self.read(65536):
                reports.put(chunk)
                if chunk.endswith(b"\n"):
                    self.write(b"ok\n")
            reports.put("eof")

    return Report


def chunks_until(reports: queue.Queue[Any], end: object) -> list[Any]:
    seen: list[Any] = []
    while not seen or seen[-1] != end:
        seen.append(reports.get(timeout=WAIT))
    return seen


def test_passes_traffic_through_unchanged() -> None:
    with serve(Upper) as server, FaultProxy(server) as proxy:
        with proxy.connect() as client:
            payload = b"a" * 50_000 + b"\n"
            client.send(payload)
            assert client.readline() == payload.upper()


def test_latency_delays_each_direction() -> None:
    with serve(Upper) as server, FaultProxy(server, latency=0.2) as proxy:
        with proxy.connect() as client:
            started = time.monotonic()
            assert client.request(b"slow") == b"SLOW\n"
            assert time.monotonic() - started >= 0.4  # 0.2 s there, 0.2 s back


@pytest.mark.parametrize(("fault", "piece"), [({"drip": True}, 1), ({"split": 7}, 7)])
def test_drip_and_split_cut_writes_into_pieces(fault: dict[str, Any], piece: int) -> None:
    reports: queue.Queue[Any] = queue.Queue()
    message = b"x" * 69 + b"\n"
    with serve(reporting(reports)) as server, FaultProxy(server, **fault) as proxy:
        with proxy.connect() as client:
            client.send(message)
            assert client.readline() == b"ok\n"
            client.shutdown_write()
            chunks = chunks_until(reports, "eof")[:-1]
    assert b"".join(chunks) == message
    # The pieces leave the proxy 1 ms apart; a loaded receiver may find some of them
    # together, so only a lower bound on their number is certain.
    assert len(chunks) >= 3
    assert min(len(chunk) for chunk in chunks) <= piece


def test_reset_after_n_bytes() -> None:
    reports: queue.Queue[Any] = queue.Queue()
    with serve(reporting(reports)) as server, FaultProxy(server, reset_after=1000) as proxy:
        with proxy.connect() as client:
            client.send(b"y" * 5000)
            with pytest.raises(ConnectionResetError):
                client.readline()
            seen = chunks_until(reports, "eof")
            closed = server.call(lambda: dict(server.server.stats.closed_by_reason))
    assert sum(len(chunk) for chunk in seen[:-1]) == 1000
    assert closed == {"error": 1}  # ECONNRESET, not an orderly end of stream


def test_half_close_after_n_bytes() -> None:
    reports: queue.Queue[Any] = queue.Queue()
    with serve(reporting(reports)) as server, FaultProxy(server, half_close_after=10) as proxy:
        with proxy.connect() as client:
            client.send(b"0123456789abcdef\n")
            seen = chunks_until(reports, "eof")
            assert b"".join(seen[:-1]) == b"0123456789"
            assert client.wait_closed() == b""  # the server ended its side too


class Flood(StreamHandler):
    """Writes ``n`` bytes on request and reports when its writes were all accepted."""

    done: queue.Queue[int]

    async def handle(self) -> None:
        size = int(await self.readline())
        for _ in range(size // 65536):
            self.write(b"z" * 65536)
            await self.drain()
        self.done.put(size)


def test_stall_stops_reading_from_the_server() -> None:
    done: queue.Queue[int] = queue.Queue()
    size = 64 * 1024 * 1024  # more than every socket buffer on the way can hold

    class Flooding(Flood):
        pass

    Flooding.done = done
    with serve(Flooding) as server, FaultProxy(server, stalled=True) as proxy:
        with proxy.connect() as client:
            client.send(b"%d\n" % size)
            with pytest.raises(TimeoutError):  # nothing passes the stalled proxy
                client.read(1, timeout=0.5)
            assert done.empty()  # and the server is held back
            assert proxy.stalled
            proxy.resume()
            assert len(client.read(size, timeout=WAIT)) == size
            assert done.get(timeout=WAIT) == size


class Address(LineHandler):
    def handle_line(self, line: bytes) -> bytes:
        host, port = self.client_address[:2]
        return f"{host} {port}\n".encode()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_names_the_client(version: str) -> None:
    with serve(Address, proxy_protocol=version) as server:
        source = ("203.0.113.7", 4242)
        with FaultProxy(server, proxy_header=version, proxy_source=source) as proxy:  # type: ignore[arg-type]
            with proxy.connect() as client:
                assert client.request(b"who") == b"203.0.113.7 4242\n"
        with FaultProxy(server, proxy_header=version) as proxy:  # type: ignore[arg-type]
            with proxy.connect() as client:
                host, port = client.sock.getsockname()[:2]
                assert client.request(b"who") == f"{host} {port}\n".encode()


def test_raw_proxy_header_bytes_are_sent_as_given() -> None:
    with (
        serve(Upper, proxy_protocol="v1") as server,
        FaultProxy(server, proxy_header=b"PROXY garbage\r\n") as proxy,
    ):
        with proxy.connect() as client:
            # The header goes out as the proxy connects: the server may close before any
            # byte of the client's could be sent, so the client only waits.
            assert client.wait_closed() == b""  # a bad header closes the connection


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_proxies_and_leaves_nothing_behind(unix: bool) -> None:
    new_event_loop("auto").close()  # uvloop's first loop opens a pipe kept for the process
    threads = set(threading.enumerate())
    fds = set(os.listdir("/proc/self/fd"))
    with serve(Upper, unix=unix) as server, FaultProxy(server, split=2) as proxy:
        assert isinstance(proxy.target, str) == unix
        with proxy.connect() as client:
            assert client.request(b"through the proxy") == b"THROUGH THE PROXY\n"
        proxy.connect().send(b"left open\n")  # closed with the proxy
    assert set(threading.enumerate()) - threads == set()
    assert set(os.listdir("/proc/self/fd")) - fds == set()
