"""TLS server contexts with secure defaults from the ssl module.

Each file is checked on its own first, so an error names the setting and the file
(``tls_cert (--tls-cert, SOCKSERVE_TLS_CERT): /tmp/nope.pem: no such file``) instead of
OpenSSL's ``[SSL] PEM lib``.
"""

from __future__ import annotations

import errno
import ssl

from sockserve.settings import Settings, SettingsError, describe

__all__ = ["server_context"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_OS_REASONS = {
    errno.ENOENT: "no such file",
    errno.EACCES: "permission denied",
    errno.EISDIR: "is a directory",
}


def server_context(settings: Settings) -> ssl.SSLContext:
    """A server context from the settings; SettingsError naming the setting and file."""
    assert settings.tls_cert is not None
    cert = _read("tls_cert", settings.tls_cert)
    if "CERTIFICATE-----" not in cert:
        raise _error("tls_cert", settings.tls_cert, "no PEM certificate in the file")
    if settings.tls_key is None:
        key_setting, key_path = "tls_cert", settings.tls_cert
        if "PRIVATE KEY-----" not in cert:
            raise _error(
                "tls_cert", key_path, "no private key in the file (give it with --tls-key)"
            )
    else:
        key_setting, key_path = "tls_key", settings.tls_key
        if "PRIVATE KEY-----" not in _read("tls_key", key_path):
            raise _error("tls_key", key_path, "no PEM private key in the file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[settings.tls_min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            message = f"the key does not match the certificate {settings.tls_cert}"
            raise _error(key_setting, key_path, message) from None
        message = f"cannot load the certificate and key: {exc.reason or exc}"
        raise _error("tls_cert", settings.tls_cert, message) from None
    except OSError as exc:  # replaced or made unreadable since it was read just now
        raise _error("tls_cert", settings.tls_cert, _os_reason(exc)) from None
    if settings.tls_client_ca:
        ca = settings.tls_client_ca
        if "CERTIFICATE-----" not in _read("tls_client_ca", ca):
            raise _error("tls_client_ca", ca, "no PEM certificate in the file")
        try:
            context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) else _os_reason(exc)
            raise _error("tls_client_ca", ca, f"cannot load: {reason}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def _read(setting: str, path: str) -> str:
    try:
        with open(path, "rb") as file:
            return file.read(1 << 20).decode("ascii", errors="replace")
    except OSError as exc:
        raise _error(setting, path, _os_reason(exc)) from None


def _os_reason(exc: OSError) -> str:
    return _OS_REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()


def _error(setting: str, path: str, reason: str) -> SettingsError:
    return SettingsError(f"{describe(setting)}: {path}: {reason}")
