"""Convert an 8-bit message to 7 bit for a next hop that does not offer 8BITMIME.

RFC 6152 section 3 forbids sending 8-bit message data to a server that did
not announce 8BITMIME: the client converts the message to 7 bit or returns
it.  ``downgrade_to_7bit`` does the conversion, as Postfix does with its
default ``disable_mime_output_conversion = no``.

Standards: RFC 2045 defines the MIME header fields, quoted-printable
(section 6.7) and base64 (section 6.8).  RFC 2046 defines multipart
boundaries (section 5.1.1) and the message types (section 5.2).  RFC 1428
section 3 labels a non-MIME 8-bit text with a charset, and RFC 6532 lets
message/global use any transfer encoding.

What changes, and what does not:

- Only entities that contain 8-bit octets change.  Every other header field,
  body, part, boundary line, line end and the order of the fields stay
  byte for byte as received, and a message that is already 7 bit is
  returned as it is.
- A leaf body whose Content-Transfer-Encoding is 7bit, 8bit, binary or
  missing is encoded: text/* and message/* leaves (message/global,
  message/delivery-status, ...) as quoted-printable, every other type as
  base64.  The first Content-Transfer-Encoding field is rewritten in place
  and any repeated one is dropped, or a new field is added after the last
  one.  The encoded lines are at most 76 octets (RFC 2045), well under the
  998 of RFC 5321.
- multipart/* is walked part by part.  Boundary lines, the preamble and the
  epilogue stay in place, and so does the line end before each boundary,
  which belongs to the boundary (RFC 2046 section 5.1.1).  MIME readers
  ignore the preamble and the epilogue, so an 8-bit octet there becomes an
  ``=XX`` escape.  A soft line break never leaves a line that starts with
  ``-``, so no encoded line can be taken for a boundary.
- message/rfc822 must not be encoded as a whole (RFC 2046 section 5.2.1),
  so the enclosed message is converted in turn, like the top-level one.
  Postfix also converts the enclosed message.  multipart/* and
  message/rfc822 entities whose content changed have an 8bit or binary
  Content-Transfer-Encoding relabelled 7bit.
- A message without MIME-Version, Content-Type and
  Content-Transfer-Encoding whose body has 8-bit octets is taken as plain
  text in an unknown charset (RFC 1428 section 3): it gets
  ``MIME-Version: 1.0``, ``Content-Type: text/plain`` and a
  quoted-printable body.  The charset is ``utf-8`` when the body is valid
  UTF-8, and ``unknown-8bit`` otherwise.  Any other entity without a
  Content-Type field that is encoded gets the same Content-Type, because
  the default us-ascii would be wrong for it.  So does an entity whose
  Content-Type field is invalid, and the new field replaces that one.
  This differs from Postfix: the mime_state.c of Postfix 2.6 converts only entities whose
  Content-Transfer-Encoding is 8bit or binary, so it sends such a body
  with its 8-bit octets.  A message with a Content-Transfer-Encoding field
  but no MIME-Version is converted as a MIME entity of that encoding,
  because readers honour the field.
- A body already in base64 or quoted-printable may still hold stray 8-bit
  octets.  In base64 they are removed, because decoders skip octets outside
  the alphabet (RFC 2045 section 6.8).  In quoted-printable they become
  ``=XX``, which decodes to the same octets.

``DowngradeError`` is raised when no 7-bit form carries the same content:
8-bit octets in a header field (that needs SMTPUTF8, RFC 6532; allowed with
``allow_8bit_headers`` when the message goes with SMTPUTF8), in a
message/partial or message/external-body entity (7bit only, RFC 2046
section 5.2), in a multipart whose boundary is missing or never occurs, in
a body with an unknown transfer encoding, or below ``MAX_DEPTH`` nested
entities.

The boundary may be given in the forms of RFC 2231: split into numbered
continuations (``boundary*0``, ``boundary*1``, ... in any order, section 3)
and percent-encoded after a charset and language (``boundary*=``, or
``boundary*0*=`` and ``boundary*1*=``, section 4).  A plain ``boundary``
parameter wins over both, as in Python's ``email`` package.

Limits: NUL octets and bare CR or LF in a 7-bit entity are left alone.  The
conversion runs in memory on the whole message, and only when the message
has an 8-bit octet.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from dataclasses import dataclass

# Entities nested deeper than this are not converted (Postfix 3.7: mime_nesting_limit = 100).
MAX_DEPTH = 100
# RFC 2045 section 6.7 rule 5: encoded lines are at most 76 characters, a soft line break's "=" included.
QP_LINE_LIMIT = 76

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
# Octets that quoted-printable must escape inside a line: all but tab and the printable ones other than "=".
_QP_UNSAFE = re.compile(rb"[^\t -<>-~]")
# RFC 2045 section 5.1: the characters that end a token in a Content-Type value.
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_WHITESPACE = frozenset(" \t\r\n")
_IDENTITY_ENCODINGS = ("7bit", "8bit", "binary")


class DowngradeError(Exception):
    """A message that cannot be converted to 7 bit.  The text names the part that prevents the conversion."""


@dataclass(slots=True)
class _Entity:
    """A message or body part split at the end of its header section."""

    fields: list[bytes]  # each header field with its continuation lines and line ends, as received
    separator: bytes  # the empty line after the header section, or b"" when the body follows without one
    body: bytes
    eol: bytes  # the line end that new lines in this entity get: b"\r\n", or b"\n" when the entity uses bare LF

    def field_names(self) -> list[bytes]:
        return [_field_name(field) for field in self.fields]

    def value(self, name: bytes) -> str | None:
        """Return the unfolded value of the first field called ``name`` (lower case), or None."""
        for field in self.fields:
            if _field_name(field) == name:
                value = field.split(b":", 1)[1]
                return value.replace(b"\r", b"").replace(b"\n", b"").decode("latin-1").strip()
        return None

    def joined(self) -> bytes:
        return b"".join(self.fields) + self.separator + self.body


def downgrade_to_7bit(message: bytes, *, allow_8bit_headers: bool = False) -> bytes:
    """Return ``message`` with every 8-bit body encoded as quoted-printable or base64.

    ``allow_8bit_headers`` leaves 8-bit header fields alone instead of
    raising; use it only when the message goes with SMTPUTF8.
    Raises DowngradeError when no 7-bit form carries the same content.
    """
    if message.isascii():
        return message
    return _Converter(allow_8bit_headers).message(message, depth=0, where="the message")


def body_is_8bit(message: bytes) -> bool:
    """Return whether ``message`` has an octet above 127, which a next hop without 8BITMIME must not receive."""
    return not message.isascii()


class _Converter:
    def __init__(self, allow_8bit_headers: bool) -> None:
        self.allow_8bit_headers = allow_8bit_headers

    def message(self, data: bytes, depth: int, where: str) -> bytes:
        """Convert a whole message: the top-level one or the content of a message/rfc822 part."""
        entity = _split_entity(data)
        names = entity.field_names()
        # A Content-Transfer-Encoding field alone counts too: readers honour it,
        # and encoding its body again would show "=3D" for "=".
        if b"mime-version" in names or b"content-type" in names or b"content-transfer-encoding" in names:
            converted = self._entity(entity, "text/plain", depth, where)
            if b"mime-version" not in names and converted.joined() != data:
                # The new Content-Transfer-Encoding means something only under MIME-Version.
                _append_field(converted, b"MIME-Version: 1.0")
            return converted.joined()
        self._check_header(entity, where)
        if entity.body.isascii():
            return data
        # RFC 1428 section 3: a non-MIME 8-bit message is plain text in an unknown charset.
        _append_field(entity, b"MIME-Version: 1.0")
        return self._encode_leaf(entity, "text", has_content_type=False).joined()

    def _entity(self, entity: _Entity, default_type: str, depth: int, where: str) -> _Entity:
        """Convert one MIME entity in place and return it."""
        if depth > MAX_DEPTH:
            raise DowngradeError(f"{where} is nested deeper than {MAX_DEPTH} MIME levels")
        self._check_header(entity, where)
        if entity.body.isascii():
            return entity
        content_type = entity.value(b"content-type")
        parsed = _parse_content_type(content_type) if content_type is not None else None
        media_type, parameters = parsed if parsed is not None else (default_type, {})
        main_type, _, subtype = media_type.partition("/")
        encoding = _transfer_encoding(entity)

        if encoding == "base64":
            # RFC 2045 section 6.8: decoders skip octets outside the base64 alphabet.
            entity.body = _EIGHT_BIT.sub(b"", entity.body)
            return entity
        if encoding == "quoted-printable":
            entity.body = _escape_qp_body(entity.body, entity.eol)
            return entity
        if encoding not in _IDENTITY_ENCODINGS:
            raise DowngradeError(f"{where} has 8-bit octets under the unknown transfer encoding {encoding!r}")

        if main_type == "multipart":
            boundary = _parameter_value(parameters, "boundary")
            if not boundary:
                raise DowngradeError(f"{where} is a {media_type} without a boundary parameter")
            default_part = "message/rfc822" if subtype == "digest" else "text/plain"
            entity.body = self._multipart(entity.body, boundary, default_part, depth, where)
            _relabel_identity(entity)
            return entity
        if media_type == "message/rfc822":
            entity.body = self.message(entity.body, depth + 1, f"the message enclosed in {where}")
            _relabel_identity(entity)
            return entity
        if media_type in ("message/partial", "message/external-body"):
            raise DowngradeError(f"{where} is a {media_type} with 8-bit octets, which must be 7bit")
        return self._encode_leaf(entity, main_type, has_content_type=parsed is not None)

    def _multipart(self, body: bytes, boundary: bytes, default_part: str, depth: int, where: str) -> bytes:
        """Convert each part between the boundary lines, and keep the boundary lines as received."""
        delimiters = _find_delimiters(body, boundary)
        if not delimiters:
            raise DowngradeError(f"{where} never uses its boundary {boundary.decode('latin-1')!r}")
        out = [_escape_8bit(body[: delimiters[0].start])]
        for number, delimiter in enumerate(delimiters):
            out.append(body[delimiter.start : delimiter.end])
            if delimiter.close:
                out.append(_escape_8bit(body[delimiter.end :]))
                break
            following = delimiters[number + 1].start if number + 1 < len(delimiters) else len(body)
            part = body[delimiter.end : following]
            # RFC 2046 section 5.1.1: the line end before a boundary line belongs to the boundary.
            tail = b""
            if number + 1 < len(delimiters):
                tail = _line_end(part)
                part = part[: len(part) - len(tail)]
            if not part.isascii():
                part_where = f"part {number + 1} of {where}"
                part = self._entity(_split_entity(part), default_part, depth + 1, part_where).joined()
            out.append(part + tail)
        return b"".join(out)

    def _encode_leaf(self, entity: _Entity, main_type: str, has_content_type: bool) -> _Entity:
        """Encode a leaf body given as 7bit, 8bit or binary, and label it."""
        if not has_content_type and main_type == "text":
            charset = b"utf-8" if _is_utf8(entity.body) else b"unknown-8bit"
            # An invalid Content-Type field, read as text/plain (RFC 2045 section 5.2), is replaced.
            _set_field(entity, b"Content-Type", b"text/plain; charset=" + charset)
        if main_type in ("text", "message"):
            entity.body = _quoted_printable(entity.body, entity.eol)
            _set_transfer_encoding(entity, b"quoted-printable")
        else:
            entity.body = base64.encodebytes(entity.body).replace(b"\n", entity.eol)
            _set_transfer_encoding(entity, b"base64")
        return entity

    def _check_header(self, entity: _Entity, where: str) -> None:
        if self.allow_8bit_headers:
            return
        for field in entity.fields:
            if not field.isascii():
                name = _field_name(field).decode("latin-1")
                raise DowngradeError(
                    f"the {name} header field of {where} has 8-bit octets, which only SMTPUTF8 can carry"
                )


@dataclass(frozen=True, slots=True)
class _Delimiter:
    """A boundary line of a multipart body: its span, line end included, and whether it closes the body."""

    start: int
    end: int
    close: bool


def _split_entity(data: bytes) -> _Entity:
    """Split ``data`` after its header section, which ends at an empty line or at the first line that is no field."""
    first_line_end = data.find(b"\n")
    eol = b"\n" if first_line_end > 0 and data[first_line_end - 1] != 0x0D else b"\r\n"
    fields: list[bytes] = []
    # Each field is sliced out once it ends, so a field with many continuation lines is not copied per line.
    field_start = -1
    position = 0
    separator = b""
    while position < len(data):
        newline = data.find(b"\n", position)
        line_end = len(data) if newline < 0 else newline + 1
        line = data[position:line_end]
        if line in (b"\r\n", b"\n"):
            separator = line
            break
        if line[:1] in (b" ", b"\t") and field_start >= 0:
            pass  # a continuation line of the current field
        elif _FIELD_NAME.match(line):
            if field_start >= 0:
                fields.append(data[field_start:position])
            field_start = position
        else:
            break
        position = line_end
    if field_start >= 0:
        fields.append(data[field_start:position])
    return _Entity(fields, separator, data[position + len(separator) :], eol)


def _line_end(data: bytes) -> bytes:
    """Return the CRLF or LF that ends ``data``, or b"" when it ends otherwise."""
    if data.endswith(b"\r\n"):
        return b"\r\n"
    if data.endswith(b"\n"):
        return b"\n"
    return b""


def _field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].rstrip(b" \t").lower()


def _append_field(entity: _Entity, field: bytes) -> None:
    entity.fields.append(field + entity.eol)
    if not entity.separator:
        # The body followed the header without an empty line; a new field must not run into it.
        entity.separator = entity.eol


def _set_transfer_encoding(entity: _Entity, encoding: bytes) -> None:
    """Rewrite the first Content-Transfer-Encoding field in place and drop any other, or add one."""
    _set_field(entity, b"Content-Transfer-Encoding", encoding)


def _set_field(entity: _Entity, name: bytes, value: bytes) -> None:
    """Rewrite the first field called ``name`` in place and drop any other, or add one."""
    line = name + b": " + value + entity.eol
    fields: list[bytes] = []
    replaced = False
    for field in entity.fields:
        if _field_name(field) != name.lower():
            fields.append(field)
        elif not replaced:
            fields.append(line)
            replaced = True
    entity.fields = fields
    if not replaced:
        _append_field(entity, line[: -len(entity.eol)])


def _transfer_encoding(entity: _Entity) -> str:
    """Return the entity's Content-Transfer-Encoding in lower case, without comments; 7bit when it has none."""
    value = entity.value(b"content-transfer-encoding")
    tokens = _tokenize(value) if value is not None else []
    return tokens[0].lower() if tokens else "7bit"


def _relabel_identity(entity: _Entity) -> None:
    """Relabel a multipart or message/rfc822 entity from 8bit or binary to 7bit, now that its content is 7 bit."""
    if _transfer_encoding(entity) in ("8bit", "binary"):
        _set_transfer_encoding(entity, b"7bit")


def _parse_content_type(value: str) -> tuple[str, dict[str, str]] | None:
    """Return the lower-case media type and the parameters of a Content-Type value, or None when it is invalid.

    RFC 2045 section 5.2 has an invalid Content-Type read as the default.
    A parameter that does not parse is skipped.
    """
    tokens = _tokenize(value)
    if len(tokens) < 3 or tokens[1] != "/" or _is_special(tokens[0]) or _is_special(tokens[2]):
        return None
    media_type = f"{tokens[0]}/{tokens[2]}".lower()
    parameters: dict[str, str] = {}
    position = 3
    while position < len(tokens):
        if tokens[position] != ";":
            position += 1
            continue
        name, equals, parameter_value = (tokens[position + 1 : position + 4] + ["", "", ""])[:3]
        if not _is_special(name) and equals == "=" and parameter_value and not _is_special(parameter_value):
            parameters.setdefault(name.lower(), parameter_value.removeprefix('"'))
            position += 4
        else:
            position += 1
    return media_type, parameters


def _parameter_value(parameters: dict[str, str], name: str) -> bytes:
    """Return the value of parameter ``name`` as octets, joining RFC 2231 continuations; b"" when it is absent.

    ``parameters`` maps lower-case names as written (``boundary*1*``) to values.
    A segment whose name ends in "*" is percent-encoded (RFC 2231 section 4).
    The first segment may start with ``charset'language'``, which is dropped
    unapplied, because a boundary line is matched octet for octet.  Segments are
    joined from ``*0`` up to the first missing number, because RFC 2231
    allows no gaps.  Each segment is looked up once, so the work stays linear
    in the length of the field.
    """
    if name in parameters:
        return parameters[name].encode("latin-1")
    if name + "*" in parameters:
        return _percent_decode(_strip_charset_language(parameters[name + "*"]))
    segments: list[bytes] = []
    number = 0
    while True:
        plain = parameters.get(f"{name}*{number}")
        encoded = parameters.get(f"{name}*{number}*")
        if encoded is not None:
            segments.append(_percent_decode(_strip_charset_language(encoded) if number == 0 else encoded))
        elif plain is not None:
            segments.append(plain.encode("latin-1"))
        else:
            return b"".join(segments)
        number += 1


def _strip_charset_language(value: str) -> str:
    """Drop the ``charset'language'`` prefix of an RFC 2231 extended value; keep a value without one whole."""
    parts = value.split("'", 2)
    return parts[2] if len(parts) == 3 else value


def _percent_decode(value: str) -> bytes:
    # The value was decoded as latin-1; a str argument would be encoded as UTF-8 first.
    return urllib.parse.unquote_to_bytes(value.encode("latin-1"))


def _is_special(token: str) -> bool:
    return len(token) == 1 and token in _TSPECIALS


def _tokenize(value: str) -> list[str]:
    """Split a structured field value into tokens, single tspecials and quoted strings; drop comments.

    A quoted string comes back unquoted with a leading '"' to mark it.
    """
    tokens: list[str] = []
    position = 0
    while position < len(value):
        char = value[position]
        if char in _WHITESPACE:
            position += 1
        elif char == "(":
            position = _skip_comment(value, position)
        elif char == '"':
            chars: list[str] = []
            position += 1
            while position < len(value) and value[position] != '"':
                if value[position] == "\\" and position + 1 < len(value):
                    position += 1
                chars.append(value[position])
                position += 1
            tokens.append('"' + "".join(chars))
            position += 1
        elif char in _TSPECIALS:
            tokens.append(char)
            position += 1
        else:
            start = position
            while position < len(value) and value[position] not in _TSPECIALS and value[position] not in _WHITESPACE:
                position += 1
            tokens.append(value[start:position])
    return tokens


def _skip_comment(value: str, position: int) -> int:
    """Return the position after the comment (which may nest) that starts at ``position``."""
    depth = 0
    while position < len(value):
        char = value[position]
        if char == "\\":
            position += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return position + 1
        position += 1
    return position


def _find_delimiters(body: bytes, boundary: bytes) -> list[_Delimiter]:
    """Return the boundary lines of a multipart body up to and including the closing one.

    RFC 2046 section 5.1.1: a boundary line starts a line with "--" and the
    boundary, may end with "--" (the last one), and may have spaces or tabs
    after that.
    """
    dash_boundary = b"--" + boundary
    delimiters: list[_Delimiter] = []
    search_from = 0
    while True:
        start = body.find(dash_boundary, search_from)
        if start < 0:
            return delimiters
        search_from = start + len(dash_boundary)
        if start > 0 and body[start - 1] != 0x0A:
            continue
        newline = body.find(b"\n", search_from)
        end = len(body) if newline < 0 else newline + 1
        rest = body[search_from:end]
        close = rest.startswith(b"--")
        if close:
            rest = rest[2:]
        if rest.strip(b" \t\r\n"):
            continue
        delimiters.append(_Delimiter(start, end, close))
        if close:
            return delimiters
        search_from = end


def _escape_8bit(text: bytes) -> bytes:
    """Replace each 8-bit octet with an ``=XX`` escape, in text that MIME readers do not show."""
    return _EIGHT_BIT.sub(lambda match: b"=%02X" % match[0][0], text)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _quoted_printable(body: bytes, eol: bytes) -> bytes:
    """Encode a text body as quoted-printable (RFC 2045 section 6.7), with ``eol`` as each line end.

    A text's line breaks are CRLF in canonical form, so a bare LF ends a
    line as CRLF does.  A last line without a line end stays without one.
    """
    lines = body.split(b"\n")
    last = lines.pop()
    out: list[bytes] = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        out.append(_break_qp_line(_encode_qp_line(line), eol) + eol)
    if last:
        out.append(_break_qp_line(_encode_qp_line(last), eol))
    return b"".join(out)


def _encode_qp_line(line: bytes) -> bytes:
    """Encode one line, without its line end, as one quoted-printable line that may be too long."""
    if len(line) <= QP_LINE_LIMIT and not _QP_UNSAFE.search(line) and not line.endswith((b" ", b"\t")):
        return line
    # A line without LF gets "=\n" from b2a_qp only as a soft line break: removed
    # here and put back by _break_qp_line.  b2a_qp leaves a bare CR as it is.
    encoded = binascii.b2a_qp(line, quotetabs=False, istext=True, header=False)
    return encoded.replace(b"=\n", b"").replace(b"\r", b"=0D")


def _break_qp_line(encoded: bytes, eol: bytes) -> bytes:
    """Break an encoded line into lines of at most QP_LINE_LIMIT octets with soft line breaks.

    A break never splits an ``=XX`` escape.  A line after a break never starts
    with "-": an encoded line must not read as a multipart boundary line.
    """
    if len(encoded) <= QP_LINE_LIMIT:
        return encoded
    pieces: list[bytes] = []
    # The line still to break is head + encoded[start:], where head is "=2D" in
    # place of a "-" that a break moved to the start of a line.  Only a window of
    # one line's length is copied per break, so a long line takes linear time.
    head = b""
    start = 0
    while len(head) + len(encoded) - start > QP_LINE_LIMIT:
        window = head + encoded[start : start + QP_LINE_LIMIT]
        cut = QP_LINE_LIMIT - 1
        if window[cut - 1] == 0x3D:
            cut -= 1
        elif window[cut - 2] == 0x3D:
            cut -= 2
        pieces.append(window[:cut] + b"=")
        start += cut - len(head)
        head = b""
        if encoded[start : start + 1] == b"-":
            head = b"=2D"
            start += 1
    pieces.append(head + encoded[start:])
    return eol.join(pieces)


def _escape_qp_body(body: bytes, eol: bytes) -> bytes:
    """Escape the 8-bit octets of a quoted-printable body as ``=XX``, breaking lines that grow too long."""
    lines = body.split(b"\n")
    out: list[bytes] = []
    for number, line in enumerate(lines):
        line_end = b"" if number == len(lines) - 1 else b"\n"
        if line.isascii():
            out.append(line + line_end)
            continue
        cr = line.endswith(b"\r")
        escaped = _escape_8bit(line[:-1] if cr else line)
        out.append(_break_qp_line(escaped, eol) + (b"\r" if cr else b"") + line_end)
    return b"".join(out)
