"""Dot-stuffing encoder for outbound DATA.

RFC 5321 section 4.5.2: before sending, a line that starts with ``.`` gets a
second ``.``, and the message ends with CRLF ``.`` CRLF.  Section 2.3.8
forbids sending any line end but CRLF, so the encoder also turns every bare
LF and bare CR into CRLF.  A CR followed by LF is one line end.  The encoder
never holds bytes back: a CR is sent as CRLF at once and a following LF is
dropped as its second half.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc


cdef enum:
    CR = 13
    LF = 10
    DOT = 46


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
