"""Session-level and transaction-level state, and the events a session emits.

A ``Transaction`` lives from MAIL to the end of DATA (or the last BDAT chunk),
RSET, a new EHLO/HELO or STARTTLS; the ``SessionState`` around it survives
those (RFC 5321 section 4.1.4).  Events are what the sans-IO session asks its
owner to do: store a message, check credentials, start TLS, close.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.smtp.replies import Reply


@dataclass(slots=True)
class RecipientInfo:
    """One accepted RCPT: the forward-path and its RFC 3461 parameters."""

    address: str
    notify: tuple[str, ...] = ()
    # ORCPT as (address type, decoded address); re-encoded as xtext when stored.
    orcpt: tuple[str, str] | None = None


@dataclass(slots=True)
class Transaction:
    """One mail transaction: the envelope so far and any BDAT chunks received."""

    sender: str
    size: int | None = None
    body_type: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    # AUTH= on MAIL (RFC 4954 section 5), kept only from authenticated clients.
    auth: str | None = None
    recipients: list[RecipientInfo] = field(default_factory=list)
    # Lower-cased forward-paths already accepted, so a repeated RCPT is stored once.
    recipient_keys: set[str] = field(default_factory=set)
    # The octets of the BDAT chunks before the LAST one, in one buffer.  A
    # list of chunks would cost an object per chunk, so one-octet or empty
    # chunks would grow memory far past the message size limit.
    bdat_body: bytearray = field(default_factory=bytearray)
    chunk_octets: int = 0
    # Set once BDAT was used: DATA is then refused (RFC 3030 section 3).
    bdat_started: bool = False


@dataclass(slots=True)
class SessionState:
    """What survives a transaction: greeting, TLS, authentication."""

    helo_name: str | None = None
    esmtp: bool = False
    tls_active: bool = False
    auth_user: str | None = None

    @property
    def protocol(self) -> str:
        """The RFC 3848 ``with`` keyword for Received: SMTP, ESMTP, ESMTPS, ESMTPSA, ..."""
        if not self.esmtp:
            return "SMTP"
        suffix = ("S" if self.tls_active else "") + ("A" if self.auth_user else "")
        return "ESMTP" + suffix


@dataclass(frozen=True, slots=True)
class MessageReady:
    """End of data: store this message, then call ``Session.message_stored``.

    ``body`` is the message as received (unstuffed, CRLF line ends) with any
    headers a submission listener adds; the owner prepends the Received
    header from ``received_header(queue_id)``.
    """

    transaction: Transaction
    body: bytes
    helo_name: str
    protocol: str
    auth_user: str | None


@dataclass(frozen=True, slots=True)
class CheckCredentials:
    """AUTH exchange complete: verify, then call ``Session.credentials_checked``."""

    mechanism: str
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The 220 for STARTTLS is queued: send it, start TLS, then call ``Session.tls_started``."""


@dataclass(frozen=True, slots=True)
class Close:
    """Send what is queued, then close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A 4xx or 5xx reply was sent; the owner logs it."""

    command: str
    reply: Reply


Event = MessageReady | CheckCredentials | StartTLS | Close | Rejected
