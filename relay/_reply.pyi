"""SMTP reply parser and formatter (see ``csrc/reply.pyx``).

The outbound client feeds ``ReplyParser`` the bytes a server sends and pulls
complete replies, single or multi-line (RFC 5321 section 4.2).  A malformed
reply raises ``relay._errors.SMTPError`` ``451 4.5.0``: the attempt failed for
now, so the client closes the connection and retries later or elsewhere.
"""

from typing import Final

from typing_extensions import Buffer

from relay._errors import SMTPError as SMTPError

DEFAULT_MAX_LINE: Final[int]
"""512: max reply line in octets, CRLF included (RFC 5321 section 4.5.3.1.5)."""
DEFAULT_MAX_REPLY: Final[int]
"""Max octets in one multi-line reply."""

class Reply:
    """One complete SMTP reply."""

    code: int
    """Reply code, 200 to 599 (the parser rejects others)."""
    enhanced: str | None
    """RFC 3463 code of the first line when it starts with one of the right class."""
    lines: list[str]
    """Text of each line after the code, separator and enhanced code."""

    def __init__(self, code: int, lines: list[str], enhanced: str | None = None) -> None: ...
    @property
    def text(self) -> str:
        """The lines joined with a space."""

    @property
    def positive(self) -> bool:
        """2xx or 3xx."""

    @property
    def transient(self) -> bool:
        """4xx."""

    @property
    def permanent(self) -> bool:
        """5xx."""

class ReplyParser:
    """Splits bytes received from an SMTP server into replies."""

    def __init__(self, max_line: int = 512, max_reply: int = 65536) -> None: ...
    @property
    def buffered(self) -> int:
        """Octets received and not yet returned in a reply."""

    def feed(self, data: Buffer) -> None:
        """Append received bytes."""

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or None until more bytes arrive.

        Raises SMTPError 451 4.5.0 on a malformed reply; the parser is then
        unusable and the connection must be closed.
        """

def parse_ehlo(reply: Reply) -> dict[str, list[str]]:
    """Return the EHLO capabilities: upper-case keyword to its parameters.

    The first line (the server's name) is skipped.
    """

def format_reply(code: int, enhanced: str | None, lines: str | list[str]) -> bytes:
    """Build a reply, multi-line when given several lines, each ending in CRLF.

    Raises ValueError when a line contains CR or LF or the code is out of range.
    """
