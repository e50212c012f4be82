"""Sans-IO parser for the PROXY protocol (HAProxy), versions 1 and 2.

A load balancer in front of the server sends this header first on each connection to pass
on the real client address. ``ProxyParser`` takes bytes (``feed``) and hands out one event
(``next_event``): ``NEED_DATA`` until the header is complete, then the ``ProxyHeader``.
Whatever followed the header (say, a TLS ClientHello) is in ``leftover``. The parser never
touches a socket, a clock or a logger, never buffers past the limits below, and remembers
how far it has looked, so a peer dripping one byte at a time costs O(n) in total.

``parse_prefix`` is the stateless form for a server that peeks at its socket: it says how
long the header is, so exactly that many bytes can be read and nothing after them.

The header type it returns and the encoders are in ``sockserve.proxy_header``; their
names are importable from here too.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Final, Literal

from sockserve.proxy_header import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_KEY_ALG,
    PP2_SUBTYPE_SSL_SIG_ALG,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    UNIX_PATH_LENGTH,
    V1_SIGNATURE,
    V2_FIXED_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Address,
    Family,
    Protocol,
    ProxyHeader,
    ProxyProtocolError,
    SSLInfo,
    crc32c,
    encode_ssl,
    encode_v1,
    encode_v2,
    show_ip,
    split_tlvs,
)

__all__ = [
    "DEFAULT_MAX_V2_LENGTH",
    "NEED_DATA",
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
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Accept",
    "NeedData",
    "ProxyHeader",
    "ProxyParser",
    "ProxyProtocolError",
    "SSLInfo",
    "crc32c",
    "encode_ssl",
    "encode_v1",
    "encode_v2",
    "parse_prefix",
]

Accept = Literal["v1", "v2", "any"]

# The spec's worst case, "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
# is 107 bytes, CRLF included; receivers may refuse anything longer, and we do.
V1_MAX_LENGTH: Final = 107

# The v2 length field allows 65535 bytes after the fixed part, so a peer could make every
# pending connection pin 64 KiB. Load balancers send far less: the largest address block
# (UNIX) is 216 bytes and the usual TLVs (ALPN, authority, a unique id of at most 128 bytes,
# SSL version/CN/cipher) add a few hundred; HAProxy itself must fit the whole header into
# one receive buffer (tune.bufsize). 4 KiB leaves ample room and stays cheap per connection.
DEFAULT_MAX_V2_LENGTH: Final = 4096

# Unique ids are "an opaque byte sequence of up to 128 bytes" (spec, section 2.2.5).
UNIQUE_ID_MAX_LENGTH: Final = 128

_COMMANDS: Final[dict[int, Literal["PROXY", "LOCAL"]]] = {0x0: "LOCAL", 0x1: "PROXY"}
# Address family nibble -> (name, address block length in bytes).
_FAMILIES: Final[dict[int, tuple[Family, int]]] = {
    0x0: ("UNKNOWN", 0),
    0x1: ("TCP4", 12),  # 2 x 4-byte address, 2 x 2-byte port
    0x2: ("TCP6", 36),  # 2 x 16-byte address, 2 x 2-byte port
    0x3: ("UNIX", 216),  # 2 x 108-byte path, as in struct sockaddr_un
}
_PROTOCOLS: Final[dict[int, Protocol]] = {0x0: "UNKNOWN", 0x1: "STREAM", 0x2: "DGRAM"}
_V1_FAMILIES: Final[dict[str, Family]] = {"TCP4": "TCP4", "TCP6": "TCP6"}
_CR: Final = 0x0D
_LF: Final = 0x0A
_PREVIEW: Final = 16  # peer bytes quoted in an error message, at most


class NeedData(enum.Enum):
    """The type of the ``NEED_DATA`` sentinel."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""``next_event`` returns this until the header is complete: feed more bytes."""


def _preview(data: bytes | bytearray) -> str:
    """A bounded quote of what the peer sent, for error messages."""
    shown = repr(bytes(data[:_PREVIEW]))
    return shown + "..." if len(data) > _PREVIEW else shown


def _check_tlvs(header: bytes, tlvs: list[tuple[int, int, bytes]]) -> None:
    """Refuse malformed known TLVs; verify the CRC32C when one is present."""
    crcs = [(offset, value) for kind, offset, value in tlvs if kind == PP2_TYPE_CRC32C]
    if len(crcs) > 1:
        raise ProxyProtocolError("more than one CRC32C TLV")
    for offset, value in crcs:
        if len(value) != 4:
            raise ProxyProtocolError(f"CRC32C TLV of {len(value)} bytes, expected 4")
        zeroed = header[:offset] + b"\0\0\0\0" + header[offset + 4 :]
        if crc32c(zeroed) != int.from_bytes(value, "big"):
            raise ProxyProtocolError("CRC32C mismatch: the header was corrupted")
    for kind, _, value in tlvs:
        if kind == PP2_TYPE_UNIQUE_ID and len(value) > UNIQUE_ID_MAX_LENGTH:
            raise ProxyProtocolError(
                f"UNIQUE_ID TLV of {len(value)} bytes, at most {UNIQUE_ID_MAX_LENGTH} allowed"
            )
        if kind == PP2_TYPE_SSL:
            if len(value) < 5:
                raise ProxyProtocolError(f"SSL TLV of {len(value)} bytes, at least 5 needed")
            split_tlvs(value, 5)


def _v1_address(text: str, family: Family) -> str:
    try:
        ip = ipaddress.IPv4Address(text) if family == "TCP4" else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(f"invalid {family} address in v1 header: {text!r}") from None
    if "%" in text:  # the stdlib accepts IPv6 scope ids; the protocol has none
        raise ProxyProtocolError(f"invalid {family} address in v1 header: {text!r}")
    return show_ip(ip)


def _v1_port(text: str) -> int:
    # Digits only: int() would also take "+80", " 80", "8_0" and non-ASCII digits.
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 0xFFFF):
        raise ProxyProtocolError(f"invalid port in v1 header: {text!r}")
    return int(text)


def _parse_v1(line: str, length: int) -> ProxyHeader:
    """Parse the v1 line between ``"PROXY "`` and CRLF (known to be printable ASCII)."""
    fields = line.split(" ")
    if fields[0] == "UNKNOWN":  # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, "PROXY", "UNKNOWN", "UNKNOWN", None, None, (), length)
    family = _V1_FAMILIES.get(fields[0])
    if family is None:
        raise ProxyProtocolError(f"unknown protocol in v1 header: {fields[0][:_PREVIEW]!r}")
    if len(fields) != 5:
        raise ProxyProtocolError(
            f"v1 {family} header needs 4 fields separated by single spaces, got {len(fields) - 1}"
        )
    source = (_v1_address(fields[1], family), _v1_port(fields[3]))
    destination = (_v1_address(fields[2], family), _v1_port(fields[4]))
    return ProxyHeader(1, "PROXY", family, "STREAM", source, destination, (), length)


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\0" and raw.rstrip(b"\0"):  # a Linux abstract name: "@" + name
        return "@" + raw[1:].rstrip(b"\0").decode("utf-8", "surrogateescape")
    return raw.partition(b"\0")[0].decode("utf-8", "surrogateescape")


def _parse_v2_body(header: bytes) -> ProxyHeader:
    """Parse a complete v2 header whose fixed 16 bytes were already checked."""
    command = _COMMANDS[header[12] & 0x0F]
    family, block = _FAMILIES[header[13] >> 4]
    protocol = _PROTOCOLS[header[13] & 0x0F]
    tlvs = split_tlvs(header, V2_FIXED_LENGTH + block)
    _check_tlvs(header, tlvs)
    source: Address = None
    destination: Address = None
    if command == "PROXY":
        if family == "TCP4":
            src, dst, sport, dport = struct.unpack_from("!4s4sHH", header, 16)
            source = (str(ipaddress.IPv4Address(src)), sport)
            destination = (str(ipaddress.IPv4Address(dst)), dport)
        elif family == "TCP6":
            src, dst, sport, dport = struct.unpack_from("!16s16sHH", header, 16)
            source = (show_ip(ipaddress.IPv6Address(src)), sport)
            destination = (show_ip(ipaddress.IPv6Address(dst)), dport)
        elif family == "UNIX":
            source = _unix_path(header[16 : 16 + UNIX_PATH_LENGTH])
            destination = _unix_path(header[16 + UNIX_PATH_LENGTH : 16 + 2 * UNIX_PATH_LENGTH])
    return ProxyHeader(
        2,
        command,
        family,
        protocol,
        source,
        destination,
        tuple((kind, value) for kind, _, value in tlvs),
        len(header),
    )


class ProxyParser:
    """Incremental PROXY header parser: ``feed(data)``, then ``next_event()``.

    ``next_event`` returns NEED_DATA until the header is complete, then the ProxyHeader
    (the same one on every later call). A malformed header makes ``next_event`` raise
    ProxyProtocolError, on that and every later call; it is detected as soon as the bytes
    show it, and the bytes are then dropped. Bytes fed after the header go to ``leftover``.
    """

    __slots__ = (
        "_accept",
        "_buf",
        "_error",
        "_header",
        "_matched",
        "_max_v2_length",
        "_scanned",
        "_total",
        "_version",
    )

    def __init__(
        self, accept: Accept = "any", *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH
    ) -> None:
        if accept not in ("v1", "v2", "any"):
            raise ValueError(f"accept must be 'v1', 'v2' or 'any', not {accept!r}")
        if not 0 <= max_v2_length <= V2_MAX_LENGTH:
            raise ValueError(f"max_v2_length must be between 0 and {V2_MAX_LENGTH}")
        self._accept = accept
        self._max_v2_length = max_v2_length
        self._buf = bytearray()  # the header so far; once it is complete, the leftover
        self._version = 0  # 1 or 2 once the signature has matched
        self._matched = 0  # signature bytes checked so far
        self._scanned = len(V1_SIGNATURE)  # v1: bytes searched for CRLF so far
        self._total = 0  # v2: the header's full length, once the fixed part is read
        self._header: ProxyHeader | None = None
        self._error: str | None = None

    @property
    def accept(self) -> Accept:
        return self._accept

    @property
    def max_v2_length(self) -> int:
        return self._max_v2_length

    @property
    def leftover(self) -> bytes:
        """Bytes fed after the header (empty until the header is complete)."""
        return bytes(self._buf) if self._header is not None else b""

    @property
    def consumed(self) -> int:
        """The header's length in bytes once it is complete, else 0."""
        return self._header.length if self._header is not None else 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer. Ignored once the header was found malformed."""
        if self._error is not None:
            return
        self._buf += data
        if self._header is not None:
            return
        try:
            self._advance()
        except ProxyProtocolError as exc:
            self._error = str(exc)
            self._buf = bytearray()

    def next_event(self) -> ProxyHeader | NeedData:
        """The header, or NEED_DATA; raises ProxyProtocolError for a malformed header."""
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        return NEED_DATA if self._header is None else self._header

    def _advance(self) -> None:
        if self._version == 0 and not self._match_signature():
            return
        if self._version == 1:
            self._advance_v1()
        else:
            self._advance_v2()

    def _match_signature(self) -> bool:
        """Check the new signature bytes; True once the whole signature has matched."""
        buf = self._buf
        if not buf:
            return False
        seen = 1 if buf[0] == V1_SIGNATURE[0] else 2 if buf[0] == V2_SIGNATURE[0] else 0
        if seen == 0:
            raise ProxyProtocolError(f"not a PROXY protocol header: {_preview(buf)}")
        if self._accept not in ("any", f"v{seen}"):
            raise ProxyProtocolError(f"PROXY v{seen} header where only {self._accept} is accepted")
        signature = V1_SIGNATURE if seen == 1 else V2_SIGNATURE
        end = min(len(buf), len(signature))
        if buf[self._matched : end] != signature[self._matched : end]:
            raise ProxyProtocolError(f"bad PROXY v{seen} signature: {_preview(buf)}")
        self._matched = end
        if end < len(signature):
            return False
        self._version = seen
        return True

    def _advance_v1(self) -> None:
        buf = self._buf
        limit = min(len(buf), V1_MAX_LENGTH)
        for i in range(self._scanned, limit):
            byte = buf[i]
            after_cr = buf[i - 1] == _CR
            if byte == _LF:
                if not after_cr:
                    raise ProxyProtocolError("v1 header ends in a bare LF, CRLF expected")
                line = bytes(buf[len(V1_SIGNATURE) : i - 1]).decode("ascii")
                self._complete(_parse_v1(line, i + 1), i + 1)
                return
            if after_cr:
                raise ProxyProtocolError("bare CR in v1 header, CRLF expected")
            if byte != _CR and not 0x20 <= byte <= 0x7E:
                raise ProxyProtocolError(f"byte 0x{byte:02x} in v1 header, printable ASCII only")
        self._scanned = limit
        if limit == V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header without CRLF in its first {V1_MAX_LENGTH} bytes")

    def _advance_v2(self) -> None:
        buf = self._buf
        if self._total == 0:
            # Each check runs as soon as its byte arrives: a few bytes, not a re-scan.
            if len(buf) > 12:
                if buf[12] >> 4 != 2:
                    raise ProxyProtocolError(f"unsupported PROXY v2 version {buf[12] >> 4}")
                if buf[12] & 0x0F not in _COMMANDS:
                    raise ProxyProtocolError(f"unknown PROXY v2 command {buf[12] & 0x0F}")
            if len(buf) > 13:
                if buf[13] >> 4 not in _FAMILIES:
                    raise ProxyProtocolError(f"unknown PROXY v2 address family {buf[13] >> 4}")
                if buf[13] & 0x0F not in _PROTOCOLS:
                    raise ProxyProtocolError(f"unknown PROXY v2 protocol {buf[13] & 0x0F}")
            if len(buf) < V2_FIXED_LENGTH:
                return
            length = (buf[14] << 8) | buf[15]
            if length > self._max_v2_length:
                raise ProxyProtocolError(
                    f"PROXY v2 header of {length} bytes after the fixed part, more than the "
                    f"{self._max_v2_length} allowed"
                )
            family, block = _FAMILIES[buf[13] >> 4]
            if length < block:
                raise ProxyProtocolError(
                    f"PROXY v2 length {length} does not cover the {block}-byte {family} "
                    "address block"
                )
            self._total = V2_FIXED_LENGTH + length
        if len(buf) >= self._total:
            self._complete(_parse_v2_body(bytes(buf[: self._total])), self._total)

    def _complete(self, header: ProxyHeader, length: int) -> None:
        self._header = header
        del self._buf[:length]


def parse_prefix(
    data: bytes, accept: Accept = "any", *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH
) -> ProxyHeader | None:
    """The header at the start of ``data``, or None when more bytes are needed.

    Raises ProxyProtocolError as soon as ``data`` shows the header is malformed. The
    header's ``length`` is how many bytes of ``data`` it took.
    """
    parser = ProxyParser(accept, max_v2_length=max_v2_length)
    parser.feed(data)
    event = parser.next_event()
    return None if event is NEED_DATA else event
