"""The one settings object: Python keyword arguments, CLI flags and SOCKSERVE_* variables.

Every setting is declared once, in ``Settings``; the CLI flags, the environment
variables and the settings reference in ``docs/settings.md`` are generated from it.
Values arrive as Python objects (``serve(max_line=4096)``) or strings (``--max-line 4k``,
``SOCKSERVE_MAX_LINE=4k``) and go through the same converter, so a bad value fails
the same way everywhere: one line naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sockserve.framing import DEFAULT_MAX_LINE
from sockserve.values import (
    CHOICES,
    VALUES,
    Network,
    backlog_size,
    bind_list,
    boolean,
    byte_size,
    choice,
    datagram_size,
    duration,
    file_mode,
    host_port,
    is_datagram,
    networks,
    non_negative_int,
    optional_str,
    positive_duration,
    positive_int,
    rate,
    show_size,
    stack_size,
)

if TYPE_CHECKING:
    from sockserve.proxy_protocol import Accept

__all__ = ["SETTINGS", "Setting", "Settings", "SettingsError", "env_settings", "markdown_reference"]

ENV_PREFIX = "SOCKSERVE_"


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting and is one line."""


def _setting(
    default: Any,
    convert: Callable[[object], Any],
    help: str,
    *,
    metavar: str | None = None,
    repeatable: bool = False,
    flag: bool = False,
    alias: str | None = None,
) -> Any:
    meta = {"convert": convert, "help": help, "metavar": metavar, "repeatable": repeatable}
    meta["flag"] = flag
    meta["alias"] = alias  # a second name for the flag and the environment variable
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything a server can be told. Build it with keywords, from the CLI or the environment.

    Unknown keywords raise TypeError; bad values raise SettingsError naming the setting.
    """

    bind: tuple[str, ...] = _setting(
        (),
        bind_list,
        "Address to listen on; repeatable. HOST:PORT, tcp://HOST:PORT, :PORT (all interfaces,"
        " dual-stack), [V6]:PORT, udp://HOST:PORT, unix:/PATH, unix:@NAME, unix-dgram:/PATH,"
        " fd://N. None given: systemd socket activation if LISTEN_FDS is set, else"
        " 127.0.0.1:9999.",
        metavar="ADDRESS",
        repeatable=True,
    )
    workers: int = _setting(
        1, positive_int, "Worker processes; 1 serves in this process with no supervisor."
    )
    loop: str = _setting(
        "auto", choice("auto", "uvloop", "asyncio"), "Event loop: uvloop if importable (auto)."
    )
    threads: int = _setting(
        128,
        positive_int,
        "Threads for blocking datagram handlers; at the limit reading waits. Blocking"
        " stream handlers get a thread per connection, up to --max-connections.",
    )
    thread_stack_size: int = _setting(
        1024 * 1024,
        stack_size,
        "Stack of each handler thread: room for the recursion limit's depth of Python"
        " calls; memory is only used as a thread touches it.",
        metavar="BYTES",
    )
    max_connections: int = _setting(
        10_000,
        positive_int,
        "Open connections per worker; at the limit accepting pauses and the kernel backlog"
        " holds new clients.",
    )
    max_connections_per_ip: int = _setting(
        0,
        non_negative_int,
        "Open connections one client may hold (its PROXY address if any; IPv6 by /64);"
        " one more is refused. For the whole server, whatever --workers. 0: no limit.",
        metavar="N",
    )
    connection_rate_per_ip: float = _setting(
        0.0,
        rate,
        "New connections per second one client may open (burst: one second's worth);"
        " faster ones are refused. For the whole server, whatever --workers. 0: no limit.",
        metavar="RATE",
    )
    connection_rate: float = _setting(
        0.0,
        rate,
        "New connections per second the server accepts (each of N workers 1/N of it); the"
        " rest wait in the kernel backlog, never refused. 0: no limit.",
        metavar="RATE",
    )
    backlog: int = _setting(4096, backlog_size, "Listen backlog (capped by net.core.somaxconn).")
    idle_timeout: float = _setting(
        300.0, duration, "Close a connection that sent nothing for this long; 0 never."
    )
    line_timeout: float = _setting(
        60.0,
        duration,
        "Time a message (a line, or a message of any framing) may take from its first byte"
        " to its last (line and message handlers, stream handlers waiting in readline or"
        " read_message): a peer dripping bytes is closed though never idle; 0 never.",
        alias="message_timeout",
    )
    max_line: int = _setting(
        DEFAULT_MAX_LINE,
        byte_size,
        "Longest line a line or stream handler reads; a longer one closes the connection.",
        metavar="BYTES",
    )
    max_buffered_input: int = _setting(
        1024**3,
        byte_size,
        "Input read from peers and not yet taken by handlers, per worker, that"
        " --max-connections share: each connection may buffer one --max-line line plus its"
        " share (4 KiB to 256 KiB) before reading from it pauses. Worst case in"
        " docs/deployment.md.",
        metavar="BYTES",
    )
    max_datagram: int = _setting(
        65507, datagram_size, "Largest datagram accepted; larger ones are dropped and logged."
    )
    max_write_buffer: int = _setting(
        1024 * 1024,
        byte_size,
        "Output send() and broadcast() may queue for one connection; a peer that lets more"
        " pile up (not reading) is closed as a slow consumer.",
        metavar="BYTES",
    )
    graceful_timeout: float = _setting(
        30.0,
        duration,
        "On SIGTERM/SIGINT, how long open connections may finish before they are closed.",
    )
    close_spread: float = _setting(
        0.0,
        duration,
        "While draining (stop, reload), close idle connections at times spread evenly over"
        " this many seconds instead of all at once, so clients do not all reconnect at once.",
    )
    max_connection_age: float = _setting(
        0.0,
        duration,
        "End a connection this old (plus or minus 10%) when it is next idle, as at shutdown"
        " (its handle_shutdown runs first), so long-lived clients rebalance; 0 never.",
    )
    handshake_timeout: float = _setting(
        10.0,
        positive_duration,
        "Time a new connection has to send its PROXY header and finish TLS; never off (a"
        " silent peer would hold its connection slot for good).",
    )
    worker_timeout: float = _setting(
        30.0,
        duration,
        "With a supervisor: a worker whose event loop stays blocked this long (a handler"
        " stuck in a loop, a stopped process), or not serving this long after it started"
        " (an import that hangs), is killed and replaced; 0 never.",
    )
    tls_cert: str | None = _setting(
        None, optional_str, "PEM certificate chain; turns TLS on.", metavar="PATH"
    )
    tls_key: str | None = _setting(
        None, optional_str, "PEM private key (default: in the certificate file).", metavar="PATH"
    )
    tls_client_ca: str | None = _setting(
        None,
        optional_str,
        "PEM CA bundle; clients must present a certificate it signed (mutual TLS).",
        metavar="PATH",
    )
    tls_min_version: str = _setting("1.2", choice("1.2", "1.3"), "Oldest TLS version accepted.")
    proxy_protocol: Literal["off"] | Accept = _setting(
        "off",
        choice("off", "v1", "v2", "any"),
        "Expect a PROXY protocol header (HAProxy) before any data; never guessed when off.",
    )
    proxy_from: tuple[Network, ...] = _setting(
        (),
        networks,
        "Peers allowed to send a PROXY header (CIDR); repeatable. Empty: any peer. A Unix"
        " socket peer has no address and never matches: with this set, PROXY on a Unix"
        " listener refuses everyone (its file's permissions, --unix-mode, decide who may"
        " connect).",
        metavar="CIDR",
        repeatable=True,
    )
    allow: tuple[Network, ...] = _setting(
        (),
        networks,
        "Serve only clients in these networks (CIDR); repeatable. Empty: everyone.",
        metavar="CIDR",
        repeatable=True,
    )
    deny: tuple[Network, ...] = _setting(
        (),
        networks,
        "Refuse clients in these networks (CIDR); repeatable; checked after --allow.",
        metavar="CIDR",
        repeatable=True,
    )
    reuse_port: bool = _setting(
        False, boolean, "Each worker gets its own SO_REUSEPORT socket.", flag=True
    )
    unix_mode: int | None = _setting(
        0o600,
        file_mode,
        "Permissions of Unix socket files, octal; the default lets only the owner connect.",
        metavar="MODE",
    )
    user: str | None = _setting(
        None, optional_str, "Drop to this user after binding.", metavar="USER"
    )
    group: str | None = _setting(
        None, optional_str, "Drop to this group after binding.", metavar="GROUP"
    )
    log_level: str = _setting(
        "info", choice("debug", "info", "warning", "error", "critical"), "Log level."
    )
    log_format: str = _setting("text", choice("text", "json"), "Log format.")
    access_log: bool = _setting(
        False, boolean, "Log one record per connection (logger sockserve.access).", flag=True
    )
    metrics: str | None = _setting(
        None,
        host_port,
        "Serve Prometheus metrics at http://HOST:PORT/metrics.",
        metavar="HOST:PORT",
    )
    reload: bool = _setting(
        False,
        boolean,
        "Development: restart workers when a .py file beside the handler's modules changes.",
        flag=True,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            raw = getattr(self, f.name)
            try:
                value = f.metadata["convert"](raw)
            except ValueError as exc:
                raise SettingsError(f"{describe(f.name)}: {exc}") from None
            object.__setattr__(self, f.name, value)
        if self.tls_key and not self.tls_cert:
            raise SettingsError(f"{describe('tls_key')}: needs --tls-cert as well")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError(f"{describe('tls_client_ca')}: needs --tls-cert as well")
        if self.tls_cert and self.bind and all(is_datagram(b) for b in self.bind):
            raise SettingsError(
                f"{describe('tls_cert')}: TLS needs a stream listener (tcp or unix);"
                f" {', '.join(self.bind)} would be served in plaintext"
            )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (validated like the original)."""
        return dataclasses.replace(self, **changes)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class Setting:
    """What the CLI, the environment and the docs need to know of one setting."""

    name: str
    default: Any
    help: str
    metavar: str | None
    repeatable: bool
    flag: bool
    convert: Callable[[object], Any]
    alias: str | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def options(self) -> tuple[str, ...]:
        """The flag, then its alias's."""
        alias = () if self.alias is None else ("--" + self.alias.replace("_", "-"),)
        return (self.option, *alias)

    @property
    def envs(self) -> tuple[str, ...]:
        """The environment variable, then its alias's."""
        alias = () if self.alias is None else (ENV_PREFIX + self.alias.upper(),)
        return (self.env, *alias)


def _settings() -> tuple[Setting, ...]:
    defaults = Settings()
    return tuple(
        Setting(
            f.name,
            getattr(defaults, f.name),
            f.metadata["help"],
            f.metadata["metavar"],
            f.metadata["repeatable"],
            f.metadata["flag"],
            f.metadata["convert"],
            f.metadata["alias"],
        )
        for f in dataclasses.fields(Settings)
    )


SETTINGS: tuple[Setting, ...] = _settings()
_BY_NAME = {s.name: s for s in SETTINGS}


def describe(name: str) -> str:
    """How an error names a setting: ``max_line (--max-line, SOCKSERVE_MAX_LINE)``."""
    s = _BY_NAME[name]
    return f"{name} ({s.option}, {s.env})"


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The SOCKSERVE_* variables that name a setting, as raw strings by setting name."""
    environ = os.environ if environ is None else environ
    found = {}
    for s in SETTINGS:
        for name in reversed(s.envs):  # the setting's own name wins over its alias
            if name in environ:
                found[s.name] = environ[name]
    return found


# SOCKSERVE_* variables that are not settings: the test suite's switches.
OTHER_ENV = frozenset({"SOCKSERVE_REQUIRE_ALL", "SOCKSERVE_TEST_HIDE"})


def unknown_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """SOCKSERVE_* variables that name no setting (typos), each with the likeliest meant."""
    environ = os.environ if environ is None else environ
    known = {name for s in SETTINGS for name in s.envs}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known | OTHER_ENV)
    if not unknown:
        return []
    import difflib  # only when there is a typo to explain

    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}

    def meant(name: str) -> str | None:
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, 1, 0.75)
        return suffixes[close[0]] if close else None

    return [(name, meant(name)) for name in unknown]


def metavar_of(s: Setting) -> str:
    """The flag's placeholder: the declared one, the choices, or the value's kind."""
    if s.metavar:
        return s.metavar
    if s.convert in CHOICES:
        return "{" + ",".join(CHOICES[s.convert]) + "}"
    return VALUES.get(s.convert, (s.name.upper(), ""))[0]


def values_of(s: Setting) -> str:
    """What a setting accepts, in words: ``one of off, v1, v2, any``, ``seconds: 30, 500ms``."""
    if s.convert in CHOICES:
        return "one of " + ", ".join(CHOICES[s.convert])
    if s.flag:
        return "a flag; --no-" + s.option[2:] + " turns it off"
    return VALUES.get(s.convert, ("", ""))[1]


def default_of(s: Setting) -> str:
    """The default as a user would type it: ``300s``, ``64k``, ``600``, ``(none)``."""
    value = s.default
    if s.name == "bind" and not value:
        return "127.0.0.1:9999, or the systemd sockets"
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if s.convert is file_mode and isinstance(value, int):
        return f"{value:o}"
    if s.convert in (duration, positive_duration) and isinstance(value, float):
        return f"{value:g}s"
    if s.convert in (byte_size, datagram_size) and isinstance(value, int):
        return show_size(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def help_of(s: Setting) -> str:
    """The whole --help text of a setting: what it does, what it takes, its default."""
    values = values_of(s)
    text = s.help.rstrip()
    if values:
        text += f" Values: {values}."
    return text + f" Default: {default_of(s)}."


def markdown_reference() -> str:
    """The settings reference, as written to docs/settings.md."""
    lines = [
        "# Settings reference",
        "",
        "Generated from `sockserve.settings.Settings` by `sockserve settings`; do not edit.",
        "",
        "Each setting is a keyword of `sockserve.serve()` and `Settings()`, a flag of"
        " `sockserve run`, and an environment variable. Flags beat the environment, which"
        " beats the defaults. Lists in the environment are comma- or space-separated.",
        "",
        "| keyword | flag | environment | default | values | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        flag = s.option if s.flag else f"{s.option} {metavar_of(s)}"
        if s.repeatable:
            flag += " (repeatable)"
        env = f"`{s.env}`"
        if s.alias is not None:
            flag += f"`, `{s.options[1]} {metavar_of(s)}"
            env += f", `{s.envs[1]}`"
        default = default_of(s).replace("|", "\\|")
        values = values_of(s).replace("|", "\\|")
        meaning = s.help.replace("|", "\\|")
        lines.append(f"| `{s.name}` | `{flag}` | {env} | `{default}` | {values} | {meaning} |")
    return "\n".join(lines) + "\n"
