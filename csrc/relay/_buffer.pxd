# Declarations of the SMTP server input buffer (buffer.pyx).  Each field says
# what it holds and its unit; offsets index _buf, sizes are octets.

cdef enum BufferMode:
    MODE_COMMAND = 0
    MODE_DATA = 1
    MODE_BDAT = 2


cdef class Line:
    cdef readonly bytes line      # command line without CRLF or LF
    cdef readonly bint bare_lf    # line ended with LF not preceded by CR


cdef class LineTooLong:
    cdef readonly Py_ssize_t limit    # line limit in force, octets with the line end


cdef class BareLineEnd:
    cdef readonly Py_ssize_t offset   # offset in the unstuffed message
    cdef readonly bytes char          # b"\n" or b"\r"


cdef class DataEnd:
    cdef readonly bytes body          # unstuffed message, empty when oversized
    cdef readonly Py_ssize_t octets   # unstuffed octets, counted past the maximum too
    cdef readonly bint oversized      # octets > max_size of start_data
    cdef readonly Py_ssize_t bare_lf  # offset of the first bare LF, or -1
    cdef readonly Py_ssize_t bare_cr  # offset of the first bare CR, or -1


cdef class BdatChunk:
    cdef readonly bytes data          # chunk octets, empty when not stored
    cdef readonly Py_ssize_t octets   # chunk size given to start_bdat


cdef class SMTPBuffer:
    # Received bytes.  [_start, _end) is not yet consumed; _buf is compacted
    # and grown by feed() and shrunk when it drains.
    cdef char *_buf
    cdef Py_ssize_t _cap              # allocated octets of _buf
    cdef Py_ssize_t _start            # first unconsumed octet
    cdef Py_ssize_t _end              # one past the last received octet

    cdef Py_ssize_t _line_limit       # max command line, octets with the line end, at least 3
    cdef BufferMode _mode
    cdef bint _discarding             # command mode: dropping the rest of a too-long line

    # Message under construction (DATA) or chunk (BDAT).  Never grows past
    # _max_size in DATA; freed after each message when it grew large.
    cdef char *_body
    cdef Py_ssize_t _body_len         # octets stored in _body
    cdef Py_ssize_t _body_cap         # allocated octets of _body

    # DATA mode
    cdef Py_ssize_t _max_size         # store at most this many unstuffed octets
    cdef Py_ssize_t _octets           # unstuffed octets so far, stored or not
    cdef bint _line_start             # the last consumed octets were CRLF (or none yet)
    cdef bint _oversized              # _octets passed _max_size; storing stopped
    cdef bint _bare_reported          # BareLineEnd already returned for this message
    cdef Py_ssize_t _bare_lf          # offset of the first bare LF, or -1
    cdef Py_ssize_t _bare_cr          # offset of the first bare CR, or -1

    # BDAT mode
    cdef Py_ssize_t _chunk_size       # size of the chunk being read
    cdef Py_ssize_t _chunk_left       # octets of the chunk still to read
    cdef bint _store                  # keep the chunk octets

    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _body_append(self, const char *data, Py_ssize_t n) except -1
    cdef void _body_release(self) noexcept
    cdef void _compact(self) noexcept
    cdef object _next_line(self)
    cdef object _next_data(self)
    cdef object _next_bdat(self)
    cdef object _finish_data(self)
    cdef object _finish_bdat(self, bytes data)
    cdef int _data_append(self, const char *data, Py_ssize_t n) except -1
