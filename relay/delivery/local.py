"""Deliver one job's local recipients: alias expansion, Maildir writes, re-queued remote targets.

Each recipient's local part is expanded through the aliases
(``relay.delivery.maildir``).  Local targets get a copy in their Maildir;
remote targets (``alias: user@elsewhere``) are committed to the spool as one
new message with the same sender, body, RET and ENVID, which the scheduler
then routes like any other.  An address with no mailbox and no alias fails with
``5.1.1``, and so does an alias none of whose members exists.  A write
error, or a ``maildir_root`` that cannot be read, defers the recipient
with ``4.3.0``.  An alias that expands to more than
``[local] alias_expansion_limit`` users and addresses is deferred with
``4.3.5`` (system incorrectly configured, RFC 3463): the check of the
aliases file rejects such an alias, so only a table that bypassed that
check gets here, and the operator can fix it without the mail bouncing.
Postfix 3.7 also defers a virtual alias expansion over its limit (with 4.6.0).

Each local user and the forwarded copy are the delivery targets of a
recipient.  When one target fails and the recipient is deferred, the targets
that already got the message are stored with the deferral
(``StoredRecipient.delivered_targets``), and the retry skips them and
reports them in its reply, so one alias delivers one copy to each target.
A process that dies between a Maildir write and the spool record that
follows delivers that target again at the retry: at least once, like any
other delivery.  ``LocalProgress`` keeps what a delivery has done so far,
so that a delivery cancelled by a shutdown can store it (see the scheduler).

An alias member that is neither an alias nor a user (``team: alice, ghost``
without ``maildir_root/ghost``) is not skipped.  It becomes the address
``ghost@`` the recipient's domain in the forwarded copy and is logged as
``alias_member_unknown``.  The copy's delivery fails it with ``550 5.1.1``,
and the DSN to the sender names the alias as Original-Recipient, the ORCPT
that the forwarded copy carries, while the other members get the message
once.  Postfix's local(8) bounces such a member the same way: ``unknown
user`` with ``5.1.1``, reporting the alias as the original recipient.
The copy stores the queue ID that the sender got in the ``250`` reply
(``Envelope.forwarded_from``), and the DSN shows that ID, not the copy's.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay._parser import xtext_encode
from relay.delivery.dsn import EXPANDED
from relay.delivery.maildir import Expansion, ExpansionLimitError, LocalDelivery, UnknownUser
from relay.log import log_event
from relay.smtp.received import header_block
from relay.spool import Claim, Envelope, MessageNotFound, Outcome, Recipient, Spool, SpoolError, StoredRecipient

logger = logging.getLogger("relay.delivery")


@dataclass(eq=False)
class LocalProgress:
    """The outcomes and delivered targets of one ``deliver_local`` call so far, read when a shutdown cancels it.

    The write or forward in flight runs as a task of its own, shielded from
    the cancellation, so it either completes or fails as a whole.
    ``finish_step`` waits for it and adds its targets.
    """

    outcomes: list[tuple[StoredRecipient, Outcome, str]] = field(default_factory=list)
    # Every target of each recipient that has the message, by recipient index,
    # earlier attempts included.  Only recipients that have one are listed.
    delivered: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # The recipient being delivered, with all the targets its alias expands to.
    current: StoredRecipient | None = None
    expansion: Expansion | None = None
    _step: asyncio.Future[Any] | None = None
    _step_targets: tuple[str, ...] = ()
    _step_done: Callable[[Any], None] | None = None

    def targets_of(self, recipient: StoredRecipient) -> tuple[str, ...]:
        """Return the targets of ``recipient`` that have the message."""
        return self.delivered.get(recipient.index, recipient.delivered_targets)

    async def run_step(
        self, work: Awaitable[Any], targets: tuple[str, ...], done: Callable[[Any], None] | None = None
    ) -> None:
        """Run ``work``, which delivers to ``targets``, and add them once it succeeds; call ``done`` with its result."""
        self._step = asyncio.ensure_future(work)
        self._step_targets = targets
        self._step_done = done
        try:
            await asyncio.shield(self._step)
        except asyncio.CancelledError:
            # The shield lets the step go on, and finish_step collects it.
            raise
        except BaseException:
            self._step = None
            raise
        self._end_step()

    async def finish_step(self) -> None:
        """Wait for the step in flight, if any, and add its targets when it succeeded."""
        if self._step is None:
            return
        try:
            await self._step
        except Exception:
            # Any failure means the target did not get the message, and the retry delivers it.
            self._step = None
            return
        self._end_step()

    def _end_step(self) -> None:
        assert self._step is not None and self.current is not None
        result = self._step.result()
        self._step = None
        recipient = self.current
        self.delivered[recipient.index] = (*self.targets_of(recipient), *self._step_targets)
        if self._step_done is not None:
            self._step_done(result)


async def deliver_local(
    local: LocalDelivery,
    spool: Spool,
    claim: Claim,
    recipients: Sequence[StoredRecipient],
    progress: LocalProgress | None = None,
) -> list[tuple[StoredRecipient, Outcome, str]]:
    """Deliver ``recipients`` of ``claim`` locally and return each one's outcome and reply.

    ``progress`` collects the outcomes as they come and the targets that
    got the message; a deferred recipient's targets are to be stored with it.
    """
    if progress is None:
        progress = LocalProgress()
    body = claim.body
    if body is None:
        try:
            body = await spool.load_body(claim.queue_id)
        except MessageNotFound:
            return []
    sender = claim.envelope.sender
    binary = claim.envelope.body_type == "BINARYMIME"
    delivered_to = _delivered_to(body)
    outcomes = progress.outcomes
    for recipient in recipients:
        progress.current, progress.expansion = recipient, None
        if recipient.address.lower() in delivered_to:
            reply = f"554 5.4.6 <{recipient.address}>: mail forwarding loop for {recipient.address}"
            outcomes.append((recipient, Outcome.FAILED, reply))
            continue
        local_part, at, domain = recipient.address.rpartition("@")
        if not at:
            local_part = recipient.address
        try:
            # Inside the OSError handler: a maildir_root that cannot be read is a
            # local error like a failed write, so the recipient is deferred.
            expansion = local.expand(local_part, domain)
            progress.expansion = expansion
            for user in expansion.users:
                if user in progress.targets_of(recipient):
                    continue
                write = asyncio.to_thread(local.deliver, user, sender, recipient.address, body, binary=binary)
                await progress.run_step(write, (user,))
            remote = tuple(address for address in expansion.remote if address not in progress.targets_of(recipient))
            if remote:
                await _forward(spool, claim, recipient, remote, expansion.unknown, body, progress)
        except UnknownUser:
            reply = f"550 5.1.1 <{recipient.address}>: no such user here"
            outcomes.append((recipient, Outcome.FAILED, reply + already_delivered(progress, recipient)))
            continue
        except ExpansionLimitError as exc:
            reply = f"451 4.3.5 <{recipient.address}>: {exc}"
            outcomes.append((recipient, Outcome.DEFERRED, reply + already_delivered(progress, recipient)))
            continue
        except (OSError, SpoolError) as exc:
            reply = f"451 4.3.0 local delivery failed: {exc}"
            outcomes.append((recipient, Outcome.DEFERRED, reply + already_delivered(progress, recipient)))
            continue
        outcomes.append((recipient, Outcome.DELIVERED, delivered_reply(expansion)))
    progress.current, progress.expansion = None, None
    return outcomes


def delivered_reply(expansion: Expansion) -> str:
    """Return the reply that reports a recipient delivered to every target of ``expansion``."""
    targets = ", ".join([*expansion.users, *expansion.remote])
    # Forwarded on: RFC 3464's "expanded", which the success DSN reports (see EXPANDED).
    verb = EXPANDED if expansion.remote else "delivered to"
    return f"250 2.0.0 {verb} {targets}"


async def _forward(
    spool: Spool,
    claim: Claim,
    recipient: StoredRecipient,
    remote: tuple[str, ...],
    unknown: tuple[str, ...],
    body: bytes,
    progress: LocalProgress,
) -> None:
    """Commit one copy of the message for the ``remote`` targets of ``recipient`` to the spool.

    ``unknown`` are the alias members with no mailbox among them (``Expansion.unknown``).
    """
    sender = claim.envelope.sender
    notify, orcpt = _forwarded_dsn(recipient)
    forwarded = Envelope(
        sender=sender,
        recipients=tuple(Recipient(address, orcpt, notify) for address in remote),
        body_type=claim.envelope.body_type,
        smtputf8=claim.envelope.smtputf8,
        ret=claim.envelope.ret,
        envid=claim.envelope.envid,
        # A copy of a copy (an alias member that is another local alias) keeps the first ID.
        forwarded_from=claim.envelope.forwarded_from or claim.queue_id,
    )
    trace = f"Delivered-To: {recipient.address}\r\n".encode()

    def log_forwarded(forward_id: str) -> None:
        log_event(logger, "forwarded", queue_id=claim.queue_id, to=recipient.address,
                  new_queue_id=forward_id, recipients=list(remote))
        members = [address for address in remote if address in unknown]
        if members:
            # Logged once the copy that bounces them is in the spool, so the line names that copy.
            log_event(logger, "alias_member_unknown", logging.WARNING, queue_id=claim.queue_id,
                      to=recipient.address, new_queue_id=forward_id, members=members)

    await progress.run_step(spool.commit(forwarded, trace + body), remote, log_forwarded)


def already_delivered(progress: LocalProgress, recipient: StoredRecipient) -> str:
    """Return the reply's note naming the targets of ``recipient`` that have the message, or "" for none."""
    targets = progress.targets_of(recipient)
    return f"; already delivered to {', '.join(targets)}" if targets else ""


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
