"""The ReadyQueue's leader: its turn to run is not lost when its slot is taken back early."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sockserve import ready_queue
from sockserve.ready_queue import ReadyQueue

pytestmark = pytest.mark.skipif(not ready_queue.HAVE_EPOLL, reason="the ReadyQueue needs epoll")


def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def queue() -> Iterator[ReadyQueue]:
    """A queue with one run slot; its monitor is run by hand, the loop never runs."""
    loop = asyncio.new_event_loop()
    queue = ReadyQueue(loop, slots=1)
    try:
        yield queue
    finally:
        queue.close()
        loop.close()


def test_a_leader_granted_its_slot_runs_even_if_the_monitor_took_the_slot_back(
    queue: ReadyQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader is granted a slot and kicked out of epoll, but is descheduled until the
    monitor has taken that slot back (held past HOLD): it must still return to run its
    handler, not go on polling for good with its own socket disarmed (a handler thread
    that outlived the server, its socket still open)."""
    pairs = [socket.socketpair() for _ in range(3)]
    running, leader, queued = (queue.register(ours.fileno()) for ours, _ in pairs)
    returned: list[bool] = []
    kicks: list[tuple[Any, bool]] = []
    wake = queue._wake

    def late_kicks(wakes: list[tuple[Any, bool]]) -> None:
        """The kicked leader is descheduled: its kick is delivered later."""
        kicks.extend(w for w in wakes if w[1])
        wake([w for w in wakes if not w[1]])

    def lead() -> None:
        returned.append(queue.wait_readable(leader, None))

    lead_thread = threading.Thread(target=lead, name="test-leader")
    queue_thread = threading.Thread(target=queue.enter, args=(queued,), name="test-queued")
    try:
        queue.enter(running)  # the one slot, held by a handler busy elsewhere
        pairs[1][1].sendall(b"x")  # the leader's client sends: it queues for the slot
        lead_thread.start()
        until(lambda: leader in queue.fifo)
        queue_thread.start()  # someone behind it keeps the monitor going
        until(lambda: queued in queue.fifo)
        monkeypatch.setattr(queue, "_wake", late_kicks)
        running.granted = 0.0
        queue._monitor()  # takes the busy handler's slot back: granted to the leader
        assert queue.holders == {leader} and len(kicks) == 1
        leader.granted = 0.0
        queue._monitor()  # before the leader woke: its slot goes to the next
        assert queue.holders == {queued}
        monkeypatch.undo()
        wake(kicks)
        lead_thread.join(5)
        assert returned == [True], "the leader lost its turn and polls on for good"
    finally:
        monkeypatch.undo()
        for waiter in (running, queued):
            queue.unregister(waiter)
        if lead_thread.is_alive():  # unstick it: its socket readable again, a slot free
            queue.epoll.modify(leader.fd, select.EPOLLIN | select.EPOLLONESHOT)
            os.eventfd_write(queue.kick, 1)
        for thread in (lead_thread, queue_thread):
            if thread.ident is not None:
                thread.join(5)
        queue.unregister(leader)
        for pair in pairs:
            for sock in pair:
                sock.close()
