"""Dot-stuffing encoder for outbound DATA, and the line-length fold before it.

RFC 5321 section 4.5.2: before sending, a line that starts with ``.`` gets a
second ``.``, and the message ends with CRLF ``.`` CRLF.  Section 2.3.8
forbids sending any line end but CRLF, so the encoder also turns every bare
LF and bare CR into CRLF.  A CR followed by LF is one line end.  The encoder
never holds bytes back: a CR is sent as CRLF at once and a following LF is
dropped as its second half.

RFC 5321 section 4.5.3.1.6 limits a line to 1000 octets with its CRLF, and
RFC 5322 section 2.1.1 to 998 before it.  ``fold_long_lines`` breaks longer
lines before they are sent, as Postfix's ``smtp_line_length_limit`` does.
It breaks before the last space or tab in the second half of the line
that has other text after it, which for a header field is RFC 5322
folding and loses nothing when the field is unfolded.  A line without
such a blank is broken at the limit by inserting CRLF and a space, never
inside a UTF-8 sequence.  That inserted space stays in the text, as it
does with Postfix.  Blanks at the end of a line that pass the limit, or a
run of blanks longer than half the limit, can still end up on a line of
their own.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc


from libc.string cimport memchr, memmove


cdef enum:
    CR = 13
    LF = 10
    DOT = 46
    SP = 32
    HTAB = 9


cdef struct EncoderState:
    bint line_start     # the next octet starts a line
    bint after_cr       # the last octet was CR, so an LF now is its second half


cdef Py_ssize_t _encode(const unsigned char *src, Py_ssize_t n, unsigned char *out,
                        EncoderState *state, bint stuff) noexcept nogil:
    """Encode src[:n] into out (room for 2 * n octets); return the octets written."""
    cdef Py_ssize_t i
    cdef Py_ssize_t o = 0
    cdef unsigned char c
    cdef bint line_start = state.line_start
    cdef bint after_cr = state.after_cr
    for i in range(n):
        c = src[i]
        if c == CR:
            out[o] = CR
            out[o + 1] = LF
            o += 2
            line_start = True
            after_cr = True
        elif c == LF:
            if not after_cr:
                out[o] = CR
                out[o + 1] = LF
                o += 2
            line_start = True
            after_cr = False
        else:
            if line_start and stuff and c == DOT:
                out[o] = DOT
                o += 1
            out[o] = c
            o += 1
            line_start = False
            after_cr = False
    state.line_start = line_start
    state.after_cr = after_cr
    return o


cdef bytes _run(object data, EncoderState *state, bint stuff, bint finish):
    cdef Py_buffer view
    cdef unsigned char *out
    cdef Py_ssize_t written
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        # Worst case: every octet doubles, plus CRLF "." CRLF at the end.
        out = <unsigned char *>PyMem_Malloc(2 * view.len + 5)
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:
                written = _encode(<const unsigned char *>view.buf, view.len, out, state, stuff)
            if finish:
                if not state.line_start:
                    out[written] = CR
                    out[written + 1] = LF
                    written += 2
                if stuff:
                    out[written] = DOT
                    out[written + 1] = CR
                    out[written + 2] = LF
                    written += 3
            return PyBytes_FromStringAndSize(<char *>out, written)
        finally:
            PyMem_Free(out)
    finally:
        PyBuffer_Release(&view)


def dot_stuff(body):
    """Encode a message for DATA, terminator included.

    Every line end becomes CRLF, a line starting with ``.`` gets a second
    ``.``, a CRLF is added when the body does not end with a line end, and
    ``.\\r\\n`` follows.
    """
    cdef EncoderState state
    state.line_start = True
    state.after_cr = False
    return _run(body, &state, True, True)


def normalize_line_ends(body):
    """Return ``body`` with every bare LF and bare CR turned into CRLF."""
    cdef EncoderState state
    state.line_start = True
    state.after_cr = False
    return _run(body, &state, False, False)


cdef class DotStuffer:
    """Streaming form of ``dot_stuff`` for large messages."""

    cdef EncoderState _state
    cdef bint _finished

    def __init__(self):
        self._state.line_start = True
        self._state.after_cr = False
        self._finished = False

    def encode(self, chunk):
        """Encode the next piece of the message."""
        if self._finished:
            raise ValueError("DotStuffer.encode() called after finish()")
        return _run(chunk, &self._state, True, False)

    def finish(self):
        """Return the CRLF the message may lack and the ``.\\r\\n`` terminator."""
        if self._finished:
            raise ValueError("DotStuffer.finish() called twice")
        self._finished = True
        return _run(b"", &self._state, True, True)


cdef bint _has_long_line(const unsigned char *src, Py_ssize_t n, Py_ssize_t limit) noexcept nogil:
    """Return whether a line of src[:n] (ended by CR or LF) is longer than limit octets."""
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t window_end
    cdef Py_ssize_t lf_free = 0  # src[:lf_free] is known to hold no LF after start
    cdef const unsigned char *found
    while n - start > limit:
        # The next line end within limit + 1 octets; none means the line is too long.
        window_end = start + limit + 1
        if lf_free < start:
            lf_free = start
        found = <const unsigned char *>memchr(src + lf_free, LF, window_end - lf_free)
        if found == NULL:
            # A bare CR also ends a line, as dot_stuff sends it.  The window has no
            # LF, so the next search for one starts after it: lines ended by bare
            # CR cost one pass, not one per line.
            lf_free = window_end
            found = <const unsigned char *>memchr(src + start, CR, window_end - start)
            if found == NULL:
                return True
        start = found - src + 1
    return False


cdef inline bint _is_blank(unsigned char c) noexcept nogil:
    return c == SP or c == HTAB


cdef Py_ssize_t _break_at(const unsigned char *out, Py_ssize_t o, Py_ssize_t line_begin,
                          Py_ssize_t limit, unsigned char next_octet, bint *blank) noexcept nogil:
    """Return where to break the line out[line_begin:o] before next_octet.

    ``blank`` is set when the break goes before a space or tab; otherwise the
    break inserts CRLF and a space, at o or a little before to keep a UTF-8
    sequence whole.
    """
    cdef Py_ssize_t i = o - 1
    cdef Py_ssize_t lowest = line_begin + limit // 2
    cdef bint text_after = not _is_blank(next_octet)
    while i >= lowest:
        # RFC 5322 section 3.2.2: a folded line must not consist of blanks only,
        # so the blank must have other text after it.
        if _is_blank(out[i]) and text_after:
            blank[0] = True
            return i
        if not _is_blank(out[i]):
            text_after = True
        i -= 1
    blank[0] = False
    if next_octet & 0xC0 != 0x80:
        return o
    # next_octet continues a UTF-8 sequence: find its lead octet, at most 3 back.
    i = o - 1
    while i > line_begin and i >= o - 3:
        if out[i] & 0xC0 == 0xC0:
            return i
        if out[i] & 0xC0 != 0x80:
            break
        i -= 1
    return o


def fold_long_lines(body, Py_ssize_t limit):
    """Return ``body`` with every line longer than ``limit`` octets broken; ``body`` itself if none is.

    Lines end at CRLF, LF or CR, and line ends are copied unchanged.  The
    limit does not count the line end or the dot that dot-stuffing adds
    (RFC 5321 section 4.5.3.1.6).  ``limit`` must be at least 8.
    """
    cdef Py_buffer view
    cdef const unsigned char *src
    cdef unsigned char *out
    cdef unsigned char c
    cdef Py_ssize_t n, i, o, at, line_begin, room, inserted
    cdef bint blank
    if limit < 8:
        raise ValueError(f"line length limit {limit} is below 8")
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        src = <const unsigned char *>view.buf
        n = view.len
        with nogil:
            blank = _has_long_line(src, n, limit)
        if not blank:
            return body if type(body) is bytes else bytes(body)
        # Each break adds at most 3 octets and leaves a line of at most limit - limit // 2
        # octets, so at least limit // 2 octets pass between two breaks.
        room = n + 3 * (n // (limit // 2) + 1)
        out = <unsigned char *>PyMem_Malloc(room)
        if out == NULL:
            raise MemoryError()
        try:
            with nogil:
                o = 0
                line_begin = 0
                for i in range(n):
                    c = src[i]
                    if c == CR or c == LF:
                        out[o] = c
                        o += 1
                        line_begin = o
                        continue
                    if o - line_begin == limit:
                        at = _break_at(out, o, line_begin, limit, c, &blank)
                        # Before a blank, CRLF alone: the continuation line starts with the blank.
                        inserted = 2 if blank else 3
                        memmove(out + at + inserted, out + at, o - at)
                        out[at] = CR
                        out[at + 1] = LF
                        if not blank:
                            out[at + 2] = SP
                        o += inserted
                        line_begin = at + 2
                    out[o] = c
                    o += 1
            return PyBytes_FromStringAndSize(<char *>out, o)
        finally:
            PyMem_Free(out)
    finally:
        PyBuffer_Release(&view)
