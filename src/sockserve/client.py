"""``sockserve client ADDRESS``: the tutorial's interactive line client, done right.

Each input line is sent with a trailing newline and the whole reply is printed: the
client reads until the reply ends with a newline, or, for servers that answer without
one (the tutorial's ``data.upper()``), until no more bytes arrive for a short quiet
period. With ``--framing`` (``u32``, ``netstring``, ...) each input line is sent as one
message and each reply message is printed on a line, escaped where not printable.
Empty lines are never sent, a closed or unreachable server is one clear line on
stderr (noticed at once even while the interactive client waits for input), and end of
input (Ctrl-D) ends the session cleanly. With ``--tls``, ``--tls-cert``/``--tls-key``
present a client certificate (mutual TLS), and a TLS failure says what it was: a
handshake the server refused, a client certificate it requires, a plaintext server.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import os
import select
import signal
import socket
import ssl
import sys
import threading
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
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="present this PEM client certificate (mutual TLS); the key too unless --tls-key",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")


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
    """The client's TLS context from --tls-ca, --tls-insecure, --tls-cert and --tls-key;
    ValueError with a one-line message naming the option and file."""
    try:
        context = ssl.create_default_context(cafile=args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-ca {args.tls_ca}: {error_text(exc)}") from None
    if args.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if args.tls_cert:
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                reason = "the key does not match the certificate"
            elif args.tls_key:
                reason = f"cannot load them: {error_text(exc)}"
            else:
                reason = "no private key in the file (give it with --tls-key)"
            files = f"{args.tls_cert}" + (f" and --tls-key {args.tls_key}" if args.tls_key else "")
            raise ValueError(f"--tls-cert {files}: {reason}") from None
        except OSError as exc:
            name = "--tls-key" if args.tls_key and exc.filename == args.tls_key else "--tls-cert"
            raise ValueError(f"{name} {exc.filename or args.tls_cert}: {error_text(exc)}") from None
    return context


# OpenSSL's reasons for a server's refusal of the handshake, as a user would put it.
_REFUSALS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate"
    " (give --tls-cert and --tls-key)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server rejected our client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the CA of our client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says our client certificate has expired",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the server refused the TLS handshake (no common"
    " version or cipher, or a client certificate it requires)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the server refused our TLS version",
    "TLSV1_ALERT_ACCESS_DENIED": "the server denied access",
}
# What reading a plaintext reply as TLS looks like.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")


def tls_failure(exc: BaseException, during_handshake: bool, with_cert: bool) -> str:
    """What really failed, from an error of a TLS connection."""
    reason = exc.reason if isinstance(exc, ssl.SSLError) else None
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate did not verify: {exc.verify_message} ({reason})"
    if reason in _REFUSALS:
        return _REFUSALS[reason]
    if reason in _NOT_TLS:
        return "the server did not answer in TLS (is it a plaintext server?)"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and during_handshake:
        return "no TLS handshake reply in time (is it a plaintext server waiting for a line?)"
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, EOFError, BrokenPipeError)):
        if during_handshake:
            return "the server closed the connection during the TLS handshake"
        if not with_cert:
            return (
                "the server closed the connection right after the TLS handshake (does it"
                " require a client certificate? give --tls-cert and --tls-key)"
            )
        return "server closed the connection"
    return f"TLS failed: {error_text(exc)}"


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
                except (OSError, ssl.SSLError) as exc:
                    sock.close()
                    message = tls_failure(exc, True, bool(args.tls_cert))
                    raise ServerGone(f"cannot connect to {url}: {message}") from None
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
            try:
                sock = context.wrap_socket(sock, server_hostname=args.tls_server_name)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                message = tls_failure(exc, True, bool(args.tls_cert))
                raise ServerGone(f"cannot connect to {url}: {message}") from None
            except BaseException:
                sock.close()
                raise
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

    def __init__(
        self,
        sock: socket.socket,
        url: str,
        timeout: float,
        quiet_time: float,
        with_cert: bool = False,
    ) -> None:
        self.sock = sock
        self.url = url
        self.timeout = timeout
        self.quiet_time = quiet_time
        self.datagram = sock.type == socket.SOCK_DGRAM
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.with_cert = with_cert  # we presented a client certificate
        self.closed = False  # the server closed its end; noticed while reading
        self.received = False  # any byte came from the server
        self.unanswered = 0
        # Held while the socket is used; the watcher takes it while we wait for input.
        self.lock = threading.Lock()

    def closed_by_server(self) -> ServerGone:
        """The server ended the stream; over TLS before any reply, say what that suggests."""
        if self.tls and not self.received and not self.with_cert:
            return ServerGone(tls_failure(EOFError(), False, False))
        return ServerGone("server closed the connection")

    def lost(self, exc: BaseException) -> ServerGone:
        """ServerGone saying what ended the connection (over TLS: what TLS reported)."""
        if self.tls and isinstance(exc, (ssl.SSLError, ConnectionError)):
            message = tls_failure(exc, False, self.with_cert)
            if message == "server closed the connection":
                return ServerGone(message)
            return ServerGone(f"connection to {self.url} lost: {message}")
        if isinstance(exc, (ConnectionResetError, ssl.SSLEOFError, BrokenPipeError)):
            return ServerGone("server closed the connection")
        return ServerGone(f"connection to {self.url} lost: {error_text(exc)}")

    def _recv(self, timeout: float) -> bytes | None:
        """Bytes from the server, or None when none came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except TimeoutError:
            return None
        except ConnectionRefusedError:
            raise ServerGone(f"cannot reach {self.url}: Connection refused") from None
        except (ConnectionError, ssl.SSLError) as exc:
            raise self.lost(exc) from None
        if not data and not self.datagram:
            self.closed = True
        elif data:
            self.received = True
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
                    self.received = True
                    data += chunk
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except (ConnectionError, ssl.SSLError) as exc:
                raise self.lost(exc) from None
            if data:
                _print_reply(data.decode("utf-8", "replace"))
        if self.closed:
            raise self.closed_by_server()

    def frame(self, line: bytes) -> bytes:
        """What goes on the wire for one input line."""
        return line + b"\n"

    def send(self, line: bytes) -> None:
        """Send one line (newline added) and print its reply."""
        with self.lock:
            self._send(line)

    def _send(self, line: bytes) -> None:
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
        except (ConnectionError, ssl.SSLError) as exc:
            raise self.lost(exc) from None
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
            raise self.closed_by_server()


class FramedSession(Session):
    """A session in a framing: each input line is one message, each reply one message."""

    def __init__(
        self,
        sock: socket.socket,
        url: str,
        timeout: float,
        quiet_time: float,
        framing: Framing,
        with_cert: bool = False,
    ) -> None:
        super().__init__(sock, url, timeout, quiet_time, with_cert)
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
                    self.received = True
                    self.framer.feed(chunk)
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except (ConnectionError, ssl.SSLError) as exc:
                raise self.lost(exc) from None
            self._print_messages()
        if self.closed:
            raise self.closed_by_server()

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
                raise self.closed_by_server()
            self.framer.feed(chunk)


class CloseWatcher:
    """While an interactive session waits for input, notices at once that the server
    closed the connection (or sent something unasked) instead of at the next line.

    A thread waits for the socket to become readable and reads it under the session's
    lock; when the server is gone it interrupts ``input()`` with SIGUSR1, whose handler
    raises the ServerGone in the main thread.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.waiting = False  # the main thread is in input()
        self.gone: ServerGone | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="close-watcher", daemon=True)

    def __enter__(self) -> CloseWatcher:
        self._previous = signal.signal(signal.SIGUSR1, self._interrupted)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        signal.signal(signal.SIGUSR1, self._previous)

    def _interrupted(self, signum: int, frame: object) -> None:
        if self.waiting and self.gone is not None:
            self.waiting = False
            _write("\n")  # off the prompt's line
            raise self.gone

    def _watch(self) -> None:
        sock = self.session.sock
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], 0.5)
            except (OSError, ValueError):  # closed under us: the session is over
                return
            if not ready or not self.waiting:
                self._stop.wait(0.05)  # the main thread reads it soon: do not spin meanwhile
                continue
            with self.session.lock:
                if self._stop.is_set() or not self.waiting:
                    continue
                try:
                    self.session.check_open()
                except ServerGone as exc:
                    self.gone = exc
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
                    return


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


def _lines(
    stdin: BinaryIO, interactive: bool, watcher: CloseWatcher | None = None
) -> Iterator[bytes]:
    """Input lines without their line ending; a prompt and line editing on a terminal."""
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  # gives input() line editing and history
        while True:
            try:
                if watcher is not None:
                    watcher.waiting = True
                text = input(PROMPT)
            except EOFError:
                _write("\n")  # the shell's prompt starts on a fresh line after Ctrl-D
                return
            finally:
                if watcher is not None:
                    watcher.waiting = False
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
        except ValueError as exc:
            _note(f"error: {exc}")
            return 2
    elif args.tls_cert or args.tls_key:
        _note("error: --tls-cert and --tls-key need --tls")
        return 2
    try:
        sock = connect(address, args, context)
    except ServerGone as exc:
        _note(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    url, with_cert = describe(address), bool(args.tls_cert)
    session = (
        Session(sock, url, args.timeout, args.quiet_time, with_cert)
        if framing is None
        else FramedSession(sock, url, args.timeout, args.quiet_time, framing, with_cert)
    )
    interactive = sys.stdin.isatty()
    watcher = CloseWatcher(session) if interactive and not datagram else None
    try:
        with watcher if watcher is not None else contextlib.nullcontext():
            for line in _lines(sys.stdin.buffer, interactive, watcher):
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
