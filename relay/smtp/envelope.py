"""Conversion of a finished SMTP transaction into the envelope that the spool stores.

ORCPT and ENVID arrive decoded from xtext (RFC 3461 section 4) and are
stored in xtext again, the form in which the delivery client passes them
on.  ``relay serve`` and ``relay sendmail -bs`` store their messages with
the same envelope.
"""

from __future__ import annotations

from relay._parser import xtext_encode
from relay.smtp.transaction import MessageReady
from relay.spool.types import Envelope, Recipient


def spool_envelope(event: MessageReady, client_address: str | None) -> Envelope:
    """Return the spool's envelope of a finished transaction; ``client_address`` is None for local mail."""
    transaction = event.transaction
    recipients = []
    for info in transaction.recipients:
        orcpt = f"{info.orcpt[0]};{xtext_encode(info.orcpt[1])}" if info.orcpt else None
        recipients.append(Recipient(address=info.address, orcpt=orcpt, notify=info.notify))
    envid = xtext_encode(transaction.envid) if transaction.envid is not None else None
    return Envelope(
        sender=transaction.sender,
        recipients=tuple(recipients),
        size=transaction.size,
        body_type=transaction.body_type,
        smtputf8=transaction.smtputf8,
        ret=transaction.ret,
        envid=envid,
        client_address=client_address,
        helo_name=event.helo_name,
        auth_user=event.auth_user,
        protocol=event.protocol,
    )
