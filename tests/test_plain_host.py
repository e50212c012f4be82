"""One address normalising for per-client limits, allow/deny/proxy-from and own ports."""

from __future__ import annotations

import ipaddress

import pytest

from sockserve.admission import client_key, plain_host
from sockserve.gate import _in_networks


@pytest.mark.parametrize(
    ("host", "plain"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::FFFF:10.1.2.3", "10.1.2.3"),
        ("::ffff:a01:203", "10.1.2.3"),
        ("0:0:0:0:0:ffff:10.1.2.3%lo", "10.1.2.3"),
        ("not an address", "not an address"),
        ("bad::address::", "bad::address::"),
    ],
)
def test_plain_host(host: str, plain: str) -> None:
    assert plain_host(host) == plain


def test_every_spelling_of_one_client_is_one_client() -> None:
    spellings = ["10.1.2.3", "::ffff:10.1.2.3", "::ffff:a01:203", "::ffff:10.1.2.3%eth0"]
    assert {client_key((host, 1)) for host in spellings} == {"10.1.2.3"}
    networks = [ipaddress.ip_network("10.0.0.0/8")]
    assert all(_in_networks((host, 1), networks) for host in spellings)
    assert client_key(("2001:db8::1%eth0", 1)) == client_key(("2001:db8::2", 1))
    assert not _in_networks("/run/server.sock", networks)
    assert not _in_networks(("nonsense", 1), networks)
