"""Per-client admission and global accept pacing, sans-IO: every call takes ``now``.

``Admission`` answers "may this client open one more connection?" from two limits, each
off at 0: concurrent connections per client and new connections per second per client.
``Pacer`` answers "may the server accept another connection now, and if not, when?" for
the global ``--connection-rate``; those that must wait stay in the kernel backlog.

A client is its IP address; IPv6 clients are grouped by /64, the block one subscriber
usually gets. Unix-socket peers have no address and are never limited.

With workers, the supervisor holds the one table (``AdmissionBroker``, sans-IO too) and
each worker asks it through a ``RemoteAdmission``, the only part here that does I/O.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from collections import OrderedDict, deque
from typing import Any

__all__ = [
    "ANSWER_WAIT",
    "MAX_RATE_CLIENTS",
    "Admission",
    "AdmissionBroker",
    "BrokerLink",
    "Pacer",
    "RemoteAdmission",
    "client_key",
    "plain_host",
]

# Clients whose connection rate is remembered after they have no connection open. Past
# it the client quiet for longest is forgotten (it starts again with a full allowance).
# About 150 bytes each: 65,536 clients cost about 10 MiB.
MAX_RATE_CLIENTS = 65_536

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
# How long a worker waits for the supervisor's answer before admitting the connection
# anyway (the answer takes microseconds; only a stalled supervisor is this slow).
ANSWER_WAIT = 1.0

# Rounding slack: a token this close to whole is whole (a timer set for the exact wait
# must find it there).
_EPSILON = 1e-9


def plain_host(host: str) -> str:
    """An IP address without its ``%scope``, and an IPv4-mapped IPv6 address (a
    dual-stack socket's IPv4 peer) as the IPv4 address it is; anything else as given."""
    host = host.split("%", 1)[0]
    if ":" in host:
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            return host
        if packed.startswith(_V4_MAPPED):
            return socket.inet_ntop(socket.AF_INET, packed[12:])
    return host


def client_key(address: Any) -> str | bytes | None:
    """The client an address belongs to: the IPv4 text, 8 bytes of IPv6 /64, None (Unix)."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return None
    host = plain_host(address[0])
    if ":" not in host:
        return host
    try:
        return socket.inet_pton(socket.AF_INET6, host)[:8]
    except OSError:
        return host


class _Bucket:
    """A token bucket: ``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last

    def take(self, now: float, rate: float, burst: float) -> bool:
        tokens = min(burst, self.tokens + (now - self.last) * rate)
        self.last = now
        if tokens < 1.0 - _EPSILON:
            self.tokens = tokens
            return False
        self.tokens = max(0.0, tokens - 1.0)
        return True


class Admission:
    """Counts each client's open connections and recent connection rate.

    Memory: one entry per client with a connection open (so at most one per open
    connection), plus at most ``max_rate_clients`` entries of rate history, each dropped
    once its client's allowance has refilled.
    """

    def __init__(
        self,
        max_per_client: int = 0,
        rate_per_client: float = 0.0,
        max_rate_clients: int | None = None,
    ) -> None:
        self.max_per_client = max_per_client
        self.rate = rate_per_client
        self.burst = max(1.0, rate_per_client)
        # A bucket left alone this long is full again, the same as no entry at all.
        self.refill = self.burst / rate_per_client if rate_per_client else 0.0
        self.max_rate_clients = max_rate_clients or MAX_RATE_CLIENTS
        self.open: dict[str | bytes, int] = {}
        self.buckets: OrderedDict[str | bytes, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.max_per_client or self.rate)

    def __len__(self) -> int:
        """Entries held, for the memory bound: open counts plus rate histories."""
        return len(self.open) + len(self.buckets)

    def admit(self, address: Any, now: float) -> str | None:
        """Count a new connection from ``address``: None if admitted, else why not.

        An admitted connection must be ``release``d once it closes; a refused one not.
        """
        key = client_key(address)
        if key is None:
            return None
        count = self.open.get(key, 0)
        if self.max_per_client and count >= self.max_per_client:
            return "too many connections from client"
        if self.rate and not self._take(key, now):
            return "client connection rate"
        self.open[key] = count + 1
        return None

    def count(self, address: Any) -> None:
        """Count a connection from ``address`` that was let in whatever the limits."""
        key = client_key(address)
        if key is not None:
            self.open[key] = self.open.get(key, 0) + 1

    def release(self, address: Any) -> None:
        """An admitted connection from ``address`` closed."""
        key = client_key(address)
        if key is None:
            return
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)

    def _take(self, key: str | bytes, now: float) -> bool:
        buckets = self.buckets
        # The oldest histories come first: drop those that have refilled, then any
        # beyond the bound.
        while buckets:
            oldest_key, oldest = next(iter(buckets.items()))
            if now - oldest.last < self.refill and len(buckets) < self.max_rate_clients:
                break
            del buckets[oldest_key]
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(self.burst, now)
        else:
            buckets.move_to_end(key)
        return bucket.take(now, self.rate, self.burst)


class Pacer:
    """Global accept pacing: at most ``rate`` accepts a second, a tenth of a second's
    worth at once, so a crowd arriving together is spread evenly."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate / 10)
        self.bucket = _Bucket(self.burst, float("-inf"))

    def take(self, now: float) -> bool:
        """True if one connection may be accepted now (and count it)."""
        if self.bucket.last == float("-inf"):
            self.bucket.last = now
        return self.bucket.take(now, self.rate, self.burst)

    def wait(self, now: float) -> float:
        """Seconds until ``take`` will succeed."""
        tokens = min(self.burst, self.bucket.tokens + (now - self.bucket.last) * self.rate)
        if tokens >= 1.0 - _EPSILON:
            return 0.0
        return (1.0 - tokens) / self.rate


# -- shared by the workers of one supervisor -----------------------------------------------
#
# With --workers N the supervisor keeps the one table, so that a client's limit holds for
# the whole server whichever worker the kernel hands its connections to. Each worker asks
# over its own SOCK_SEQPACKET socket, one message per datagram: b"+" HOST to admit (the
# answer is one byte), b"-" HOST when an admitted connection closes (no answer), b"!" HOST
# when a worker that had no answer in time admitted one the answer then refused (count it).

_ANSWERS = {None: b"=", "too many connections from client": b"n", "client connection rate": b"r"}
_REASONS = {code: reason for reason, code in _ANSWERS.items()}


class AdmissionBroker:
    """The supervisor's side, sans-IO: one Admission table for every worker, and what
    each worker holds, so that a worker's connections are released when it dies."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held: dict[int, dict[str, int]] = {}  # worker id: host: open connections

    def handle(self, worker: int, message: bytes, now: float) -> bytes | None:
        """The answer to send back to ``worker`` for ``message``, if any."""
        op, host = message[:1], message[1:].decode("ascii", "replace")
        held = self.held.setdefault(worker, {})
        if op == b"+":
            reason = self.admission.admit((host, 0), now)
            if reason is None:
                held[host] = held.get(host, 0) + 1
            return _ANSWERS[reason]
        if op == b"!":
            self.admission.count((host, 0))
            held[host] = held.get(host, 0) + 1
            return None
        if op == b"-" and held.get(host):  # only what this worker was given
            held[host] -= 1
            if not held[host]:
                del held[host]
            self.admission.release((host, 0))
        return None

    def worker_gone(self, worker: int) -> None:
        """Release every connection a worker held (it exited, or was killed)."""
        for host, count in self.held.pop(worker, {}).items():
            for _ in range(count):
                self.admission.release((host, 0))


class BrokerLink:
    """The supervisor's end of one worker's link to the broker, in the supervisor's
    selector: the worker's questions go to the broker and the answers back in order."""

    def __init__(
        self,
        sock: socket.socket,
        worker: int,
        broker: AdmissionBroker,
        selector: selectors.BaseSelector,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.worker = worker
        self.broker = broker
        self.selector = selector
        self.answers: deque[bytes] = deque()  # not yet sent
        self.closed = False
        selector.register(sock, selectors.EVENT_READ, self)

    def ready(self, events: int) -> None:
        """The selector found the link writable or readable (``events``)."""
        if events & selectors.EVENT_WRITE:
            self.send_answers()
        if events & selectors.EVENT_READ:
            self.receive()

    def receive(self) -> None:
        """A worker asks whether a client may connect, or says a connection closed."""
        while True:
            try:
                message = self.sock.recv(256)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:  # the worker is gone
                self.close()
                self.broker.worker_gone(self.worker)
                return
            answer = self.broker.handle(self.worker, message, time.monotonic())
            if answer is not None:
                self.answers.append(answer)
                self.send_answers()

    def send_answers(self) -> None:
        """Send the worker its answers in order; those its socket has no room for wait
        until it reads (a busy worker is never blocked on, nor its answers dropped)."""
        if self.closed:
            return
        answers = self.answers
        while answers:
            try:
                self.sock.send(answers[0])
            except BlockingIOError:
                break
            except OSError:  # gone: the EOF that follows drops the link
                answers.clear()
                break
            answers.popleft()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if answers else 0)
        if self.selector.get_key(self.sock).events != events:
            self.selector.modify(self.sock, events, self)

    def close(self) -> None:
        """Leave the selector and close the link (again: nothing)."""
        if not self.closed:
            self.closed = True
            self.selector.unregister(self.sock)
            self.sock.close()
            self.answers.clear()


class RemoteAdmission:
    """A worker's side: asks the supervisor's broker over ``sock`` (non-blocking; what
    cannot be sent at once is queued and sent when the socket is writable).

    A connection never waits more than ``answer_wait`` for its answer: past it, it is
    admitted (a stalled supervisor must not stall every client). If the late answer
    refuses it, the worker tells the broker to count it anyway; that connection's
    client's releases wait until then, so the table stays exact.
    """

    def __init__(self, sock: socket.socket, answer_wait: float = ANSWER_WAIT) -> None:
        self.sock = sock
        self.answer_wait = answer_wait
        self.waiting: deque[tuple[asyncio.Future[str | None], str, asyncio.TimerHandle]] = deque()
        self.outgoing: deque[bytes] = deque()
        self.late: dict[str, int] = {}  # host: admitted without an answer, answer to come
        self.held_back: dict[str, int] = {}  # host: releases waiting for those answers
        self.loop: asyncio.AbstractEventLoop | None = None
        self.broken = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._answers)

    def admit(self, address: Any) -> asyncio.Future[str | None] | None:
        """A future for the broker's answer (None: admitted), or None when the address
        has no client to limit (Unix sockets) and is admitted at once."""
        if client_key(address) is None:
            return None
        assert self.loop is not None
        future: asyncio.Future[str | None] = self.loop.create_future()
        if self.broken:  # the supervisor is gone: this worker is stopping, admit
            future.set_result(None)
            return future
        host = address[0]
        timer = self.loop.call_later(self.answer_wait, self._no_answer, future, host)
        self.waiting.append((future, host, timer))
        self._send(b"+", host)
        return future

    def release(self, address: Any) -> None:
        if client_key(address) is None or self.broken:
            return
        host = address[0]
        if self.late.get(host):
            self.held_back[host] = self.held_back.get(host, 0) + 1
        else:
            self._send(b"-", host)

    def close(self) -> None:
        """The worker has stopped: refuse whoever still waits for an answer."""
        if self.loop is not None and not self.broken:
            self.broken = True
            self.loop.remove_reader(self.sock.fileno())
            if self.outgoing:
                self.loop.remove_writer(self.sock.fileno())
        self._settle_waiting("server shutdown")
        self.sock.close()

    def _no_answer(self, future: asyncio.Future[str | None], host: str) -> None:
        """No answer in time: read what has come (the worker may just have been busy),
        then admit the connection if its answer still has not."""
        self._answers()
        if not future.done():
            future.set_result(None)
            self.late[host] = self.late.get(host, 0) + 1

    def _send(self, op: bytes, host: str) -> None:
        message = op + host.encode("ascii", "replace")
        if not self.outgoing:
            try:
                self.sock.send(message)
                return
            except BlockingIOError:
                assert self.loop is not None
                self.loop.add_writer(self.sock.fileno(), self._flush)
            except OSError:
                self._broke()
                return
        self.outgoing.append(message)

    def _flush(self) -> None:
        while self.outgoing:
            try:
                self.sock.send(self.outgoing[0])
            except BlockingIOError:
                return
            except OSError:
                self._broke()
                return
            self.outgoing.popleft()
        assert self.loop is not None
        self.loop.remove_writer(self.sock.fileno())

    def _answers(self) -> None:
        while not self.broken:
            try:
                answer = self.sock.recv(16)
            except BlockingIOError:
                return
            except OSError:
                answer = b""
            if not answer:
                self._broke()
                return
            if not self.waiting:
                continue  # nothing asked: not an answer
            future, host, timer = self.waiting.popleft()
            timer.cancel()
            reason = _REASONS.get(answer[:1])
            if not future.done():
                future.set_result(reason)
            elif self.late.get(host):
                self._late_answer(host, reason)

    def _late_answer(self, host: str, reason: str | None) -> None:
        """The answer for a connection already admitted without it."""
        if reason is not None:  # refused, but it is open: the broker must count it
            self._send(b"!", host)
        self.late[host] -= 1
        if not self.late[host]:
            del self.late[host]
            for _ in range(self.held_back.pop(host, 0)):
                self._send(b"-", host)

    def _settle_waiting(self, reason: str | None) -> None:
        while self.waiting:
            future, _, timer = self.waiting.popleft()
            timer.cancel()
            if not future.done():
                future.set_result(reason)

    def _broke(self) -> None:
        """The supervisor is gone (the worker stops too): admit whoever still waits."""
        if self.broken:
            return
        self.broken = True
        assert self.loop is not None
        self.loop.remove_reader(self.sock.fileno())
        if self.outgoing:
            self.loop.remove_writer(self.sock.fileno())
            self.outgoing.clear()
        self._settle_waiting(None)
