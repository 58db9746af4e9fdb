"""SMTP command parser: one command line in, a ``Command`` or an ``SMTPError`` out.

Standards: the command grammar of RFC 5321 section 4.1 (verbs, paths,
ESMTP parameters), STARTTLS (RFC 3207), AUTH (RFC 4954), BDAT (RFC 3030),
and the MAIL/RCPT parameters SIZE (RFC 1870), BODY (RFC 6152, RFC 3030),
SMTPUTF8 (RFC 6531), RET, ENVID, NOTIFY and ORCPT (RFC 3461) and AUTH
(RFC 4954 section 5).  Verbs and parameter keywords are case-insensitive
(RFC 5321 section 2.4).

Paths: dot-string and quoted-string local parts (the quoted form is kept
byte for byte), domains, address literals (IPv4 and ``IPv6:``), the null
reverse-path ``<>`` and ``<postmaster>`` without a domain in RCPT.  A source
route (``<@a,@b:user@c>``) is accepted and dropped (RFC 5321 section 4.1.2
and appendix C).  Two lenient forms that real clients send are accepted: a
space after the colon and a path without angle brackets.  In both the stored
address is exactly the mailbox, without spaces or brackets.  Non-ASCII octets
in a path must be valid UTF-8 (RFC 6531).  A MAIL path with them also needs
the SMTPUTF8 parameter.  A RCPT path with them is parsed, and the session
rejects it unless its transaction's MAIL had SMTPUTF8.

Limits: a path is at most ``MAX_PATH`` = 256 octets with its brackets (RFC
5321 section 4.5.3.1.3), a domain 255 octets and a label 63 (RFC 1035
section 2.3.4), ENVID 100 characters and ORCPT 500 (RFC 3461 sections 4.4
and 4.2).  Local parts are not limited to 64 octets: RFC 5321 section 4.5.3.1
asks receivers to accept longer ones where they can, and real senders
(VERP, SRS) exceed it.

The parser checks syntax only.  Policy (which extensions were advertised,
address literal rules, the SIZE limit, HELO name checks) is the session's.
Every error is an ``SMTPError`` whose text never contains peer input; no
other exception leaves ``parse_command`` for any input bytes.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8

import ipaddress

from relay._errors import SMTPError

cdef extern from *:
    """
    #ifndef RELAY_DEBUG
    #define RELAY_DEBUG 0
    #endif
    """
    const int RELAY_DEBUG


cdef enum:
    # RFC 5321 section 4.5.3.1.3: a path is at most 256 octets, brackets included.
    MAX_PATH_OCTETS = 256
    # RFC 1035 section 2.3.4: a domain name is at most 255 octets, a label 63.
    MAX_DOMAIN_OCTETS = 255
    MAX_LABEL_OCTETS = 63
    # RFC 3461 section 4.4: ENVID is at most 100 characters; section 4.2:
    # ORCPT is at most 500.
    MAX_ENVID = 100
    MAX_ORCPT = 500
    # Longest verb: STARTTLS.
    MAX_VERB = 8

MAX_PATH = MAX_PATH_OCTETS

# Character classes, one bit each, for the 256 octet values.
cdef enum:
    C_ATEXT = 1         # RFC 5322 atext
    C_LETDIG = 2        # ALPHA / DIGIT
    C_QTEXT = 4         # RFC 5321 qtextSMTP: %d32-33 / %d35-91 / %d93-126
    C_VALUE = 8         # RFC 5321 esmtp-value: %d33-60 / %d62-126
    C_XCHAR = 16        # RFC 3461 xchar: %d33-42 / %d44-60 / %d62-126
    C_KEYWORD = 32      # RFC 5321 esmtp-keyword tail: ALPHA / DIGIT / "-"
    C_DIGIT = 64
    C_CONTROL = 128     # C0 controls and DEL

cdef unsigned char CLASS[256]


cdef void _init_classes() noexcept:
    cdef int c
    cdef bytes atext_specials = b"!#$%&'*+-/=?^_`{|}~"
    for c in range(256):
        CLASS[c] = 0
    for c in range(256):
        if (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122):
            CLASS[c] |= C_ATEXT | C_LETDIG | C_KEYWORD
        if 48 <= c <= 57:
            CLASS[c] |= C_DIGIT
        if c in (32, 33) or 35 <= c <= 91 or 93 <= c <= 126:
            CLASS[c] |= C_QTEXT
        if 33 <= c <= 60 or 62 <= c <= 126:
            CLASS[c] |= C_VALUE
        if 33 <= c <= 42 or 44 <= c <= 60 or 62 <= c <= 126:
            CLASS[c] |= C_XCHAR
        if c < 32 or c == 127:
            CLASS[c] |= C_CONTROL
    for c in atext_specials:
        CLASS[c] |= C_ATEXT
    CLASS[45] |= C_KEYWORD  # "-"


_init_classes()


# Verb codes, in the order of _VERB_NAMES.
cdef enum Verb:
    V_UNKNOWN = -1
    V_HELO = 0
    V_EHLO
    V_MAIL
    V_RCPT
    V_DATA
    V_RSET
    V_VRFY
    V_EXPN
    V_HELP
    V_NOOP
    V_QUIT
    V_STARTTLS
    V_AUTH
    V_BDAT

_VERB_NAMES = (
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "VRFY", "EXPN",
    "HELP", "NOOP", "QUIT", "STARTTLS", "AUTH", "BDAT",
)
VERBS = frozenset(_VERB_NAMES)

# Reply code, enhanced status code and text of each error.  No text includes
# input octets, so a reply can never echo injected bytes back to the client.
_UNKNOWN_COMMAND = (500, "5.5.1", "Unknown command")
_CONTROL_CHARACTER = (501, "5.5.2", "Control character in command line")
_INVALID_UTF8 = (501, "5.5.2", "Command line is not valid UTF-8")
_ARGUMENT_EXPECTED = (501, "5.5.4", "Argument required")
_NO_ARGUMENT = (501, "5.5.4", "No argument allowed")
_MAIL_SYNTAX = (501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
_RCPT_SYNTAX = (501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
_BDAT_SYNTAX = (501, "5.5.4", "Syntax: BDAT size [LAST]")
_AUTH_SYNTAX = (501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
_BAD_SENDER = (501, "5.1.7", "Invalid sender address syntax")
_BAD_RECIPIENT = (501, "5.1.3", "Invalid recipient address syntax")
_SENDER_TOO_LONG = (501, "5.1.7", "Sender address too long")
_RECIPIENT_TOO_LONG = (501, "5.1.3", "Recipient address too long")
_SENDER_UTF8 = (501, "5.1.7", "Sender address is not valid UTF-8")
_RECIPIENT_UTF8 = (501, "5.1.3", "Recipient address is not valid UTF-8")
_NON_ASCII = (553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
_PARAM_SYNTAX = (501, "5.5.4", "Invalid parameter syntax")
_PARAM_UNKNOWN = (555, "5.5.4", "Unknown or unsupported parameter")
_PARAM_REPEATED = (501, "5.5.4", "Parameter given twice with different values")
_SIZE_INVALID = (501, "5.5.4", "Invalid SIZE value")
_BODY_INVALID = (501, "5.5.4", "Invalid BODY value")
_SMTPUTF8_INVALID = (501, "5.5.4", "SMTPUTF8 takes no value")
_RET_INVALID = (501, "5.5.4", "Invalid RET value")
_ENVID_INVALID = (501, "5.5.4", "Invalid ENVID value")
_AUTH_INVALID = (501, "5.5.4", "Invalid AUTH value")
_NOTIFY_INVALID = (501, "5.5.4", "Invalid NOTIFY value")
_ORCPT_INVALID = (501, "5.5.4", "Invalid ORCPT value")
_XTEXT_INVALID = (501, "5.5.4", "Invalid xtext value")


cdef inline object _error(tuple spec):
    return SMTPError(spec[0], spec[1], spec[2])


cdef inline unsigned char _upper(unsigned char c) noexcept:
    if 97 <= c <= 122:
        return c - 32
    return c


cdef bint _equal_nocase(const unsigned char *s, Py_ssize_t n, const char *upper) noexcept:
    """True when s[:n] equals the NUL-terminated upper-case ``upper``, ignoring case."""
    cdef Py_ssize_t i = 0
    while i < n:
        if upper[i] == 0 or _upper(s[i]) != <unsigned char>upper[i]:
            return False
        i += 1
    return upper[n] == 0


cdef Verb _lookup_verb(const unsigned char *s, Py_ssize_t n) noexcept:
    if n == 4:
        if _equal_nocase(s, 4, "MAIL"):
            return V_MAIL
        if _equal_nocase(s, 4, "RCPT"):
            return V_RCPT
        if _equal_nocase(s, 4, "EHLO"):
            return V_EHLO
        if _equal_nocase(s, 4, "HELO"):
            return V_HELO
        if _equal_nocase(s, 4, "DATA"):
            return V_DATA
        if _equal_nocase(s, 4, "RSET"):
            return V_RSET
        if _equal_nocase(s, 4, "NOOP"):
            return V_NOOP
        if _equal_nocase(s, 4, "QUIT"):
            return V_QUIT
        if _equal_nocase(s, 4, "BDAT"):
            return V_BDAT
        if _equal_nocase(s, 4, "AUTH"):
            return V_AUTH
        if _equal_nocase(s, 4, "VRFY"):
            return V_VRFY
        if _equal_nocase(s, 4, "EXPN"):
            return V_EXPN
        if _equal_nocase(s, 4, "HELP"):
            return V_HELP
    elif n == 8 and _equal_nocase(s, 8, "STARTTLS"):
        return V_STARTTLS
    return V_UNKNOWN


cdef inline str _ascii(const unsigned char *s, Py_ssize_t start, Py_ssize_t end):
    return PyUnicode_DecodeASCII(<const char *>s + start, end - start, NULL)


cdef str _text(const unsigned char *s, Py_ssize_t start, Py_ssize_t end, bint eight_bit):
    """Decode s[start:end]: ASCII fast, UTF-8 when 8-bit octets were seen (may raise)."""
    if eight_bit:
        return PyUnicode_DecodeUTF8(<const char *>s + start, end - start, NULL)
    return PyUnicode_DecodeASCII(<const char *>s + start, end - start, NULL)


# ---------------------------------------------------------------------------
# Paths

cdef struct PathSpan:
    Py_ssize_t mailbox_start    # first octet of the mailbox (after a source route)
    Py_ssize_t at               # the "@" outside quotes, or -1 for <postmaster> and <>
    Py_ssize_t mailbox_end      # one past the mailbox
    Py_ssize_t end              # one past the path ('>' included)
    bint null                   # the path was <>
    bint eight_bit              # the mailbox contains octets >= 0x80


cdef Py_ssize_t _scan_ipv4(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Scan a dotted quad of 0-255 (RFC 5321 IPv4-address-literal); return its end or -1."""
    cdef int part
    cdef int digits
    cdef int value
    for part in range(4):
        if part > 0:
            if i >= n or s[i] != 46:
                return -1
            i += 1
        digits = 0
        value = 0
        while i < n and (CLASS[s[i]] & C_DIGIT) and digits < 4:
            value = value * 10 + (s[i] - 48)
            digits += 1
            i += 1
        if digits == 0 or digits > 3 or value > 255:
            return -1
    return i


cdef bint _valid_ipv6(const unsigned char *s, Py_ssize_t start, Py_ssize_t end):
    """Check RFC 5321 IPv6-addr; address literals are rare, so ipaddress does the work."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if end - start < 2 or end - start > 45:
        return False
    for i in range(start, end):
        c = s[i]
        # Only hex digits, ":" and "." appear in IPv6-addr; ipaddress would
        # also take a "%zone" suffix, which RFC 5321 does not allow.
        if not ((CLASS[c] & C_DIGIT) or 65 <= c <= 70 or 97 <= c <= 102 or c == 58 or c == 46):
            return False
    try:
        ipaddress.IPv6Address(_ascii(s, start, end))
    except ValueError:
        return False
    return True


cdef Py_ssize_t _scan_domain(const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                             bint allow_literal, bint *eight_bit) noexcept:
    """Scan a Domain or an address literal; return its end or -1.

    A label is Let-dig [Ldh-str] (RFC 5321 section 4.1.2).  Octets >= 0x80
    are taken as part of a U-label; the caller checks them against SMTPUTF8
    and UTF-8 validity.
    """
    cdef Py_ssize_t start = i
    cdef Py_ssize_t label_start
    cdef Py_ssize_t close
    cdef unsigned char c
    if i >= n:
        return -1
    if s[i] == 91:  # "["
        if not allow_literal:
            return -1
        close = i + 1
        while close < n and s[close] != 93:  # "]"
            close += 1
        if close >= n:
            return -1
        if close - (i + 1) > 5 and _equal_nocase(s + i + 1, 5, "IPV6:"):
            try:
                if not _valid_ipv6(s, i + 6, close):
                    return -1
            except BaseException:
                return -1
        elif _scan_ipv4(s, i + 1, close) != close:
            # General-address-literal needs an IANA-registered tag, and IPv6
            # is the only one (RFC 5321 section 4.1.3).
            return -1
        return close + 1
    while True:
        label_start = i
        while i < n:
            c = s[i]
            if c >= 128:
                eight_bit[0] = True
            elif not (CLASS[c] & C_LETDIG) and c != 45:
                break
            i += 1
        if i == label_start or i - label_start > MAX_LABEL_OCTETS:
            return -1
        if s[label_start] == 45 or s[i - 1] == 45:  # no "-" at either end
            return -1
        if i < n and s[i] == 46:
            i += 1
            continue
        break
    if i - start > MAX_DOMAIN_OCTETS:
        return -1
    return i


cdef Py_ssize_t _scan_local_part(const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                                 bint *eight_bit) noexcept:
    """Scan a Dot-string or Quoted-string local part; return its end or -1."""
    cdef unsigned char c
    cdef Py_ssize_t atom_start
    if i >= n:
        return -1
    if s[i] == 34:  # '"'
        i += 1
        while i < n:
            c = s[i]
            if c == 34:
                return i + 1
            if c == 92:  # quoted-pairSMTP: backslash and one of %d32-126
                if i + 1 >= n or s[i + 1] < 32 or s[i + 1] > 126:
                    return -1
                i += 2
            elif c >= 128:
                eight_bit[0] = True
                i += 1
            elif CLASS[c] & C_QTEXT:
                i += 1
            else:
                return -1
        return -1
    while True:
        atom_start = i
        while i < n:
            c = s[i]
            if c >= 128:
                eight_bit[0] = True
            elif not (CLASS[c] & C_ATEXT):
                break
            i += 1
        if i == atom_start:
            return -1
        if i < n and s[i] == 46:
            i += 1
            continue
        return i


cdef bint _scan_path(const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                     bint recipient, PathSpan *span) noexcept:
    """Scan a reverse-path or forward-path, bracketed or not; False on bad syntax."""
    cdef bint bracketed = i < n and s[i] == 60  # "<"
    cdef bint ignored = False
    cdef Py_ssize_t j
    span.null = False
    span.eight_bit = False
    span.at = -1
    if bracketed:
        i += 1
        if i < n and s[i] == 62:  # "<>"
            span.null = True
            span.mailbox_start = span.mailbox_end = i
            span.end = i + 1
            # Like any other path, <> ends the argument or is followed by a
            # space, so "<>x" is a bad address and not a bad parameter.
            if span.end < n and s[span.end] != 32:
                return False
            return not recipient
        if i < n and s[i] == 64:
            # A-d-l source route: "@" domain *("," "@" domain) ":"; dropped.
            while True:
                i = _scan_domain(s, i + 1, n, True, &ignored)
                if i < 0 or i >= n:
                    return False
                if s[i] == 58:  # ":"
                    i += 1
                    break
                if s[i] != 44 or i + 1 >= n or s[i + 1] != 64:
                    return False
                i += 1
    span.mailbox_start = i
    j = _scan_local_part(s, i, n, &span.eight_bit)
    if j < 0:
        return False
    if j < n and s[j] == 64:
        span.at = j
        j = _scan_domain(s, j + 1, n, True, &span.eight_bit)
        if j < 0:
            return False
    elif not (recipient and _equal_nocase(s + i, j - i, "POSTMASTER")):
        # Only <postmaster> may lack a domain (RFC 5321 section 4.1.1.3).
        return False
    span.mailbox_end = j
    if bracketed:
        if j >= n or s[j] != 62:
            return False
        j += 1
    # The path ends the argument or is followed by a space and parameters.
    if j < n and s[j] != 32:
        return False
    span.end = j
    return True


# ---------------------------------------------------------------------------
# xtext (RFC 3461 section 4)

cdef inline int _hex_value(unsigned char c) noexcept:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef object _xtext_decode(const unsigned char *s, Py_ssize_t start, Py_ssize_t end):
    """Decode xtext; return None on bad syntax, a control character or invalid UTF-8."""
    cdef bytearray out = bytearray()
    cdef Py_ssize_t i = start
    cdef int high
    cdef int low
    cdef int value
    cdef unsigned char c
    while i < end:
        c = s[i]
        if c == 43:  # "+" HEXCHAR HEXCHAR
            if i + 2 >= end:
                return None
            high = _hex_value(s[i + 1])
            low = _hex_value(s[i + 2])
            if high < 0 or low < 0:
                return None
            value = high * 16 + low
            # A decoded control character would let a value smuggle a line
            # end into anything that stores or forwards it.
            if value < 32 or value == 127:
                return None
            out.append(value)
            i += 3
        elif CLASS[c] & C_XCHAR:
            out.append(c)
            i += 1
        else:
            return None
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return None


def xtext_decode(str value):
    """Decode RFC 3461 xtext; raise SMTPError 501 5.5.4 on bad syntax or a control character."""
    cdef bytes raw
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise _error(_XTEXT_INVALID) from None
    decoded = _xtext_decode(<const unsigned char *>PyBytes_AS_STRING(raw), 0, PyBytes_GET_SIZE(raw))
    if decoded is None:
        raise _error(_XTEXT_INVALID)
    return decoded


def xtext_encode(str value):
    """Encode a string as RFC 3461 xtext (``+XX`` for ``+``, ``=``, controls, space and non-ASCII)."""
    cdef bytes raw = value.encode("utf-8")
    cdef unsigned char c
    cdef list parts = []
    for c in raw:
        if CLASS[c] & C_XCHAR:
            parts.append(chr(c))
        else:
            parts.append(f"+{c:02X}")
    return "".join(parts)


# ---------------------------------------------------------------------------
# Commands

cdef class Command:
    """One parsed SMTP command."""

    def __repr__(self):
        fields = [f"verb={self.verb!r}", f"argument={self.argument!r}"]
        for name in ("path", "size", "body", "ret", "envid", "auth", "notify",
                     "orcpt", "chunk_size", "mechanism", "initial_response"):
            value = getattr(self, name)
            if value is not None:
                fields.append(f"{name}={value!r}")
        if self.smtputf8:
            fields.append("smtputf8=True")
        if self.last:
            fields.append("last=True")
        return f"Command({', '.join(fields)})"


cdef Command _new_command(Verb verb, str argument):
    cdef Command command = Command.__new__(Command)
    command.verb = _VERB_NAMES[<int>verb]
    command.argument = argument
    command.params = {}
    return command


cdef int _scan_keyword(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Return the end of an esmtp-keyword at i, or -1 (ALPHA / DIGIT, then also "-")."""
    if i >= n or not (CLASS[s[i]] & C_LETDIG):
        return -1
    i += 1
    while i < n and (CLASS[s[i]] & C_KEYWORD):
        i += 1
    return i


cdef object _parse_params(Command command, const unsigned char *s, Py_ssize_t i,
                          Py_ssize_t n, bint recipient):
    """Parse the ESMTP parameters in s[i:n] into ``command``; return an error spec or None."""
    cdef Py_ssize_t key_start
    cdef Py_ssize_t key_end
    cdef Py_ssize_t value_start
    cdef Py_ssize_t value_end
    cdef Py_ssize_t key_len
    cdef Py_ssize_t j
    cdef bint has_value
    cdef bint value_eight_bit
    cdef dict params = command.params
    while i < n:
        # Parameters are separated by one or more spaces.
        if s[i] != 32:
            return _PARAM_SYNTAX
        while i < n and s[i] == 32:
            i += 1
        if i >= n:
            break
        key_start = i
        key_end = _scan_keyword(s, i, n)
        if key_end < 0:
            return _PARAM_SYNTAX
        key_len = key_end - key_start
        has_value = key_end < n and s[key_end] == 61  # "="
        value_start = value_end = key_end
        value_eight_bit = False
        if has_value:
            value_start = j = key_end + 1
            while j < n and s[j] != 32:
                if s[j] >= 128:
                    value_eight_bit = True
                elif not (CLASS[s[j]] & C_VALUE):
                    return _PARAM_SYNTAX
                j += 1
            value_end = j
            if value_end == value_start:
                return _PARAM_SYNTAX
        elif key_end < n and s[key_end] != 32:
            return _PARAM_SYNTAX
        i = value_end

        keyword = _ascii(s, key_start, key_end).upper()
        value = None
        if has_value:
            try:
                value = _text(s, value_start, value_end, value_eight_bit)
            except UnicodeDecodeError:
                return _PARAM_SYNTAX
        if keyword in params:
            # An exact repeat changes nothing, and Python's smtplib sends
            # one (BODY=8BITMIME, SMTPUTF8) when the caller also passed it.
            if params[keyword] == value:
                continue
            return _PARAM_REPEATED
        params[keyword] = value

        error = _apply_param(command, keyword, s, value_start, value_end, has_value,
                             value_eight_bit, recipient)
        if error is not None:
            return error
    return None


cdef object _apply_param(Command command, str keyword, const unsigned char *s,
                         Py_ssize_t start, Py_ssize_t end, bint has_value,
                         bint eight_bit, bint recipient):
    """Decode one known parameter into ``command``; return an error spec or None."""
    cdef Py_ssize_t i
    cdef Py_ssize_t semicolon
    if recipient:
        if keyword == "NOTIFY":
            if not has_value or eight_bit:
                return _NOTIFY_INVALID
            items = _ascii(s, start, end).upper().split(",")
            if len(set(items)) != len(items):
                return _NOTIFY_INVALID
            if items != ["NEVER"]:
                for item in items:
                    if item not in ("SUCCESS", "FAILURE", "DELAY"):
                        return _NOTIFY_INVALID
            command.notify = tuple(items)
            return None
        if keyword == "ORCPT":
            if not has_value or eight_bit or end - start > MAX_ORCPT:
                return _ORCPT_INVALID
            semicolon = -1
            for i in range(start, end):
                if s[i] == 59:
                    semicolon = i
                    break
            # addr-type is an atom (RFC 3461 section 4.2): "rfc822", "utf-8", ...
            if semicolon <= start or semicolon + 1 >= end:
                return _ORCPT_INVALID
            for i in range(start, semicolon):
                if not (CLASS[s[i]] & C_ATEXT):
                    return _ORCPT_INVALID
            address = _xtext_decode(s, semicolon + 1, end)
            if address is None:
                return _ORCPT_INVALID
            command.orcpt = (_ascii(s, start, semicolon), address)
            return None
        return _PARAM_UNKNOWN

    if keyword == "SIZE":
        # RFC 1870: size-value is 1*20DIGIT.  A longer one is invalid, and int()
        # would refuse more than 4300 digits with an exception of its own.
        if not has_value or end - start > 20:
            return _SIZE_INVALID
        for i in range(start, end):
            if not (CLASS[s[i]] & C_DIGIT):
                return _SIZE_INVALID
        command.size = int(_ascii(s, start, end))
        return None
    if keyword == "BODY":
        if not has_value or eight_bit:
            return _BODY_INVALID
        value = _ascii(s, start, end).upper()
        if value not in ("7BIT", "8BITMIME", "BINARYMIME"):
            return _BODY_INVALID
        command.body = value
        return None
    if keyword == "SMTPUTF8":
        if has_value:
            return _SMTPUTF8_INVALID
        command.smtputf8 = True
        return None
    if keyword == "RET":
        if not has_value or eight_bit:
            return _RET_INVALID
        value = _ascii(s, start, end).upper()
        if value not in ("FULL", "HDRS"):
            return _RET_INVALID
        command.ret = value
        return None
    if keyword == "ENVID":
        if not has_value or eight_bit or end - start > MAX_ENVID:
            return _ENVID_INVALID
        envid = _xtext_decode(s, start, end)
        if envid is None:
            return _ENVID_INVALID
        command.envid = envid
        return None
    if keyword == "AUTH":
        if not has_value or eight_bit:
            return _AUTH_INVALID
        auth = _xtext_decode(s, start, end)
        if auth is None:
            return _AUTH_INVALID
        command.auth = auth
        return None
    return _PARAM_UNKNOWN


cdef Command _parse_path_command(Verb verb, const unsigned char *s, Py_ssize_t i,
                                 Py_ssize_t n, str argument):
    """Parse the argument of MAIL or RCPT, starting at s[i]."""
    cdef bint recipient = verb == V_RCPT
    cdef PathSpan span
    cdef Command command
    cdef Py_ssize_t path_octets
    cdef tuple bad_address = _BAD_RECIPIENT if recipient else _BAD_SENDER

    if recipient:
        if n - i < 3 or not _equal_nocase(s + i, 3, "TO:"):
            raise _error(_RCPT_SYNTAX)
        i += 3
    else:
        if n - i < 5 or not _equal_nocase(s + i, 5, "FROM:"):
            raise _error(_MAIL_SYNTAX)
        i += 5
    # Lenient: RFC 5321 section 3.3 allows no space after the colon, but
    # common clients send one.
    while i < n and s[i] == 32:
        i += 1
    if i >= n:
        raise _error(bad_address)
    if not _scan_path(s, i, n, recipient, &span):
        raise _error(bad_address)
    path_octets = span.end - i
    if s[i] != 60:
        path_octets += 2  # count the brackets the client left out
    if path_octets > MAX_PATH_OCTETS:
        raise _error(_RECIPIENT_TOO_LONG if recipient else _SENDER_TOO_LONG)

    command = _new_command(verb, argument)
    error = _parse_params(command, s, span.end, n, recipient)
    if error is not None:
        raise _error(error)

    if span.eight_bit:
        # SMTPUTF8 is a MAIL parameter (RFC 6531 section 3.4), so only the
        # session knows whether a RCPT's transaction allows a UTF-8 path.
        if not recipient and not command.smtputf8:
            raise _error(_NON_ASCII)
        try:
            command.path = _text(s, span.mailbox_start, span.mailbox_end, True)
        except UnicodeDecodeError:
            raise _error(_RECIPIENT_UTF8 if recipient else _SENDER_UTF8) from None
    else:
        command.path = _ascii(s, span.mailbox_start, span.mailbox_end)

    if span.null:
        command.local_part = ""
        command.domain = ""
    elif span.at < 0:
        command.local_part = command.path
        command.domain = ""
    else:
        # Split on the octet offset of the "@", which lies outside any quotes;
        # count characters for the str when the path is UTF-8.
        if span.eight_bit:
            local = _text(s, span.mailbox_start, span.at, True)
        else:
            local = None
        at_index = (span.at - span.mailbox_start) if local is None else len(local)
        command.local_part = command.path[:at_index]
        command.domain = command.path[at_index + 1:]
    return command


def parse_command(bytes line not None):
    """Parse one command line without its line end; raise SMTPError when invalid."""
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t verb_end
    cdef Py_ssize_t arg_start
    cdef Py_ssize_t arg_end
    cdef Py_ssize_t j
    cdef bint eight_bit = False
    cdef Verb verb
    cdef Command command
    cdef str argument

    while i < n and s[i] != 32:
        i += 1
    verb_end = i
    verb = _lookup_verb(s, verb_end) if verb_end <= MAX_VERB else V_UNKNOWN
    if verb == V_UNKNOWN:
        raise _error(_UNKNOWN_COMMAND)

    for j in range(verb_end, n):
        if CLASS[s[j]] & C_CONTROL:
            raise _error(_CONTROL_CHARACTER)
        if s[j] >= 128:
            eight_bit = True

    arg_start = verb_end
    while arg_start < n and s[arg_start] == 32:
        arg_start += 1
    arg_end = n
    while arg_end > arg_start and s[arg_end - 1] == 32:
        arg_end -= 1

    if verb == V_MAIL or verb == V_RCPT:
        # The argument text is decoded leniently here: a bad octet in the
        # path gets the more precise SMTPUTF8 or syntax reply below.
        if eight_bit:
            argument = (<bytes>line[arg_start:arg_end]).decode("utf-8", "replace")
        else:
            argument = _ascii(s, arg_start, arg_end)
        return _parse_path_command(verb, s, arg_start, arg_end, argument)

    try:
        argument = _text(s, arg_start, arg_end, eight_bit)
    except UnicodeDecodeError:
        raise _error(_INVALID_UTF8) from None

    if verb == V_DATA or verb == V_RSET or verb == V_QUIT or verb == V_STARTTLS:
        if arg_end > arg_start:
            raise _error(_NO_ARGUMENT)
        return _new_command(verb, argument)
    if verb == V_NOOP or verb == V_HELP:
        return _new_command(verb, argument)
    if arg_end == arg_start:
        raise _error(_ARGUMENT_EXPECTED)
    if verb == V_BDAT:
        return _parse_bdat(s, arg_start, arg_end, argument)
    if verb == V_AUTH:
        return _parse_auth(argument)
    # HELO, EHLO, VRFY, EXPN: the argument is free text to the parser.
    return _new_command(verb, argument)


cdef Command _parse_bdat(const unsigned char *s, Py_ssize_t i, Py_ssize_t n, str argument):
    cdef Py_ssize_t start = i
    cdef Command command
    while i < n and (CLASS[s[i]] & C_DIGIT):
        i += 1
    if i == start:
        raise _error(_BDAT_SYNTAX)
    command = _new_command(V_BDAT, argument)
    # RFC 3030 chunk-size is 1*DIGIT, so leading zeros do not change the
    # size and must not count towards the 20 digits below.
    while start < i - 1 and s[start] == 48:
        start += 1
    # Past 20 digits only "too big" matters, and the session then closes the
    # connection, because the chunk cannot be skipped.  int() would refuse
    # more than 4300 digits with an exception of its own.
    command.chunk_size = int(_ascii(s, start, i)) if i - start <= 20 else 10**20
    if i < n:
        if s[i] != 32:
            raise _error(_BDAT_SYNTAX)
        while i < n and s[i] == 32:
            i += 1
        if n - i != 4 or not _equal_nocase(s + i, 4, "LAST"):
            raise _error(_BDAT_SYNTAX)
        command.last = True
    return command


cdef Command _parse_auth(str argument):
    # Words are separated by spaces only: str.split() would also split on
    # Unicode spaces, and could return no word at all for "AUTH \u00a0".
    cdef list words = [word for word in argument.split(" ") if word]
    cdef Command command
    if not words:
        raise _error(_AUTH_SYNTAX)
    mechanism = words[0].upper()
    # RFC 4954 section 4: sasl-mech is 1*20 of upper-case letters, digits, "-" and "_".
    if len(mechanism) > 20 or len(words) > 2:
        raise _error(_AUTH_SYNTAX)
    for c in mechanism:
        if not ("A" <= c <= "Z" or "0" <= c <= "9" or c == "-" or c == "_"):
            raise _error(_AUTH_SYNTAX)
    command = _new_command(V_AUTH, argument)
    command.mechanism = mechanism
    if len(words) == 2:
        command.initial_response = words[1]
    return command
