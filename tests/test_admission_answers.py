"""With --workers and per-client limits, no connection waits forever for the supervisor's
admission answer: a busy worker gets every answer later, a stalled supervisor costs a
connection at most ``ANSWER_WAIT`` (it is then admitted), and the table stays exact."""

from __future__ import annotations

import asyncio
import selectors
import socket

from sockserve.admission import Admission, AdmissionBroker, BrokerLink, RemoteAdmission


def test_the_supervisor_keeps_the_answers_a_busy_worker_has_no_room_for() -> None:
    """A worker that asked for more than its socket holds unread (278 answers on Linux)
    gets every answer once it reads again; the supervisor neither waits nor drops one."""
    broker = AdmissionBroker(Admission(max_per_client=10_000))
    sock, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_end.setblocking(False)
    with selectors.DefaultSelector() as selector, sock, worker_end:
        link = BrokerLink(sock, 1, broker, selector)  # the supervisor's end
        asked = 0
        for _ in range(10):  # ask as much as the socket takes, until answers must wait
            try:
                while True:
                    worker_end.send(b"+127.0.0.1")
                    asked += 1
            except BlockingIOError:
                pass
            link.ready(selectors.EVENT_READ)
            if link.answers:
                break
        assert link.answers  # waiting for room, not sent nor dropped
        worker_end.settimeout(5)
        answers: list[bytes] = []
        while len(answers) < asked:
            answers.append(worker_end.recv(16))
            for key, events in selector.select(0):
                if events & selectors.EVENT_WRITE:
                    key.data.ready(selectors.EVENT_WRITE)
        assert answers == [b"="] * asked
        assert not link.answers
        assert selector.get_key(sock).events == selectors.EVENT_READ


class Broker:
    """The supervisor's end of a worker's admission socket, answered by hand."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.broker = AdmissionBroker(Admission(max_per_client=limit))

    def serve_one(self) -> bytes:
        """Read one message, answer it if it asks; return it."""
        message = self.sock.recv(256)
        answer = self.broker.handle(1, message, 0.0)
        if answer is not None:
            self.sock.send(answer)
        return message

    def open_count(self) -> int:
        return self.broker.admission.open.get("127.0.0.1", 0)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_no_answer_in_time_admits_and_a_late_refusal_is_counted() -> None:
    async def scenario() -> None:
        worker_end, supervisor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor_end.settimeout(5)
        remote = RemoteAdmission(worker_end, answer_wait=0.05)
        remote.start(asyncio.get_running_loop())
        broker = Broker(supervisor_end, limit=1)
        client = ("127.0.0.1", 40000)
        try:
            first = remote.admit(client)
            assert first is not None
            broker.serve_one()  # admitted: the client's one slot is taken
            assert await asyncio.wait_for(first, 5) is None

            second = remote.admit(client)  # the supervisor does not answer in time
            assert second is not None
            assert await asyncio.wait_for(second, 5) is None  # admitted anyway
            remote.release(client)  # one of the two closes before the answer comes
            assert broker.serve_one() == b"+127.0.0.1"  # refused: over the limit
            assert broker.open_count() == 1
            await settle()  # the worker reads the late refusal
            assert broker.serve_one() == b"!127.0.0.1"  # count it: it was served
            assert broker.open_count() == 2
            assert broker.serve_one() == b"-127.0.0.1"  # then the held-back release
            assert broker.open_count() == 1
            remote.release(client)
            assert broker.serve_one() == b"-127.0.0.1"
            assert broker.open_count() == 0
        finally:
            remote.close()
            supervisor_end.close()

    asyncio.run(scenario())


def test_a_late_admission_needs_no_correction() -> None:
    async def scenario() -> None:
        worker_end, supervisor_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor_end.settimeout(5)
        remote = RemoteAdmission(worker_end, answer_wait=0.05)
        remote.start(asyncio.get_running_loop())
        broker = Broker(supervisor_end, limit=5)
        client = ("127.0.0.1", 40000)
        try:
            late = remote.admit(client)
            assert late is not None
            assert await asyncio.wait_for(late, 5) is None
            remote.release(client)  # held back until the answer comes
            broker.serve_one()
            await settle()
            assert broker.serve_one() == b"-127.0.0.1"
            assert broker.open_count() == 0
        finally:
            remote.close()
            supervisor_end.close()

    asyncio.run(scenario())
