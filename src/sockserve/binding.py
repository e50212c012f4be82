"""Bind addresses: the grammar, socket creation, inherited descriptors and systemd activation.

``parse_address`` is pure (text in, address out); ``bind`` turns an address into bound,
listening sockets and closes whatever it opened if any step fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import re
import socket
import stat
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sockserve.settings import Settings

__all__ = [
    "DEFAULT_BIND",
    "Address",
    "FdAddress",
    "Listener",
    "TCPAddress",
    "UDPAddress",
    "UnixAddress",
    "WorkerSockets",
    "addresses_of",
    "bind",
    "bind_all",
    "format_sockaddr",
    "parse_address",
    "prepare_stop",
    "systemd_listeners",
]

SD_LISTEN_FDS_START = 3
DEFAULT_BIND = "127.0.0.1:9999"


@dataclass(frozen=True)
class TCPAddress:
    host: str | None  # None: every interface, dual-stack
    port: int


@dataclass(frozen=True)
class UDPAddress:
    host: str | None
    port: int


@dataclass(frozen=True)
class UnixAddress:
    path: str  # a leading "@" is a Linux abstract name
    datagram: bool = False

    @property
    def abstract(self) -> bool:
        return self.path.startswith("@")

    @property
    def sockaddr(self) -> str:
        return "\0" + self.path[1:] if self.abstract else self.path


@dataclass(frozen=True)
class FdAddress:
    fd: int
    name: str | None = None


Address = TCPAddress | UDPAddress | UnixAddress | FdAddress

_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^\[\]:/\s]*)):(?P<port>[0-9]{1,5})$",
    re.ASCII,
)
# The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
UNIX_PATH_MAX = 107
FD_MAX = 2**31 - 1


def _host_port(text: str, original: str) -> tuple[str | None, int]:
    match = _HOST_PORT.match(text)
    if not match:
        raise ValueError(f"{original!r} is not an address (expected HOST:PORT, [V6]:PORT or :PORT)")
    port = int(match.group("port"))
    if port > 65535:
        raise ValueError(f"{original!r}: port {port} is out of range 0-65535")
    host = match.group("v6") or match.group("host") or None
    if host is not None and re.fullmatch(r"[0-9.]+", host, re.ASCII) and host.count(".") != 3:
        # inet_aton would read "0" as 0.0.0.0 (every interface) and "127.1" as 127.0.0.1.
        hint = "0.0.0.0 or :PORT for every interface" if host.strip(".0") == "" else "a.b.c.d"
        raise ValueError(f"{original!r}: host {host!r} is not a full IPv4 address (write {hint})")
    if match.group("v6"):
        import ipaddress

        try:
            mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped  # type: ignore[union-attr]
        except ValueError:
            mapped = None
        if mapped is not None:
            raise ValueError(
                f"{original!r}: an IPv4-mapped IPv6 address cannot be bound; use {mapped}:{port}"
            )
    return host, port


def parse_address(text: str) -> Address:
    """Parse one ``--bind`` value; raise ValueError saying what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not an address")
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme == "tcp":
            return TCPAddress(*_host_port(rest, text))
        if scheme == "udp":
            return UDPAddress(*_host_port(rest, text))
        if scheme == "fd":
            if not re.fullmatch(r"[0-9]+", rest, re.ASCII):
                raise ValueError(f"{text!r}: fd:// needs a descriptor number")
            if int(rest) > FD_MAX:
                raise ValueError(f"{text!r}: descriptor number above {FD_MAX}")
            return FdAddress(int(rest))
        raise ValueError(f"{text!r}: unknown scheme {scheme!r} (tcp, udp, unix, unix-dgram, fd)")
    for prefix, datagram in (("unix-dgram:", True), ("unix:", False)):
        if text.startswith(prefix):
            path = text[len(prefix) :]
            if not path or path == "@":
                raise ValueError(f"{text!r}: missing socket path")
            if "\0" in path:
                raise ValueError(f"{text!r}: NUL in socket path")
            size = len(os.fsencode(path))
            if size > UNIX_PATH_MAX:
                raise ValueError(
                    f"{text!r}: the socket path is {size} bytes; a Unix socket address holds"
                    f" at most {UNIX_PATH_MAX} (use a shorter path or a relative one)"
                )
            return UnixAddress(path, datagram)
    return TCPAddress(*_host_port(text, text))


def format_sockaddr(family: int, sockaddr: object, datagram: bool = False) -> str:
    """The URL a bound socket is reported under: ``tcp://127.0.0.1:40123``, ``unix:/x.sock``."""
    if family == socket.AF_UNIX:
        if isinstance(sockaddr, bytes):
            sockaddr = sockaddr.decode("utf-8", "surrogateescape")
        path = str(sockaddr)
        if path.startswith("\0"):
            path = "@" + path[1:]
        return ("unix-dgram:" if datagram else "unix:") + path
    assert isinstance(sockaddr, tuple)
    host, port = sockaddr[0], sockaddr[1]
    scheme = "udp" if datagram else "tcp"
    if family == socket.AF_INET6:
        return f"{scheme}://[{host}]:{port}"
    return f"{scheme}://{host}:{port}"


@dataclass(eq=False)
class Listener:
    """A bound socket the server serves: stream (listening) or datagram."""

    sock: socket.socket
    datagram: bool
    url: str
    unix_path: str | None = None  # a socket file sockserve created and removes on close
    name: str | None = None  # systemd's FileDescriptorName, if any
    # Another process goes on serving this socket after we close our copy: systemd, the
    # parent that passed fd://N, or (in a worker) the supervisor.
    shared: bool = False
    _inode: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def family(self) -> int:
        return self.sock.family

    def describe(self) -> str:
        """The URL, with systemd's name for the socket when it has one."""
        return f"{self.url} ({self.name})" if self.name else self.url

    def refuse_new(self) -> None:
        """Keep new clients out of the backlog before it is drained for the last time.

        Closing a listening socket resets every connection still in its backlog, so one
        that arrives between the last accept() and close() would be reset after the
        client saw it connect. Removing the socket file (Unix) or dropping new SYNs (TCP
        on Linux; the client retries and is then refused) closes that gap; handshakes
        already under way still complete and are accepted by the drain.
        """
        if self.datagram or self.shared:
            return
        if self.unix_path:
            self._remove_file()
        elif self.family in (socket.AF_INET, socket.AF_INET6) and sys.platform == "linux":
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _drop_new_syns().fprog)

    def close(self) -> None:
        """Close the socket and remove the socket file if it is still the one we made
        (unless the socket is shared: then whoever serves it on removes it)."""
        if not self.shared:
            self._remove_file()
        self.sock.close()

    def _remove_file(self) -> None:
        if self.unix_path and self._inode:
            with contextlib.suppress(OSError):
                st = os.lstat(self.unix_path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.unix_path)
            self._inode = None


SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


class _SocketFilter:
    """A classic BPF program in the layout SO_ATTACH_FILTER takes (a struct sock_fprog)."""

    def __init__(self, *instructions: tuple[int, int, int, int]) -> None:
        import ctypes  # only needed when stopping: not loaded by every server at start

        code = b"".join(struct.pack("HBBI", *i) for i in instructions)
        self._code = ctypes.create_string_buffer(code, len(code))  # kept alive for the pointer
        self.fprog = struct.pack("HP", len(instructions), ctypes.addressof(self._code))


@functools.cache
def _drop_new_syns() -> _SocketFilter:
    """Run on each packet from the TCP header on: drop a bare SYN (a new handshake), pass
    the rest (among it the ACKs that finish handshakes already under way)."""
    return _SocketFilter(
        (0x30, 0, 0, 13),  # ldb [13]: the TCP flags
        (0x54, 0, 0, 0x12),  # and #(SYN|ACK)
        (0x15, 0, 1, 0x02),  # jeq #SYN: next, else skip one
        (0x06, 0, 0, 0),  # ret #0: drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: pass
    )


def prepare_stop() -> None:
    """Load what stopping a listener needs (ctypes, for the SYN filter) now: after a
    privilege drop, the interpreter's own files may no longer be readable."""
    if sys.platform == "linux":
        _drop_new_syns()


def _listener(sock: socket.socket, datagram: bool) -> Listener:
    return Listener(sock, datagram, format_sockaddr(sock.family, sock.getsockname(), datagram))


@contextlib.contextmanager
def _closing_on_error(socks: list[socket.socket]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for s in socks:
            s.close()
        raise


def _resolve(host: str | None, port: int, type_: int) -> list[tuple[int, tuple[object, ...]]]:
    if host is None:
        if socket.has_ipv6:
            return [(socket.AF_INET6, ("::", port))]
        return [(socket.AF_INET, ("0.0.0.0", port))]
    try:
        infos = socket.getaddrinfo(host, port, 0, type_, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {exc.strerror}") from None
    seen: list[tuple[int, tuple[object, ...]]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, tuple(sockaddr)))
    return seen


def _bind_inet(
    host: str | None, port: int, datagram: bool, backlog: int, reuse_port: bool
) -> list[Listener]:
    type_ = socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM
    socks: list[socket.socket] = []
    with _closing_on_error(socks):
        for family, resolved in _resolve(host, port, type_):
            sockaddr = resolved
            if port == 0 and socks:  # one ephemeral port for every address of the host
                sockaddr = (resolved[0], socks[0].getsockname()[1], *resolved[2:])
            sock = socket.socket(family, type_)
            socks.append(sock)
            if not datagram:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # Dual-stack only for the wildcard address; an explicit v6 address stays v6.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host is None else 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                shown = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
                reason = exc.strerror or str(exc)
                if exc.errno == errno.EACCES and 0 < port < 1024:
                    reason += ": ports below 1024 need root or CAP_NET_BIND_SERVICE"
                raise OSError(exc.errno, f"cannot bind {shown}:{sockaddr[1]}: {reason}") from None
            if not datagram:
                sock.listen(backlog)
            sock.setblocking(False)
        return [_listener(s, datagram) for s in socks]


def _remove_stale_unix_socket(path: str, type_: int) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, type_)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: left behind by a server that is gone
        return
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:  # a socket of the other type: someone's file
            raise OSError(errno.EADDRINUSE, f"{path} is in use by another socket") from None
        raise
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")


Owner = tuple[int, int]  # (uid, gid) a Unix socket file is handed to; -1 keeps one as is


def _check_directory(path: str) -> None:
    """Refuse a socket directory anyone may write to without the sticky bit: anyone could
    then replace the socket file (or the link to it) under the server's feet."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind unix:{path}: {directory}: {exc.strerror}") from None
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise OSError(
            errno.EPERM,
            f"cannot bind unix:{path}: {directory} is writable by anyone and has no sticky"
            " bit; use a directory only the service may write to",
        )


def _bind_file(sock: socket.socket, path: str, mode: int | None, owner: Owner | None) -> None:
    """Bind ``sock`` to the file ``path`` with ``mode`` and ``owner``, never changing a
    path's mode or owner afterwards: a link swapped in for the file is never followed.

    The mode comes from the umask at bind. With ``owner`` (root binding for the user
    ``--user`` drops to), the file is created by that user: the bind runs with the
    user's effective ids. Only where that user cannot create files (a directory only
    root may write to, where nobody else can swap the file either) does root bind and
    hand the file over with ``lchown``.
    """
    old_umask = os.umask(0o777 & ~mode) if mode is not None else None
    try:
        try:
            if owner is None:
                sock.bind(path)
            else:
                with _acting_as(owner):
                    sock.bind(path)
        except PermissionError:
            if owner is None or not _only_root_writes(path):
                raise
            sock.bind(path)
            os.chown(path, *owner, follow_symlinks=False)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind unix:{path}: {exc.strerror or exc}") from None
    finally:
        if old_umask is not None:
            os.umask(old_umask)


@contextlib.contextmanager
def _acting_as(owner: Owner) -> Iterator[None]:
    """Run the block with ``owner``'s effective user and group ids (-1: keep ours)."""
    uid, gid = owner
    old_uid, old_gid = os.geteuid(), os.getegid()
    if gid != -1:
        os.setegid(gid)
    try:
        if uid != -1:
            os.seteuid(uid)
        try:
            yield
        finally:
            if uid != -1:
                os.seteuid(old_uid)
    finally:
        if gid != -1:
            os.setegid(old_gid)


def _only_root_writes(path: str) -> bool:
    st = os.stat(os.path.dirname(os.path.abspath(path)))
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _bind_unix(
    address: UnixAddress, backlog: int, mode: int | None, owner: Owner | None = None
) -> Listener:
    type_ = socket.SOCK_DGRAM if address.datagram else socket.SOCK_STREAM
    if not address.abstract:
        _check_directory(address.path)
        _remove_stale_unix_socket(address.path, type_)
    sock = socket.socket(socket.AF_UNIX, type_)
    with _closing_on_error([sock]):
        if address.abstract:
            try:
                sock.bind(address.sockaddr)
            except OSError as exc:
                message = f"cannot bind unix:{address.path}: {exc.strerror or exc}"
                raise OSError(exc.errno, message) from None
        else:
            _bind_file(sock, address.path, mode, owner)
        # Named after the path asked for: a socket bound in a private directory reports
        # that directory's path as its own name.
        url = format_sockaddr(socket.AF_UNIX, address.sockaddr, address.datagram)
        listener = Listener(sock, address.datagram, url)
        if not address.abstract:
            st = os.lstat(address.path)
            listener.unix_path = address.path
            listener._inode = (st.st_dev, st.st_ino)
        if not address.datagram:
            sock.listen(backlog)
        sock.setblocking(False)
        return listener


def adopt_fd(fd: int, backlog: int) -> Listener:
    """Serve an inherited, already-bound socket (``fd://N`` or systemd)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"fd://{fd} is not a usable socket: {exc.strerror}") from None
    with _closing_on_error([sock]):
        datagram = sock.type == socket.SOCK_DGRAM
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise OSError(errno.ENOTSOCK, f"fd://{fd} is neither a stream nor a datagram socket")
        if not datagram and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(backlog)
        sock.setblocking(False)
        listener = _listener(sock, datagram)
        listener.shared = True
        return listener


def bind(
    address: Address,
    *,
    backlog: int,
    reuse_port: bool = False,
    unix_mode: int | None = None,
    owner: Owner | None = None,
) -> list[Listener]:
    """Create, bind and listen; one address may give several sockets (a name with v4 and v6).

    ``owner`` is the (uid, gid) a Unix socket file is handed to (the user ``--user`` drops to).
    """
    if isinstance(address, TCPAddress):
        return _bind_inet(address.host, address.port, False, backlog, reuse_port)
    if isinstance(address, UDPAddress):
        return _bind_inet(address.host, address.port, True, backlog, reuse_port)
    if isinstance(address, UnixAddress):
        return [_bind_unix(address, backlog, unix_mode, owner)]
    listener = adopt_fd(address.fd, backlog)
    listener.name = address.name
    return [listener]


def systemd_listeners(environ: Mapping[str, str] | None = None) -> list[FdAddress]:
    """The sockets systemd passed to this process (LISTEN_FDS), or [] if none.

    See sd_listen_fds(3): the variables count only when LISTEN_PID is our pid.
    """
    environ = os.environ if environ is None else environ
    try:
        if int(environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    result = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            message = f"LISTEN_FDS={count} but descriptor {fd} is not open"
            raise OSError(exc.errno, message) from None
        result.append(FdAddress(fd, names[i] if i < len(names) else None))
    return result


def addresses_of(settings: Settings) -> list[Address]:
    """What to serve: the bind settings, else systemd's sockets, else the default address."""
    if settings.bind:
        return [parse_address(text) for text in settings.bind]
    return list(systemd_listeners()) or [parse_address(DEFAULT_BIND)]


def bind_all(
    settings: Settings, addresses: Iterable[Address] | None = None, owner: Owner | None = None
) -> list[Listener]:
    """Bind every address (default: ``addresses_of(settings)``); all or nothing."""
    listeners: list[Listener] = []
    try:
        for address in addresses_of(settings) if addresses is None else addresses:
            listeners.extend(
                bind(
                    address,
                    backlog=settings.backlog,
                    reuse_port=settings.reuse_port,
                    unix_mode=settings.unix_mode,
                    owner=owner,
                )
            )
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


class WorkerSockets:
    """The sockets a supervisor's workers serve, bound once with the supervisor's rights:
    ``shared`` ones every worker inherits and, with reuse-port, one socket per worker and
    address, each joining the same SO_REUSEPORT group."""

    def __init__(self, settings: Settings, owner: Owner | None) -> None:
        self.settings = settings
        self.owner = owner
        self.shared: list[Listener] = []  # inherited by every worker
        self.reuse_addresses: list[Address] = []  # bound afresh for each worker
        self.first_reuse: list[Listener] = []  # the first worker's, bound at start

    @property
    def bound(self) -> list[Listener]:
        """What is bound now: the shared sockets and the first worker's own."""
        return self.shared + self.first_reuse

    def bind(self) -> None:
        """Bind everything once; with reuse-port, note the real ports to bind per worker."""
        addresses = addresses_of(self.settings)
        if not self.settings.reuse_port:
            self.shared = bind_all(self.settings, addresses, owner=self.owner)
            return
        try:
            for address in addresses:
                listeners = bind_all(self.settings, [address], owner=self.owner)
                if isinstance(address, (TCPAddress, UDPAddress)):
                    port = listeners[0].sock.getsockname()[1]
                    self.reuse_addresses.append(dataclasses.replace(address, port=port))
                    self.first_reuse.extend(listeners)
                else:
                    self.shared.extend(listeners)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for listener in self.bound:
            listener.close()
        self.shared = []
        self.first_reuse = []

    def for_worker(self) -> list[Listener]:
        """Shared sockets, plus (with reuse-port) the next worker's own ones (bound here,
        with the supervisor's rights, so each joins the same group)."""
        if not self.settings.reuse_port:
            return self.shared
        if self.first_reuse:
            first, self.first_reuse = self.first_reuse, []
            return self.shared + first
        return self.shared + bind_all(self.settings, self.reuse_addresses)
