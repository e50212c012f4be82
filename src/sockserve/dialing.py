"""Reaching a server from the command-line tools (``sockserve client``, ``sockserve bench``).

An address as a URL for messages, a connected socket (TLS included, with what really
failed when the handshake does), a network error as one short phrase, and the option
types both tools share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

from sockserve.binding import Address, TCPAddress, UDPAddress, UnixAddress
from sockserve.framing import Framing, parse_framing

__all__ = [
    "ServerGone",
    "connect",
    "describe",
    "error_text",
    "framing_of",
    "positive",
    "tls_context",
    "tls_failure",
]


class ServerGone(Exception):
    """The server closed the connection, reset it, or cannot be reached: one line for the user."""


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
                sock = _wrap(sock, context, args.tls_server_name or host, args, url)
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
            sock = _wrap(sock, context, args.tls_server_name, args, url)
        return sock
    except (OSError, ssl.SSLError) as exc:
        raise ServerGone(f"cannot connect to {url}: {error_text(exc)}") from None


def _wrap(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_name: str | None,
    args: argparse.Namespace,
    url: str,
) -> ssl.SSLSocket:
    """``sock`` after the TLS handshake; closed, and ServerGone saying why, if it fails."""
    try:
        return context.wrap_socket(sock, server_hostname=server_name)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        message = tls_failure(exc, True, bool(args.tls_cert))
        raise ServerGone(f"cannot connect to {url}: {message}") from None
    except BaseException:
        sock.close()
        raise


@contextlib.contextmanager
def _closing_on_error(sock: socket.socket) -> Iterator[None]:
    try:
        yield
    except BaseException:
        sock.close()
        raise


def framing_of(spec: str) -> Framing | None:
    """The --framing option: None for lines (each tool's own fast path), else the framing;
    ValueError saying what is wrong with ``spec``."""
    return None if spec.strip().lower() == "line" else parse_framing(spec)
