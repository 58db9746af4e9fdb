"""Queue IDs and spool rows, compiled (see ``csrc/spoolrows.pyx``)."""

from collections.abc import Iterable
from typing import Any

def set_process_bits(bits: int) -> None:
    """Set the 20 random bits that end every queue ID this process makes."""

def new_queue_id_and_key(now: float | None = None) -> tuple[str, int]:
    """Return a fresh queue ID and its message key; ``now`` defaults to the clock."""

def is_queue_id(text: object) -> bool:
    """Return whether ``text`` has the form of a queue ID."""

def message_key(queue_id: str) -> int:
    """Return the spool's integer key for a well-formed queue ID.  Raise ValueError for any other text."""

def add_message_rows(batch: Iterable[Any], message_values: list[Any], fresh_values: list[Any]) -> None:
    """Append the ``message`` and ``fresh`` row parameters of each pending commit in ``batch``."""
