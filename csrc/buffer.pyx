"""Input buffer of an SMTP server session: command lines, DATA and BDAT.

The session feeds the bytes of each ``data_received`` call to ``feed()`` and
pulls events with ``next_event()`` until it returns None.  Parsing happens
only in ``next_event()`` and only in the current mode, so when an event
changes the mode (a DATA or BDAT command) the session calls ``start_data()``
or ``start_bdat()`` before it pulls the next event.  The events are the same
however the input is split into chunks.

Modes and the standards they follow:

- Command: a line ends at CRLF or at a bare LF (``Line.bare_lf`` tells
  which, so the session can apply its own policy).  A line longer than
  ``line_limit`` octets with its line end (default 512, RFC 5321 section
  4.5.3.1.4) is reported once as ``LineTooLong`` as soon as the limit is
  passed and then dropped up to its LF, so memory stays bounded by the limit.
- DATA: only CRLF ``.`` CRLF ends the message (RFC 5321 sections 4.1.1.4
  and 2.3.8).  A bare LF or bare CR never ends a line: the first one is
  reported once as ``BareLineEnd`` and its offset is kept in ``DataEnd``.  A
  dot starting a line is removed (RFC 5321 section 4.5.2).  Octets are
  counted after unstuffing (the SIZE of RFC 1870); past ``max_size`` they are
  still counted and scanned but no longer stored.  There is no line length
  limit in DATA: only the message size caps a message.
- BDAT: exactly the chunk size in octets, with no unstuffing (RFC 3030).

Speed: in DATA mode, 16-octet blocks of plain CRLF lines (no bare CR or LF,
no line starting with a dot) are skipped with SSE2 compares and copied in
bulk; everything else takes a per-line path that uses ``memchr``.  Builds
without SSE2 use the per-line path alone, with the same results.

Memory: the received bytes not yet consumed, plus the message being stored,
whose allocation never exceeds ``max_size`` (DATA) or the chunk size
(BDAT).  Buffers larger than ``_KEEP_CAPACITY`` are freed once drained, so
an idle connection holds little.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memchr, memcpy, memmove

cdef extern from *:
    """
    #ifndef RELAY_DEBUG
    #define RELAY_DEBUG 0
    #endif

    /* Skip 16-octet blocks of DATA that need no per-line work: every LF is
       preceded by CR, every CR is followed by LF, and no line starts with a
       dot.  Returns the offset of the first block that fails (or that does
       not fit before end); *ends_line is set when the octet before that
       offset is the LF of a CRLF.  p must not be a line start whose dot is
       still unchecked, and octet p - 1 must not be a CR.  Without SSE2 it
       skips nothing and the scalar loop does all the work. */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static Py_ssize_t relay_skip_plain(const char *buf, Py_ssize_t p, Py_ssize_t end,
                                       int *ends_line) {
        const __m128i cr_byte = _mm_set1_epi8(13);
        const __m128i lf_byte = _mm_set1_epi8(10);
        const __m128i dot_byte = _mm_set1_epi8(46);
        unsigned int cr_in = 0, line_start_in = 0;
        while (end - p >= 16) {
            __m128i block = _mm_loadu_si128((const __m128i *)(buf + p));
            unsigned int cr = (unsigned int)_mm_movemask_epi8(_mm_cmpeq_epi8(block, cr_byte));
            unsigned int lf = (unsigned int)_mm_movemask_epi8(_mm_cmpeq_epi8(block, lf_byte));
            unsigned int dot = (unsigned int)_mm_movemask_epi8(_mm_cmpeq_epi8(block, dot_byte));
            if (lf != (((cr << 1) | cr_in) & 0xFFFFu))
                break;
            if ((((lf << 1) | line_start_in) & dot) & 0xFFFFu)
                break;
            /* A CR in the last octet is accepted only when its LF is in
               the buffer, so the block after it starts with that LF. */
            if ((cr & 0x8000u) && (end - p == 16 || buf[p + 16] != 10))
                break;
            cr_in = cr >> 15;
            line_start_in = lf >> 15;
            p += 16;
        }
        *ends_line = (int)line_start_in;
        return p;
    }
    #else
    static Py_ssize_t relay_skip_plain(const char *buf, Py_ssize_t p, Py_ssize_t end,
                                       int *ends_line) {
        (void)buf; (void)end;
        *ends_line = 0;
        return p;
    }
    #endif
    """
    const int RELAY_DEBUG
    Py_ssize_t relay_skip_plain(const char *buf, Py_ssize_t p, Py_ssize_t end,
                                int *ends_line) noexcept nogil


cdef enum:
    # RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets,
    # CRLF included.
    DEFAULT_LINE_LIMIT_OCTETS = 512
    # Buffers up to this size are kept between messages; larger ones are
    # freed when drained, so idle connections hold at most this much each.
    _KEEP_CAPACITY = 65536
    # First allocation of the receive buffer: one typical TCP read.
    _INITIAL_CAPACITY = 4096


cdef enum:
    CR = 13
    LF = 10
    DOT = 46

DEFAULT_LINE_LIMIT = DEFAULT_LINE_LIMIT_OCTETS

_MODE_NAMES = ("command", "data", "bdat")


cdef class Line:
    """A complete command line, without its line end."""

    def __init__(self, bytes line, bint bare_lf=False):
        self.line = line
        self.bare_lf = bare_lf

    def __eq__(self, other):
        if type(other) is not Line:
            return NotImplemented
        return self.line == (<Line>other).line and self.bare_lf == (<Line>other).bare_lf

    def __repr__(self):
        return f"Line({self.line!r}, bare_lf={self.bare_lf})"


cdef class LineTooLong:
    """A command line passed the limit; reported once, then discarded to its end."""

    def __init__(self, Py_ssize_t limit):
        self.limit = limit

    def __eq__(self, other):
        if type(other) is not LineTooLong:
            return NotImplemented
        return self.limit == (<LineTooLong>other).limit

    def __repr__(self):
        return f"LineTooLong(limit={self.limit})"


cdef class BareLineEnd:
    """The first bare LF or bare CR seen in the current DATA, reported once."""

    def __init__(self, Py_ssize_t offset, bytes char):
        self.offset = offset
        self.char = char

    def __eq__(self, other):
        if type(other) is not BareLineEnd:
            return NotImplemented
        return (
            self.offset == (<BareLineEnd>other).offset
            and self.char == (<BareLineEnd>other).char
        )

    def __repr__(self):
        return f"BareLineEnd(offset={self.offset}, char={self.char!r})"


cdef class DataEnd:
    """End of DATA: CRLF ``.`` CRLF was read; the buffer is back in command mode."""

    def __init__(self, bytes body, Py_ssize_t octets, bint oversized=False,
                 Py_ssize_t bare_lf=-1, Py_ssize_t bare_cr=-1):
        self.body = body
        self.octets = octets
        self.oversized = oversized
        self.bare_lf = bare_lf
        self.bare_cr = bare_cr

    def __eq__(self, other):
        if type(other) is not DataEnd:
            return NotImplemented
        cdef DataEnd o = <DataEnd>other
        return (
            self.body == o.body
            and self.octets == o.octets
            and self.oversized == o.oversized
            and self.bare_lf == o.bare_lf
            and self.bare_cr == o.bare_cr
        )

    def __repr__(self):
        return (
            f"DataEnd(body=<{len(self.body)} octets>, octets={self.octets}, "
            f"oversized={self.oversized}, bare_lf={self.bare_lf}, bare_cr={self.bare_cr})"
        )


cdef class BdatChunk:
    """A complete BDAT chunk; the buffer is back in command mode."""

    def __init__(self, bytes data, Py_ssize_t octets):
        self.data = data
        self.octets = octets

    def __eq__(self, other):
        if type(other) is not BdatChunk:
            return NotImplemented
        return self.data == (<BdatChunk>other).data and self.octets == (<BdatChunk>other).octets

    def __repr__(self):
        return f"BdatChunk(data=<{len(self.data)} octets>, octets={self.octets})"


cdef void _check_plain(const char *buf, Py_ssize_t start, Py_ssize_t stop) noexcept:
    """Debug builds: verify a range relay_skip_plain() skipped, octet by octet."""
    cdef Py_ssize_t i
    for i in range(start, stop):
        if buf[i] == LF and (i == 0 or buf[i - 1] != CR):
            raise_fatal(b"relay_skip_plain skipped a bare LF")
        if buf[i] == CR and buf[i + 1] != LF:
            raise_fatal(b"relay_skip_plain skipped a bare CR")
        if buf[i] == DOT and i > start and buf[i - 1] == LF:
            raise_fatal(b"relay_skip_plain skipped a dot at a line start")


cdef extern from "Python.h":
    void raise_fatal "Py_FatalError" (const char *message) noexcept


# Every event next_event() returns; usable with isinstance() and in annotations.
Event = Line | LineTooLong | BareLineEnd | DataEnd | BdatChunk


cdef bytes _LF = b"\n"
cdef bytes _CR = b"\r"


cdef class SMTPBuffer:
    """Bytes received from one client, split into command lines, DATA and BDAT."""

    def __cinit__(self):
        self._buf = NULL
        self._body = NULL
        self._bare_lf = -1
        self._bare_cr = -1

    def __init__(self, Py_ssize_t line_limit=DEFAULT_LINE_LIMIT_OCTETS):
        self.line_limit = line_limit
        self._mode = MODE_COMMAND

    def __dealloc__(self):
        PyMem_Free(self._buf)
        PyMem_Free(self._body)

    @property
    def line_limit(self):
        """Max command line in octets, line end included."""
        return self._line_limit

    @line_limit.setter
    def line_limit(self, Py_ssize_t value):
        # _next_line passes the limit to memchr as a length, so a value
        # below 1 would read outside the buffer.  3 fits the shortest
        # command line with its CRLF.
        if value < 3:
            raise ValueError(f"line_limit must be at least 3 octets, got {value}")
        self._line_limit = value

    @property
    def mode(self):
        return _MODE_NAMES[<int>self._mode]

    @property
    def buffered(self):
        return self._end - self._start

    @property
    def discarding(self):
        return self._discarding

    @property
    def data_octets(self):
        if self._mode == MODE_DATA:
            return self._octets
        if self._mode == MODE_BDAT:
            return self._chunk_size - self._chunk_left
        return 0

    # -- receive buffer ---------------------------------------------------

    cdef void _compact(self) noexcept:
        """Move the unconsumed octets to the front, or free a large drained buffer."""
        cdef Py_ssize_t n = self._end - self._start
        if n == 0:
            self._start = self._end = 0
            if self._cap > _KEEP_CAPACITY:
                PyMem_Free(self._buf)
                self._buf = NULL
                self._cap = 0
        elif self._start > 0:
            memmove(self._buf, self._buf + self._start, n)
            self._start = 0
            self._end = n

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need
        cdef Py_ssize_t cap
        cdef char *grown
        if self._cap - self._end >= extra:
            return 0
        self._compact()
        need = self._end + extra
        if self._cap >= need:
            return 0
        cap = self._cap * 2 if self._cap else _INITIAL_CAPACITY
        if cap < need:
            cap = need
        grown = <char *>PyMem_Realloc(self._buf, cap)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._cap = cap
        return 0

    def feed(self, data):
        """Append received bytes; parsing happens in ``next_event``."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len == 0:
                return
            self._reserve(view.len)
            memcpy(self._buf + self._end, view.buf, view.len)
            self._end += view.len
        finally:
            PyBuffer_Release(&view)

    def discard(self):
        """Drop every buffered octet and return to command mode; return the count."""
        cdef Py_ssize_t dropped = self._end - self._start
        self._start = self._end = 0
        self._compact()
        self._mode = MODE_COMMAND
        self._discarding = False
        self._body_release()
        return dropped

    # -- message store ----------------------------------------------------

    cdef int _body_append(self, const char *data, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap
        cdef Py_ssize_t limit
        cdef char *grown
        if self._body_len + n > self._body_cap:
            cap = self._body_cap * 2 if self._body_cap else _INITIAL_CAPACITY
            # Doubling alone would allocate up to twice the limit: a 35 MiB
            # message would grow the store to 64 MiB.  The store never holds
            # more than max_size (DATA) or the chunk size (BDAT).
            limit = self._max_size if self._mode == MODE_DATA else self._chunk_size
            if cap > limit:
                cap = limit
            if cap < self._body_len + n:
                cap = self._body_len + n
            grown = <char *>PyMem_Realloc(self._body, cap)
            if grown == NULL:
                raise MemoryError()
            self._body = grown
            self._body_cap = cap
        memcpy(self._body + self._body_len, data, n)
        self._body_len += n
        return 0

    cdef void _body_release(self) noexcept:
        self._body_len = 0
        if self._body_cap > _KEEP_CAPACITY:
            PyMem_Free(self._body)
            self._body = NULL
            self._body_cap = 0

    cdef inline int _data_append(self, const char *data, Py_ssize_t n) except -1:
        """Count ``n`` unstuffed octets and store them while under the maximum."""
        if n <= 0:
            return 0
        self._octets += n
        if self._oversized:
            return 0
        if self._octets > self._max_size:
            # Stop storing for good: the message is rejected after its end,
            # so the octets already stored are of no use.
            self._oversized = True
            self._body_len = 0
            self._body_release()
            return 0
        return self._body_append(data, n)

    # -- modes ------------------------------------------------------------

    def start_data(self, Py_ssize_t max_size):
        """Switch to DATA mode; the message is stored up to ``max_size`` octets."""
        if max_size < 0:
            raise ValueError(f"max_size must not be negative, got {max_size}")
        self._mode = MODE_DATA
        self._max_size = max_size
        self._octets = 0
        self._body_len = 0
        self._line_start = True
        self._oversized = False
        self._bare_reported = False
        self._bare_lf = -1
        self._bare_cr = -1

    def start_bdat(self, Py_ssize_t size, bint store=True):
        """Switch to BDAT mode for a chunk of exactly ``size`` octets."""
        if size < 0:
            raise ValueError(f"BDAT chunk size must not be negative, got {size}")
        self._mode = MODE_BDAT
        self._chunk_size = size
        self._chunk_left = size
        self._store = store
        self._body_len = 0

    def next_event(self):
        """Return the next event in the current mode, or None until more bytes arrive."""
        if self._mode == MODE_COMMAND:
            return self._next_line()
        if self._mode == MODE_DATA:
            return self._next_data()
        return self._next_bdat()

    cdef object _next_line(self):
        cdef char *buf = self._buf
        cdef Py_ssize_t avail
        cdef Py_ssize_t window
        cdef Py_ssize_t lf
        cdef Py_ssize_t stop
        cdef bint bare
        cdef const char *hit
        while True:
            avail = self._end - self._start
            if avail == 0:
                return None
            if self._discarding:
                hit = <const char *>memchr(buf + self._start, LF, avail)
                if hit == NULL:
                    self._start = self._end
                    self._compact()
                    return None
                self._start = (hit - buf) + 1
                self._discarding = False
                continue
            window = avail if avail < self._line_limit else self._line_limit
            hit = <const char *>memchr(buf + self._start, LF, window)
            if hit != NULL:
                lf = hit - buf
                bare = not (lf > self._start and buf[lf - 1] == CR)
                stop = lf if bare else lf - 1
                line = Line.__new__(Line)
                (<Line>line).line = PyBytes_FromStringAndSize(buf + self._start, stop - self._start)
                (<Line>line).bare_lf = bare
                self._start = lf + 1
                if self._start == self._end:
                    self._compact()
                return line
            if avail < self._line_limit:
                return None
            # The limit passed without a line end: report now, not at the LF,
            # so a client streaming a line without end cannot grow memory.
            # Only the first line_limit octets are known to hold no LF; the
            # discarding branch drops the rest up to the LF on the next call.
            self._discarding = True
            self._start += window
            if self._start == self._end:
                self._compact()
            return LineTooLong(self._line_limit)

    cdef object _next_data(self):
        cdef char *buf = self._buf
        cdef Py_ssize_t first = self._start   # octets before it were consumed earlier
        cdef Py_ssize_t end = self._end
        cdef Py_ssize_t p = first
        cdef Py_ssize_t copy_from = first      # start of octets not yet appended
        cdef Py_ssize_t line_end
        cdef Py_ssize_t scan_end
        cdef const char *hit
        cdef Py_ssize_t skipped
        cdef int ends_line = 0
        cdef object event = None

        # Invariant between calls: a consumed octet is never a CR whose
        # successor is unknown, so "is this LF preceded by CR" and "is this
        # CR bare" are always decided with both octets in _buf.
        while p < end:
            if self._line_start:
                if buf[p] == DOT:
                    if p + 1 >= end:
                        break
                    if buf[p + 1] == CR:
                        if p + 2 >= end:
                            break
                        if buf[p + 2] == LF:
                            self._data_append(buf + copy_from, p - copy_from)
                            self._start = p + 3
                            return self._finish_data()
                    # A leading dot is stuffing: drop it (RFC 5321 section 4.5.2).
                    self._data_append(buf + copy_from, p - copy_from)
                    p += 1
                    copy_from = p
                self._line_start = False
                if p >= end:
                    break

            skipped = relay_skip_plain(buf, p, end, &ends_line)
            if skipped > p:
                if RELAY_DEBUG:
                    _check_plain(buf, p, skipped)
                p = skipped
                if ends_line:
                    self._line_start = True
                    continue
                if p >= end:
                    break

            hit = <const char *>memchr(buf + p, LF, end - p)
            line_end = (hit - buf) if hit != NULL else end

            # Every CR before line_end - 1 is bare.  A CR at line_end - 1
            # either pairs with the LF or waits for the next octet.
            if self._bare_cr < 0 and line_end - 1 > p:
                scan_end = line_end - 1
                hit = <const char *>memchr(buf + p, CR, scan_end - p)
                if hit != NULL:
                    self._bare_cr = self._octets + ((hit - buf) - copy_from)
                    if not self._bare_reported:
                        self._bare_reported = True
                        event = BareLineEnd(self._bare_cr, _CR)

            if line_end == end:
                # No LF yet: keep a trailing CR for the next call.
                p = end - 1 if buf[end - 1] == CR else end
                break

            if line_end > first and buf[line_end - 1] == CR:
                self._line_start = True
            else:
                if self._bare_lf < 0:
                    self._bare_lf = self._octets + (line_end - copy_from)
                    if not self._bare_reported:
                        self._bare_reported = True
                        event = BareLineEnd(self._bare_lf, _LF)
            p = line_end + 1
            if event is not None:
                break

        self._data_append(buf + copy_from, p - copy_from)
        self._start = p
        if RELAY_DEBUG:
            assert self._start <= self._end
            assert self._start == self._end or self._end - self._start <= 2 or event is not None
        if self._start == self._end:
            self._compact()
        return event

    cdef object _finish_data(self):
        cdef DataEnd event = DataEnd.__new__(DataEnd)
        if self._oversized:
            event.body = b""
        else:
            event.body = PyBytes_FromStringAndSize(self._body, self._body_len)
        event.octets = self._octets
        event.oversized = self._oversized
        event.bare_lf = self._bare_lf
        event.bare_cr = self._bare_cr
        self._mode = MODE_COMMAND
        self._body_release()
        if self._start == self._end:
            self._compact()
        return event

    cdef object _next_bdat(self):
        cdef Py_ssize_t avail = self._end - self._start
        cdef Py_ssize_t take = avail if avail < self._chunk_left else self._chunk_left
        cdef bytes data
        if take > 0:
            if self._store:
                if take == self._chunk_size:
                    # The whole chunk sits in one buffer: one copy, straight out.
                    data = PyBytes_FromStringAndSize(self._buf + self._start, take)
                    self._start += take
                    self._chunk_left = 0
                    return self._finish_bdat(data)
                self._body_append(self._buf + self._start, take)
            self._start += take
            self._chunk_left -= take
            if self._start == self._end:
                self._compact()
        if self._chunk_left > 0:
            return None
        if self._store:
            data = PyBytes_FromStringAndSize(self._body, self._body_len)
        else:
            data = b""
        return self._finish_bdat(data)

    cdef object _finish_bdat(self, bytes data):
        cdef BdatChunk event = BdatChunk.__new__(BdatChunk)
        event.data = data
        event.octets = self._chunk_size
        self._mode = MODE_COMMAND
        self._body_release()
        if self._start == self._end:
            self._compact()
        return event
