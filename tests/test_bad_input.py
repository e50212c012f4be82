"""Bad settings fail at start in one line naming the setting, with the reason a user needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sockserve.settings import SETTINGS

LONG_PATH = "/tmp/" + "a" * 120


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "sockserve", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--backlog", "3000000000"],
            "backlog (--backlog, SOCKSERVE_BACKLOG): 3000000000 is above the maximum of 65535",
        ),
        (["-b", "fd://99999999999999999999"], "descriptor number above 2147483647"),
        (
            ["--max-datagram", "100g"],
            "max_datagram (--max-datagram, SOCKSERVE_MAX_DATAGRAM):"
            " 100g is above the maximum of 1M",
        ),
        (["--max-datagram", "4g"], "above the maximum of 1M"),
        (["--max-line", "2g"], "above the maximum of 1G"),
        (["--workers", "99999999999"], "above the maximum of 2147483647"),
        (["-b", "127.0.0.1:\uff19\uff19\uff19\uff18"], "is not an address"),
        (["-b", "fd://\uff13"], "fd:// needs a descriptor number"),
        (["--idle-timeout", "\uff15s"], "is not a duration"),
        (["--max-line", "\uff16\uff14k"], "is not a byte size"),
        (["--threads", "\uff18"], "is not an integer"),
        (["-b", "0:0"], "host '0' is not a full IPv4 address (write 0.0.0.0 or :PORT"),
        (["-b", "127.1:0"], "host '127.1' is not a full IPv4 address"),
        (
            ["-b", "[::ffff:127.0.0.1]:0"],
            "IPv4-mapped IPv6 address cannot be bound; use 127.0.0.1:0",
        ),
        (
            ["-b", f"unix:{LONG_PATH}"],
            "the socket path is 125 bytes; a Unix socket address holds at most 107",
        ),
        (["-b", f"unix-dgram:{LONG_PATH}"], "the socket path is 125 bytes"),
    ],
)
def test_bad_value_is_one_line(args: list[str], expected: str) -> None:
    code, err = run("demo", *args)
    assert code == 2, err
    assert err.startswith("sockserve: error: ") and err.count("\n") == 1, err
    assert expected in err


def test_unresolvable_host_has_no_errno_prefix() -> None:
    code, err = run("demo", "-b", "nonexistent.invalid:0")
    assert code == 1
    assert "cannot resolve 'nonexistent.invalid'" in err
    assert "[Errno" not in err and "Traceback" not in err


# Root binds any port: the CLI runs as nobody, what it needs imported before the switch.
AS_NOBODY = """
import encodings.idna, os, shutil, sys
import sockserve.cli, sockserve.observability, sockserve.server, sockserve.runner
import sockserve.examples.uppercase, sockserve.binding
sockserve.cli.build_parser().format_help()
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(sockserve.cli.main(sys.argv[1:]))
"""


def test_privileged_port_says_what_is_needed() -> None:
    result = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, "demo", "-b", "127.0.0.1:1"],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert result.returncode == 1, result.stderr
    assert (
        "cannot bind 127.0.0.1:1: Permission denied: ports below 1024 need root or"
        " CAP_NET_BIND_SERVICE" in result.stderr
    )
    assert "[Errno" not in result.stderr


def test_help_shows_values_and_default_of_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sockserve", "run", "--help"],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    ).stdout
    # Each option's entry: from its line to the next option's, unwrapped.
    entries = {
        entry.split()[0].rstrip(","): " ".join(entry.split())
        for entry in re.split(r"\n(?=  -)", out.split("settings (", 1)[1])[1:]
    }
    for s in SETTINGS:
        assert "Default: " in entries[s.option], entries[s.option]
    assert "--proxy-protocol {off,v1,v2,any}" in out
    assert "--log-format {text,json}" in out
    assert "--log-level {debug,info,warning,error,critical}" in out
    assert "--loop {auto,uvloop,asyncio}" in out
    assert "--tls-min-version {1.2,1.3}" in out
    idle = entries["--idle-timeout"]
    assert "500ms" in idle and "1m" in idle and "Default: 300s." in idle
    assert "64k" in entries["--max-line"] and "Default: 64k." in entries["--max-line"]
    assert "Default: 600." in entries["--unix-mode"]
    assert "Default: 127.0.0.1:9999" in entries["--bind"]
    assert "--no-access-log turns it off" in entries["--access-log"]
