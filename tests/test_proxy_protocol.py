"""PROXY protocol parser: the vector files at every split point, encoders, properties."""

from __future__ import annotations

import ipaddress
import itertools
import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockserve.proxy_protocol import (
    DEFAULT_MAX_V2_LENGTH,
    NEED_DATA,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Accept,
    ProxyHeader,
    ProxyParser,
    ProxyProtocolError,
    crc32c,
    encode_ssl,
    encode_v1,
    encode_v2,
    parse_prefix,
)

VECTORS = Path(__file__).parent / "vectors" / "proxy"
NAMES = sorted(path.stem for path in VECTORS.glob("*.bin"))

# Deterministic and bounded: the same examples on every run, the whole file in seconds.
CI = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    data = (VECTORS / f"{name}.bin").read_bytes()
    expected: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    return data, expected


def header_from_json(spec: dict[str, Any]) -> ProxyHeader:
    def address(value: Any) -> tuple[str, int] | str | None:
        return (value[0], value[1]) if isinstance(value, list) else value

    return ProxyHeader(
        version=spec["version"],
        command=spec["command"],
        family=spec["family"],
        protocol=spec["protocol"],
        source=address(spec["source"]),
        destination=address(spec["destination"]),
        tlvs=tuple((kind, bytes.fromhex(value)) for kind, value in spec["tlvs"]),
        length=spec["length"],
    )


Outcome = tuple[str, ProxyHeader | None, bytes]  # ("header"|"need"|error message, ...)


def run(chunks: Iterable[bytes], accept: Accept = "any", max_v2_length: int = 4096) -> Outcome:
    """Feed the chunks, asking for the event after each one, as a server would."""
    parser = ProxyParser(accept, max_v2_length=max_v2_length)
    seen: ProxyHeader | None = None
    error: str | None = None
    for chunk in chunks:
        parser.feed(chunk)
        try:
            event = parser.next_event()
        except ProxyProtocolError as exc:
            assert error in (None, str(exc)), "the error must stay the same once raised"
            error = str(exc)
            continue
        assert error is None, "an error must persist"
        if event is NEED_DATA:
            assert seen is None, "a complete header must stay complete"
            assert parser.consumed == 0
            assert parser.leftover == b""
        else:
            assert seen in (None, event)
            seen = event
            assert parser.consumed == event.length
    if error is not None:
        with pytest.raises(ProxyProtocolError):
            parser.next_event()
        return error, None, b""
    if seen is None:
        return "need", None, b""
    return "header", seen, parser.leftover


def check(outcome: Outcome, expected: dict[str, Any]) -> None:
    kind, header, leftover = outcome
    if "error" in expected:
        assert expected["error"] in kind
    elif expected.get("need_data"):
        assert kind == "need"
    else:
        assert kind == "header"
        assert header == header_from_json(expected["header"])
        assert leftover == bytes.fromhex(expected["leftover"])


def test_vectors_come_in_pairs() -> None:
    assert len(NAMES) >= 50
    assert sorted(p.stem for p in VECTORS.glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_vector_whole(name: str) -> None:
    data, expected = load(name)
    accept = expected["accept"]
    check(run([data], accept), expected)
    if "error" in expected:
        with pytest.raises(ProxyProtocolError, match=expected["error"]):
            parse_prefix(data, accept)
    elif expected.get("need_data"):
        assert parse_prefix(data, accept) is None
    else:
        assert parse_prefix(data, accept) == header_from_json(expected["header"])


@pytest.mark.parametrize("name", NAMES)
def test_vector_every_split(name: str) -> None:
    data, expected = load(name)
    for i in range(len(data) + 1):
        check(run([data[:i], data[i:]], expected["accept"]), expected)


@pytest.mark.parametrize("name", NAMES)
def test_vector_byte_by_byte(name: str) -> None:
    data, expected = load(name)
    check(run([data[i : i + 1] for i in range(len(data))], expected["accept"]), expected)


PROPERTIES = ["alpn", "authority", "netns"]
SSL_PROPERTIES = ["client", "verify", "ssl", "cert_in_connection", "cert_in_session"]
SSL_PROPERTIES += ["verified", "version", "cn", "cipher", "sig_alg", "key_alg"]


@pytest.mark.parametrize(
    "name", [n for n in NAMES if "properties" in json.loads((VECTORS / f"{n}.json").read_text())]
)
def test_vector_properties(name: str) -> None:
    data, expected = load(name)
    header = parse_prefix(data)
    assert header is not None
    for key, value in expected["properties"].items():
        if key == "alpn":
            assert header.alpn == (None if value is None else value.encode())
        elif key == "unique_id":
            assert header.unique_id == (None if value is None else bytes.fromhex(value))
        elif key == "ssl" and value is not None:
            ssl = header.ssl
            assert ssl is not None
            assert {k: getattr(ssl, k) for k in SSL_PROPERTIES} == value
        else:
            assert getattr(header, key) == value


def first_error_at(data: bytes, accept: Accept = "any", max_v2_length: int = 4096) -> int:
    """How many bytes, fed one at a time, it takes before the parser reports an error."""
    parser = ProxyParser(accept, max_v2_length=max_v2_length)
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        try:
            parser.next_event()
        except ProxyProtocolError:
            return i + 1
    raise AssertionError("no error")


def test_errors_are_raised_as_soon_as_the_bytes_show_them() -> None:
    assert first_error_at(b"GET / HTTP/1.1\r\n") == 1
    assert first_error_at(b"PROXI TCP4") == 5
    assert first_error_at(b"\r\n\r\nGET /") == 5
    assert first_error_at(b"PROXY " + b"1" * 500) == V1_MAX_LENGTH
    assert first_error_at(b"PROXY UNKNOWN\rX\r\n") == 15
    assert first_error_at(b"PROXY TCP4 \x00") == 12
    assert first_error_at(V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12)) == 13
    assert first_error_at(V2_SIGNATURE + b"\x21\x51\x00\x0c" + bytes(12)) == 14
    assert first_error_at(V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(100)) == 16
    assert first_error_at(V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8)) == 16
    assert first_error_at(b"\r\n", accept="v1") == 1
    assert first_error_at(b"PR", accept="v2") == 1


def test_error_drops_the_buffer_and_ignores_later_bytes() -> None:
    parser = ProxyParser()
    parser.feed(b"PROXY " + b"1" * 200)
    with pytest.raises(ProxyProtocolError, match="107"):
        parser.next_event()
    parser.feed(b"\r\n")
    with pytest.raises(ProxyProtocolError, match="107"):
        parser.next_event()
    assert parser.leftover == b""
    assert parser.consumed == 0


def test_error_messages_quote_at_most_a_few_bytes() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_prefix(b"X" * 10_000)
    assert len(str(info.value)) < 100
    assert str(info.value).endswith("...")
    with pytest.raises(ProxyProtocolError) as info:
        parse_prefix(b"PROXY " + b"Z" * 100 + b"\r\n")
    assert len(str(info.value)) < 100


def test_bytes_after_the_header_go_to_leftover() -> None:
    parser = ProxyParser()
    assert parser.next_event() is NEED_DATA
    parser.feed(b"")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"PROXY UNKNOWN\r\nab")
    first = parser.next_event()
    assert isinstance(first, ProxyHeader)
    parser.feed(b"cd")
    parser.feed(bytearray(b"e"))
    assert parser.next_event() is first
    assert parser.leftover == b"abcde"
    assert parser.consumed == 15


def test_api_misuse() -> None:
    with pytest.raises(ValueError, match="accept"):
        ProxyParser("v3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_v2_length"):
        ProxyParser(max_v2_length=-1)
    with pytest.raises(ValueError, match="max_v2_length"):
        ProxyParser(max_v2_length=65536)
    with pytest.raises(ValueError, match="accept"):
        parse_prefix(b"", "V1")  # type: ignore[arg-type]
    parser = ProxyParser("v2", max_v2_length=10)
    assert (parser.accept, parser.max_v2_length) == ("v2", 10)
    with pytest.raises(TypeError):
        parser.feed("PROXY")  # type: ignore[arg-type]
    assert ProxyProtocolError.__mro__[1] is ValueError


def test_max_v2_length() -> None:
    big = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=[(0xE0, bytes(5000))])
    with pytest.raises(ProxyProtocolError, match="more than the 4096 allowed"):
        parse_prefix(big)
    header = parse_prefix(big, max_v2_length=65535)
    assert header is not None
    assert header.length == len(big) == 16 + 12 + 3 + 5000
    local = encode_v2(command="LOCAL")
    assert parse_prefix(local, max_v2_length=0) is not None
    with pytest.raises(ProxyProtocolError, match="more than the 11 allowed"):
        parse_prefix(encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2)), max_v2_length=11)
    assert DEFAULT_MAX_V2_LENGTH == 4096


def test_crc32c_known_values() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4


def test_encoders_match_the_vectors() -> None:
    def raw(name: str) -> bytes:
        data, expected = load(name)
        return data[: expected["header"]["length"]]

    tcp4 = (("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert encode_v1(*tcp4) == raw("v1_tcp4")
    assert encode_v1() == raw("v1_unknown_short")
    assert encode_v1(("2001:db8::1", 12345), ("::ffff:192.0.2.1", 443)) == (
        b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 12345 443\r\n"
    )
    assert encode_v2(*tcp4) == raw("v2_tcp4")
    assert encode_v2(*tcp4, protocol="DGRAM") == raw("v2_udp4")
    assert encode_v2(*tcp4, tlvs=[(1, b"http/1.1")], crc=True) == raw("v2_crc32c_good")
    assert encode_v2("/var/run/client.sock", "/run/haproxy.sock") == raw("v2_unix")
    assert encode_v2("", "@sockserve-abstract", protocol="DGRAM") == raw(
        "v2_unix_dgram_unnamed_and_abstract"
    )
    assert encode_v2(command="LOCAL", protocol="UNKNOWN") == raw("v2_local")
    assert encode_v2(protocol="UNKNOWN") == raw("v2_unspec")
    ssl = encode_ssl(1, 1, [(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.2")])
    assert encode_v2(*tcp4, tlvs=[(PP2_TYPE_SSL, ssl)]) == raw("v2_ssl_no_cert")


def test_encoder_misuse() -> None:
    with pytest.raises(ValueError, match="both addresses"):
        encode_v1(("1.2.3.4", 1), None)
    with pytest.raises(ValueError, match="IPv4 or both IPv6"):
        encode_v1(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError, match="port"):
        encode_v1(("1.2.3.4", 65536), ("1.2.3.4", 2))
    with pytest.raises(ValueError):
        encode_v1(("example.com", 1), ("1.2.3.4", 2))
    with pytest.raises(ValueError, match="same kind"):
        encode_v2(("1.2.3.4", 1), "/path")
    with pytest.raises(ValueError, match="IPv4 or both IPv6"):
        encode_v2(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError, match="port"):
        encode_v2(("1.2.3.4", -1), ("1.2.3.4", 2))
    with pytest.raises(ValueError, match="108"):
        encode_v2("/" + "x" * 108, "/y")
    with pytest.raises(ValueError, match="TLV"):
        encode_v2(tlvs=[(256, b"")])
    with pytest.raises(ValueError, match="TLV"):
        encode_v2(tlvs=[(1, bytes(65536))])
    with pytest.raises(ValueError, match="65535"):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=[(1, bytes(65530))])


def test_header_helpers() -> None:
    header = parse_prefix(encode_v1())
    assert header is not None
    assert header.tlvs == ()
    assert (header.alpn, header.authority, header.unique_id, header.netns, header.ssl) == (
        None,
        None,
        None,
        None,
        None,
    )
    ssl_value = encode_ssl(0x01, 0, [(PP2_SUBTYPE_SSL_CIPHER, b"AES"), (0x99, b"x")])
    data = encode_v2(
        ("::1", 1),
        ("::2", 2),
        tlvs=[
            (PP2_TYPE_ALPN, b"h2"),
            (PP2_TYPE_ALPN, b"second"),
            (PP2_TYPE_AUTHORITY, "h\u00e9llo".encode()),
            (PP2_TYPE_SSL, ssl_value),
        ],
    )
    header = parse_prefix(data)
    assert header is not None
    assert header.alpn == b"h2"  # the first of a type
    assert header.authority == "h\u00e9llo"
    assert header.tlv(0x77) is None
    ssl = header.ssl
    assert ssl is not None
    assert ssl.ssl and not ssl.verified  # verify 0 but no client certificate
    assert ssl.cipher == "AES"
    assert ssl.tlv(0x99) == b"x"
    assert ssl.cn is None


# Hypothesis strategies ------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
tcp_pairs = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
unix_paths = st.one_of(
    st.text(st.characters(blacklist_characters="\0@", codec="utf-8"), max_size=30).filter(
        lambda p: len(p.encode()) <= 108
    ),
    st.text(st.characters(blacklist_characters="\0", codec="utf-8"), min_size=1, max_size=30)
    .map(lambda p: "@" + p)
    .filter(lambda p: len(p.encode()) <= 108),
)
v2_addresses: st.SearchStrategy[tuple[Any, Any]] = st.one_of(
    tcp_pairs, st.tuples(unix_paths, unix_paths), st.just((None, None))
)
plain_tlvs = st.tuples(
    st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID, 0x20)),
    st.binary(max_size=64),
)
ssl_tlvs = st.builds(
    lambda client, verify, subs: (PP2_TYPE_SSL, encode_ssl(client, verify, subs)),
    st.integers(0, 7),
    st.integers(0, 2**32 - 1),
    st.lists(st.tuples(st.integers(0x21, 0x25), st.binary(max_size=20)), max_size=4),
)
unique_ids = st.binary(max_size=128).map(lambda v: (PP2_TYPE_UNIQUE_ID, v))
tlv_lists = st.lists(st.one_of(plain_tlvs, ssl_tlvs, unique_ids), max_size=6)


def expected_address(value: Any) -> Any:
    if isinstance(value, tuple):
        ip = ipaddress.ip_address(value[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return (f"::ffff:{ip.ipv4_mapped}", value[1])  # the same text on every Python
        return (str(ip), value[1])
    return value


commands: st.SearchStrategy[Literal["PROXY", "LOCAL"]] = st.sampled_from(["PROXY", "LOCAL"])
protocols: st.SearchStrategy[Literal["STREAM", "DGRAM", "UNKNOWN"]] = st.sampled_from(
    ["STREAM", "DGRAM", "UNKNOWN"]
)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    source, destination = draw(v2_addresses)
    command = draw(commands)
    protocol = draw(protocols)
    tlvs = draw(tlv_lists)
    crc = draw(st.booleans())
    data = encode_v2(source, destination, command=command, protocol=protocol, tlvs=tlvs, crc=crc)
    return data, {
        "source": source,
        "destination": destination,
        "command": command,
        "protocol": protocol,
        "tlvs": tlvs,
        "crc": crc,
    }


@st.composite
def any_headers(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(v2_headers())[0]
    if draw(st.booleans()):
        return encode_v1()
    return encode_v1(*draw(tcp_pairs))


@CI
@given(v2_headers())
def test_v2_round_trip(case: tuple[bytes, dict[str, Any]]) -> None:
    data, spec = case
    header = parse_prefix(data)
    assert header is not None
    assert header.version == 2
    assert header.length == len(data)
    assert header.command == spec["command"]
    assert header.protocol == spec["protocol"]
    if spec["command"] == "LOCAL":
        assert header.source is header.destination is None
    else:
        assert header.source == expected_address(spec["source"])
        assert header.destination == expected_address(spec["destination"])
    tlvs = [(kind, value) for kind, value in header.tlvs if kind != PP2_TYPE_CRC32C]
    assert tlvs == spec["tlvs"]
    assert (header.tlv(PP2_TYPE_CRC32C) is not None) == spec["crc"]
    ssl_value = next((v for k, v in spec["tlvs"] if k == PP2_TYPE_SSL), None)
    if ssl_value is None:
        assert header.ssl is None
    else:
        assert header.ssl is not None
        assert encode_ssl(header.ssl.client, header.ssl.verify, header.ssl.tlvs) == ssl_value


@CI
@given(tcp_pairs)
def test_v1_round_trip(pair: tuple[tuple[str, int], tuple[str, int]]) -> None:
    data = encode_v1(*pair)
    assert len(data) <= V1_MAX_LENGTH
    header = parse_prefix(data)
    assert header is not None
    assert (header.version, header.command, header.protocol) == (1, "PROXY", "STREAM")
    assert header.family == f"TCP{ipaddress.ip_address(pair[0][0]).version}"
    assert header.source == expected_address(pair[0])
    assert header.destination == expected_address(pair[1])
    assert header.length == len(data)


def chunks_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@CI
@given(any_headers(), st.binary(max_size=40), st.lists(st.integers(0, 400), max_size=6))
def test_any_split_gives_the_same_header_and_leftover(
    header_bytes: bytes, trailing: bytes, cuts: list[int]
) -> None:
    data = header_bytes + trailing
    kind, header, leftover = run(chunks_at(data, cuts))
    assert kind == "header"
    assert header == parse_prefix(data)
    assert header is not None and header.length == len(header_bytes)
    assert leftover == trailing


@CI
@given(any_headers(), st.data())
def test_a_flipped_byte_gives_a_header_or_a_protocol_error(
    header: bytes, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(header) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = header[:index] + bytes([value]) + header[index + 1 :]
    outcome = run([mutated])
    try:
        prefix = parse_prefix(mutated)
    except ProxyProtocolError as exc:
        assert outcome[0] == str(exc)
    else:
        assert outcome[1] == prefix


prefixes = st.sampled_from(
    [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"]
)
accepts: st.SearchStrategy[Accept] = st.sampled_from(["any", "v1", "v2"])


@CI
@given(
    prefixes,
    st.binary(max_size=300),
    accepts,
    st.integers(0, 300),
    st.lists(st.integers(0, 310), max_size=5),
)
def test_random_bytes_raise_only_protocol_errors_and_stay_bounded(
    prefix: bytes, tail: bytes, accept: Accept, max_v2: int, cuts: list[int]
) -> None:
    data = prefix + tail
    parser = ProxyParser(accept, max_v2_length=max_v2)
    fed = 0
    for chunk in chunks_at(data, cuts):
        parser.feed(chunk)
        fed += len(chunk)
        try:
            event = parser.next_event()
        except ProxyProtocolError:
            break
        if event is NEED_DATA:
            # Still waiting: everything fed is header so far, so it is within the limits.
            limit = V1_MAX_LENGTH if data[:1] == b"P" else 16 + max_v2
            assert fed < limit
        else:
            assert event.length + len(parser.leftover) == fed


@CI
@given(prefixes, st.binary(max_size=200), accepts)
def test_parse_prefix_agrees_with_the_parser(prefix: bytes, tail: bytes, accept: Accept) -> None:
    data = prefix + tail
    kind, header, _ = run([data], accept)
    try:
        result = parse_prefix(data, accept)
    except ProxyProtocolError as exc:
        assert kind == str(exc)
    else:
        assert kind == ("need" if result is None else "header")
        assert header == result


def test_dripping_a_large_header_one_byte_at_a_time() -> None:
    data = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=[(PP2_TYPE_NOOP, bytes(4000))])
    kind, header, _ = run(data[i : i + 1] for i in range(len(data)))
    assert kind == "header"
    assert header is not None and header.length == len(data)


def test_crc32c_covers_the_whole_header() -> None:
    data = bytearray(encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=[(2, b"a")], crc=True))
    assert parse_prefix(bytes(data)) is not None
    data[20] ^= 0x01  # a source address bit
    with pytest.raises(ProxyProtocolError, match="CRC32C mismatch"):
        parse_prefix(bytes(data))


def test_ssl_tlv_layout() -> None:
    value = encode_ssl(0x07, 0, [(PP2_SUBTYPE_SSL_CN, b"me")])
    assert value == struct.pack("!BI", 7, 0) + b"\x22\x00\x02me"
