"""The PROXY protocol header (HAProxy): what a parsed one holds, and how to write one.

``ProxyHeader`` is what ``sockserve.proxy_protocol``'s parser returns (addresses, TLVs,
the SSL details a TLS-terminating balancer passes on); ``encode_v1``, ``encode_v2`` and
``encode_ssl`` write headers, for tests, fault proxies and anything that relays. The
numbers are the specification's.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "UNIX_PATH_LENGTH",
    "V1_SIGNATURE",
    "V2_FIXED_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "Family",
    "Protocol",
    "ProxyHeader",
    "ProxyProtocolError",
    "SSLInfo",
    "TLVs",
    "crc32c",
    "encode_ssl",
    "encode_v1",
    "encode_v2",
    "show_ip",
    "split_tlvs",
]

Family = Literal["TCP4", "TCP6", "UNIX", "UNKNOWN"]
Protocol = Literal["STREAM", "DGRAM", "UNKNOWN"]
Address = tuple[str, int] | str | None
TLVs = tuple[tuple[int, bytes], ...]

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16  # signature, version/command, family/protocol, 16-bit length
V2_MAX_LENGTH: Final = 0xFFFF

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

# As in struct sockaddr_un.
UNIX_PATH_LENGTH: Final = 108


class ProxyProtocolError(ValueError):
    """The peer sent a malformed or refused PROXY header; close the connection."""


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B) of ``data``, as the v2 CRC32C TLV uses."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _first(tlvs: TLVs, kind: int) -> bytes | None:
    for tlv_type, value in tlvs:
        if tlv_type == kind:
            return value
    return None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """The PP2_TYPE_SSL TLV: how the client reached the load balancer over TLS."""

    client: int  # PP2_CLIENT_* bit field
    verify: int  # zero when the client sent a certificate and it was verified
    tlvs: TLVs  # sub-TLVs: version, CN, cipher, signature and key algorithms

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first sub-TLV of this type, or None."""
        return _first(self.tlvs, kind)

    @property
    def ssl(self) -> bool:
        """The client connected over SSL/TLS."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def cert_in_connection(self) -> bool:
        """The client sent a certificate over this connection."""
        return bool(self.client & PP2_CLIENT_CERT_CONN)

    @property
    def cert_in_session(self) -> bool:
        """The client sent a certificate at least once over this TLS session."""
        return bool(self.client & PP2_CLIENT_CERT_SESS)

    @property
    def verified(self) -> bool:
        """A client certificate was presented and verified."""
        return self.verify == 0 and (self.cert_in_connection or self.cert_in_session)

    @property
    def version(self) -> str | None:
        """TLS version, e.g. ``"TLSv1.3"``."""
        return _text(self.tlv(PP2_SUBTYPE_SSL_VERSION))

    @property
    def cn(self) -> str | None:
        """Common name of the client certificate's subject."""
        return _text(self.tlv(PP2_SUBTYPE_SSL_CN))

    @property
    def cipher(self) -> str | None:
        """Cipher name, e.g. ``"ECDHE-RSA-AES128-GCM-SHA256"``."""
        return _text(self.tlv(PP2_SUBTYPE_SSL_CIPHER))

    @property
    def sig_alg(self) -> str | None:
        """Signature algorithm of the client certificate."""
        return _text(self.tlv(PP2_SUBTYPE_SSL_SIG_ALG))

    @property
    def key_alg(self) -> str | None:
        """Key algorithm of the client certificate."""
        return _text(self.tlv(PP2_SUBTYPE_SSL_KEY_ALG))


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header.

    ``family`` uses the v1 names for both versions (``"TCP4"`` also for UDP over IPv4:
    ``protocol`` tells). ``source`` and ``destination`` are ``(ip, port)`` for TCP4/TCP6, a
    path for UNIX (``"@name"`` for a Linux abstract name), None for UNKNOWN and for every
    LOCAL header (a health check from the proxy itself: use the real peer address).
    """

    version: int
    command: Literal["PROXY", "LOCAL"]
    family: Family
    protocol: Protocol
    source: Address
    destination: Address
    tlvs: TLVs  # raw v2 TLVs, in order
    length: int  # bytes the header took on the wire

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        return _first(self.tlvs, kind)

    @property
    def alpn(self) -> bytes | None:
        """The ALPN protocol the client negotiated, e.g. ``b"h2"``."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """The host name the client asked for (TLS SNI, usually)."""
        return _text(self.tlv(PP2_TYPE_AUTHORITY))

    @property
    def unique_id(self) -> bytes | None:
        """The proxy's opaque connection id (at most 128 bytes)."""
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """The network namespace the proxy accepted the connection in."""
        return _text(self.tlv(PP2_TYPE_NETNS))

    @property
    def ssl(self) -> SSLInfo | None:
        """TLS details, when the proxy terminated TLS and sent them."""
        value = self.tlv(PP2_TYPE_SSL)
        if value is None:
            return None
        client, verify = struct.unpack_from("!BI", value)
        return SSLInfo(client, verify, tuple((t, v) for t, _, v in split_tlvs(value, 5)))


def split_tlvs(data: bytes, start: int) -> list[tuple[int, int, bytes]]:
    """(type, offset of the value, value) for each TLV in ``data[start:]``; bounded."""
    tlvs = []
    pos = start
    end = len(data)
    while pos < end:
        if end - pos < 3:
            raise ProxyProtocolError(f"truncated TLV: {end - pos} bytes left, a TLV needs 3")
        kind = data[pos]
        size = (data[pos + 1] << 8) | data[pos + 2]
        pos += 3
        if pos + size > end:
            raise ProxyProtocolError(
                f"TLV 0x{kind:02x} of {size} bytes runs past the end of the header"
            )
        tlvs.append((kind, pos, data[pos : pos + size]))
        pos += size
    return tlvs


def show_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as text, the same on every Python (3.13 changed IPv4-mapped ones)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _check_port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return port


def encode_v1(
    source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None
) -> bytes:
    """A v1 header; ``"PROXY UNKNOWN\\r\\n"`` when the addresses are None."""
    if source is None or destination is None:
        if source is not None or destination is not None:
            raise ValueError("give both addresses or neither")
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must both be IPv4 or both IPv6")
    line = (
        f"PROXY TCP{src.version} {show_ip(src)} {show_ip(dst)} "
        f"{_check_port(source[1])} {_check_port(destination[1])}\r\n"
    )
    return line.encode("ascii")


def _encode_unix(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if path.startswith("@"):  # a Linux abstract name
        raw = b"\0" + raw[1:]
    if len(raw) > UNIX_PATH_LENGTH:
        raise ValueError(f"Unix socket path longer than {UNIX_PATH_LENGTH} bytes: {path!r}")
    return raw.ljust(UNIX_PATH_LENGTH, b"\0")


def _encode_tlvs(tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type must fit a byte and its value 65535 bytes: {kind!r}")
        out += struct.pack("!BH", kind, len(value)) + value
    return bytes(out)


def encode_ssl(client: int, verify: int, tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """The value of a PP2_TYPE_SSL TLV: client flags, verify result, sub-TLVs."""
    return struct.pack("!BI", client, verify) + _encode_tlvs(tlvs)


def encode_v2(
    source: tuple[str, int] | str | None = None,
    destination: tuple[str, int] | str | None = None,
    *,
    command: Literal["PROXY", "LOCAL"] = "PROXY",
    protocol: Protocol = "STREAM",
    tlvs: Sequence[tuple[int, bytes]] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header; the family follows the addresses ((ip, port), a Unix path or None).

    ``crc=True`` appends a CRC32C TLV holding the checksum of the whole header.
    """
    if type(source) is not type(destination):
        raise ValueError("source and destination must be of the same kind")
    if isinstance(source, tuple) and isinstance(destination, tuple):
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        if src.version != dst.version:
            raise ValueError("source and destination must both be IPv4 or both IPv6")
        family = 0x1 if src.version == 4 else 0x2
        block = (
            src.packed
            + dst.packed
            + struct.pack("!HH", _check_port(source[1]), _check_port(destination[1]))
        )
    elif isinstance(source, str) and isinstance(destination, str):
        family = 0x3
        block = _encode_unix(source) + _encode_unix(destination)
    else:
        family, block = 0x0, b""
    body = block + _encode_tlvs(tlvs)
    if crc:
        body += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\0\0\0\0"
    if len(body) > V2_MAX_LENGTH:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes, at most 65535 fit")
    cmd = 0x1 if command == "PROXY" else 0x0
    proto = {"UNKNOWN": 0x0, "STREAM": 0x1, "DGRAM": 0x2}[protocol]
    header = V2_SIGNATURE + struct.pack("!BBH", 0x20 | cmd, family << 4 | proto, len(body)) + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header
