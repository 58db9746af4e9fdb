"""Deliver one job's local recipients: alias expansion, Maildir writes, re-queued remote targets.

Each recipient's local part is expanded through the aliases
(``relay.delivery.maildir``).  Local targets get a copy in their Maildir;
remote targets (``alias: user@elsewhere``) are committed to the spool as one
new message with the same sender, body, RET and ENVID, which the scheduler
then routes like any other.  An address with no mailbox and no alias fails with
``5.1.1``; a write error, or a ``maildir_root`` that cannot be read, defers
the recipient with ``4.3.0``.  An alias that expands to more than
``[local] alias_expansion_limit`` users and addresses is deferred with
``4.3.5`` (system incorrectly configured, RFC 3463): the check of the
aliases file rejects such an alias, so only a table that bypassed that
check gets here, and the operator can fix it without the mail bouncing.
Postfix 3.7 also defers a virtual alias expansion over its limit (with 4.6.0).

Forwarding loops: a forwarded copy starts with ``Delivered-To:`` naming the
recipient it was expanded for, and a recipient that the message's header
already names in ``Delivered-To:`` fails with ``5.4.6`` instead of being
expanded again, as Postfix's local delivery does.  This stops loops the
aliases file cannot show, such as ``a: a@localhost`` or two aliases that
forward to each other through two local domains.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence

from relay._parser import xtext_encode
from relay.delivery.dsn import EXPANDED
from relay.delivery.maildir import ExpansionLimitError, LocalDelivery, UnknownUser
from relay.log import log_event
from relay.smtp.received import header_block
from relay.spool import Claim, Envelope, MessageNotFound, Outcome, Recipient, Spool, SpoolError, StoredRecipient

logger = logging.getLogger("relay.delivery")


async def deliver_local(
    local: LocalDelivery, spool: Spool, claim: Claim, recipients: Sequence[StoredRecipient]
) -> list[tuple[StoredRecipient, Outcome, str]]:
    """Deliver ``recipients`` of ``claim`` locally and return each one's outcome and reply."""
    body = claim.body
    if body is None:
        try:
            body = await spool.load_body(claim.queue_id)
        except MessageNotFound:
            return []
    sender = claim.envelope.sender
    binary = claim.envelope.body_type == "BINARYMIME"
    delivered_to = _delivered_to(body)
    outcomes: list[tuple[StoredRecipient, Outcome, str]] = []
    for recipient in recipients:
        if recipient.address.lower() in delivered_to:
            reply = f"554 5.4.6 <{recipient.address}>: mail forwarding loop for {recipient.address}"
            outcomes.append((recipient, Outcome.FAILED, reply))
            continue
        local_part = recipient.address.rpartition("@")[0] or recipient.address
        try:
            # Inside the OSError handler: a maildir_root that cannot be read is a
            # local error like a failed write, so the recipient is deferred.
            expansion = local.expand(local_part)
            for user in expansion.users:
                await asyncio.to_thread(
                    local.deliver, user, sender, recipient.address, body, binary=binary
                )
            if expansion.remote:
                notify, orcpt = _forwarded_dsn(recipient)
                forwarded = Envelope(
                    sender=sender,
                    recipients=tuple(Recipient(address, orcpt, notify) for address in expansion.remote),
                    body_type=claim.envelope.body_type,
                    smtputf8=claim.envelope.smtputf8,
                    ret=claim.envelope.ret,
                    envid=claim.envelope.envid,
                )
                trace = f"Delivered-To: {recipient.address}\r\n".encode()
                forward_id = await spool.commit(forwarded, trace + body)
                log_event(logger, "forwarded", queue_id=claim.queue_id, to=recipient.address,
                          new_queue_id=forward_id, recipients=list(expansion.remote))
        except UnknownUser:
            outcomes.append((recipient, Outcome.FAILED, f"550 5.1.1 <{recipient.address}>: no such user here"))
            continue
        except ExpansionLimitError as exc:
            outcomes.append((recipient, Outcome.DEFERRED, f"451 4.3.5 <{recipient.address}>: {exc}"))
            continue
        except (OSError, SpoolError) as exc:
            outcomes.append((recipient, Outcome.DEFERRED, f"451 4.3.0 local delivery failed: {exc}"))
            continue
        targets = ", ".join([*expansion.users, *expansion.remote])
        # Forwarded on: RFC 3464's "expanded", which the success DSN reports (see EXPANDED).
        verb = EXPANDED if expansion.remote else "delivered to"
        outcomes.append((recipient, Outcome.DELIVERED, f"250 2.0.0 {verb} {targets}"))
    return outcomes


_DELIVERED_TO = re.compile(rb"^Delivered-To:[ \t]*<?([^<>\s]+)>?[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def _delivered_to(body: bytes) -> set[str]:
    """Return the addresses in the message's Delivered-To header fields, lower-cased."""
    headers = header_block(body)
    return {match.decode("utf-8", "replace").lower() for match in _DELIVERED_TO.findall(headers)}


def _forwarded_dsn(recipient: StoredRecipient) -> tuple[tuple[str, ...], str | None]:
    """Return the NOTIFY and ORCPT that the forwarded copies of ``recipient`` carry.

    NOTIFY loses SUCCESS, because this delivery already reports it, and
    becomes NEVER when nothing else was requested.  ORCPT is the original
    recipient unless the client gave one.
    """
    notify = recipient.notify
    if notify:
        notify = tuple(item for item in notify if item != "SUCCESS") or ("NEVER",)
    orcpt = recipient.orcpt
    if orcpt is None and recipient.address.isascii():
        orcpt = "rfc822;" + xtext_encode(recipient.address)
    return notify, orcpt
