"""SMTP reply parser and formatter.

The parser reads what a server sends to the outbound client: replies of one
or more lines (RFC 5321 section 4.2).  Every line is a three-digit code, then
``-`` on all lines but the last, or a space or nothing on the last, then
text.  All lines of one reply carry the same code (section 4.2.1).  The
first digit is 2 to 5 and the second 0 to 5 (section 4.2.1); other codes and
lines shorter than the code are malformed.  An RFC 3463 enhanced status code
at the start of a line's text (RFC 2034) is split off when its class digit
matches the reply code.

Limits: a reply line is at most ``max_line`` octets with its line end
(default 512, RFC 5321 section 4.5.3.1.5) and a whole reply at most
``max_reply`` octets (default 64 KiB; an EHLO reply, the longest in practice,
is well under 1 KiB).  A longer line is cut: its first ``max_line - 2``
octets are read as the line and the rest is dropped up to the line end, as
Postfix's SMTP client does; the reply is complete only once that line end
has arrived.  Failing the reply instead would, for the reply
to the end of data, retry a message the server has already taken.  A reply
longer than ``max_reply`` is malformed, so a hostile server cannot grow the
client's memory.  Lines ending in a bare LF are
accepted: the reply's meaning does not depend on the line end, and the client
never forwards reply text.

A malformed reply raises ``SMTPError`` 451 4.5.0: the delivery attempt failed
for now, and the client closes the connection and retries later or at
another host.  The parser then stays failed.

``format_reply`` builds the replies a server sends, refusing text that
contains CR or LF.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memchr

from relay._errors import SMTPError


cdef enum:
    CR = 13
    LF = 10
    # RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets, CRLF included.
    DEFAULT_MAX_LINE_OCTETS = 512
    # A cap on one whole reply; see the module docstring.
    DEFAULT_MAX_REPLY_OCTETS = 65536

DEFAULT_MAX_LINE = DEFAULT_MAX_LINE_OCTETS
DEFAULT_MAX_REPLY = DEFAULT_MAX_REPLY_OCTETS


cdef class Reply:
    """One complete SMTP reply."""

    cdef readonly int code
    cdef readonly object enhanced
    cdef readonly list lines

    def __init__(self, int code, list lines, enhanced=None):
        self.code = code
        self.lines = lines
        self.enhanced = enhanced

    @property
    def text(self):
        return " ".join(self.lines)

    @property
    def positive(self):
        return 200 <= self.code < 400

    @property
    def transient(self):
        return 400 <= self.code < 500

    @property
    def permanent(self):
        return 500 <= self.code < 600

    def __eq__(self, other):
        if type(other) is not Reply:
            return NotImplemented
        cdef Reply o = <Reply>other
        return self.code == o.code and self.lines == o.lines and self.enhanced == o.enhanced

    def __repr__(self):
        return f"Reply({self.code}, {self.lines!r}, enhanced={self.enhanced!r})"


cdef object _malformed(str why):
    # The reason goes into the text so the client can log it; it never
    # contains octets from the server.
    return SMTPError(451, "4.5.0", f"Malformed reply from server: {why}")


cdef inline bint _is_digit(unsigned char c) noexcept:
    return 48 <= c <= 57


cdef Py_ssize_t _enhanced_end(const unsigned char *s, Py_ssize_t n, unsigned char klass) noexcept:
    """Return the length of an RFC 3463 code at s (class.subject.detail) or 0.

    The class digit must equal ``klass``; subject and detail have 1 to 3
    digits; the code ends the text or is followed by a space.
    """
    cdef Py_ssize_t i = 0
    cdef int part
    cdef Py_ssize_t digits
    if n < 5 or s[0] != klass or s[1] != 46:
        return 0
    i = 2
    for part in range(2):
        digits = 0
        while i < n and _is_digit(s[i]) and digits < 4:
            i += 1
            digits += 1
        if digits == 0 or digits > 3:
            return 0
        if part == 0:
            if i >= n or s[i] != 46:
                return 0
            i += 1
    if i < n and s[i] != 32:
        return 0
    return i


cdef class ReplyParser:
    """Splits bytes received from an SMTP server into replies."""

    cdef bytearray _buf
    cdef Py_ssize_t _pos              # first octet of _buf not yet consumed
    cdef Py_ssize_t _max_line         # max line, octets with the line end
    cdef Py_ssize_t _max_reply        # max reply, octets with line ends
    cdef int _code                    # code of the reply being read, 0 before its first line
    cdef Py_ssize_t _reply_octets     # octets of the reply being read
    cdef list _lines                  # text lines of the reply being read
    cdef object _enhanced             # enhanced code of its first line
    cdef object _failure              # SMTPError once the input was malformed
    cdef bint _skipping               # dropping the rest of a line cut at max_line
    cdef bint _done_after_skip        # the cut line was the reply's last: return it at the line end

    def __init__(self, Py_ssize_t max_line=DEFAULT_MAX_LINE_OCTETS,
                 Py_ssize_t max_reply=DEFAULT_MAX_REPLY_OCTETS):
        # A cut line keeps max_line - 2 octets: with 6 or more, the code and the
        # separator that tells the last line from the others.
        if max_line < 6 or max_reply < max_line:
            raise ValueError(
                f"need 6 <= max_line <= max_reply, got max_line={max_line}, max_reply={max_reply}"
            )
        self._buf = bytearray()
        self._max_line = max_line
        self._max_reply = max_reply
        self._lines = []

    @property
    def buffered(self):
        return len(self._buf) - self._pos + self._reply_octets

    def feed(self, data):
        """Append received bytes."""
        self._buf += data

    def next_reply(self):
        """Return the next complete reply, or None until more bytes arrive."""
        if self._failure is not None:
            raise self._failure
        try:
            return self._next_reply()
        except SMTPError as error:
            self._failure = error
            self._buf = bytearray()
            self._pos = 0
            raise

    cdef object _next_reply(self):
        cdef const unsigned char *s
        cdef Py_ssize_t n
        cdef Py_ssize_t lf
        cdef Py_ssize_t stop
        cdef Py_ssize_t length
        cdef Py_ssize_t text_start
        cdef Py_ssize_t code_len
        cdef const void *hit
        cdef int code
        cdef bint last
        while True:
            n = len(self._buf)
            s = <const unsigned char *>(<char *>self._buf)
            if self._pos >= n:
                self._compact()
                return None
            hit = memchr(s + self._pos, LF, n - self._pos)
            if self._skipping:
                # The rest of a cut line: drop it up to its line end.  A reply whose
                # last line was cut is returned only now, so that no octet of it
                # is still to come when the caller sends its next command.
                if hit == NULL:
                    self._pos = n
                    self._compact()
                    return None
                self._pos = <const unsigned char *>hit - s + 1
                self._skipping = False
                if self._done_after_skip:
                    self._done_after_skip = False
                    return self._finish()
                continue
            if hit == NULL:
                if n - self._pos < self._max_line:
                    self._compact()
                    return None
                # No line end within max_line octets: read the line cut, drop the rest later.
                lf = n
                length = self._max_line
                stop = self._pos + self._max_line - 2
                self._skipping = True
            else:
                lf = <const unsigned char *>hit - s
                length = lf + 1 - self._pos
                stop = lf
                if stop > self._pos and s[stop - 1] == CR:
                    stop -= 1
                if length > self._max_line:
                    length = self._max_line
                    stop = self._pos + self._max_line - 2
            self._reply_octets += length
            if self._reply_octets > self._max_reply:
                raise _malformed("reply too long")

            if stop - self._pos < 3:
                raise _malformed("line shorter than a reply code")
            if not (50 <= s[self._pos] <= 53 and 48 <= s[self._pos + 1] <= 53
                    and _is_digit(s[self._pos + 2])):
                raise _malformed("invalid reply code")
            code = ((s[self._pos] - 48) * 100 + (s[self._pos + 1] - 48) * 10
                    + (s[self._pos + 2] - 48))
            text_start = self._pos + 3
            if text_start == stop:
                last = True
            elif s[text_start] == 32:
                last = True
                text_start += 1
            elif s[text_start] == 45:  # "-"
                last = False
                text_start += 1
            else:
                raise _malformed("invalid separator after the reply code")
            if self._code != 0 and code != self._code:
                raise _malformed("reply code changed inside a multi-line reply")

            code_len = _enhanced_end(s + text_start, stop - text_start, s[self._pos])
            if code_len:
                if self._code == 0:
                    self._enhanced = PyBytes_FromStringAndSize(
                        <const char *>s + text_start, code_len).decode("ascii")
                text_start += code_len
                if text_start < stop:
                    text_start += 1
            if self._code == 0:
                self._code = code
            self._lines.append(
                PyBytes_FromStringAndSize(<const char *>s + text_start, stop - text_start)
                .decode("utf-8", "replace")
            )
            if self._skipping:
                self._pos = n
                self._done_after_skip = last
                continue
            self._pos = lf + 1
            if last:
                return self._finish()

    cdef Reply _finish(self):
        """Return the reply read so far and start the next one."""
        cdef Reply reply = Reply.__new__(Reply)
        reply.code = self._code
        reply.lines = self._lines
        reply.enhanced = self._enhanced
        self._code = 0
        self._lines = []
        self._enhanced = None
        self._reply_octets = 0
        return reply

    cdef void _compact(self) noexcept:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0


def parse_ehlo(Reply reply not None):
    """Return the EHLO capabilities: upper-case keyword to its parameters.

    The first line (the server's name) is skipped.
    """
    cdef dict capabilities = {}
    for line in reply.lines[1:]:
        words = line.split()
        if words:
            capabilities[words[0].upper()] = words[1:]
    return capabilities


def format_reply(int code, enhanced, lines):
    """Build a reply, multi-line when given several lines, each ending in CRLF."""
    if not 200 <= code <= 599:
        raise ValueError(f"reply code must be 200 to 599, got {code}")
    if isinstance(lines, str):
        lines = [lines]
    elif not lines:
        lines = [""]
    prefix = f"{enhanced} " if enhanced else ""
    if enhanced and (not isinstance(enhanced, str) or enhanced[:1] != str(code)[0]):
        raise ValueError(f"enhanced status {enhanced!r} is not in the class of reply code {code}")
    parts = []
    count = len(lines)
    for index, text in enumerate(lines):
        if "\r" in text or "\n" in text:
            raise ValueError(f"reply text must not contain CR or LF: {text!r}")
        separator = " " if index == count - 1 else "-"
        parts.append(f"{code}{separator}{prefix}{text}\r\n")
    return "".join(parts).encode("utf-8")
