"""Build RFC 3464 delivery status notifications (bounces) for spooled messages.

A DSN is a ``multipart/report; report-type=delivery-status`` message
(RFC 6522) from ``MAILER-DAEMON@hostname`` with three parts: a plain-text
explanation, the ``message/delivery-status`` fields (per message:
``Reporting-MTA``, ``Arrival-Date``, ``Original-Envelope-Id``; per recipient:
``Final-Recipient``, ``Original-Recipient``, ``Action``, ``Status``,
``Remote-MTA``, ``Diagnostic-Code``, ``Last-Attempt-Date``; ENVID and ORCPT
decoded from the xtext the spool keeps), and the original
message: its header only (``text/rfc822-headers``) unless the sender asked
for ``RET=FULL`` and the DSN reports a failure (``message/rfc822``); an original with UTF-8 in its header
goes as ``message/global-headers`` or ``message/global`` (RFC 6533).

The envelope sender of a DSN is the null reverse-path (RFC 5321 section
4.5.5), so a DSN that fails is never answered by another DSN.  Which
recipients need a DSN (NOTIFY, never for the null sender) is decided by the
spool when results are recorded; this module only formats.

The ``Status`` comes from the enhanced code in the recorded reply; without
one, the reply code's class gives ``X.0.0``.  An expired recipient keeps the
status of its last temporary failure with ``Action: failed``, as RFC 3464
section 2.3.3 allows, and its ``Diagnostic-Code`` is that last reply alone
(RFC 3464 section 2.3.6 reserves the field for the remote MTA's text).  The
plain-text part states that the message expired and how long it was queued.
A delivered recipient is reported as ``relayed`` when
a remote host took it (the spool owes such a DSN only when that host did
not offer DSN, RFC 3461 section 5.2.2) and as ``delivered`` after local
delivery.  A still-deferred recipient is a delay warning: ``Action:
delayed`` with ``Will-Retry-Until``.

Dates carry the local UTC offset, as Postfix's mail_date() writes them,
because ``-0000`` means an unknown local time zone (RFC 5322 section 3.3).

The plain-text part escapes control characters, line and paragraph
separators and bidirectional formatting characters in addresses, so a reader
sees each address as it is.  The delivery-status part writes a UTF-8 address
as utf-8-addr-xtext (RFC 6533 section 3), which keeps it US-ASCII.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from relay._errors import SMTPError
from relay._parser import xtext_decode
from relay.cli import escape_controls
from relay.spool import Envelope, Recipient, RecipientState, StoredMessage, StoredRecipient

_REPLY_RE = re.compile(r"^([245])\d\d(?:[ -]([245]\.\d{1,3}\.\d{1,3}))?\b")


@dataclass(frozen=True, slots=True)
class Report:
    """A DSN ready to commit: its envelope and its bytes."""

    envelope: Envelope
    body: bytes
    indexes: tuple[int, ...]  # recipients of the original message it reports on


def status_of(reply: str) -> str:
    """Return the RFC 3463 status of an SMTP reply line, such as ``5.1.1``."""
    match = _REPLY_RE.match(reply)
    if match is None:
        return "5.0.0"
    klass, enhanced = match.group(1), match.group(2)
    # RFC 3463 section 2: the status class must be the reply's ("550 4.2.2" gives 5.0.0).
    return enhanced if enhanced and enhanced[0] == klass else f"{klass}.0.0"


# The start of the reply text of a local delivery whose alias forwarded the
# message to other addresses.  A success DSN gives such a recipient
# "Action: expanded" (RFC 3464 section 2.3.3).
EXPANDED = "expanded to"


def _action(recipient: StoredRecipient) -> str:
    if recipient.state is RecipientState.DELIVERED:
        if recipient.last_host:
            return "relayed"
        if (recipient.last_reply or "").startswith(f"250 2.0.0 {EXPANDED} "):
            return "expanded"
        return "delivered"
    if recipient.state is RecipientState.BOUNCED:
        return "failed"
    return "delayed"


def _header_block(body: bytes) -> bytes:
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = body.find(separator)
        if end >= 0:
            return body[: end + len(separator)]
    return body


def _address_type(address: str) -> str:
    # RFC 6533 section 3: non-ASCII addresses use the utf-8 address type.
    return "rfc822" if address.isascii() else "utf-8"


def _utf8_addr_xtext(text: str) -> str:
    """Return ``text`` with every character outside US-ASCII written ``\\x{HEX}``.

    RFC 6533 section 3 (utf-8-addr-xtext): the form of a UTF-8 address in
    a US-ASCII delivery-status part, where "+", "=" and "\\" are escaped
    too.  ASCII text comes back unchanged.
    """
    if text.isascii():
        return text
    return "".join(
        char if 0x21 <= ord(char) <= 0x7E and char not in "+=\\" else f"\\x{{{ord(char):X}}}" for char in text
    )


def _xtext_decoded(value: str) -> str:
    """Return an ENVID or ORCPT address stored as xtext decoded, or unchanged when it is not valid xtext.

    xtext is only the SMTP form of these values.  The DSN fields carry the
    decoded text, as Postfix and sendmail write them.
    """
    try:
        return xtext_decode(value)
    except SMTPError:
        return value


def _original_envelope_id(envid: str) -> str:
    """Return the ``Original-Envelope-Id`` value: the decoded ENVID, or its xtext when not printable US-ASCII."""
    decoded = _xtext_decoded(envid)
    return decoded if decoded.isascii() and decoded.isprintable() else envid


def _original_recipient(orcpt: str) -> str:
    """Return the ``Original-Recipient`` value for an ORCPT stored as ``addr-type;xtext``."""
    address_type, separator, address = _clean(orcpt).partition(";")
    if not separator:
        return _utf8_addr_xtext(address_type)
    return f"{address_type};{_utf8_addr_xtext(_clean(_xtext_decoded(address)))}"


def _clean(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


# Control characters, which a next hop's reply may contain and a terminal would
# act on, and the characters that break a line or reorder text for display
# (the set that relay.cli.escape_controls escapes).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# Maximum length of a DSN line before it is folded; RFC 5322 section 2.1.1 recommends 78.
_FOLD_WIDTH = 78
# Longer words are cut into pieces of at most this many octets in UTF-8, well below 998.
_CUT_WIDTH = 900


def _printable(text: str, ascii_only: bool) -> str:
    """Return ``text`` with control characters, and with ``ascii_only`` non-ASCII ones, as "?"."""
    text = _CONTROL.sub("?", _clean(text))
    return text.encode("ascii", "replace").decode("ascii") if ascii_only else text


def _folded(line: str) -> str:
    """Fold a long field or text line at spaces, so no line passes 998 octets (RFC 5322 section 2.1.1).

    Continuation lines start with a space, as a folded header field does.  A
    word longer than ``_CUT_WIDTH`` octets is cut.
    """
    if len(line) <= _FOLD_WIDTH:
        return line
    pieces: list[str] = []
    for word in line.split(" "):
        pieces += _cut(word)
    out: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 1 + len(piece) > _FOLD_WIDTH:
            out.append(current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    out.append(current)
    return "\r\n ".join(out)


def _cut(word: str) -> list[str]:
    """Cut ``word`` between characters into pieces of at most ``_CUT_WIDTH`` octets in UTF-8.

    The plain-text part keeps a reply's UTF-8, where a character takes up
    to 4 octets, so a cut by characters could pass 998 octets.
    """
    if len(word.encode("utf-8")) <= _CUT_WIDTH:
        return [word]
    pieces: list[str] = []
    start = 0
    octets = 0
    for end, char in enumerate(word):
        size = len(char.encode("utf-8"))
        if octets + size > _CUT_WIDTH:
            pieces.append(word[start:end])
            start = end
            octets = 0
        octets += size
    pieces.append(word[start:])
    return pieces


def _expired(recipient: StoredRecipient) -> bool:
    """Return whether ``recipient`` failed because the message's queue lifetime ran out.

    The spool stores that fact with each result since schema version 4.
    For an older result the reply decides, because before then only expiry
    turned a temporary failure into a bounce.
    """
    if recipient.state is not RecipientState.BOUNCED:
        return False
    if recipient.expired is not None:
        return recipient.expired
    return status_of(recipient.last_reply or "").startswith("4")


def _queued_for(seconds: float) -> str:
    """Format a time in the queue in the largest unit that counts at least 2 of it, such as "5 days" or "90 seconds"."""
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= 2 * length:
            count = int(seconds // length)
            return f"{count} {unit}s"
    count = round(seconds)
    return "1 second" if count == 1 else f"{count} seconds"


def _summary_line(message: StoredMessage, recipient: StoredRecipient, now: float) -> str:
    """Return the plain-text line that reports ``recipient``: its address, action and last reply."""
    reply = _printable(recipient.last_reply or "", ascii_only=False)
    line = f"<{escape_controls(recipient.address)}>: {_action(recipient)}: {reply}"
    if _expired(recipient):
        waited = (recipient.last_attempt or now) - message.arrival
        line += f" (the message expired after {_queued_for(waited)} in the queue)"
    return _folded(line)


def _date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, localtime=True)


def _remote_mta(peer: str) -> str:
    """Return the ``Remote-MTA`` value for a next hop stored as ``name[address]:port``.

    RFC 3464 section 2.3.5 defines the field as the MTA's name, with the type ``dns``.
    A next hop named by its address (a relayhost such as ``[192.0.2.1]``)
    gets that address as an RFC 5321 address literal.
    """
    name = peer.split("[", 1)[0] or peer
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return f"dns; {name}"
    return f"dns; [IPv6:{address}]" if address.version == 6 else f"dns; [{address}]"


def build_report(
    message: StoredMessage,
    body: bytes,
    recipients: Sequence[StoredRecipient],
    hostname: str,
    now: float,
    *,
    retry_until: float | None = None,
) -> Report:
    """Build the DSN that reports ``recipients`` of ``message`` to its sender.

    ``retry_until`` is when delayed recipients will fail (arrival plus the
    maximal queue lifetime), given as ``Will-Retry-Until``.
    """
    # The sender got the queue ID of its own message in the 250 reply, never that of a copy an alias forwarded.
    queue_id = message.envelope.forwarded_from or message.queue_id
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{hostname}"
    failed = [r for r in recipients if r.state is RecipientState.BOUNCED]
    delayed = [r for r in recipients if _action(r) == "delayed"]
    if failed:
        subject = "Undelivered Mail Returned to Sender"
    elif delayed:
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"
    date = _date(now)
    # RFC 3461 section 4.3: RET=FULL asks for the whole message in a "failed"
    # DSN.  Delay warnings and success reports return the header only, as Postfix's do.
    full = message.envelope.ret == "FULL" and bool(failed)

    lines = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{message.envelope.sender}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {hostname}.",
        "",
    ]
    if failed:
        lines.append("Your message could not be delivered to one or more recipients.")
    elif delayed:
        lines.append("Your message has not been delivered yet to the recipients below.")
        if retry_until is not None:
            lines.append(f"The mail system will keep trying until {_date(retry_until)}.")
    else:
        lines.append("Your message was delivered to the recipients below, as you asked.")
    lines.append("")
    for recipient in recipients:
        lines.append(_summary_line(message, recipient, now))
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Queue-ID: {queue_id}",
    ]
    if message.envelope.envid:
        lines.append(f"Original-Envelope-Id: {_original_envelope_id(message.envelope.envid)}")
    lines.append(f"Arrival-Date: {_date(message.arrival)}")
    for recipient in recipients:
        lines += _recipient_fields(recipient, retry_until)
    # RFC 6533 section 3: an original whose header contains UTF-8 (an SMTPUTF8
    # message) goes in the global types, whose header may contain it.
    utf8_header = not _header_block(body).isascii()
    if full:
        content_type = "message/global" if utf8_header else "message/rfc822"
    else:
        content_type = "message/global-headers" if utf8_header else "text/rfc822-headers"
    lines += ["", f"--{boundary}", f"Content-Type: {content_type}", ""]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    original = body if full else _header_block(body)
    if not original.endswith(b"\n"):
        original += b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode()

    report = head + original + tail
    envelope = Envelope(
        sender="",
        recipients=(Recipient(address=message.envelope.sender),),
        smtputf8=not message.envelope.sender.isascii(),
        # RFC 6152 section 3: 8-bit text (a reply in UTF-8, or the original) needs BODY=8BITMIME.
        body_type="8BITMIME" if not report.isascii() else None,
    )
    return Report(envelope=envelope, body=report, indexes=tuple(r.index for r in recipients))


def _recipient_fields(recipient: StoredRecipient, retry_until: float | None) -> list[str]:
    # RFC 3464 section 2.1: the delivery-status part is US-ASCII.
    reply = _printable(recipient.last_reply or "", ascii_only=True)
    fields = ["", f"Final-Recipient: {_address_type(recipient.address)}; {_utf8_addr_xtext(recipient.address)}"]
    if recipient.orcpt:
        fields.append(f"Original-Recipient: {_original_recipient(recipient.orcpt)}")
    fields.append(f"Action: {_action(recipient)}")
    fields.append(f"Status: {status_of(reply)}")
    if recipient.last_host:
        fields.append(f"Remote-MTA: {_remote_mta(_clean(recipient.last_host))}")
        fields.append(_folded(f"Diagnostic-Code: smtp; {reply}"))
    elif reply:
        fields.append(_folded(f"Diagnostic-Code: X-relay; {reply}"))
    if recipient.last_attempt is not None:
        fields.append(f"Last-Attempt-Date: {_date(recipient.last_attempt)}")
    if retry_until is not None and _action(recipient) == "delayed":
        fields.append(f"Will-Retry-Until: {_date(retry_until)}")
    return fields
