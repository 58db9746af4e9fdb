"""Dot-stuffing encoder for outbound DATA (see ``csrc/stuffing.pyx``)."""

from typing_extensions import Buffer

def dot_stuff(body: Buffer) -> bytes:
    """Encode a message for DATA, terminator included.

    Every line end (CRLF, bare LF, bare CR) becomes CRLF, a line starting with
    ``.`` gets a second ``.`` (RFC 5321 section 4.5.2), a CRLF is added when
    the body does not end with one, and ``.\\r\\n`` follows.
    """

def normalize_line_ends(body: Buffer) -> bytes:
    """Return ``body`` with every bare LF and bare CR turned into CRLF."""

class DotStuffer:
    """Streaming form of ``dot_stuff`` for large messages."""

    def __init__(self) -> None: ...
    def encode(self, chunk: Buffer) -> bytes:
        """Encode the next piece of the message."""

    def finish(self) -> bytes:
        """Return the CRLF the message may lack and the ``.\\r\\n`` terminator."""

def fold_long_lines(body: Buffer, limit: int) -> bytes:
    """Return ``body`` with every line longer than ``limit`` octets broken; ``body`` itself if none is.

    A line breaks before the last space or tab in its second half that has
    other text after it (RFC 5322 folding), or else at the limit by
    inserting CRLF and a space.  Raises
    ValueError when ``limit`` is below 8.
    """
