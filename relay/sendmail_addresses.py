"""Address lists as ``relay sendmail`` reads them, in To, Cc and Bcc and on its command line.

``split_address_list`` returns the address of each mailbox in an RFC 5322
section 3.4 address-list.  A mailbox written as ``name <address>`` gives
only the address between the angle brackets, even when the name itself
looks like an address (``ops@example.com <pager@example.com>``), because
that name is only shown to the reader.  The standard library's
``email.utils.getaddresses`` returns both addresses for such a mailbox in
Python 3.11, and the ``email.headerregistry`` parser returns only the name,
so neither is used here.

Quoted strings and domain literals keep their content, including commas,
colons and angle brackets.
Comments (nested too) are dropped.  A group (``team: a@x, b@y;``) gives its
members, and an empty group (``undisclosed-recipients:;``) gives nothing.
A source route in angle brackets (``<@relay.example:user@example.com>``) is
dropped, as RFC 5321 section 4.1.2 lets a receiver do.  The parser is
lenient: it never raises, and text that is not an address comes back as it
is, for the caller's address check to reject with the value in its error.

``check_recipients`` sorts the addresses into those to deliver to and
those rejected, each rejected one with the SMTP reply that the server would
give it: ``501 5.1.3`` for invalid syntax, ``550 5.1.1`` for an unknown
local user, ``550 5.7.1`` for a denied address literal.  A rejected
recipient does not stop the message for the others.  ``relay sendmail``
queues the message for the valid recipients and stores the rejected ones
as already failed, so that the sender gets a DSN as for any bounce.
Postfix 3.7's sendmail also queues such a message, and its queue manager
bounces an address like ``user@`` with 5.1.3 "bad address syntax".

A local recipient whose Maildir folder cannot be looked up (the server
would answer ``451 4.3.0``) is queued like a valid one, and nothing is
printed, here and in ``-bs`` mode, because whether the user exists is
unknown, not false.  The caller often lacks the right to search
``maildir_root``, which belongs to the relay's user.  Local delivery runs
as that user: it delivers the message, or defers it with the cause in its
log until the folder can be read.  Postfix's sendmail does not look up
local users at all, and its local(8) delivery agent decides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay._errors import SMTPError
from relay._parser import parse_command
from relay.config import Config
from relay.sendmail_options import EX_NOUSER, SendmailError
from relay.smtp import replies
from relay.smtp.policy import RelayPolicy
from relay.units import is_safe_user_name

# Control characters (C0, DEL and C1), replaced by "?" in a rejected address
# before it is stored, because the DSN that names the address is text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Maximum length of a rejected address as stored and reported, in characters:
# the 256-octet limit of a path (RFC 5321 section 4.5.3.1.3).  Longer text
# is cut and ends in "...".
MAX_REPORTED_ADDRESS = 256


class _Mailbox:
    """The text of one list element, split into what is outside and inside angle brackets."""

    def __init__(self) -> None:
        self.outside: list[str] = []
        self.inside: list[str] | None = None  # None until a "<" is seen

    def target(self, in_angle: bool) -> list[str]:
        return self.inside if in_angle and self.inside is not None else self.outside

    def address(self) -> str:
        if self.inside is None:
            return "".join(self.outside).strip()
        address = "".join(self.inside).strip()
        if address.startswith("@") and ":" in address:
            address = address.partition(":")[2].strip()
        return address


def split_address_list(text: str) -> list[str]:
    """Return the address of each mailbox in the address-list ``text``, without empty elements."""
    addresses: list[str] = []
    mailbox = _Mailbox()
    in_quote = False
    in_angle = False
    in_literal = False
    comment_depth = 0
    escaped = False

    def finish() -> None:
        nonlocal mailbox
        address = mailbox.address()
        if address:
            addresses.append(address)
        mailbox = _Mailbox()

    for character in text:
        if escaped:
            # A quoted-pair: kept inside a quoted string, dropped with its comment.
            if not comment_depth:
                mailbox.target(in_angle).append(character)
            escaped = False
            continue
        if character == "\\" and (in_quote or comment_depth):
            escaped = True
            if in_quote:
                mailbox.target(in_angle).append(character)
            continue
        if comment_depth:
            if character == "(":
                comment_depth += 1
            elif character == ")":
                comment_depth -= 1
            continue
        if in_quote or in_literal:
            mailbox.target(in_angle).append(character)
            in_quote = in_quote and character != '"'
            in_literal = in_literal and character != "]"
            continue
        if character in '"[':
            # A quoted string, or a domain literal such as [IPv6:2001:db8::1], whose colons are no group.
            in_quote = character == '"'
            in_literal = character == "["
            mailbox.target(in_angle).append(character)
        elif character == "(":
            comment_depth = 1
        elif in_angle:
            if character == ">":
                in_angle = False
            else:
                mailbox.target(in_angle).append(character)
        elif character == "<":
            # The angle-addr is the address; a second one in the same element replaces the first.
            in_angle = True
            mailbox.inside = []
        elif character == ":":
            # The end of a group's display name: its members follow.
            mailbox = _Mailbox()
        elif character in ",;":
            finish()
        else:
            mailbox.outside.append(character)
    finish()
    return addresses


def qualify_address_list(text: str, domain: str) -> str:
    """Return the address-list ``text`` with ``@domain`` after each address that is a bare local part.

    Local programs write header fields such as ``To: root`` or ``From: root
    (Cron Daemon)`` (vixie cron), which only the local host can read.
    Postfix's cleanup(8) turns header addresses into the user@domain form,
    appending ``myorigin`` to a bare name, and so does this.  Everything
    else keeps its text:
    display names, comments, groups, folding, and any element that is not
    a valid local part, such as ``John Doe``.  The scan follows
    ``split_address_list``.
    """
    # The offset after each bare local part, where "@domain" goes.
    ends: list[int] = []
    outside: list[str] = []
    inside: list[str] | None = None
    outside_end = inside_end = 0
    in_quote = in_angle = in_literal = escaped = False
    comment_depth = 0

    def finish() -> None:
        nonlocal outside, inside
        address = "".join(outside if inside is None else inside).strip()
        end = outside_end if inside is None else inside_end
        if address and "@" not in address and _is_local_part(address, domain):
            ends.append(end)
        outside, inside = [], None

    for offset, character in enumerate(text):
        significant = False
        if escaped:
            escaped = False
            significant = not comment_depth
        elif character == "\\" and (in_quote or comment_depth):
            escaped = True
            significant = in_quote
        elif comment_depth:
            comment_depth += {"(": 1, ")": -1}.get(character, 0)
        elif in_quote or in_literal:
            in_quote = in_quote and character != '"'
            in_literal = in_literal and character != "]"
            significant = True
        elif character in '"[':
            in_quote = character == '"'
            in_literal = character == "["
            significant = True
        elif character == "(":
            comment_depth = 1
        elif in_angle:
            in_angle = character != ">"
            significant = in_angle
        elif character == "<":
            in_angle = True
            inside = []
        elif character == ":":
            # A group's display name ends here, and its members follow.
            outside, inside = [], None
        elif character in ",;":
            finish()
        else:
            significant = True
        if not significant:
            continue
        target = inside if in_angle and inside is not None else outside
        target.append(character)
        if not character.isspace():
            if target is inside:
                inside_end = offset + 1
            else:
                outside_end = offset + 1
    finish()

    for end in reversed(ends):
        text = f"{text[:end]}@{domain}{text[end:]}"
    return text


def _is_local_part(text: str, domain: str) -> bool:
    """Return whether ``text`` followed by ``@domain`` is a valid address."""
    try:
        check_address(text, "header", domain)
    except SendmailError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class RejectedRecipient:
    """A recipient that cannot get the message, with the reply that reports it."""

    address: str  # as stored and named in the DSN: control characters as "?", at most MAX_REPORTED_ADDRESS
    reply: str  # the SMTP reply that the DSN quotes, such as "501 5.1.3 Invalid recipient address syntax"
    error: str  # the explanation for standard error, naming the value and the fix


def check_address(address: str, role: str, default_domain: str) -> str:
    """Validate one address with the SMTP command parser; return it without brackets.

    A bare user name gets ``@default_domain`` first, as Postfix's
    append_at_myorigin does for local programs.  Raises SendmailError
    (``EX_NOUSER``) naming the address.
    """
    stripped = address.strip()
    if stripped.startswith("<") and stripped.endswith(">"):
        stripped = stripped[1:-1]
    if "@" not in stripped:
        stripped = f"{stripped}@{default_domain}"
    try:
        # The MAIL grammar with SMTPUTF8 is the forward-path grammar too, and
        # admits UTF-8 addresses (RFC 6531).
        command = parse_command(f"MAIL FROM:<{stripped}> SMTPUTF8".encode())
    except (SMTPError, UnicodeEncodeError):
        raise SendmailError(EX_NOUSER, f"invalid {role} address {address!r}") from None
    if not command.path:
        raise SendmailError(EX_NOUSER, f"invalid {role} address {address!r}")
    return command.path


def check_recipients(
    addresses: Iterable[tuple[str, str]], config: Config, default_domain: str
) -> tuple[list[str], list[RejectedRecipient]]:
    """Return the valid recipients and the rejected ones, each list in input order and without repeats.

    ``addresses`` holds each address with where it came from ("on the
    command line", "in the To field"), which the error names.  An address is rejected
    when it is invalid, or when the SMTP server would reject it from a
    trusted client (``RelayPolicy.check_recipient`` with ``privileged``).
    """
    valid: dict[str, None] = {}
    rejected: dict[str, RejectedRecipient] = {}
    syntax = replies.BAD_RECIPIENT_SYNTAX
    for address, source in addresses:
        if "\ufffd" in address:
            # U+FFFD stands for octets of the header that are not UTF-8 (RFC 6532).
            error = f"invalid recipient address {address!r} {source}: the header is not UTF-8"
        else:
            try:
                valid[check_address(address, "recipient", default_domain)] = None
                continue
            except SendmailError as exc:
                error = f"{exc} {source}"
        reported = _reported_address(address)
        if reported not in rejected:
            rejected[reported] = RejectedRecipient(reported, f"{syntax.code} {syntax.status} {syntax.text}", error)

    policy = RelayPolicy(config, accept_on_lookup_error=True)
    for address in list(valid):
        local_part, _, domain = address.rpartition("@")
        rejection = policy.check_recipient(local_part, domain, privileged=True)
        if rejection is None:
            continue
        del valid[address]
        if rejection is replies.NO_SUCH_USER:
            error = unknown_user_message(address, local_part, config)
        else:
            error = f"recipient {address!r} rejected: {rejection.code} {rejection.status} {rejection.text}"
        reply = f"{rejection.code} {rejection.status} {rejection.text}"
        rejected.setdefault(address, RejectedRecipient(address, reply, error))
    return list(valid), list(rejected.values())


def _reported_address(address: str) -> str:
    """Return a rejected address as it is stored and named in the DSN."""
    text = _CONTROL.sub("?", address.strip())
    if len(text) > MAX_REPORTED_ADDRESS:
        text = text[: MAX_REPORTED_ADDRESS - 3] + "..."
    return text or "<>"


def unknown_user_message(address: str, local_part: str, config: Config) -> str:
    """Return the error for a local recipient without a mailbox, naming the folder or alias that would fix it."""
    alias = f'an alias such as "{local_part.lower()}: alice" in the local.aliases file'
    if config.local.maildir_root and is_safe_user_name(local_part.lower()):
        folder = os.path.join(config.local.maildir_root, local_part.lower())
        return f"unknown local user {address!r}; create its Maildir folder {folder} (mkdir -p {folder}) or add {alias}"
    return f"unknown local user {address!r}; add {alias}"
