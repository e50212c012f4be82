"""A datagram whose source is the server's own address is dropped, not answered (10.11).

Answering it would send the reply to the server itself, which would answer that, and so
on forever. The spoofed datagram is built on a raw socket, which needs root (CI is root).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

import pytest

from helpers import ServerProcess, address_of

Start = Callable[..., ServerProcess]


def spoofed_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
    """Send one IPv4 UDP datagram with a forged source address."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload  # no checksum
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # IPv4, 5-word header
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,  # the kernel fills in the checksum
        socket.inet_aton(src[0]),
        socket.inet_aton(dst[0]),
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + udp, (dst[0], 0))


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw socket needs root")
def test_datagram_from_the_servers_own_address_is_dropped(start_server: Start) -> None:
    server = start_server(["demo", "-b", "udp://127.0.0.1:0"])
    address = address_of(server.urls[0])
    spoofed_udp(address, address, b"loop forever\n")
    server.read_until(
        rf"dropped a datagram from 127\.0\.0\.1:{address[1]} on udp://127\.0\.0\.1:{address[1]}:"
        r" it claims to come from this server's own address"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:  # others are served
        client.settimeout(5)
        client.sendto(b"hello\n", address)
        assert client.recvfrom(64)[0] == b"HELLO\n"
