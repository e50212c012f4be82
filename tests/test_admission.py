"""Per-client admission and accept pacing, without sockets: every call is given ``now``."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sockserve.admission import Admission, AdmissionBroker, Pacer, client_key


def test_ipv4_is_its_own_client_and_ipv6_is_grouped_by_64() -> None:
    assert client_key(("10.0.0.1", 5000)) == "10.0.0.1"
    assert client_key(("2001:db8:1:2::1", 1, 0, 0)) == client_key(("2001:db8:1:2:ffff::9", 2))
    assert client_key(("2001:db8:1:2::1", 1)) != client_key(("2001:db8:1:3::1", 1))
    assert client_key(("fe80::1%eth0", 1, 0, 2)) == client_key(("fe80::2", 1))


def test_ipv4_mapped_ipv6_counts_as_the_ipv4_client() -> None:
    assert client_key(("::ffff:10.0.0.1", 1, 0, 0)) == "10.0.0.1"


def test_unix_peers_are_never_limited() -> None:
    admission = Admission(max_per_client=1, rate_per_client=1)
    for _ in range(10):
        assert admission.admit("", 0.0) is None
        assert admission.admit(None, 0.0) is None
    assert len(admission) == 0


def test_the_connection_past_the_limit_is_refused_and_a_close_frees_a_slot() -> None:
    admission = Admission(max_per_client=3)
    one, two = ("127.0.0.1", 1), ("127.0.0.2", 1)
    assert [admission.admit(one, 0.0) for _ in range(3)] == [None] * 3
    assert admission.admit(one, 0.0) == "too many connections from client"
    assert admission.admit(two, 0.0) is None
    admission.release(one)
    assert admission.admit(one, 0.0) is None
    assert admission.admit(one, 0.0) == "too many connections from client"


def test_entries_of_clients_that_left_are_dropped() -> None:
    admission = Admission(max_per_client=3)
    for i in range(100):
        admission.admit((f"10.0.0.{i}", 1), 0.0)
    for i in range(100):
        admission.release((f"10.0.0.{i}", 1))
    assert len(admission) == 0


def test_rate_per_client_refuses_past_one_second_of_burst_then_refills() -> None:
    admission = Admission(rate_per_client=5)
    client = ("10.0.0.1", 1)
    results = [admission.admit(client, 100.0) for _ in range(6)]
    assert results == [None] * 5 + ["client connection rate"]
    assert admission.admit(("10.0.0.2", 1), 100.0) is None
    assert admission.admit(client, 100.1) == "client connection rate"
    assert admission.admit(client, 100.2) is None  # 0.2 s at 5/s: one more
    assert admission.admit(client, 101.3) is None


def test_a_slow_rate_allows_one_connection_per_interval() -> None:
    admission = Admission(rate_per_client=0.5)
    client = ("10.0.0.1", 1)
    assert admission.admit(client, 0.0) is None
    admission.release(client)
    assert admission.admit(client, 1.0) == "client connection rate"
    assert admission.admit(client, 2.0) is None


def test_rate_histories_of_quiet_clients_are_dropped() -> None:
    admission = Admission(rate_per_client=10)
    for i in range(1000):
        address = (f"10.0.{i // 256}.{i % 256}", 1)
        admission.admit(address, 0.0)
        admission.release(address)
    assert len(admission) == 1000
    admission.admit(("10.9.9.9", 1), 5.0)  # every earlier history has refilled by now
    assert len(admission) == 2


def test_table_stays_bounded_with_twenty_times_its_bound_of_ipv6_sources() -> None:
    bound = 10_000
    admission = Admission(max_per_client=2, rate_per_client=1, max_rate_clients=bound)
    now = 0.0
    largest = 0
    for i in range(20 * bound):
        address = (f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1", 4000, 0, 0)
        assert admission.admit(address, now) is None
        admission.release(address)
        now += 5e-7  # all within 0.1 s: no history refills, only the bound drops them
        largest = max(largest, len(admission))
    assert largest <= bound
    # A client over its rate stays refused while the flood goes on: recently seen
    # clients are kept, the quiet ones forgotten first.
    heavy = ("2001:db8:ffff::1", 1, 0, 0)
    assert admission.admit(heavy, now) is None
    admission.release(heavy)
    assert admission.admit(heavy, now) == "client connection rate"


def test_open_counts_are_never_forgotten_past_the_bound() -> None:
    admission = Admission(max_per_client=1, rate_per_client=100, max_rate_clients=10)
    holder = ("10.1.1.1", 1)
    assert admission.admit(holder, 0.0) is None
    for i in range(100):
        admission.admit((f"10.2.0.{i}", 1), 0.0)
        admission.release((f"10.2.0.{i}", 1))
    assert admission.admit(holder, 0.0) == "too many connections from client"


@given(st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200))
def test_pacer_never_exceeds_its_rate(gaps: list[float]) -> None:
    rate = 50.0
    pacer = Pacer(rate)
    now = 0.0
    taken = 0
    for gap in gaps:
        now += gap
        wait = pacer.wait(now)
        if wait == 0:
            assert pacer.take(now)
            taken += 1
        else:
            assert not Pacer.take(_copy(pacer), now)
            assert pacer.wait(now + wait) < 1e-9
    assert taken <= pacer.burst + now * rate + 1e-9


def _copy(pacer: Pacer) -> Pacer:
    clone = Pacer(pacer.rate)
    clone.bucket.tokens, clone.bucket.last = pacer.bucket.tokens, pacer.bucket.last
    return clone


def test_pacer_spreads_a_crowd_at_its_rate() -> None:
    pacer = Pacer(50)
    now = 0.0
    accepted = 0
    while accepted < 150:
        wait = pacer.wait(now)
        if wait:
            now += wait
            continue
        assert pacer.take(now)
        accepted += 1
    assert 2.8 <= now <= 3.0


def test_broker_shares_one_limit_among_workers_and_frees_a_dead_workers_share() -> None:
    broker = AdmissionBroker(Admission(max_per_client=3))
    assert broker.handle(1, b"+10.0.0.1", 0.0) == b"="
    assert broker.handle(2, b"+10.0.0.1", 0.0) == b"="
    assert broker.handle(2, b"+10.0.0.1", 0.0) == b"="
    assert broker.handle(1, b"+10.0.0.1", 0.0) == b"n"  # the fourth, whichever worker
    assert broker.handle(1, b"-10.0.0.1", 0.0) is None
    assert broker.handle(2, b"+10.0.0.1", 0.0) == b"="
    broker.worker_gone(2)  # killed while holding all three connections of that client
    assert [broker.handle(1, b"+10.0.0.1", 0.0) for _ in range(4)] == [b"="] * 3 + [b"n"]
    assert len(broker.admission) == 1


def test_broker_ignores_a_release_the_worker_was_never_given() -> None:
    broker = AdmissionBroker(Admission(max_per_client=1))
    assert broker.handle(1, b"+10.0.0.1", 0.0) == b"="
    assert broker.handle(2, b"-10.0.0.1", 0.0) is None  # not worker 2's to release
    assert broker.handle(2, b"+10.0.0.1", 0.0) == b"n"


def test_broker_answers_the_rate_refusal() -> None:
    broker = AdmissionBroker(Admission(rate_per_client=1))
    assert broker.handle(1, b"+2001:db8::1", 5.0) == b"="
    assert broker.handle(2, b"+2001:db8::2", 5.0) == b"r"  # same /64, other worker
