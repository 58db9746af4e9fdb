"""The server-side TLS context shared by STARTTLS and implicit-TLS listeners.

TLS 1.2 is the minimum (RFC 8314 section 4.1 asks for 1.2 or later), with
the standard library's default cipher choice for that floor.  Client
certificates are not requested.  The certificate chain and key come from
``[tls] cert`` and ``[tls] key``; a missing or unreadable file is reported
with its path when the server starts, not at the first STARTTLS.

A failed server-side handshake is logged as ``tls_failed`` with the reason
from ``handshake_failure_reason``: OpenSSL's reason code (for example
``WRONG_VERSION_NUMBER`` for a plaintext client, ``UNSUPPORTED_PROTOCOL``
for one that offers only TLS 1.1 or older), or what happened to the
connection.
"""

from __future__ import annotations

import ssl

from relay.config import TLSConfig


class TLSSetupError(Exception):
    """The certificate or key cannot be loaded."""


def server_context(config: TLSConfig) -> ssl.SSLContext | None:
    """Return a server SSLContext, or None when no certificate is configured."""
    if not (config.cert and config.key):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Session tickets would let a resumed session skip the checks a full
    # handshake makes; SMTP sessions are long enough not to need them.
    context.options |= ssl.OP_NO_TICKET
    try:
        context.load_cert_chain(config.cert, config.key)
    except (OSError, ssl.SSLError) as exc:
        bad_file = _bad_file(config)
        reason = f"{bad_file} ({exc})" if bad_file else str(exc)
        raise TLSSetupError(f"cannot load TLS certificate {config.cert} with key {config.key}: {reason}") from None
    return context


def _bad_file(config: TLSConfig) -> str | None:
    """Return which of the two files OpenSSL could not use, or None when the check cannot tell.

    OpenSSL's error for load_cert_chain ("PEM lib") is the same for a bad
    certificate and a bad key.  The certificate is loaded alone, as a CA
    file, to tell them apart.
    """
    try:
        ssl.create_default_context(cafile=config.cert)
    except ssl.SSLError:
        return f"{config.cert} contains no valid PEM certificate"
    except OSError:
        return None
    return f"{config.key} is not a valid PEM private key, or not the key of that certificate"


# OpenSSL's reason codes for the handshake failures an operator sees most,
# with what they usually mean on a TLS listener.
_REASON_MEANINGS = {
    "WRONG_VERSION_NUMBER": "not a TLS handshake, plaintext SMTP perhaps",
    "HTTP_REQUEST": "an HTTP request, not a TLS handshake",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions this listener does not accept",
    "NO_SHARED_CIPHER": "no cipher suite in common with the client",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected this certificate",
}


def handshake_failure_reason(error: OSError | None) -> str:
    """Return why a server-side TLS handshake failed, in a few words for the log.

    ``error`` is what ``loop.start_tls`` or ``loop.connect_accepted_socket``
    raised, or None when the call returned although the connection closed
    before the handshake completed.  The asyncio of Python 3.11 and uvloop
    0.23 both raise ConnectionAbortedError when ``ssl_handshake_timeout``
    runs out, and a ConnectionResetError without an errno when the client
    closes its side before the handshake completes.
    """
    if error is None:
        return "connection closed during the handshake"
    if isinstance(error, ssl.SSLError) and error.reason:
        meaning = _REASON_MEANINGS.get(error.reason)
        return f"{meaning} ({error.reason})" if meaning else error.reason
    if isinstance(error, ConnectionAbortedError):
        return "handshake timed out"
    if isinstance(error, ConnectionResetError) and error.errno is None:
        return "client closed the connection during the handshake"
    return str(error) or type(error).__name__
