"""The server-side TLS context shared by STARTTLS and implicit-TLS listeners.

The oldest TLS version accepted is ``[tls] min_version``, TLS 1.2 by default
(RFC 8314 section 4.1 asks for 1.2 or later), with the standard library's
default cipher choice for that floor.  A lower floor also lowers OpenSSL's
security level (see ``set_minimum_version``).  Client certificates are not
requested.  The certificate chain and key come from
``[tls] cert`` and ``[tls] key``; a missing, unreadable or invalid file is
reported with its path and its key when the server starts, not at the first
STARTTLS.  An encrypted key is rejected, because no one is there to type its
passphrase.

A failed server-side handshake is logged as ``tls_failed`` with the reason
from ``handshake_failure_reason``: OpenSSL's reason code (for example
``WRONG_VERSION_NUMBER`` for a plaintext client, ``UNSUPPORTED_PROTOCOL``
for one that offers only TLS 1.1 or older), or what happened to the
connection.
"""

from __future__ import annotations

import ssl
import warnings

from relay.config import TLSConfig, read_error

# Config names to ssl.TLSVersion member names.  The members are looked up
# when used, because reading TLSv1 and TLSv1_1 raises a DeprecationWarning.
_TLS_VERSIONS = {"TLSv1": "TLSv1", "TLSv1.1": "TLSv1_1", "TLSv1.2": "TLSv1_2", "TLSv1.3": "TLSv1_3"}
# OpenSSL's own default list at security level 0.  OpenSSL 3.0 refuses TLS 1.0
# and 1.1 at level 1 and above, because their handshake signs with MD5+SHA-1,
# and Python's default list has no SHA-1 suites, which are all that TLS 1.0 and
# 1.1 can use.  The list still excludes NULL, anonymous, RC4 and DES suites.
_LEGACY_CIPHERS = "DEFAULT:@SECLEVEL=0"


class TLSSetupError(Exception):
    """The certificate or key cannot be loaded.

    ``config_key`` is the setting at fault: ``tls.cert``, or ``tls.key`` for
    a key that is unreadable, encrypted, no private key, or not the key of
    the certificate.
    """

    def __init__(self, message: str, config_key: str) -> None:
        super().__init__(message)
        self.config_key = config_key


class _PassphraseRequested(Exception):
    """OpenSSL asked for the passphrase of an encrypted key."""


def _refuse_passphrase() -> bytes:
    # Without a callback OpenSSL prompts on the terminal, which would block
    # relay serve and relay check-config until someone types a passphrase.
    raise _PassphraseRequested


def server_context(config: TLSConfig) -> ssl.SSLContext | None:
    """Return a server SSLContext, or None when no certificate is configured."""
    if not (config.cert and config.key):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    set_minimum_version(context, config.min_version)
    # Session tickets would let a resumed session skip the checks a full
    # handshake makes; SMTP sessions are long enough not to need them.
    context.options |= ssl.OP_NO_TICKET
    try:
        context.load_cert_chain(config.cert, config.key, password=_refuse_passphrase)
    except _PassphraseRequested:
        raise _setup_error(
            config,
            f"{config.key} is encrypted with a passphrase, which relay cannot ask for;"
            f" store the key unencrypted (openssl pkey -in {config.key} -out NEW-FILE) and keep it mode 0600",
            "tls.key",
        ) from None
    except ssl.SSLError as exc:  # before OSError, its base class
        raise _invalid_file_error(config, exc) from None
    except OSError as exc:
        raise _unreadable_file_error(config, exc) from None
    return context


def set_minimum_version(context: ssl.SSLContext, name: str) -> None:
    """Set the oldest TLS version ``context`` negotiates; ``name`` is one of config.TLS_VERSIONS.

    Below TLS 1.2 the cipher list becomes OpenSSL's DEFAULT at security level
    0, because without it OpenSSL 3.0 fails every TLS 1.0 and 1.1 handshake
    (checked with OpenSSL 3.0.19).  Level 0 also lets TLS 1.2 peers use
    SHA-1 CBC suites and short keys.  The TLS 1.3 suites stay as they are,
    and a peer that offers TLS 1.2 or 1.3 still negotiates it.
    """
    with warnings.catch_warnings():
        # Python 3.10 and later warn on TLS 1.0 and 1.1, which here are the operator's explicit choice.
        warnings.simplefilter("ignore", DeprecationWarning)
        version = ssl.TLSVersion[_TLS_VERSIONS[name]]
        context.minimum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers(_LEGACY_CIPHERS)


def _setup_error(config: TLSConfig, reason: str, config_key: str) -> TLSSetupError:
    return TLSSetupError(f"cannot load TLS certificate {config.cert} with key {config.key}: {reason}", config_key)


def _unreadable_file_error(config: TLSConfig, error: OSError) -> TLSSetupError:
    """Return the error for a file that OpenSSL could not read, found by reading each in turn."""
    for path, config_key in ((config.cert, "tls.cert"), (config.key, "tls.key")):
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            return _setup_error(config, read_error(path, exc), config_key)
    # Both read now (a file replaced while OpenSSL read it, say): blame the
    # key if the certificate loads alone.
    return _setup_error(config, str(error), "tls.key" if _certificate_loads(config.cert) else "tls.cert")


def _certificate_loads(path: str) -> bool:
    try:
        ssl.create_default_context(cafile=path)
    except OSError:  # ssl.SSLError included
        return False
    return True


def _invalid_file_error(config: TLSConfig, error: ssl.SSLError) -> TLSSetupError:
    """Return the error that names which of the two files OpenSSL could not use.

    OpenSSL's error for load_cert_chain ("PEM lib") is the same for a bad
    certificate and a bad key.  The certificate is loaded alone, as a CA
    file, to tell them apart.  A valid key of another type than the
    certificate's public key (an EC key for an RSA certificate) fails with
    NO_CERTIFICATE_ASSIGNED in OpenSSL 3.0, because OpenSSL files the key
    under its own type, where no certificate is loaded.
    """
    if error.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
        return _setup_error(
            config,
            f"{config.key} is not the private key of that certificate;"
            " give the matching key, or the certificate issued for this key",
            "tls.key",
        )
    if not _certificate_loads(config.cert):
        return _setup_error(config, f"{config.cert} contains no valid PEM certificate ({error})", "tls.cert")
    return _setup_error(config, f"{config.key} contains no valid PEM private key ({error})", "tls.key")


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
