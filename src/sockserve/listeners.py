"""The listening side: accepting stream connections and reading datagrams.

``StreamListener`` accepts while the server allows it (under the connection limit, not
backing off from EMFILE, not paced) and hands every connection to the ``Gate``.
``DatagramEndpoint`` reads datagrams into one preallocated buffer and answers them the
way the handler kind says.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING, Any

from sockserve.admission import plain_host
from sockserve.observability import format_peer

if TYPE_CHECKING:
    from sockserve.binding import Listener
    from sockserve.gate import Gate
    from sockserve.server import Server

__all__ = ["DATAGRAM_CONCURRENCY", "DatagramEndpoint", "StreamListener"]

logger = logging.getLogger("sockserve.server")

# Accept errors that mean "out of a resource": back off and retry (as trio does), never spin.
OVERLOAD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.1
# Connections accepted per readiness event, so one busy listener cannot starve the others.
ACCEPT_BATCH = 256
DATAGRAM_BATCH = 64
# Host strings remembered per listener so that connections from one peer share them.
SHARED_HOSTS = 1024
# Async datagram handlers running at once per listener before reading pauses.
DATAGRAM_CONCURRENCY = 1024


class StreamListener:
    """Accepts connections from one listening socket while the server allows it, and
    hands each to the gate."""

    def __init__(self, gate: Gate, listener: Listener) -> None:
        self.gate = gate
        self.ledger = gate.ledger
        self.listener = listener
        self.sock = listener.sock
        self.reading = False
        self.backing_off = False
        self.hosts: dict[str, str] = {}  # peers' host strings, shared by their connections

    def set_reading(self, on: bool) -> None:
        if on == self.reading:
            return
        self.reading = on
        if on:
            self.ledger.loop.add_reader(self.sock.fileno(), self.accept_ready)
        else:
            self.ledger.loop.remove_reader(self.sock.fileno())

    def accept_ready(self, limit: int = ACCEPT_BATCH, draining: bool = False) -> None:
        gate, loop = self.gate, self.ledger.loop
        sock = self.sock
        hosts = self.hosts
        pacer = None if draining else gate.pacer
        for _ in range(limit):
            if pacer is not None and pacer.wait(loop.time()):
                gate.pace()
                return
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OVERLOAD_ERRNOS:
                    self.ledger.overload_log(
                        "accept() on %s failed: %s; backing off %.1f s",
                        self.listener.url,
                        exc.strerror,
                        ACCEPT_BACKOFF,
                    )
                    self.backing_off = True
                    loop.call_later(ACCEPT_BACKOFF, self.end_backoff)
                    self.ledger.capacity_changed()
                    return
                # ECONNABORTED, EPROTO, EPERM (firewall): that one peer is gone; go on.
                logger.debug("accept() on %s failed: %s", self.listener.url, exc)
                continue
            if type(addr) is tuple:  # an IP peer (a Unix peer's address is a str)
                # Its connections share one host string: 64 bytes less for each idle one
                # behind a load balancer or a NAT.
                if (host := hosts.get(addr[0])) is not None:
                    addr = (host, *addr[1:])
                else:
                    if len(hosts) >= SHARED_HOSTS:
                        hosts.clear()
                    hosts[addr[0]] = addr[0]
            if pacer is not None:
                pacer.take(loop.time())
            gate.accepted(conn, addr, self.listener)
            if not self.reading and not draining:  # paused: limit reached or stopping
                return

    def end_backoff(self) -> None:
        # A flag, not a deadline: uvloop's clock may read a hair early when the timer fires.
        self.backing_off = False
        self.ledger.capacity_changed()

    def drain_backlog(self) -> None:
        """Accept every connection already waiting, ignoring the limit (used when stopping)."""
        self.accept_ready(limit=1 << 30, draining=True)


class DatagramEndpoint:
    """Reads datagrams itself: one preallocated buffer, no per-datagram 256 KiB allocation."""

    def __init__(self, server: Server, listener: Listener, own_ports: frozenset[int]) -> None:
        self.server = server
        self.own_ports = own_ports  # of the server's datagram listeners
        self.listener = listener
        self.sock = listener.sock
        self.max_size = server.settings.max_datagram
        self.buffer = bytearray(self.max_size + 1)
        self.view = memoryview(self.buffer)
        self.reading = False
        self.started = False  # the handler's setup() ran: its finish() runs at close
        self.in_flight = 0
        answer = server.kind.datagram_answer(self)
        self.answer = answer.answer
        self.is_async = answer.is_async
        self.handler = answer.handler

    def start(self) -> None:
        if self.handler is not None:
            self.handler.setup()
            self.started = True
        self.set_reading(True)

    def set_reading(self, on: bool) -> None:
        if on == self.reading:
            return
        self.reading = on
        if on:
            self.server.loop.add_reader(self.sock.fileno(), self.ready)
        else:
            self.server.loop.remove_reader(self.sock.fileno())

    def ready(self) -> None:
        server = self.server
        ledger = server.ledger
        stats = ledger.stats
        own_ports = self.own_ports
        for _ in range(DATAGRAM_BATCH):
            try:
                size, address = self.sock.recvfrom_into(self.view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error of an earlier reply
                logger.debug("recvfrom on %s failed: %s", self.listener.url, exc)
                continue
            stats.datagrams += 1
            stats.bytes_received += size
            if type(address) is tuple and address[1] in own_ports and _is_local(address[0]):
                # From one of our own sockets (a spoofed source): answering it would make
                # the server answer itself forever.
                ledger.rejected("own address")
                ledger.reflection_log(
                    "dropped a datagram from %s on %s: it claims to come from this server's"
                    " own address (answering would loop)",
                    address,
                    self.listener.url,
                )
                continue
            if size > self.max_size:
                stats.datagrams_oversized += 1
                ledger.oversize_log(
                    "dropped a datagram from %s on %s: larger than %d bytes",
                    address,
                    self.listener.url,
                    self.max_size,
                )
                continue
            data = bytes(self.view[:size])  # one copy out of the reused buffer
            if self.is_async:
                self.in_flight += 1
                ledger.spawn(self._answer_async(data, address))
                if self.in_flight >= DATAGRAM_CONCURRENCY:
                    self.set_reading(False)
                    return
                continue
            try:
                reply = self.answer(data, address)
            except Exception as exc:
                ledger.handler_failed(address, exc)
                continue
            if reply is not None:
                self.send(reply, address)
            if not self.reading:
                return

    async def _answer_async(self, data: bytes, address: Any) -> None:
        try:
            reply = await self.answer(data, address)
            if reply is not None:
                self.send(reply, address)
        except Exception as exc:
            self.server.ledger.handler_failed(address, exc)
        finally:
            self.in_flight -= 1
            if self.in_flight < DATAGRAM_CONCURRENCY // 2 and not self.server.ledger.stopping:
                self.set_reading(True)

    def send(self, reply: bytes, address: Any) -> None:
        if not address:  # an unbound Unix datagram client cannot be answered
            return
        try:
            self.sock.sendto(reply, address)
        except (BlockingIOError, InterruptedError):
            self.server.stats.datagrams_dropped += 1  # socket buffer full: UDP may drop
            return
        except OSError as exc:
            logger.debug("sendto %s failed: %s", format_peer(address), exc)
            return
        self.server.stats.bytes_sent += len(reply)

    def close(self) -> None:
        self.set_reading(False)
        if self.started:
            self.started = False
            try:
                self.handler.finish()
            except Exception as exc:
                self.server.ledger.handler_failed(None, exc)


_local_ips: dict[str, bool] = {}


def _is_local(host: str) -> bool:
    """Whether ``host`` is an address of this machine: only those can be bound."""
    host = plain_host(host)
    known = _local_ips.get(host)
    if known is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((host, 0))
            known = True
        except OSError:
            known = False
        if len(_local_ips) > 1024:  # sources are chosen by peers: keep the cache bounded
            _local_ips.clear()
        _local_ips[host] = known
    return known
