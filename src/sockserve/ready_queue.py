"""The ready queue: which blocking handler thread runs next, and when.

A thousand threads each blocked in ``recv`` would all wake at once when their clients
answer and fight over the interpreter lock, unfairly. Here a handler thread whose read
finds nothing parks on its own lock, and the ``ReadyQueue`` wakes it once its socket is
readable, in the order the sockets became readable, with at most ``RUN_SLOTS`` threads
running Python at once; a slot held past ``HOLD`` goes to the next ready client.
``Idle`` is one handler socket's side of it: its place in the queue and its timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["HAVE_EPOLL", "HOLD", "RUN_SLOTS", "Idle", "IdleTimeout", "ReadyQueue"]

# Handler threads running Python at once. Two lets one thread's system call overlap
# another's Python; more only adds contention for the interpreter lock (measured in
# docs/benchmarks.md: 2 costs less CPU per round trip than 4 at 64 and 1000 clients).
RUN_SLOTS = 2
# A slot held this long without the thread coming back to read is given to the next
# ready client: its holder is busy with something else (sleeping, a database call).
HOLD = 0.002
# With this many stream connections or fewer, threads wait for input in the kernel's
# recv, as socketserver's do: so few wake together that the queue's hand-offs would cost
# more than the contention they save (docs/benchmarks.md, the 64-client point).
DIRECT_WAIT_MAX = 128
HAVE_EPOLL = (
    hasattr(select, "epoll") and hasattr(os, "eventfd") and bool(getattr(socket, "MSG_DONTWAIT", 0))
)


class IdleTimeout(TimeoutError):
    """The client sent nothing for ``--idle-timeout`` seconds (raised from a read)."""


# Waiter states.
_RUNNING, _PARKED, _QUEUED, _LEADING, _LEADING_QUEUED = range(5)


class _Waiter:
    """A handler thread's place in the ReadyQueue."""

    __slots__ = ("fd", "granted", "lock", "pending", "promote", "slot", "state")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.lock.acquire()  # released (by another thread) to wake this one
        self.state = _RUNNING
        self.slot = False
        self.granted = 0.0
        self.promote = False  # woken to become the leader
        self.pending = False  # readable before it parked


class ReadyQueue:
    """Wakes handler threads whose sockets are readable, in arrival order, a few at once.

    One shared epoll holds every connection, armed one-shot while its thread waits.
    Leader/follower: the first thread to park with nobody polling becomes the leader
    and waits in ``epoll.poll``; the others wait on their own locks. The leader queues
    the ready ones and hands out run slots; a thread giving its slot up hands it to the
    head of the queue directly. So the event loop is not involved on the hot path, and
    a client answered wakes one thread, not a crowd. The event loop only runs a monitor
    while clients wait for a slot, taking slots back from holders that keep them past
    ``HOLD``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: int = RUN_SLOTS) -> None:
        self.loop = loop
        self.slots = slots
        self.running = 0
        self.epoll = select.epoll()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.kick, select.EPOLLIN)
        self.waiters: dict[int, _Waiter] = {}
        self.fifo: collections.deque[_Waiter] = collections.deque()
        self.parked: set[_Waiter] = set()
        self.holders: set[_Waiter] = set()
        self.leader: _Waiter | None = None
        self.monitoring = False
        self.lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Clients with input ready, waiting for a run slot."""
        return len(self.fifo)

    def register(self, fd: int) -> _Waiter:
        waiter = _Waiter(fd)
        with self.lock:
            self.waiters[fd] = waiter
        self.epoll.register(fd, 0)
        return waiter

    def unregister(self, waiter: _Waiter) -> None:
        """The handler returned: give up its slot, forget the socket (before closing it)."""
        with self.lock:
            self.waiters.pop(waiter.fd, None)
            self._unslot(waiter)
            wake = self._dispatch()
        self._wake(wake)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(waiter.fd)

    def close(self) -> None:
        self.epoll.close()
        os.close(self.kick)

    def give_up(self, waiter: _Waiter) -> None:
        """The thread is about to wait outside the queue: its slot goes to the next."""
        with self.lock:
            self._unslot(waiter)
            wake = self._dispatch()
        self._wake(wake)

    def enter(self, waiter: _Waiter) -> None:
        """Wait for a run slot (a new connection, before its handler starts)."""
        with self.lock:
            waiter.state = _QUEUED
            self.fifo.append(waiter)
            wake = self._dispatch()
            mine = self._take(wake, waiter)
        self._wake(wake)
        if not mine:
            self._wait(waiter, None)

    def wait_readable(self, waiter: _Waiter, timeout: float | None) -> bool:
        """Park until the socket is readable and a slot is ours; False after ``timeout``
        seconds with nothing to read."""
        self.epoll.modify(waiter.fd, select.EPOLLIN | select.EPOLLONESHOT)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self._unslot(waiter)
            if waiter.pending:  # the leader saw it readable before it parked
                waiter.pending = False
                waiter.state = _QUEUED
                self.fifo.append(waiter)
                wake = self._dispatch()
                lead, ready = False, self._take(wake, waiter)
            else:
                wake = self._dispatch()
                ready = False
                lead = self.leader is None
                if lead:
                    self.leader = waiter
                    waiter.state = _LEADING
                else:
                    waiter.state = _PARKED
                    self.parked.add(waiter)
        self._wake(wake)
        if ready:
            return True
        if lead:
            return self._lead(waiter, deadline)
        return self._wait(waiter, deadline)

    # -- internals (``self.lock`` held where noted) -------------------------------------

    def _unslot(self, waiter: _Waiter) -> None:
        """Under the lock: give the slot up, if it still has one."""
        if waiter.slot:
            waiter.slot = False
            self.running -= 1
            self.holders.discard(waiter)

    def _dispatch(self) -> list[tuple[_Waiter, bool]]:
        """Under the lock: grant free slots to the queue's head; returns whom to wake
        (and whether by kicking the leader out of epoll)."""
        fifo = self.fifo
        wake: list[tuple[_Waiter, bool]] = []
        if fifo and self.running < self.slots:
            now = time.monotonic()
            while fifo and self.running < self.slots:
                waiter = fifo.popleft()
                self.running += 1
                waiter.slot = True
                waiter.granted = now
                self.holders.add(waiter)
                wake.append((waiter, waiter.state == _LEADING_QUEUED))
                waiter.state = _RUNNING
        if fifo and not self.monitoring:
            self.monitoring = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: stopping
                self.loop.call_soon_threadsafe(self._monitor_soon)
        return wake

    @staticmethod
    def _take(wake: list[tuple[_Waiter, bool]], waiter: _Waiter) -> bool:
        """Under the lock: True (and off the wake list) if ``waiter`` was granted."""
        for i, (granted, _kick) in enumerate(wake):
            if granted is waiter:
                del wake[i]
                return True
        return False

    def _wake(self, wake: list[tuple[_Waiter, bool]]) -> None:
        for waiter, kick in wake:
            if kick:
                os.eventfd_write(self.kick, 1)
            else:
                waiter.lock.release()

    def _promote(self) -> _Waiter | None:
        """Under the lock: the leader is leaving; a parked follower takes over polling."""
        if self.leader is None and self.parked:
            follower = self.parked.pop()
            self.leader = follower
            follower.state = _LEADING
            follower.promote = True
            return follower
        return None

    def _wait(self, waiter: _Waiter, deadline: float | None) -> bool:
        if deadline is None:
            waiter.lock.acquire()
        elif not waiter.lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            with self.lock:
                if waiter.state == _PARKED:  # nothing arrived in time
                    self.parked.discard(waiter)
                    waiter.state = _RUNNING
                    return False
            # Ready and queued for a slot, granted, or promoted: the wake-up is coming.
            waiter.lock.acquire()
        if waiter.promote:
            waiter.promote = False
            return self._lead(waiter, deadline)
        return True

    def _lead(self, me: _Waiter, deadline: float | None) -> bool:
        epoll, waiters, kick = self.epoll, self.waiters, self.kick
        while True:
            timeout = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            events = epoll.poll(timeout, 1024)
            with self.lock:
                for fd, _mask in events:
                    if fd == kick:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(kick)
                        continue
                    waiter = waiters.get(fd)
                    if waiter is None:
                        continue
                    if waiter is me:
                        me.state = _LEADING_QUEUED
                        self.fifo.append(me)
                    elif waiter.state == _PARKED:
                        self.parked.discard(waiter)
                        waiter.state = _QUEUED
                        self.fifo.append(waiter)
                    elif waiter.state == _RUNNING:
                        waiter.pending = True
                wake = self._dispatch()
                self._take(wake, me)
                # Granted now, or by a thread that kicked us: dispatched, so RUNNING. Not
                # me.slot: the monitor may have taken the slot back before we looked.
                mine = me.state == _RUNNING
                if me.state == _LEADING_QUEUED:
                    deadline = None  # our input is here: not idle, wait for the slot
                timed_out = (
                    not mine
                    and me.state == _LEADING
                    and deadline is not None
                    and time.monotonic() >= deadline
                )
                follower = None
                if mine or timed_out:
                    me.state = _RUNNING
                    self.leader = None
                    follower = self._promote()
            self._wake(wake)
            if follower is not None:
                follower.lock.release()
            if mine or timed_out:
                return mine

    def _monitor_soon(self) -> None:
        self.loop.call_later(HOLD, self._monitor)

    def _monitor(self) -> None:
        """In the event loop, while clients wait for a slot: take slots back from holders
        that have had them for ``HOLD`` (they are blocked on something else)."""
        now = time.monotonic()
        with self.lock:
            for waiter in list(self.holders):
                if now - waiter.granted >= HOLD:
                    self._unslot(waiter)
            wake = self._dispatch()
            again = bool(self.fifo)
            self.monitoring = again
        self._wake(wake)
        if again:
            self.loop.call_later(HOLD, self._monitor)


class Idle:
    """What a handler socket needs to wait for input: the queue, its place, the timeout."""

    __slots__ = ("expired", "idle_timeout", "on_wait", "queue", "waiter")

    def __init__(self, queue: ReadyQueue | None, fd: int, idle_timeout: float | None) -> None:
        self.queue = queue
        self.waiter = queue.register(fd) if queue is not None else None
        self.idle_timeout = idle_timeout
        self.expired = False
        # Called (in the handler's thread) each time it is about to wait for input.
        self.on_wait: Callable[[], None] | None = None

    def wait(self, fd: int, timeout: float | None) -> None:
        """Return once ``fd`` is readable; TimeoutError after ``timeout`` (the handler's
        own) or IdleTimeout after the idle timeout."""
        if self.on_wait is not None:
            self.on_wait()
        limit = self.idle_timeout if timeout is None else timeout
        if self.queue is not None and self.waiter is not None:
            ready = self.queue.wait_readable(self.waiter, limit)
        else:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            ready = bool(poller.poll(None if limit is None else limit * 1000))
        if ready:
            return
        if timeout is not None:
            raise TimeoutError("timed out")
        self.expired = True
        raise IdleTimeout(f"idle for {limit:.1f} s")

    def direct(self) -> bool:
        """Whether to wait for input in the kernel (few connections, or no epoll); the
        run slot, if any, is given up first."""
        if self.on_wait is not None:
            self.on_wait()
        queue, waiter = self.queue, self.waiter
        if queue is None or waiter is None:
            return True
        if len(queue.waiters) > DIRECT_WAIT_MAX:
            return False
        if waiter.slot:
            queue.give_up(waiter)
        return True

    def expire(self) -> None:
        """A kernel wait ran out (SO_RCVTIMEO): the connection was idle."""
        self.expired = True
        raise IdleTimeout(f"idle for {self.idle_timeout or 0:.1f} s")

    def release(self) -> None:
        if self.queue is not None and self.waiter is not None:
            self.queue.unregister(self.waiter)
            self.waiter = None
