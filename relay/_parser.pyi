"""SMTP command parser (see ``csrc/parser.pyx``).

``parse_command`` takes one command line without its line end (as
``relay._buffer.Line.line`` gives it) and returns a ``Command`` or raises
``relay._errors.SMTPError`` with the reply to send.  Replies the parser uses:

- ``500 5.5.1`` unknown command
- ``501 5.5.2`` control character (CR, NUL, ...) or invalid UTF-8 in the line
- ``501 5.5.4`` missing, unexpected or malformed argument; malformed value of
  a known ESMTP parameter; a parameter given twice
- ``501 5.1.7`` bad sender address syntax (MAIL)
- ``501 5.1.3`` bad recipient address syntax (RCPT)
- ``553 5.6.7`` non-ASCII MAIL address without the SMTPUTF8 parameter
- ``555 5.5.4`` unknown ESMTP parameter, or one not valid for the verb
"""

from typing import Final

from relay._errors import SMTPError as SMTPError

VERBS: Final[frozenset[str]]
"""HELO EHLO MAIL RCPT DATA RSET VRFY EXPN HELP NOOP QUIT STARTTLS AUTH BDAT."""

MAX_PATH: Final[int]
"""256: max reverse-path or forward-path in octets (RFC 5321 section 4.5.3.1.3)."""

class Command:
    """One parsed SMTP command."""

    verb: str
    """Upper-case verb, one of ``VERBS``."""
    argument: str
    """Text after the verb and its separating space, stripped of outer spaces."""

    # MAIL and RCPT; None for other verbs.
    path: str | None
    """The address, without brackets or source route, quoted local part kept
    byte for byte; ``""`` for the null reverse-path ``<>``."""
    local_part: str | None
    """Part of ``path`` before the ``@`` outside quotes (``path`` for ``<postmaster>``)."""
    domain: str | None
    """Part of ``path`` after that ``@``: a domain or an address literal in
    brackets (``"[192.0.2.1]"``, ``"[IPv6:2001:db8::1]"``); ``""`` for
    ``<>`` and ``<postmaster>``."""
    params: dict[str, str | None]
    """ESMTP parameters as sent: upper-case keyword to raw value (None without ``=``)."""

    # ESMTP parameters, decoded; None or False when absent.
    size: int | None
    """SIZE (RFC 1870), any number of digits, so it may exceed every limit."""
    body: str | None
    """BODY upper-cased: ``"7BIT"``, ``"8BITMIME"`` (RFC 6152) or ``"BINARYMIME"`` (RFC 3030)."""
    smtputf8: bool
    """The SMTPUTF8 parameter was given (RFC 6531)."""
    ret: str | None
    """RET upper-cased: ``"FULL"`` or ``"HDRS"`` (RFC 3461)."""
    envid: str | None
    """ENVID, xtext-decoded (RFC 3461)."""
    auth: str | None
    """AUTH on MAIL, xtext-decoded; ``"<>"`` stays ``"<>"`` (RFC 4954 section 5)."""
    notify: tuple[str, ...] | None
    """NOTIFY upper-cased: ``("NEVER",)`` or some of SUCCESS, FAILURE, DELAY (RFC 3461)."""
    orcpt: tuple[str, str] | None
    """ORCPT as (address type, xtext-decoded address), e.g. ``("rfc822", "a@b")``."""

    # BDAT
    chunk_size: int | None
    """BDAT chunk size in octets."""
    last: bool
    """BDAT carried LAST."""

    # AUTH
    mechanism: str | None
    """AUTH mechanism, upper-cased (RFC 4954)."""
    initial_response: str | None
    """AUTH initial response as sent (``"="`` means an empty one), or None."""

def parse_command(line: bytes) -> Command:
    """Parse one command line without its line end; raise SMTPError when invalid."""

def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext; raise SMTPError 501 5.5.4 on bad syntax or a control character."""

def xtext_encode(value: str) -> str:
    """Encode a string as RFC 3461 xtext (``+XX`` for ``+``, ``=``, controls, space and non-ASCII)."""
