"""Trace and submission headers, and the header-block checks made at end of data.

The Received header follows RFC 5321 section 4.4 and RFC 5322 section 3.6.7::

    Received: from HELO (unknown [IP])
    \tby HOSTNAME (relay) with ESMTPSA id QUEUEID
    \tfor <rcpt>; Thu, 01 Jan 2026 00:00:00 +0000

The reverse DNS name is always ``unknown``: the server makes no PTR lookups
(as Postfix with ``smtpd_peername_lookup = no``).  ``for`` names the
recipient only when there is exactly one, so a message with many recipients
does not disclose the others.  HELO names and addresses come from the command
parser, which lets no CR, LF or NUL through, so they cannot add header lines.
The session takes any HELO name without blanks, so the header writes it as
an address literal or an RFC 5322 dot-atom (see ``received_helo``), because
a ``(`` or ``;`` in it would open a comment or mark the start of the date.

Loop detection counts ``Received:`` fields in the header block (the lines
before the first empty line).  RFC 5321 section 6.3 asks for a threshold of
at least 100; ``policy.max_received_headers`` sets it.
"""

from __future__ import annotations

import re
import secrets
import time
from email.utils import formatdate


def field_pattern(name: bytes) -> re.Pattern[bytes]:
    """Return a pattern that finds the header fields called ``name`` in a header block.

    The field name is matched in any letter case, and white space may
    come before the colon: the obsolete syntax of RFC 5322 section 4.5
    (obs-fields, such as ``"Date" *WSP ":"``) allows it in messages
    that are read.  Missing ``Date :`` would add a second Date field.
    """
    return re.compile(rb"^" + re.escape(name) + rb"[ \t]*:", re.IGNORECASE | re.MULTILINE)


_RECEIVED = field_pattern(b"received")
_DATE = field_pattern(b"date")
_MESSAGE_ID = field_pattern(b"message-id")
_FROM = field_pattern(b"from")
# A HELO name in brackets with only letters, digits, ".", ":" and "-" inside,
# the characters of the IPv4 and IPv6 address literals of RFC 5321 section
# 4.1.3.  Such a name is also a valid RFC 5322 domain-literal.
_ADDRESS_LITERAL = re.compile(r"\[[A-Za-z0-9.:\-]*\]")
# A character that is neither RFC 5322 atext nor the dot of a dot-atom.
_NOT_DOT_ATOM = re.compile(r"[^A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]")
# A LF without CR before it, or a CR without LF after it.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def header_block(body: bytes) -> bytes:
    """Return the header block of a message: everything up to the first empty line."""
    if body.startswith(b"\r\n"):
        return b""
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


def count_received(headers: bytes) -> int:
    return len(_RECEIVED.findall(headers))


def received_helo(name: str) -> str:
    """Return the HELO name as the ``from`` clause of a Received header writes it.

    An address literal is kept whole.  In any other name, each character
    that an RFC 5322 dot-atom does not allow becomes ``?``, so the name is
    one token and cannot change how the rest of the header parses.
    """
    if _ADDRESS_LITERAL.fullmatch(name):
        return name
    return _NOT_DOT_ATOM.sub("?", name)


def received_header(
    *,
    helo_name: str,
    client_address: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    now: float | None = None,
) -> bytes:
    """Return the Received header (with its CRLF) for one message."""
    address = client_address
    if ":" in address:
        # The zone ID of a link-local address ("%eth0") means nothing on
        # other hosts, and an RFC 5321 IPv6 address literal has no syntax for it.
        address = "IPv6:" + address.partition("%")[0]
    lines = [
        f"Received: from {received_helo(helo_name)} (unknown [{address}])",
        f"\tby {hostname} (relay) with {protocol} id {queue_id}",
    ]
    return _end_received(lines, recipients, now)


def local_received_header(
    *,
    helo_name: str,
    hostname: str,
    uid: int,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    now: float | None = None,
) -> bytes:
    """Return the Received header for a message that a local program sent over ``sendmail -bs``.

    The client is a process of user ID ``uid``, not a network peer, so the
    header names the user ID, as the header of ``relay sendmail`` does,
    in place of a client address.
    """
    lines = [
        f"Received: from {received_helo(helo_name)}",
        f"\tby {hostname} (relay, from userid {uid}) with {protocol} id {queue_id}",
    ]
    return _end_received(lines, recipients, now)


def _end_received(lines: list[str], recipients: list[str], now: float | None) -> bytes:
    """Add the ``for`` clause (only for a single recipient) and the date, and encode the header."""
    date = _date(time.time() if now is None else now)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _date(moment: float) -> str:
    """Return the RFC 5322 local date of ``moment``, formatting each second once."""
    global _last_date
    second = int(moment)
    cached_second, text = _last_date
    if second != cached_second:
        text = formatdate(second, localtime=True)
        _last_date = (second, text)
    return text


_last_date = (-1, "")


def has_from_field(headers: bytes) -> bool:
    """Return whether a header block has a From field, also in the obsolete form ``From :``."""
    return _FROM.search(headers) is not None


def submission_headers(headers: bytes, hostname: str, now: float | None = None) -> bytes:
    """Return the Date and Message-ID headers a submitted message lacks (RFC 6409 section 8)."""
    added = b""
    if not _DATE.search(headers):
        added += f"Date: {formatdate(time.time() if now is None else now, localtime=True)}\r\n".encode()
    if not _MESSAGE_ID.search(headers):
        added += f"Message-ID: <{secrets.token_hex(12)}@{hostname}>\r\n".encode()
    return added


def normalize_line_ends(body: bytes) -> bytes:
    """Turn every bare LF and bare CR into CRLF (the ``bare_lf = "normalize"`` policy)."""
    return _BARE_LINE_END.sub(b"\r\n", body)


# Two dots at the start of a line that follows a bare LF or bare CR.
_STUFFED_AFTER_BARE_LINE_END = re.compile(rb"(\r(?!\n)|(?<!\r)\n)\.(?=\.)")


def normalize_data_line_ends(body: bytes) -> bytes:
    """Turn bare line ends in DATA content into CRLF, and unstuff ``..`` lines after them.

    The DATA buffer removes the dot that RFC 5321 section 4.5.2 adds to a
    line starting with ``.`` only after CRLF.  A client that ends its lines
    with bare LF stuffs the lines after them too, so such a line starting
    with ``..`` loses one dot, as it would after CRLF.  A single leading dot
    stays, because a client that does not stuff may have sent it.
    """
    return normalize_line_ends(_STUFFED_AFTER_BARE_LINE_END.sub(rb"\1", body))
