"""Input buffer of an SMTP server session (see ``csrc/buffer.pyx``).

The session feeds it the chunks from ``data_received`` and pulls events with
``next_event()`` until it returns None.  The buffer parses only in its current
mode, so the session switches mode (``start_data``, ``start_bdat``) right
after the event that requests it, before pulling the next event.  Pipelined
bytes after end-of-data or after a BDAT chunk stay for the next command.
"""

from typing import Final, Literal

from typing_extensions import Buffer

DEFAULT_LINE_LIMIT: Final[int]
"""512: max command line in octets, CRLF included (RFC 5321 section 4.5.3.1.4)."""

class Line:
    """A complete command line, without its line end."""

    line: bytes
    bare_lf: bool
    """True when the line ended with a bare LF instead of CRLF."""

    def __init__(self, line: bytes, bare_lf: bool = False) -> None: ...

class LineTooLong:
    """A command line passed the limit: reported once, then dropped up to its LF."""

    limit: int
    """The line limit in force, in octets with the line end."""

    def __init__(self, limit: int) -> None: ...

class BareLineEnd:
    """The first bare LF or bare CR seen in the current DATA, reported once."""

    offset: int
    """Offset of the byte in the unstuffed message."""
    char: bytes
    """``b"\\n"`` or ``b"\\r"``."""

    def __init__(self, offset: int, char: bytes) -> None: ...

class DataEnd:
    """End of DATA: CRLF ``.`` CRLF was read; the buffer is back in command mode."""

    body: bytes
    """The unstuffed message with the CRLF before the final dot; empty when oversized."""
    octets: int
    """Octets of the unstuffed message, counted even past the maximum."""
    oversized: bool
    """True when ``octets`` passed the ``max_size`` given to ``start_data``."""
    bare_lf: int
    """Offset of the first bare LF in the unstuffed message, or -1."""
    bare_cr: int
    """Offset of the first bare CR in the unstuffed message, or -1."""

    def __init__(
        self,
        body: bytes,
        octets: int,
        oversized: bool = False,
        bare_lf: int = -1,
        bare_cr: int = -1,
    ) -> None: ...

class BdatChunk:
    """A complete BDAT chunk; the buffer is back in command mode."""

    data: bytes
    """The chunk octets as sent, or empty when started with ``store=False``."""
    octets: int
    """The chunk size from the BDAT command."""

    def __init__(self, data: bytes, octets: int) -> None: ...

Event = Line | LineTooLong | BareLineEnd | DataEnd | BdatChunk

class SMTPBuffer:
    """Bytes received from one client, split into command lines, DATA and BDAT."""

    line_limit: int
    """Max command line in octets with its line end, at least 3 (ValueError otherwise); raise it for AUTH responses."""

    def __init__(self, line_limit: int = 512) -> None: ...
    @property
    def mode(self) -> Literal["command", "data", "bdat"]: ...
    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed by an event."""

    @property
    def discarding(self) -> bool:
        """Whether the rest of a line reported as ``LineTooLong`` is still being dropped."""

    @property
    def data_octets(self) -> int:
        """Octets of the current DATA or BDAT chunk read so far."""

    def feed(self, data: Buffer) -> None:
        """Append received bytes; parsing happens in ``next_event``."""

    def next_event(self) -> Event | None:
        """Return the next event in the current mode, or None until more bytes arrive."""

    def start_data(self, max_size: int) -> None:
        """Switch to DATA mode; the message is stored up to ``max_size`` octets."""

    def start_bdat(self, size: int, store: bool = True) -> None:
        """Switch to BDAT mode for a chunk of exactly ``size`` octets.

        With ``store=False`` the chunk is read and dropped (a refused BDAT
        must still consume its chunk, RFC 3030 section 2).
        """

    def discard(self) -> int:
        """Drop every buffered byte and return to command mode.

        Returns the number of octets dropped.  Used after STARTTLS, where
        plaintext sent after the command must not be run (RFC 3207 section 4.2).
        """
