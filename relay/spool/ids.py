"""Queue IDs: short, unique, and sorted by arrival time as plain strings.

An ID is 15 characters of Crockford base32 (digits and upper-case letters
without I, L, O, U).  The first 11 encode the arrival time in microseconds
since the Unix epoch (55 bits, enough until the year 3111).  The last 4 are
20 random bits, drawn once per process (and again after a fork), that keep
IDs from concurrent worker processes apart.
Within one process the time part never repeats or goes backwards, so IDs
sort in arrival order even when two messages arrive in the same microsecond.
Across processes, a clash needs the same microsecond and the same 20 random
bits: two processes stamping the same microsecond clash with a chance of 1
in 2**20.  The spool's primary key catches a clash, and the writer then
takes the process's next ID.

The spool keys each message by an integer derived from its ID (see
``message_key``), so that the ID needs no index of its own.

Making, checking and keying IDs is compiled (``csrc/spoolrows.pyx``),
because the spool does all three for every message.
"""

from __future__ import annotations

import os

from relay._spoolrows import is_queue_id, message_key, new_queue_id_and_key, set_process_bits

__all__ = [
    "ALPHABET",
    "DROPPED_BITS",
    "KEY_SLOTS",
    "MALFORMED_KEYS",
    "QUEUE_ID_LENGTH",
    "is_queue_id",
    "message_key",
    "message_key_range",
    "new_queue_id",
    "new_queue_id_and_key",
    "queue_id_time",
]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_CHARS = 11
RANDOM_CHARS = 4
QUEUE_ID_LENGTH = TIME_CHARS + RANDOM_CHARS

# Low random bits that a message key leaves out, and the key bits per microsecond
# that remain.  The 8 kept bits (KEY_SLOTS values) spread the processes over the
# microsecond, and the spool picks another of them when two IDs share a key.
DROPPED_BITS = 12
KEY_SLOTS = 1 << (RANDOM_CHARS * 5 - DROPPED_BITS)
# Keys of messages whose ID is not well formed, which only a version 1 spool can
# contain.  They are negative, so they never meet the keys of well-formed IDs.
MALFORMED_KEYS = (-(1 << 63), -1)



def _draw_process_bits() -> None:
    set_process_bits(int.from_bytes(os.urandom(3), "big") & 0xFFFFF)


_draw_process_bits()
# A forked worker must not share its parent's random bits.
os.register_at_fork(after_in_child=_draw_process_bits)


def new_queue_id(now: float | None = None) -> str:
    """Return a fresh queue ID for a message arriving at ``now`` (default: the clock)."""
    return new_queue_id_and_key(now)[0]


def queue_id_time(queue_id: str) -> float:
    """Return the arrival time encoded in a queue ID, in seconds since the epoch.

    Raises ValueError when ``queue_id`` is not a well-formed queue ID.
    """
    if not is_queue_id(queue_id):
        raise ValueError(f"invalid queue ID {queue_id!r}; expected {QUEUE_ID_LENGTH} base32 characters")
    micros = 0
    for char in queue_id[:TIME_CHARS]:
        micros = micros * 32 + ALPHABET.index(char)
    return micros / 1_000_000


def message_key_range(queue_id: str) -> tuple[int, int]:
    """Return the lowest and highest key that the spool may store ``queue_id`` under.

    The range covers every slot of the ID's arrival microsecond, because the
    spool moves a message to another slot when its own is taken.  An ID that
    is not well formed gets ``MALFORMED_KEYS``.
    """
    if not is_queue_id(queue_id):
        return MALFORMED_KEYS
    low = message_key(queue_id) & ~(KEY_SLOTS - 1)
    return low, low + KEY_SLOTS - 1
