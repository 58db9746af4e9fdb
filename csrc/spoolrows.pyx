"""Queue IDs and spool rows: the work a spool commit does for every message.

``relay.spool.ids`` documents the queue ID format: 11 Crockford base32
characters of arrival time in microseconds, then 4 of 20 random bits per
process.  The 75-bit value is kept as its two parts, 55 bits of time and
20 random bits, so that C integers hold it.

``add_message_rows`` turns a batch of pending commits into the parameters
of the spool's multi-row ``INSERT`` statements.  Its output equals the rows
built in Python: the envelope document is made by the same ``orjson.dumps``
call on the same dictionary, the CRC by ``zlib.crc32``.  The document and
bodies up to ``COPY_BODY_MAX`` come as bytearray copies, which sqlite3 binds
with less work than bytes.

Called with the GIL held.  Between reading and writing the last timestamp,
``new_queue_id_and_key`` runs only C code, which never releases the GIL,
so the timestamp needs no lock of its own.  (``zlib.crc32`` in
``add_message_rows`` does release it for large buffers.)
"""

import zlib

import orjson

from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME


cdef enum:
    TIME_CHARS = 11
    ID_LENGTH = 15
    RANDOM_BITS = 20
    DROPPED_BITS = 12
    RANDOM_MASK = 0xFFFFF

# Microseconds that fit the 11 time characters: up to the year 3111.
cdef unsigned long long MICROS_LIMIT = (<unsigned long long>1) << 55

cdef bytes ALPHABET = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Each code point below 128 to its base32 digit, or -1 when it is not one.
cdef signed char DIGITS[128]

cdef unsigned long long _last_micros = 0
cdef unsigned long _process_bits = 0

cdef object _dumps = orjson.dumps
cdef object _crc32 = zlib.crc32


cdef void _init_digits():
    cdef int i
    for i in range(128):
        DIGITS[i] = -1
    for i in range(32):
        DIGITS[ALPHABET[i]] = i


_init_digits()


def set_process_bits(unsigned long bits):
    """Set the 20 random bits that end every queue ID this process makes."""
    global _process_bits
    _process_bits = bits & RANDOM_MASK


cdef inline long long _key(unsigned long long micros, unsigned long bits) noexcept:
    # The 75-bit ID value without its low DROPPED_BITS random bits (see message_key).
    return <long long>((micros << (RANDOM_BITS - DROPPED_BITS)) | (bits >> DROPPED_BITS))


cdef str _encode(unsigned long long micros, unsigned long bits):
    cdef char out[ID_LENGTH]
    cdef const char *alphabet = ALPHABET
    cdef int i
    for i in range(TIME_CHARS - 1, -1, -1):
        out[i] = alphabet[micros & 31]
        micros >>= 5
    for i in range(ID_LENGTH - 1, TIME_CHARS - 1, -1):
        out[i] = alphabet[bits & 31]
        bits >>= 5
    return out[:ID_LENGTH].decode("ascii")


def new_queue_id_and_key(now=None):
    """Return a fresh queue ID and its message key.

    ``now`` is the arrival time in seconds since the epoch (default: the
    clock).  Within the process the time part never repeats or goes back.
    """
    global _last_micros
    cdef timespec clock
    cdef double seconds
    cdef unsigned long long micros
    if now is None:
        if clock_gettime(CLOCK_REALTIME, &clock) != 0:
            raise OSError("clock_gettime(CLOCK_REALTIME) failed")
        micros = <unsigned long long>clock.tv_sec * 1000000 + <unsigned long long>(clock.tv_nsec // 1000)
    else:
        seconds = now
        if not 0 <= seconds * 1000000 < MICROS_LIMIT:
            raise ValueError(f"arrival time {now!r} is outside what a queue ID can hold")
        micros = <unsigned long long>(seconds * 1000000)
    if micros <= _last_micros:
        micros = _last_micros + 1
    if micros >= MICROS_LIMIT:
        raise ValueError("the clock is past what a queue ID can hold")
    _last_micros = micros
    return _encode(micros, _process_bits), _key(micros, _process_bits)


cdef bint _decode(object text, unsigned long long *micros, unsigned long *bits):
    """Read a queue ID's two parts; return False when ``text`` is not a queue ID."""
    if type(text) is not str or len(<str>text) != ID_LENGTH:
        return False
    cdef str value = <str>text
    cdef Py_UCS4 char
    cdef int i = 0
    cdef signed char digit
    cdef unsigned long long high = 0
    cdef unsigned long low = 0
    for char in value:
        if char >= 128:
            return False
        digit = DIGITS[char]
        if digit < 0:
            return False
        if i < TIME_CHARS:
            high = (high << 5) | <unsigned long long>digit
        else:
            low = (low << 5) | <unsigned long>digit
        i += 1
    micros[0] = high
    bits[0] = low
    return True


def is_queue_id(text):
    """Return whether ``text`` has the form of a queue ID."""
    cdef unsigned long long micros
    cdef unsigned long bits
    return _decode(text, &micros, &bits)


def message_key(queue_id):
    """Return the spool's integer key for a well-formed queue ID.  Raise ValueError for any other text."""
    cdef unsigned long long micros
    cdef unsigned long bits
    if not _decode(queue_id, &micros, &bits):
        raise ValueError(f"invalid queue ID {queue_id!r}")
    return _key(micros, bits)


# CPython's sqlite3 binds a bytearray parameter directly, but a bytes one only
# after a lookup in its adapter registry (need_adapt in
# Modules/_sqlite/cursor.c, 3.11).  For a blob of a few KiB, a copy into a
# bytearray costs fewer instructions than that lookup, and SQLite stores the
# same BLOB either way.  Larger bodies go as they are, because a copy would
# also cost memory and the lookup is a small part of their commit.
cdef Py_ssize_t COPY_BODY_MAX = 64 * 1024


cdef bytearray _as_bytearray(bytes value):
    return PyByteArray_FromStringAndSize(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))


cdef str _domain(str address):
    cdef Py_ssize_t at = address.rfind("@")
    if at < 0:
        return ""
    return address[at + 1:].lower()


def add_message_rows(batch, list message_values, list fresh_values):
    """Append the ``message`` and ``fresh`` row parameters of each pending commit in ``batch``.

    Raises ValueError for a malformed queue ID or a message without
    recipients, before anything is appended for that message.
    """
    cdef unsigned long long micros
    cdef unsigned long bits
    cdef list recipients_document
    cdef list domains
    for pending in batch:
        queue_id = pending.queue_id
        key = pending.key
        if key is None:
            if not _decode(queue_id, &micros, &bits):
                raise ValueError(f"invalid queue ID {queue_id!r}; use one from new_queue_id")
            key = _key(micros, bits)
        envelope = pending.envelope
        recipients = envelope.recipients
        if not recipients:
            raise ValueError("a message needs at least one recipient")

        recipients_document = []
        domains = []
        for recipient in recipients:
            address = recipient.address
            recipients_document.append([address, recipient.orcpt, ",".join(recipient.notify)])
            domains.append(_domain(address))
        fields = {
            "size": envelope.size,
            "body_type": envelope.body_type,
            "smtputf8": envelope.smtputf8,
            "ret": envelope.ret,
            "envid": envelope.envid,
            "protocol": envelope.protocol,
            "recipients": recipients_document,
        }
        # Stored only when set, so the documents of SMTP mail keep their size.
        if envelope.local_submission:
            fields["local_submission"] = True
        if envelope.original_queue_id is not None:
            fields["original_queue_id"] = envelope.original_queue_id
        if envelope.forwarded_from is not None:
            fields["forwarded_from"] = envelope.forwarded_from
        document = _dumps(fields)

        body = pending.body
        length = len(body)
        body_value = body
        if type(body) is bytes and length <= COPY_BODY_MAX:
            body_value = _as_bytearray(body)
        message_values += (
            key, queue_id, pending.arrival, envelope.sender, length, envelope.client_address,
            envelope.helo_name, envelope.auth_user, _as_bytearray(document), _crc32(body), body_value,
        )
        fresh_values += (key, len(recipients), " " + " ".join(domains) + " ")
