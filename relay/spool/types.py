"""Value types that cross the spool's interface: what callers hand in and get back.

The SMTP server builds an ``Envelope`` (with one ``Recipient`` per accepted
RCPT TO) and passes it to ``Spool.commit``.  The scheduler gets ``Claim``
objects from ``Spool.claim`` and hands back one ``DeliveryResult`` per
recipient.  ``relay queue`` and the scheduler read ``StoredMessage`` views.
All times are Unix timestamps in seconds (``time.time()``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RecipientState(enum.StrEnum):
    """State of one recipient in the spool, stored as its value."""

    QUEUED = "queued"  # never attempted
    DEFERRED = "deferred"  # attempted, failed temporarily; retried at next_attempt
    DELIVERED = "delivered"  # terminal
    BOUNCED = "bounced"  # terminal: failed permanently (or expired)
    HELD = "held"  # set aside by `relay queue hold`; never claimed until released


# States in which a recipient still needs work; a message with one is never deleted.
PENDING_STATES = frozenset({RecipientState.QUEUED, RecipientState.DEFERRED, RecipientState.HELD})


class Outcome(enum.StrEnum):
    """Result of one delivery attempt for one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"  # temporary failure: try again at DeliveryResult.next_attempt
    FAILED = "failed"  # permanent failure: the recipient becomes bounced


class DsnState(enum.StrEnum):
    """Whether a recipient still owes the sender an RFC 3464 delivery status notification."""

    NONE = "none"  # no DSN needed (yet)
    PENDING = "pending"  # needed and not yet queued: the message must not be deleted
    QUEUED = "queued"  # the DSN is itself in the spool


@dataclass(frozen=True, slots=True)
class Recipient:
    """One forward-path accepted by RCPT TO, with its RFC 3461 DSN parameters."""

    address: str  # forward-path without angle brackets, e.g. "user@example.test"
    orcpt: str | None = None  # ORCPT value as received: "addr-type;xtext"
    notify: tuple[str, ...] = ()  # NEVER, or any of SUCCESS, FAILURE, DELAY; () if not given


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope of one message as the server accepted it.

    ``sender`` is the reverse-path without angle brackets: ``""`` is the null
    sender (``MAIL FROM:<>``), to which no DSN is ever sent.
    """

    sender: str
    recipients: tuple[Recipient, ...]
    size: int | None = None  # RFC 1870 SIZE parameter as declared, not the measured size
    body_type: str | None = None  # RFC 6152 BODY: "7BIT", "8BITMIME", or "BINARYMIME"
    smtputf8: bool = False  # RFC 6531 SMTPUTF8 parameter given
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"
    envid: str | None = None  # RFC 3461 ENVID, xtext as received
    client_address: str | None = None  # peer IP address; None for local injection
    helo_name: str | None = None  # name given in HELO/EHLO
    auth_user: str | None = None  # RFC 4954 authenticated identity, None if not authenticated
    protocol: str | None = None  # "SMTP", "ESMTP", "ESMTPS", "ESMTPSA", ... as for Received
    # Stored by ``relay sendmail``, so the scheduler logs ``picked_up`` at its first claim.
    local_submission: bool = False
    # For a DSN: the queue ID of the message it reports on; None for other messages.
    original_queue_id: str | None = None
    # For a copy that an alias forwarded: the queue ID that the sender got in the
    # 250 reply, which a DSN about the copy shows.  None for other messages.
    forwarded_from: str | None = None


@dataclass(frozen=True, slots=True)
class StoredRecipient:
    """A recipient as stored, with its delivery state."""

    index: int  # position in Envelope.recipients, stable for the message's life
    address: str
    orcpt: str | None
    notify: tuple[str, ...]
    state: RecipientState
    attempts: int
    next_attempt: float  # when the recipient is due (queued/deferred only)
    last_attempt: float | None
    last_reply: str | None  # last SMTP reply or local error text
    last_host: str | None  # host that gave last_reply
    dsn: DsnState
    # Local delivery targets of an alias (Maildir users, forwarded addresses)
    # that already got the message at an earlier attempt; the retry skips them.
    delivered_targets: tuple[str, ...] = ()
    # Whether a bounced recipient failed because its queue lifetime ran out;
    # None for a result recorded before spool schema version 4.
    expired: bool | None = None
    dsn_attempts: int = 0  # failed attempts to queue the DSN owed
    dsn_due: float = 0.0  # time.time() from which the owed DSN is tried again

    @property
    def domain(self) -> str:
        """The lower-cased domain part of the address ("" if there is none)."""
        return domain_of(self.address)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message's stored envelope and recipients (the body is read separately)."""

    queue_id: str
    arrival: float
    size: int  # length of the stored body in octets
    envelope: Envelope
    recipients: tuple[StoredRecipient, ...]
    # A claim has returned this local submission, and its ``picked_up`` line was due then.
    picked_up: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """Recipients of one message leased to one scheduler for delivery.

    While ``lease_until`` is in the future no other claim returns these
    recipients.  Report each with ``Spool.record_results``; a recipient whose
    lease runs out unreported becomes claimable again.
    """

    queue_id: str
    arrival: float
    size: int
    envelope: Envelope
    recipients: tuple[StoredRecipient, ...]
    lease_token: str  # identifies this lease; pass it back with the results
    lease_until: float
    # The message body, checked against its CRC-32, when the claim asked for bodies
    # and the body is at most the spool's claim_body_max_bytes; None otherwise.
    body: bytes | None = None
    # The first claim of a local submission (``Envelope.local_submission``) since it
    # was stored: the scheduler logs ``picked_up`` for it.
    picked_up: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one attempt for one recipient, as the scheduler reports it."""

    queue_id: str
    index: int  # StoredRecipient.index
    outcome: Outcome
    reply: str = ""  # the SMTP reply (or local error) that decided the outcome
    host: str = ""  # the host that gave the reply; "" for local delivery
    next_attempt: float | None = None  # required for DEFERRED
    # DELIVERED to a next hop that accepted the NOTIFY parameter, so that hop
    # reports success and this relay owes no success DSN (RFC 3461 section 5.2.1).
    next_hop_notifies: bool = False
    # DEFERRED after waiting past the delay warning time: the recipient owes an
    # "Action: delayed" DSN when its NOTIFY allows and none was queued before.
    delay_warning: bool = False
    # With DEFERRED: every local delivery target of the recipient that has the
    # message so far, earlier attempts included.  Stored in place of the
    # recipient's list; () leaves the stored list as it is.
    delivered_targets: tuple[str, ...] = ()
    # FAILED because the queue lifetime ran out (the reply is then the last
    # temporary one), so the DSN states that the message expired.
    expired: bool = False


@dataclass(frozen=True, slots=True)
class Attempt:
    """One line of a recipient's delivery history."""

    index: int
    time: float
    outcome: str  # an Outcome value, or "held", "released", "flushed" for operator actions
    reply: str
    host: str


@dataclass(frozen=True, slots=True)
class DsnRequest:
    """Recipients whose DSN a newly committed message carries (see ``Spool.commit``)."""

    queue_id: str  # the original message
    indexes: tuple[int, ...] = field(default=())  # its recipients the DSN reports on


def domain_of(address: str) -> str:
    """Return the lower-cased domain of an address, or "" when it has none."""
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""
