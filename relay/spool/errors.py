"""Exceptions raised by the spool."""

from __future__ import annotations


class SpoolError(Exception):
    """The spool could not store or read data: disk full, I/O error, lock timeout.

    The message was not accepted; the SMTP server replies ``452 4.3.1`` (RFC 3463:
    mail system full) and never ``250``.
    """


class MessageNotFound(LookupError):
    """No message with this queue ID is in the spool."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"queue ID {queue_id} not found in the spool")
        self.queue_id = queue_id


class CorruptRecord(Exception):
    """A stored message cannot be decoded; the spool moves it aside to ``corrupt/``."""

    def __init__(self, queue_id: str, reason: str) -> None:
        super().__init__(f"message {queue_id} is corrupt: {reason}")
        self.queue_id = queue_id
        self.reason = reason
