"""The connection ledger on its own: slots, capacity callbacks, accounting, idle waits."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from sockserve.lifecycle import ConnectionLedger, RateLimitedLog
from sockserve.settings import Settings


def test_capacity_changes_at_the_limit_only() -> None:
    calls: list[int] = []
    ledger = ConnectionLedger(Settings(max_connections=2), lambda: calls.append(ledger.open))
    ledger.accepted()
    assert (calls, ledger.full) == ([], False)
    ledger.accepted()
    assert (calls, ledger.full) == ([2], True)  # the last slot filled: pause accepting
    ledger.closed(("127.0.0.1", 1), "tcp://x", 0.0, 3, 4, "eof")
    assert (calls, ledger.full) == ([2, 1], False)  # a slot freed at the limit: accept again
    ledger.closed(("127.0.0.1", 2), "tcp://x", 0.0, 5, 6, "denied: by rule")
    assert calls == [2, 1]
    stats = ledger.stats
    assert stats.connections_total == 2
    assert (stats.bytes_received, stats.bytes_sent) == (8, 10)
    assert stats.closed_by_reason == {"eof": 1, "denied": 1}


def test_closed_writes_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sockserve.access")
    ledger = ConnectionLedger(Settings(access_log=True), lambda: None)
    ledger.accepted()
    ledger.closed(("127.0.0.1", 5), "tcp://127.0.0.1:1", 0.25, 1, 2, "idle timeout")
    assert [r.getMessage() for r in caplog.records] == [
        "127.0.0.1:5 tcp://127.0.0.1:1 250.000ms in=1 out=2 idle timeout"
    ]


def test_handler_failed_counts_and_logs_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    ledger = ConnectionLedger(Settings(), lambda: None)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        ledger.handler_failed(("127.0.0.1", 7), exc)
    assert ledger.stats.handler_errors == 1
    assert caplog.records[0].exc_info is not None


def test_wait_idle_returns_when_the_last_connection_closes() -> None:
    async def main() -> None:
        ledger = ConnectionLedger(Settings(), lambda: None)
        ledger.loop = loop = asyncio.get_running_loop()
        ledger.accepted()
        ledger.stopping = True
        loop.call_soon(ledger.closed, None, "tcp://x", 0.0, 0, 0, "eof")
        await asyncio.wait_for(ledger.wait_idle(loop.time() + 30), 10)
        assert ledger.open == 0

    asyncio.run(main())


def test_stop_waiting_cuts_wait_idle_short() -> None:
    async def main() -> None:
        ledger = ConnectionLedger(Settings(), lambda: None)
        ledger.loop = loop = asyncio.get_running_loop()
        ledger.accepted()
        loop.call_soon(ledger.stop_waiting)
        await asyncio.wait_for(ledger.wait_idle(loop.time() + 30), 10)
        assert ledger.open == 1
        await asyncio.wait_for(ledger.wait_idle(loop.time() + 30), 10)  # at once from now

    asyncio.run(main())


def test_call_from_thread_runs_in_the_loop() -> None:
    async def main() -> None:
        ledger = ConnectionLedger(Settings(), lambda: None)
        ledger.loop = asyncio.get_running_loop()
        done = asyncio.Event()
        seen: list[bool] = []

        def report() -> None:
            seen.append(threading.current_thread() is threading.main_thread())
            done.set()

        thread = threading.Thread(target=ledger.call_from_thread, args=(report,))
        thread.start()
        await asyncio.wait_for(done.wait(), 10)
        thread.join(10)
        assert seen == [True]

    asyncio.run(main())


def test_rate_limited_log_from_many_threads(caplog: pytest.LogCaptureFixture) -> None:
    """One line for a burst from any number of threads, the rest counted in the next."""
    caplog.set_level(logging.INFO, "sockserve.server")
    log = RateLimitedLog(interval=3600.0)

    def flood() -> None:
        for _ in range(500):
            log("refused %s", "peer")

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert [r.getMessage() for r in caplog.records] == ["refused peer"]
    assert log.suppressed == 4 * 500 - 1
    log.last -= 3600.0
    log("refused %s", "again")
    assert caplog.records[-1].getMessage() == "refused again (1999 more since the last report)"
