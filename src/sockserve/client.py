"""``sockserve client ADDRESS``: the tutorial's interactive line client, done right.

Each input line is sent with a trailing newline and the whole reply is printed: the
client reads until the reply ends with a newline, or, for servers that answer without
one (the tutorial's ``data.upper()``), until no more bytes arrive for a short quiet
period. With ``--framing`` (``u32``, ``netstring``, ...) each input line is sent as one
message and each reply message is printed on a line, escaped where not printable.
Empty lines are never sent, a closed or unreachable server is one clear line on
stderr (noticed at once even while the interactive client waits for input), and end of
input (Ctrl-D) ends the session cleanly: every reply still on its way is printed first
(see ``Session.finish``). With ``--tls``, ``--tls-cert``/``--tls-key``
present a client certificate (mutual TLS), and a TLS failure says what it was: a
handshake the server refused, a client certificate it requires, a plaintext server.
"""

from __future__ import annotations

import argparse
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
from typing import BinaryIO

from sockserve.binding import (
    FdAddress,
    UDPAddress,
    UnixAddress,
    parse_address,
)
from sockserve.dialing import (
    ServerGone,
    connect,
    describe,
    error_text,
    framing_of,
    positive,
    tls_context,
    tls_failure,
)
from sockserve.framing import FRAMING_SPECS, Framing, ProtocolError

__all__ = ["add_arguments", "run"]

PROG = "sockserve client"
PROMPT = "> "
MAX_DATAGRAM = 65535


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sockserve client``."""
    parser.description = (
        "Send each input line to ADDRESS and print each reply. Interactive (with a "
        "'> ' prompt and line editing) when stdin is a terminal; with piped input it "
        "sends every line, prints every reply and exits at end of input, once the replies "
        "still on their way are printed (it ends its sending half and reads until the "
        "server closes, each wait up to --timeout; over TLS until --quiet-time passes "
        "without bytes). Empty lines "
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
        self._print_text(chunk, self.quiet_time, one_reply=True)
        if self.closed:
            raise self.closed_by_server()

    def _print_text(self, chunk: bytes | None, wait: float, one_reply: bool) -> None:
        """Print ``chunk`` and what follows until ``wait`` s pass without bytes or the
        server closes; with ``one_reply``, also stop after a chunk that ends a line."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        last = ""
        while chunk:
            # Printed as it comes: a long reply never piles up in memory.
            if text := decoder.decode(chunk):
                _write(text)
                last = text
            if one_reply and (chunk.endswith(b"\n") or self.datagram):
                break
            chunk = self._recv(wait)
        if text := decoder.decode(b"", final=True):
            _write(text)
            last = text
        if last and not last.endswith("\n"):
            _write("\n")

    def finish(self) -> None:
        """At end of input: print every reply still on its way, then let the session end.

        A reply is only known to be whole by its newline, message or a quiet period, so
        the last one (or a server's unasked message taken for a reply) may still be on its
        way. Over a plain stream we end our half of it (shutdown SHUT_WR): the server
        answers what it was sent and closes, and we print everything until it does, each
        wait up to --timeout. Python's TLS cannot end one half (sending close_notify waits
        for the server's), so over TLS we print until --quiet-time passes without bytes.
        """
        if self.datagram:
            return
        with self.lock:
            wait = self.quiet_time if self.tls else self.timeout
            if not self.tls:
                with contextlib.suppress(OSError):  # the server may be gone already
                    self.sock.shutdown(socket.SHUT_WR)
            if not self._drain(wait) and not self.tls:
                _note(f"server did not close the connection within {wait:g} s of end of input")

    def _drain(self, wait: float) -> bool:
        """Print what the server sends until it closes (True) or is quiet for ``wait`` s."""
        chunk = self._recv(wait)
        if chunk:
            self._print_text(chunk, wait, one_reply=False)
        return self.closed


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

    def _drain(self, wait: float) -> bool:
        while chunk := self._recv(wait):
            self.framer.feed(chunk)
            self._print_messages()
        if not self.closed:
            return False
        try:
            last = self.framer.end()
        except ProtocolError as exc:  # the server closed inside a message
            raise ServerGone(f"bad reply from {self.url}: {exc}") from None
        if last is not None:
            _write(escape(last) + "\n")
        return True

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
        framing = framing_of(args.framing)
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
            session.finish()
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
