"""Messages and envelope addresses that ``relay bench`` sends.

A run sends either one generated message of a given size or, cycling in name
order, the files of a folder (such as a corpus of real messages).  Each
message is encoded once before the run: dot-stuffed with CRLF line ends and
the terminating ``.`` for DATA (RFC 5321 section 4.5.2), and with CRLF line
ends only for BDAT (RFC 3030), so the send loop only writes bytes.

Sender and recipient patterns may contain ``{n}``, the zero-based message
number across the whole run, and ``{r}``, the recipient's index within the
message, so a run can spread its mail over many mailboxes.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from relay._stuffing import dot_stuff, normalize_line_ends

_SUBJECT = "relay bench message"
_FILLER_LINE = b"The quick brown fox jumps over the lazy dog; relay bench filler text 0123456789.\r\n"


@dataclass(frozen=True)
class EncodedMessage:
    """One message ready to write, in both encodings."""

    octets: int
    """Size of the message with CRLF line ends, before dot-stuffing."""
    data: bytes
    """Dot-stuffed message followed by ``.`` CRLF, for DATA."""
    chunk: bytes
    """The message with CRLF line ends, for a single ``BDAT n LAST``."""


def encode(message: bytes) -> EncodedMessage:
    """Encode raw message bytes (any line ends) for DATA and for BDAT."""
    chunk = normalize_line_ends(message)
    if chunk and not chunk.endswith(b"\r\n"):
        chunk += b"\r\n"
    return EncodedMessage(octets=len(chunk), data=dot_stuff(chunk), chunk=chunk)


def _headers(sender: str, recipient: str, subject: str) -> bytes:
    return (
        f"From: <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "Message-ID: <bench@relay.invalid>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")


def generate_message(size: int, sender: str, recipient: str) -> bytes:
    """Return a plain-text message of exactly ``size`` octets.

    Raises ValueError when ``size`` is below the size of the headers alone.
    """
    headers = _headers(sender, recipient, _SUBJECT)
    body_size = size - len(headers)
    if body_size < 0:
        raise ValueError(
            f"{size} octets is below the minimum {len(headers)}, the size of the generated headers;"
            f" give at least {len(headers)}"
        )
    if body_size == 1:
        # A one-octet body cannot end in CRLF, and encode() would add one,
        # so the extra octet goes into the Subject instead.
        return _headers(sender, recipient, _SUBJECT + ".")
    repeats = body_size // len(_FILLER_LINE) + 1
    body = (_FILLER_LINE * repeats)[:body_size]
    if body_size >= 2:
        # End on a line end so the size is exact after CRLF normalisation.
        # A cut just after a filler line's CR would leave a bare CR, which
        # normalisation turns into CRLF, so that CR becomes a dot.
        text = body[:-2]
        if text.endswith(b"\r"):
            text = text[:-1] + b"."
        body = text + b"\r\n"
    return headers + body


def load_folder(folder: Path) -> list[bytes]:
    """Return the contents of every regular file in folder, in name order.

    Raises ValueError when the folder contains no non-empty file.
    """
    messages = [path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()]
    messages = [message for message in messages if message]
    if not messages:
        raise ValueError(f"message folder {folder} contains no non-empty files")
    return messages


class AddressPattern:
    """An address template with ``{n}`` (message number) and ``{r}`` (recipient index)."""

    __slots__ = ("template", "fixed")

    def __init__(self, template: str) -> None:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:  # an unmatched brace
            raise ValueError(f"invalid address pattern {template!r}: {exc}; write {{{{ or }}}} for a brace") from None
        unknown = names - {"n", "r"}
        if unknown:
            raise ValueError(
                f"invalid address pattern {template!r}: unknown field {{{sorted(unknown)[0]}}}; use {{n}} or {{r}}"
            )
        if "<" in template or ">" in template or any(c in template for c in "\r\n "):
            raise ValueError(
                f"invalid address pattern {template!r}: give the bare address, without <>, spaces or line ends"
            )
        self.template = template
        self.fixed = not names

    def format(self, number: int, recipient: int = 0) -> str:
        """Return the address for a message number and recipient index."""
        if self.fixed:
            return self.template
        return self.template.format(n=number, r=recipient)
