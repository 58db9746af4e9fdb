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
"""

from __future__ import annotations

import os
import re
import threading
import time

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

_QUEUE_ID = re.compile(f"[{ALPHABET}]{{{QUEUE_ID_LENGTH}}}")
# Crockford digits to the digits that int(text, 32) reads.
_TO_BASE32 = str.maketrans(ALPHABET, "0123456789abcdefghijklmnopqrstuv")

# Two base32 characters per 10 bits, looked up instead of computed: an ID is made
# for every message, on the event loop's thread.
_PAIRS = [ALPHABET[high] + ALPHABET[low] for high in range(32) for low in range(32)]

_lock = threading.Lock()
_last_micros = 0
_process_bits = 0


def _draw_process_bits() -> None:
    global _process_bits
    _process_bits = int.from_bytes(os.urandom(3), "big") & 0xFFFFF


_draw_process_bits()
# A forked worker must not share its parent's random bits.
os.register_at_fork(after_in_child=_draw_process_bits)


def _encode(value: int) -> str:
    # 75 bits: one leading character (5 bits), then seven pairs of 10 bits each.
    # Unrolled, because a loop over the pairs takes twice as long.
    pairs = _PAIRS
    return "".join(
        (
            ALPHABET[(value >> 70) & 31],
            pairs[(value >> 60) & 0x3FF],
            pairs[(value >> 50) & 0x3FF],
            pairs[(value >> 40) & 0x3FF],
            pairs[(value >> 30) & 0x3FF],
            pairs[(value >> 20) & 0x3FF],
            pairs[(value >> 10) & 0x3FF],
            pairs[value & 0x3FF],
        )
    )


def new_queue_id(now: float | None = None) -> str:
    """Return a fresh queue ID for a message arriving at ``now`` (default: the clock)."""
    return new_queue_id_and_key(now)[0]


def new_queue_id_and_key(now: float | None = None) -> tuple[str, int]:
    """Return a fresh queue ID and its ``message_key``, both made from the same integer."""
    global _last_micros
    micros = int((time.time() if now is None else now) * 1_000_000)
    with _lock:
        if micros <= _last_micros:
            micros = _last_micros + 1
        _last_micros = micros
    value = (micros << 20) | _process_bits
    return _encode(value), value >> DROPPED_BITS


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


def is_queue_id(text: str) -> bool:
    """Return whether ``text`` has the form of a queue ID."""
    return _QUEUE_ID.fullmatch(text) is not None


def message_key(queue_id: str) -> int:
    """Return the spool's integer key for a well-formed queue ID.

    The key is the ID's 75-bit value without its low ``DROPPED_BITS`` random
    bits: the arrival microsecond times ``KEY_SLOTS`` plus a slot, below 2**63
    so it fits SQLite's signed 64-bit rowid.  Keys sort like the IDs.  Two IDs
    can share a key, so the spool stores the ID too and compares it.
    """
    return int(queue_id.translate(_TO_BASE32), 32) >> DROPPED_BITS


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
