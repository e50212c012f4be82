"""What a setting's value may be: the converters behind every setting, and their limits.

A converter takes a str (CLI flag, environment variable) or a Python value (keyword
argument) and returns the typed value, raising ValueError with a short reason; the
caller (``sockserve.settings``) names the setting. ``CHOICES`` and ``VALUES`` say what
each converter accepts, for ``--help`` and ``docs/settings.md``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

INT_MAX = 2**31 - 1  # what the C calls behind most settings (listen, fds, counts) accept
MAX_BACKLOG = 65535  # the largest net.core.somaxconn traditionally allows; listen() caps it
MAX_SIZE = 1024**3  # 1 GiB: no line or buffer needs more, and some are allocated whole
# A UDP payload is at most 65,507 bytes; a Unix datagram is bounded by the send buffer
# (about 208 KiB by default). The receive buffer is allocated whole, once per listener.
MAX_DATAGRAM = 1024**2


def _to_int(value: object, minimum: int = 0, maximum: int = INT_MAX) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, int):
        result = value
    else:
        text = str(value).strip().replace("_", "")
        if not re.fullmatch(r"[+-]?[0-9]+", text, re.ASCII):  # ASCII digits only
            raise ValueError(f"{value!r} is not an integer")
        result = int(text)
    if result < minimum:
        raise ValueError(f"{result} is below the minimum of {minimum}")
    if result > maximum:
        raise ValueError(f"{result} is above the maximum of {maximum}")
    return result


def positive_int(value: object) -> int:
    return _to_int(value, minimum=1)


def non_negative_int(value: object) -> int:
    return _to_int(value, minimum=0)


def backlog_size(value: object) -> int:
    return _to_int(value, minimum=1, maximum=MAX_BACKLOG)


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def byte_size(value: object, maximum: int = MAX_SIZE) -> int:
    """A positive byte count: ``4096``, ``64k``, ``1M`` (binary multiples), at most 1 GiB."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+)\s*([kmg]?)i?b?\s*", str(value), re.I | re.ASCII)
        if not match:
            raise ValueError(f"{value!r} is not a byte size (examples: 4096, 64k, 1M)")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size < 1:
        raise ValueError(f"{size} is below the minimum of 1")
    if size > maximum:
        raise ValueError(f"{value} is above the maximum of {show_size(maximum)}")
    return size


def datagram_size(value: object) -> int:
    """A byte size of at most 1 MiB (the receive buffer is allocated whole)."""
    return byte_size(value, MAX_DATAGRAM)


def show_size(size: int) -> str:
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("k", 1024)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def stack_size(value: object) -> int:
    """A thread stack size: a byte size from 64k to 256M."""
    size = byte_size(value)
    if not 64 * 1024 <= size <= 256 * 1024**2:
        raise ValueError(f"{value!r} is outside 64k..256M")
    return size


def duration(value: object) -> float:
    """Seconds, >= 0: ``30``, ``2.5``, ``500ms``, ``1m``; 0 turns the timeout off."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = re.fullmatch(
            r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*", str(value), re.ASCII
        )
        if not match:
            raise ValueError(f"{value!r} is not a duration (examples: 30, 2.5, 500ms, 1m)")
        scale = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]
        seconds = float(match.group(1)) * scale
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{value!r} is not a duration >= 0")
    return seconds


def positive_duration(value: object) -> float:
    """A duration > 0: for deadlines that cannot be turned off."""
    seconds = duration(value)
    if not seconds:
        raise ValueError("0 is not allowed: this deadline cannot be turned off")
    return seconds


def rate(value: object) -> float:
    """Events per second, >= 0: ``50``, ``0.5``; 0 turns the limit off."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    else:
        text = str(value).strip().removesuffix("/s")
        if not re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", text, re.ASCII):
            raise ValueError(f"{value!r} is not a rate per second (examples: 50, 0.5)")
        result = float(text)
    if not result >= 0 or result == float("inf"):
        raise ValueError(f"{value!r} is not a rate >= 0")
    return result


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def optional_str(value: object) -> str | None:
    """A string or None; an empty one is refused (``SOCKSERVE_TLS_CERT=`` must not mean off)."""
    if value is None:
        return None
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if not text.strip():
        raise ValueError("empty: give a value, or leave the setting out")
    return text


def choice(*options: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return text

    convert.__doc__ = " | ".join(options)
    CHOICES[convert] = options
    return convert


CHOICES: dict[Callable[[object], str], tuple[str, ...]] = {}


def file_mode(value: object) -> int | None:
    """An octal permission mode such as ``660`` or ``0o600``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        text = str(value).strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ValueError(f"{value!r} is not an octal mode (example: 660)")
        mode = int(text, 8)
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"{value!r} is not a file mode")
    return mode


def _split_list(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part for part in re.split(r"[\s,]+", value) if part]
    if isinstance(value, Iterable):
        return list(value)
    return [value]


def networks(value: object) -> tuple[Network, ...]:
    """CIDR blocks (``10.0.0.0/8``, ``::1``); a comma- or space-separated string works too."""
    result = []
    for item in _split_list(value):
        try:
            result.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (example: 10.0.0.0/8)") from None
    return tuple(result)


def bind_list(value: object) -> tuple[str, ...]:
    """Bind addresses, checked against the grammar in ``sockserve.binding``."""
    from sockserve.binding import parse_address

    result = []
    for item in _split_list(value):
        text = str(item).strip()
        parse_address(text)  # raises ValueError naming what is wrong
        result.append(text)
    return tuple(result)


def is_datagram(bind: str) -> bool:
    from sockserve.binding import UDPAddress, UnixAddress, parse_address

    address = parse_address(bind)
    return isinstance(address, UDPAddress) or (
        isinstance(address, UnixAddress) and address.datagram
    )


def host_port(value: object) -> str | None:
    """``HOST:PORT`` for a TCP listener, or None for off."""
    if value is None or value == "":
        return None
    from sockserve.binding import TCPAddress, parse_address

    address = parse_address(str(value).strip())
    if not isinstance(address, TCPAddress):
        raise ValueError(f"{value!r} must be a TCP address such as 127.0.0.1:9100")
    return str(value).strip()


# What each converter accepts, for --help and docs/settings.md: (metavar, values).
VALUES: dict[Callable[[object], Any], tuple[str, str]] = {
    positive_int: ("N", "an integer >= 1"),
    non_negative_int: ("N", "an integer >= 0"),
    byte_size: ("BYTES", "bytes: 4096, 64k, 1M (binary multiples), at most 1G"),
    datagram_size: ("BYTES", "bytes: 4096, 64k (binary multiples), at most 1M"),
    backlog_size: ("N", f"an integer from 1 to {MAX_BACKLOG}"),
    duration: ("SECONDS", "seconds: 30, 2.5, 500ms, 1m, 1h"),
    positive_duration: ("SECONDS", "seconds > 0: 10, 2.5, 500ms, 1m"),
    rate: ("RATE", "per second: 50, 0.5"),
    file_mode: ("MODE", "octal: 600, 660"),
    networks: ("CIDR", "IP networks: 10.0.0.0/8, ::1"),
    host_port: ("HOST:PORT", "a TCP address"),
    bind_list: ("ADDRESS", ""),
    optional_str: ("TEXT", ""),
}
