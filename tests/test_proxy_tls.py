"""PROXY protocol and TLS in the server, over real sockets (HAProxy itself: test_haproxy.py)."""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from helpers import (
    BlockingWho,
    StreamWho,
    Who,
    address_of,
    closed_by_server,
    read_all,
    read_line,
    serving,
)
from sockserve.handlers import LineHandler
from sockserve.proxy_protocol import PP2_TYPE_AUTHORITY, encode_v1, encode_v2


def raw(address: tuple[str, int], first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(address, timeout=5)
    if first:
        sock.sendall(first)
    return sock


# -- PROXY protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("handler", [Who, BlockingWho], ids=lambda h: h.__name__)
def test_proxy_header_gives_the_real_client_address(loop: str, version: str, handler: type) -> None:
    header = (
        encode_v1(("203.0.113.7", 40000), ("192.0.2.1", 443))
        if version == "v1"
        else encode_v2(("203.0.113.7", 40000), ("192.0.2.1", 443))
    )
    with serving(handler, loop, proxy_protocol=version) as server:
        with raw(server.address, header + b"hello\n") as sock:
            assert read_line(sock).startswith(b"203.0.113.7:40000")


def test_proxy_v2_tlvs_and_ipv6_reach_the_handler(loop: str) -> None:
    tlvs = [(PP2_TYPE_AUTHORITY, b"example.org")]
    header = encode_v2(("2001:db8::7", 1234), ("2001:db8::1", 443), tlvs=tlvs, crc=True)
    with serving(Who, loop, proxy_protocol="any") as server:
        with raw(server.address, header + b"x\n") as sock:
            assert read_line(sock) == b"2001:db8::7:1234 v2 example.org -\n"


def test_proxy_local_and_unknown_keep_the_peer_address(loop: str) -> None:
    with serving(Who, loop, proxy_protocol="any") as server:
        for header in (encode_v2(command="LOCAL"), encode_v1()):
            with raw(server.address, header + b"x\n") as sock:
                assert read_line(sock).startswith(b"127.0.0.1:")


def test_header_dripped_byte_by_byte_then_data(loop: str) -> None:
    header = encode_v1(("198.51.100.9", 5555), ("192.0.2.1", 80))
    with serving(Who, loop, proxy_protocol="v1") as server, raw(server.address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in header:
            sock.send(bytes([byte]))
            time.sleep(0.001)
        sock.sendall(b"after\n")
        assert read_line(sock).startswith(b"198.51.100.9:5555")


@pytest.mark.parametrize(
    "first",
    [
        b"hello\n",  # no header at all
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # malformed v1
        b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 4,  # v2 cut short, then garbage
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_missing_or_malformed_header_closes_before_the_handler(
    loop: str, first: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    seen: list[bytes] = []

    class Record(LineHandler):
        def handle_line(self, line: bytes) -> bytes:
            seen.append(line)
            return line

    with serving(Record, loop, proxy_protocol="any", handshake_timeout=0.5) as server:
        with raw(server.address, first) as sock:
            assert closed_by_server(sock)
    assert seen == []
    assert "Traceback" not in caplog.text
    assert "PROXY" in caplog.text


def test_version_mismatch_is_refused(loop: str) -> None:
    with serving(Who, loop, proxy_protocol="v2") as server:
        header = encode_v1(("203.0.113.7", 1), ("192.0.2.1", 2))
        with raw(server.address, header + b"x\n") as sock:
            assert closed_by_server(sock)


def test_silent_peer_times_out_without_holding_up_others(loop: str) -> None:
    with serving(Who, loop, proxy_protocol="v1", handshake_timeout=2) as server:
        silent = [raw(server.address) for _ in range(20)]
        header = encode_v1(("203.0.113.8", 9), ("192.0.2.1", 2))
        started = time.monotonic()
        with raw(server.address, header + b"x\n") as sock:
            assert read_line(sock).startswith(b"203.0.113.8:9")
        assert time.monotonic() - started < 1.5  # not after the silent ones' 2 s
        for sock in silent:
            assert closed_by_server(sock)
            sock.close()


def test_only_trusted_proxies_may_send_headers(loop: str) -> None:
    header = encode_v1(("203.0.113.7", 40000), ("192.0.2.1", 443))
    with serving(Who, loop, proxy_protocol="v1", proxy_from=["10.0.0.0/8"]) as server:
        with raw(server.address, header + b"x\n") as sock:
            assert closed_by_server(sock)
        assert server.server.stats.rejected_by_reason["untrusted proxy"] == 1
    with serving(Who, loop, proxy_protocol="v1", proxy_from=["127.0.0.0/8"]) as server:
        with raw(server.address, header + b"x\n") as sock:
            assert read_line(sock).startswith(b"203.0.113.7")


def test_allow_and_deny_use_the_proxied_address(loop: str) -> None:
    header = encode_v1(("203.0.113.7", 40000), ("192.0.2.1", 443))
    with serving(Who, loop, proxy_protocol="v1", deny=["203.0.113.0/24"]) as server:
        with raw(server.address, header + b"x\n") as sock:
            assert closed_by_server(sock)
    with serving(Who, loop, proxy_protocol="v1", allow=["203.0.113.0/24"]) as server:
        with raw(server.address, header + b"x\n") as sock:
            assert read_line(sock).startswith(b"203.0.113.7")


# -- TLS ---------------------------------------------------------------------------------


def client_context(ca: trustme.CA, cert: Any = None, maximum: Any = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


def tls_connect(
    address: tuple[str, int], context: ssl.SSLContext, first: bytes = b""
) -> ssl.SSLSocket:
    sock = socket.create_connection(address, timeout=5)
    if first:
        sock.sendall(first)
    return context.wrap_socket(sock, server_hostname="localhost")


@pytest.mark.parametrize("handler", [Who, StreamWho, BlockingWho], ids=lambda h: h.__name__)
def test_tls_round_trip_for_every_handler_kind(
    loop: str, handler: type, ca: trustme.CA, certs: dict[str, str]
) -> None:
    settings = {"tls_cert": certs["cert"], "tls_key": certs["key"]}
    with serving(handler, loop, **settings) as server:
        with tls_connect(server.address, client_context(ca)) as sock:
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            sock.sendall(b"hi\n")
            assert read_line(sock).startswith(b"127.0.0.1")


def test_plaintext_on_a_tls_port_is_closed_quietly(
    loop: str, certs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "sockserve.access")
    settings = {"tls_cert": certs["cert"], "tls_key": certs["key"], "access_log": True}
    with serving(Who, loop, **settings) as server:
        with raw(server.address, b"hello in clear text\n") as sock:
            try:
                data = read_all(sock)
            except ConnectionResetError:
                data = b""
            assert b"127.0.0.1" not in data
        with raw(server.address):  # the server carries on
            pass
    assert "Traceback" not in caplog.text
    server_lines = [r for r in caplog.records if r.name == "sockserve.server"]
    assert sum("TLS handshake failed" in r.getMessage() for r in server_lines) <= 1
    # Each failed handshake is still one connection: counted and in the access log.
    failed = server.server.stats.closed_by_reason["TLS handshake failed"]
    assert failed >= 1
    access = [r for r in caplog.records if r.name == "sockserve.access"]
    assert sum(r.getMessage().endswith("TLS handshake failed") for r in access) == failed


def test_silent_peers_do_not_hold_up_tls_handshakes(
    loop: str, ca: trustme.CA, certs: dict[str, str]
) -> None:
    settings = {"tls_cert": certs["cert"], "tls_key": certs["key"], "handshake_timeout": 2}
    with serving(Who, loop, **settings) as server:
        silent = [raw(server.address) for _ in range(50)]
        started = time.monotonic()
        with tls_connect(server.address, client_context(ca)) as sock:
            sock.sendall(b"x\n")
            assert read_line(sock).startswith(b"127.0.0.1")
        assert time.monotonic() - started < 1.5  # not after the silent ones' 2 s
        for peer in silent:
            assert closed_by_server(peer)
            peer.close()


def test_mutual_tls(loop: str, ca: trustme.CA, certs: dict[str, str]) -> None:
    settings = {"tls_cert": certs["cert"], "tls_key": certs["key"], "tls_client_ca": certs["ca"]}
    good = ca.issue_cert("alice@example.org", common_name="alice")
    stranger = trustme.CA().issue_cert("mallory@example.org", common_name="mallory")
    with serving(StreamWho, loop, **settings) as server:
        with tls_connect(server.address, client_context(ca, good)) as sock:
            sock.sendall(b"who\n")
            assert read_line(sock) == b"127.0.0.1 alice\n"
        for cert in (None, stranger):
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
                with tls_connect(server.address, client_context(ca, cert)) as sock:
                    sock.sendall(b"who\n")
                    assert read_line(sock) == b""
                    raise ConnectionResetError  # TLS 1.3 reports the refusal on read


def test_minimum_tls_version(loop: str, ca: trustme.CA, certs: dict[str, str]) -> None:
    settings = {"tls_cert": certs["cert"], "tls_key": certs["key"], "tls_min_version": "1.3"}
    with serving(Who, loop, **settings) as server:
        old = client_context(ca, maximum=ssl.TLSVersion.TLSv1_2)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            tls_connect(server.address, old).close()
        with tls_connect(server.address, client_context(ca)) as sock:
            assert sock.version() == "TLSv1.3"


def test_proxy_header_then_tls(loop: str, ca: trustme.CA, certs: dict[str, str]) -> None:
    """The header is read from plain TCP; TLS starts after it on the same connection."""
    header = encode_v2(("203.0.113.7", 40000), ("192.0.2.1", 443))
    settings = {"tls_cert": certs["cert"], "tls_key": certs["key"], "proxy_protocol": "v2"}
    for handler in (Who, BlockingWho):
        with serving(handler, loop, **settings) as server:
            with tls_connect(server.address, client_context(ca), first=header) as sock:
                sock.sendall(b"x\n")
                assert read_line(sock).startswith(b"203.0.113.7:40000")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_rereads_certificates(start_server: Any, tmp_path: Path, workers: str) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(ca: trustme.CA) -> None:
        issued = ca.issue_cert("localhost", "127.0.0.1")
        issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))

    install(old_ca)
    server = start_server(
        [
            "demo",
            "-b",
            "127.0.0.1:0",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--workers",
            workers,
        ]
    )
    address = address_of(server.urls[0])

    def round_trip(ca: trustme.CA) -> bytes:
        with tls_connect(address, client_context(ca)) as sock:
            sock.sendall(b"tls\n")
            return read_line(sock)

    assert round_trip(old_ca) == b"TLS\n"
    install(new_ca)
    server.signal(signal.SIGHUP)
    server.read_until("reload done" if workers == "2" else "TLS certificate reloaded")
    deadline = time.monotonic() + 10
    while True:  # old workers may take one more connection before they see SIGTERM
        try:
            assert round_trip(new_ca) == b"TLS\n"
            break
        except ssl.SSLError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    if workers == "2":  # the old workers finish before the old certificate is gone
        server.read_until(r"worker \d+ stopped")
        server.read_until(r"worker \d+ stopped")
    with pytest.raises(ssl.SSLError):
        round_trip(old_ca)
