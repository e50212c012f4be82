"""The one settings object: converters, errors naming the setting, env and docs."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockserve.binding import FdAddress, TCPAddress, UDPAddress, UnixAddress, parse_address
from sockserve.settings import SETTINGS, Settings, SettingsError, env_settings, markdown_reference

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_production_minded() -> None:
    s = Settings()
    assert s.max_connections >= 10_000
    assert s.idle_timeout > 0 and s.max_line > 0 and s.graceful_timeout > 0
    assert s.tls_min_version == "1.2" and s.proxy_protocol == "off"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"workers": -1}, "workers (--workers, SOCKSERVE_WORKERS)"),
        ({"workers": "many"}, "workers"),
        ({"max_line": "lots"}, "max_line (--max-line, SOCKSERVE_MAX_LINE)"),
        ({"bind": ["nonsense"]}, "bind (--bind, SOCKSERVE_BIND)"),
        ({"bind": ["127.0.0.1:99999"]}, "out of range"),
        ({"loop": "tokio"}, "loop"),
        ({"idle_timeout": "-3"}, "idle_timeout"),
        ({"allow": ["300.1.1.1/8"]}, "allow"),
        ({"unix_mode": "999"}, "unix_mode"),
        ({"access_log": "maybe"}, "access_log"),
        ({"metrics": "udp://127.0.0.1:9"}, "metrics"),
        ({"tls_key": "k.pem"}, "needs --tls-cert"),
        ({"proxy_protocol": "v3"}, "proxy_protocol"),
    ],
)
def test_bad_values_name_the_setting_in_one_line(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Settings(max_lines=3)  # type: ignore[call-arg]


def test_strings_and_values_convert_alike() -> None:
    raw: dict[str, Any] = {
        "max_line": "4k",
        "idle_timeout": "500ms",
        "access_log": "yes",
        "unix_mode": "660",
    }
    a = Settings(**raw)
    b = Settings(max_line=4096, idle_timeout=0.5, access_log=True, unix_mode=0o660)
    assert a == b
    listed: dict[str, Any] = {"bind": "127.0.0.1:1, unix:/tmp/x", "allow": "10.0.0.0/8 ::1"}
    assert Settings(**listed).bind == ("127.0.0.1:1", "unix:/tmp/x")
    assert Settings(**listed).allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1"),
    )
    assert Settings().replace(workers=3).workers == 3


def test_environment_variables() -> None:
    env = {"SOCKSERVE_MAX_LINE": "1k", "SOCKSERVE_BIND": "unix:/a udp://:5", "OTHER": "x"}
    assert env_settings(env) == {"max_line": "1k", "bind": "unix:/a udp://:5"}
    values: dict[str, Any] = env_settings(env)
    assert Settings(**values).max_line == 1024


def test_docs_reference_is_generated_from_the_settings() -> None:
    text = markdown_reference()
    for s in SETTINGS:
        assert s.option in text and s.env in text
    assert (ROOT / "docs" / "settings.md").read_text() == text, (
        "docs/settings.md is stale: run `sockserve settings > docs/settings.md`"
    )


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:80", TCPAddress("127.0.0.1", 80)),
        ("tcp://localhost:0", TCPAddress("localhost", 0)),
        (":8080", TCPAddress(None, 8080)),
        ("[::1]:9", TCPAddress("::1", 9)),
        ("tcp://[fe80::1%eth0]:9", TCPAddress("fe80::1%eth0", 9)),
        ("udp://0.0.0.0:53", UDPAddress("0.0.0.0", 53)),
        ("udp://:53", UDPAddress(None, 53)),
        ("unix:/run/app.sock", UnixAddress("/run/app.sock")),
        ("unix:@abstract", UnixAddress("@abstract")),
        ("unix-dgram:/run/d.sock", UnixAddress("/run/d.sock", datagram=True)),
        ("fd://3", FdAddress(3)),
    ],
)
def test_bind_grammar(text: str, address: object) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "text", ["", "80", "host", "http://x:1", "unix:", "fd://x", "1.2.3.4:65536", "[::1]", "a:b"]
)
def test_bind_grammar_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


@settings(max_examples=300, derandomize=True)
@given(st.text(max_size=40))
def test_bind_grammar_only_raises_value_error(text: str) -> None:
    try:
        parse_address(text)
    except ValueError:
        pass


@settings(max_examples=200, derandomize=True)
@given(st.ip_addresses(), st.integers(0, 65535), st.sampled_from(["tcp", "udp"]))
def test_bind_grammar_round_trips_ip_addresses(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, scheme: str
) -> None:
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        with pytest.raises(ValueError, match="IPv4-mapped"):
            parse_address(f"{scheme}://{host}:{port}")
        return
    address = parse_address(f"{scheme}://{host}:{port}")
    assert (address.host, address.port) == (str(ip), port)  # type: ignore[union-attr]
