"""``sockserve client ADDRESS``: the tutorial's interactive line client, done right.

Each input line is sent with a trailing newline and the whole reply is printed: the
client reads until the reply ends with a newline, or, for servers that answer without
one (the tutorial's ``data.upper()``), until no more bytes arrive for a short quiet
period. With ``--framing`` (``u32``, ``netstring``, ...) each input line is sent as one
message and each reply message is printed on a line, escaped where not printable.
Empty lines are never sent, a closed or unreachable server is one clear line on
stderr, and end of input (Ctrl-D) ends the session cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from sockserve.binding import (
    Address,
    FdAddress,
    TCPAddress,
    UDPAddress,
    UnixAddress,
    parse_address,
)
from sockserve.framing import FRAMING_SPECS, Framing, ProtocolError, parse_framing

__all__ = ["add_arguments", "run"]

PROG = "sockserve client"
PROMPT = "> "
MAX_DATAGRAM = 65535


class ServerGone(Exception):
    """The server closed the connection, reset it, or cannot be reached: one line for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sockserve client``."""
    parser.description = (
        "Send each input line to ADDRESS and print each reply. Interactive (with a "
        "'> ' prompt and line editing) when stdin is a terminal; with piped input it "
        "sends every line, prints every reply and exits at end of input. Empty lines "
        "are not sent. A line that gets no reply within --timeout seconds is reported "
        "on stderr and the client goes on with the next line, but then exits with "
        "status 1. Exit status: 0 at end of input (Ctrl-D), 1 when the server closed "
        "the connection, could not be reached or left a line unanswered, 130 on Ctrl-C."
    )
    parser.epilog = (
        "ADDRESS: HOST:PORT, tcp://HOST:PORT, [V6]:PORT, unix:/PATH, unix:@NAME, "
        "udp://HOST:PORT or unix-dgram:/PATH (datagrams: one line per datagram, the reply "
        "is one datagram)."
    )
    parser.add_argument("address", metavar="ADDRESS", help="where the server listens")
    parser.add_argument(
        "--timeout",
        type=positive(float),
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a connection and for the first bytes of a reply (default 10)",
    )
    parser.add_argument(
        "--quiet-time",
        type=positive(float),
        default=0.2,
        metavar="SECONDS",
        help="a reply without a trailing newline ends once no bytes arrive for this long "
        "(default 0.2)",
    )
    parser.add_argument(
        "--framing",
        default="line",
        metavar="SPEC",
        help="how messages travel (stream addresses): "
        + FRAMING_SPECS
        + " (u16..u64: big-endian length prefix, ..le: little-endian); with anything but"
        " line, each input line is sent as one message and each reply message is printed"
        " on a line of its own, escaped where not printable (default line)",
    )
    tls = parser.add_argument_group("TLS (stream addresses only)")
    tls.add_argument("--tls", action="store_true", help="speak TLS to the server")
    tls.add_argument(
        "--tls-ca", metavar="FILE", help="trust the CAs in this PEM file instead of the system's"
    )
    tls.add_argument(
        "--tls-insecure", action="store_true", help="do not verify the server's certificate"
    )
    tls.add_argument("--tls-server-name", metavar="NAME", help="the name to verify and send (SNI)")


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` greater than 0."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return convert


def describe(address: Address) -> str:
    """The address as a URL for messages: ``tcp://127.0.0.1:9999``, ``unix:/run/x.sock``."""
    if isinstance(address, (TCPAddress, UDPAddress)):
        scheme = "udp" if isinstance(address, UDPAddress) else "tcp"
        host = address.host or "localhost"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{address.port}"
    if isinstance(address, UnixAddress):
        return ("unix-dgram:" if address.datagram else "unix:") + address.path
    return f"fd://{address.fd}"


def error_text(exc: BaseException) -> str:
    """A network error as a short phrase for a one-line message: no errno, no traceback."""
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The client's TLS context from --tls-ca and --tls-insecure."""
    context = ssl.create_default_context(cafile=args.tls_ca)
    if args.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def connect(
    address: Address, args: argparse.Namespace, context: ssl.SSLContext | None = None
) -> socket.socket:
    """A connected socket for ``address``; raise ServerGone saying why it cannot be had."""
    url = describe(address)
    try:
        if isinstance(address, TCPAddress):
            host = address.host or "localhost"
            sock = socket.create_connection((host, address.port), timeout=args.timeout)
            if context is not None:
                try:
                    sock = context.wrap_socket(sock, server_hostname=args.tls_server_name or host)
                except BaseException:
                    sock.close()
                    raise
            return sock
        if isinstance(address, UDPAddress):
            host = address.host or "localhost"
            infos = socket.getaddrinfo(host, address.port, 0, socket.SOCK_DGRAM)
            family, type_, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, type_, proto)
            with _closing_on_error(sock):
                sock.connect(sockaddr)
            return sock
        assert isinstance(address, UnixAddress)
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM if address.datagram else socket.SOCK_STREAM
        )
        with _closing_on_error(sock):
            sock.settimeout(args.timeout)
            if address.datagram:
                sock.bind("")  # an autobound abstract name, so the server can reply
            sock.connect(address.sockaddr)
        if context is not None:
            with _closing_on_error(sock):
                sock = context.wrap_socket(sock, server_hostname=args.tls_server_name)
        return sock
    except (OSError, ssl.SSLError) as exc:
        raise ServerGone(f"cannot connect to {url}: {error_text(exc)}") from None


@contextlib.contextmanager
def _closing_on_error(sock: socket.socket) -> Iterator[None]:
    try:
        yield
    except BaseException:
        sock.close()
        raise


class Session:
    """One connection: send a line, collect its reply, print it."""

    def __init__(self, sock: socket.socket, url: str, timeout: float, quiet_time: float) -> None:
        self.sock = sock
        self.url = url
        self.timeout = timeout
        self.quiet_time = quiet_time
        self.datagram = sock.type == socket.SOCK_DGRAM
        self.closed = False  # the server closed its end; noticed while reading
        self.unanswered = 0

    def _recv(self, timeout: float) -> bytes | None:
        """Bytes from the server, or None when none came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except TimeoutError:
            return None
        except ConnectionRefusedError:
            raise ServerGone(f"cannot reach {self.url}: Connection refused") from None
        except (ConnectionResetError, ssl.SSLEOFError):
            raise ServerGone("server closed the connection") from None
        except (ConnectionError, ssl.SSLError) as exc:
            raise ServerGone(f"connection to {self.url} lost: {error_text(exc)}") from None
        if not data and not self.datagram:
            self.closed = True
        return data

    def check_open(self) -> None:
        """Print anything the server sent unasked; raise ServerGone if it has closed."""
        if not self.closed and not self.datagram:
            self.sock.settimeout(0.0)
            data = b""
            try:
                for _ in range(64):  # bounded: a server that never stops cannot hold us here
                    chunk = self.sock.recv(MAX_DATAGRAM)
                    if not chunk:
                        self.closed = True
                        break
                    data += chunk
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except (ConnectionResetError, ssl.SSLEOFError):
                self.closed = True
            except (ConnectionError, ssl.SSLError) as exc:
                raise ServerGone(f"connection to {self.url} lost: {error_text(exc)}") from None
            if data:
                _print_reply(data.decode("utf-8", "replace"))
        if self.closed:
            raise ServerGone("server closed the connection")

    def frame(self, line: bytes) -> bytes:
        """What goes on the wire for one input line."""
        return line + b"\n"

    def send(self, line: bytes) -> None:
        """Send one line (newline added) and print its reply."""
        self.check_open()
        data = self.frame(line)
        try:
            self.sock.settimeout(self.timeout)
            if self.datagram:
                self.sock.send(data)
            else:
                self.sock.sendall(data)
        except ConnectionRefusedError:
            raise ServerGone(f"cannot reach {self.url}: Connection refused") from None
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            raise ServerGone("server closed the connection") from None
        except OSError as exc:
            raise ServerGone(f"cannot send to {self.url}: {error_text(exc)}") from None
        self.receive()

    def receive(self) -> None:
        """Print one reply; a stream reply ends at a newline or after a quiet period."""
        chunk = self._recv(self.timeout)
        if chunk is None:
            self.unanswered += 1
            _note(f"no reply within {self.timeout:g} s")
            return
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        last = ""
        while chunk:
            # Printed as it comes: a long reply never piles up in memory.
            if text := decoder.decode(chunk):
                _write(text)
                last = text
            if chunk.endswith(b"\n") or self.datagram:
                break
            chunk = self._recv(self.quiet_time)
        if text := decoder.decode(b"", final=True):
            _write(text)
            last = text
        if last and not last.endswith("\n"):
            _write("\n")
        if self.closed:
            raise ServerGone("server closed the connection")


class FramedSession(Session):
    """A session in a framing: each input line is one message, each reply one message."""

    def __init__(
        self, sock: socket.socket, url: str, timeout: float, quiet_time: float, framing: Framing
    ) -> None:
        super().__init__(sock, url, timeout, quiet_time)
        self.framing = framing
        self.framer = framing.framer()

    def frame(self, line: bytes) -> bytes:
        return self.framing.encode(line)

    def _print_messages(self) -> int:
        """Print every complete reply message held; how many there were."""
        printed = 0
        try:
            while (message := self.framer.next_message()) is not None:
                _write(escape(message) + "\n")
                printed += 1
        except ProtocolError as exc:
            raise ServerGone(f"bad reply from {self.url}: {exc}") from None
        return printed

    def check_open(self) -> None:
        """Print any messages the server sent unasked; raise ServerGone if it has closed."""
        if not self.closed:
            self.sock.settimeout(0.0)
            try:
                for _ in range(64):  # bounded, as in Session.check_open
                    chunk = self.sock.recv(MAX_DATAGRAM)
                    if not chunk:
                        self.closed = True
                        break
                    self.framer.feed(chunk)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except (ConnectionResetError, ssl.SSLEOFError):
                self.closed = True
            except (ConnectionError, ssl.SSLError) as exc:
                raise ServerGone(f"connection to {self.url} lost: {error_text(exc)}") from None
            self._print_messages()
        if self.closed:
            raise ServerGone("server closed the connection")

    def receive(self) -> None:
        """Print one reply message (and any that came with it)."""
        deadline = time.monotonic() + self.timeout
        while not self._print_messages():
            left = deadline - time.monotonic()
            chunk = self._recv(left) if left > 0 else None
            if chunk is None:
                self.unanswered += 1
                _note(f"no reply within {self.timeout:g} s")
                return
            if not chunk:
                raise ServerGone("server closed the connection")
            self.framer.feed(chunk)


def escape(payload: bytes) -> str:
    """A message as one printable line: UTF-8 text as is, anything else escaped."""
    text = payload.decode("utf-8", "backslashreplace")
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _print_reply(text: str) -> None:
    """Write the end of a reply, adding a newline only when it lacks one."""
    _write(text if text.endswith("\n") or not text else text + "\n")


def _note(message: str) -> None:
    sys.stdout.flush()
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _lines(stdin: BinaryIO, interactive: bool) -> Iterator[bytes]:
    """Input lines without their line ending; a prompt and line editing on a terminal."""
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  # gives input() line editing and history
        while True:
            try:
                text = input(PROMPT)
            except EOFError:
                _write("\n")  # the shell's prompt starts on a fresh line after Ctrl-D
                return
            yield text.encode("utf-8", "surrogateescape")
    else:
        for raw in stdin:
            yield raw.rstrip(b"\r\n")


def run(args: argparse.Namespace) -> int:
    """Run the client; the exit status (0 end of input, 1 server trouble, 130 Ctrl-C)."""
    try:
        address = parse_address(args.address)
    except ValueError as exc:
        _note(f"error: {exc}")
        return 2
    if isinstance(address, FdAddress):
        _note("error: fd:// addresses are for servers; give the address the server listens on")
        return 2
    datagram = isinstance(address, UDPAddress) or (
        isinstance(address, UnixAddress) and address.datagram
    )
    try:
        framing = None if args.framing.strip().lower() == "line" else parse_framing(args.framing)
    except ValueError as exc:
        _note(f"error: --framing: {exc}")
        return 2
    if framing is not None and datagram:
        _note("error: --framing needs a stream address (a datagram is already one message)")
        return 2
    context = None
    if args.tls:
        if datagram:
            _note("error: --tls needs a stream address (tcp or unix)")
            return 2
        if isinstance(address, UnixAddress) and not (args.tls_server_name or args.tls_insecure):
            _note("error: --tls on a Unix socket needs --tls-server-name or --tls-insecure")
            return 2
        try:
            context = tls_context(args)
        except (OSError, ssl.SSLError) as exc:
            _note(f"error: --tls-ca {args.tls_ca}: {error_text(exc)}")
            return 2
    try:
        sock = connect(address, args, context)
    except ServerGone as exc:
        _note(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    session = (
        Session(sock, describe(address), args.timeout, args.quiet_time)
        if framing is None
        else FramedSession(sock, describe(address), args.timeout, args.quiet_time, framing)
    )
    interactive = sys.stdin.isatty()
    try:
        for line in _lines(sys.stdin.buffer, interactive):
            if not line.strip():
                _note("empty line not sent")
                continue
            try:
                session.send(line)
            except ValueError as exc:  # the framing cannot carry this line
                _note(f"not sent: {exc}")
    except ServerGone as exc:
        _note(str(exc))
        return 1
    except KeyboardInterrupt:
        if interactive:
            _write("\n")
        return 130
    except BrokenPipeError:  # our stdout's reader went away (``| head``); sockets raise ServerGone
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        sock.close()
    return 1 if session.unanswered else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
