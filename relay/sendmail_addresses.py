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
"""

from __future__ import annotations


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
