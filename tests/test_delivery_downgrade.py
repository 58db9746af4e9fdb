"""Conversion of 8-bit messages to 7 bit for next hops without 8BITMIME, on byte inputs."""

from __future__ import annotations

import email
import email.message
import email.policy
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mime_helpers import decoded_leaves

from conftest import require_corpus
from relay.delivery.downgrade import MAX_DEPTH, QP_LINE_LIMIT, DowngradeError, downgrade_to_7bit


def corpus_message(name: str) -> bytes:
    """Return a corpus message in the CRLF form that SMTP carries."""
    data = (require_corpus("cpython-email") / name).read_bytes()
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def check_converted(original: bytes, converted: bytes) -> None:
    """Check that ``converted`` is 7-bit SMTP data with the same decoded content as ``original``."""
    assert converted.isascii()
    assert max(len(line) for line in converted.split(b"\r\n")) <= 998
    assert decoded_leaves(converted) == decoded_leaves(original)


def header_fields(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_corpus_seven_bit_messages_unchanged() -> None:
    names = sorted(path.name for path in require_corpus("cpython-email").glob("msg_*.txt"))
    assert len(names) == 48
    for name in names:
        message = corpus_message(name)
        assert message.isascii(), name
        assert downgrade_to_7bit(message) is message


def test_text_part_becomes_quoted_printable() -> None:
    original = (
        b"From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit (comment)\r\nSubject: menu\r\n\r\n"
        b"Caf\xc3\xa9 cr\xc3\xa8me = 3\r\nplain line\r\n"
    )
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    # The field is rewritten where it was; the other fields keep their bytes and order.
    assert header_fields(converted) == [
        b"From: a@example.test", b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: quoted-printable", b"Subject: menu",
    ]
    assert converted.endswith(b"\r\n\r\nCaf=C3=A9 cr=C3=A8me =3D 3\r\nplain line\r\n")


def test_non_mime_utf8_body_labelled_utf8() -> None:
    original = b"From: a@example.test\r\nSubject: hi\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    assert header_fields(converted) == [
        b"From: a@example.test", b"Subject: hi", b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8", b"Content-Transfer-Encoding: quoted-printable",
    ]
    parsed = email.message_from_bytes(converted, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert parsed.get_content().splitlines() == ["Grüße"]


def test_non_mime_latin1_body_labelled_unknown() -> None:
    original = b"Subject: hi\r\n\r\nd\xe9j\xe0 vu\r\n"
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    assert b"Content-Type: text/plain; charset=unknown-8bit\r\n" in converted
    assert converted.endswith(b"\r\n\r\nd=E9j=E0 vu\r\n")


def test_non_mime_quoted_printable_not_encoded_twice() -> None:
    # No MIME-Version, but a transfer encoding that readers honour: the body is
    # escaped as quoted-printable once, not encoded a second time.
    original = b"Subject: s\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\na=3D\xe9\r\n"
    converted = downgrade_to_7bit(original)

    assert converted.isascii()
    assert converted.endswith(b"\r\n\r\na=3D=E9\r\n")
    assert b"MIME-Version: 1.0\r\n" in converted
    parsed = email.message_from_bytes(converted)
    assert parsed.get_payload(decode=True) == b"a=\xe9\r\n"


def test_corpus_multipart_report_parts() -> None:
    # A multipart/report with a text part, a delivery-status part and an enclosed
    # message (MESSAGE/RFC822), given 8-bit text in the first and the last.
    original = corpus_message("msg_16.txt")
    eight_bit = original.replace(b"Content-type: text/plain; charset=ISO-8859-1\r\n\r\n",
                                 b"Content-type: text/plain; charset=ISO-8859-1\r\n\r\nR\xe9sum\xe9\r\n")
    eight_bit = eight_bit.replace(b"I always love", b"I always l\xc3\xb6ve")
    assert eight_bit.count(b"\xe9") == 2
    converted = downgrade_to_7bit(eight_bit)
    check_converted(eight_bit, converted)

    boundary = b"--Boundary_(ID_PGS2F2a+z+/jL7hupKgRhA)"
    before, after = eight_bit.split(boundary), converted.split(boundary)
    assert len(after) == len(before) == 5
    # Preamble, the delivery-status part and the epilogue keep their bytes.
    assert after[0] == before[0]
    assert after[2] == before[2]
    assert after[4] == before[4]
    assert after[1] == before[1].replace(
        b"ISO-8859-1\r\n\r\nR\xe9sum\xe9",
        b"ISO-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nR=E9sum=E9",
    )
    # The enclosed message's header fields stay; only its body is encoded.
    enclosed_header = before[3].split(b"\r\n\r\n", 2)[1]
    assert enclosed_header + b"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" in after[3]
    assert b"I always l=C3=B6ve" in after[3]


def test_corpus_nested_digest_message() -> None:
    # multipart/mixed holding a multipart/digest, whose parts default to message/rfc822.
    original = corpus_message("msg_02.txt")
    assert original.count(b"Send Ppp mailing list submissions") == 1
    eight_bit = original.replace(b"Send Ppp mailing list", b"Send \xc3\x9cpp mailing list")
    eight_bit = eight_bit.replace(b"\r\n\r\nhello\r\n", b"\r\n\r\nh\xc3\xa9llo \xe2\x80\x94 from the digest\r\n", 1)
    converted = downgrade_to_7bit(eight_bit)
    check_converted(eight_bit, converted)
    assert converted.count(b"Content-Transfer-Encoding: quoted-printable") == 2


def test_enclosed_message_relabelled_7bit() -> None:
    original = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=outer\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\n--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8BIT\r\n\r\n"
        b"Subject: inner\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"in ner\"\r\n\r\n"
        b"--in ner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"
        b"--in ner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>\xc3\xa9t\xc3\xa9</p>\r\n--in ner--\r\n"
        b"\r\n--outer--\r\n"
    )
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    assert converted.count(b"Content-Transfer-Encoding: 7bit\r\n") == 2
    assert b"8bit" not in converted.lower()
    assert converted.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 2


def test_binary_attachment_becomes_base64() -> None:
    payload = bytes(range(128, 256)) * 5
    original = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        + payload + b"\r\n--b--\r\n"
    )
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    assert b"Content-Transfer-Encoding: base64\r\n" in converted
    # The untouched text part keeps its bytes, with no encoding field added.
    assert b"--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--b\r\n" in converted


def test_long_lines_broken_by_soft_breaks() -> None:
    text = ("x" * 40 + "é") * 100
    original = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() + b"\r\n"
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    body = converted.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= QP_LINE_LIMIT


def test_seven_bit_part_keeps_long_line() -> None:
    # Breaking long lines is the SMTP client's job (line_length_limit), not the converter's.
    long_line = b"y" * 1500
    original = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n" + long_line
        + b"\r\n--b\r\nContent-Type: text/plain; charset=latin1\r\n\r\n\xe9\r\n--b--\r\n"
    )
    converted = downgrade_to_7bit(original)
    assert b"--b\r\n\r\n" + long_line + b"\r\n--b\r\n" in converted
    assert b"\r\n\r\n=E9\r\n--b--\r\n" in converted


def test_no_encoded_line_starts_with_dash() -> None:
    # A soft break that put "--b" at the start of a line would end the part early.
    text = b"\xc3\xa9" + b"--b" * 200
    original = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n" + text
    original += b"\r\n--b--\r\n"
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    lines = converted.split(b"\r\n")
    assert [line for line in lines if line.startswith(b"--")] == [b"--b", b"--b--"]


def test_preamble_and_epilogue_escaped() -> None:
    original = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\nPr\xe9amble\r\n"
        b"--b\r\nContent-Type: text/plain; charset=latin1\r\n\r\n\xe9\r\n--b--\r\n\xc3\xa9pilogue\r\n"
    )
    converted = downgrade_to_7bit(original)
    assert converted.isascii()
    assert converted.startswith(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\nPr=E9amble\r\n")
    assert converted.endswith(b"--b--\r\n=C3=A9pilogue\r\n")


def test_encoded_parts_with_stray_8bit_octets() -> None:
    original = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nSGVs\xffbG8=\r\n"
        b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nna\xefve=3D\r\n"
        b"--b--\r\n"
    )
    converted = downgrade_to_7bit(original)
    assert converted.isascii()
    assert b"\r\n\r\nSGVsbG8=\r\n--b\r\n" in converted
    assert b"\r\n\r\nna=EFve=3D\r\n--b--\r\n" in converted
    decoded = [content for _, content in decoded_leaves(converted)]
    assert decoded == [b"", b"Hello", b"na\xefve="]


def test_bare_lf_line_ends_kept() -> None:
    original = b"Subject: lf\n\nl\xc3\xadne one\nline two\n"
    converted = downgrade_to_7bit(original)
    assert converted == (
        b"Subject: lf\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n\nl=C3=ADne one\nline two\n"
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n", "the subject header field of the message has 8-bit octets"),
        (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Disposition: attachment; filename=\"\xe9.txt\"\r\n\r\nx\r\n--b--\r\n",
            "the content-disposition header field of part 1 of the message has 8-bit octets",
        ),
        (
            b"Content-Type: message/rfc822\r\n\r\nSubject: \xe9\r\n\r\nx\r\n",
            "the subject header field of the message enclosed in the message has 8-bit octets",
        ),
    ],
)
def test_8bit_header_fields_rejected(message: bytes, reason: str) -> None:
    with pytest.raises(DowngradeError) as caught:
        downgrade_to_7bit(message)
    assert str(caught.value).startswith(reason)


def test_8bit_headers_allowed_with_smtputf8() -> None:
    original = b"Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nth\xc3\xa9\r\n"
    converted = downgrade_to_7bit(original, allow_8bit_headers=True)
    assert converted == (
        b"Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\nth=C3=A9\r\n"
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"Content-Type: message/partial; id=x; number=1\r\n\r\n\xe9\r\n", "message/partial"),
        (b"Content-Type: multipart/mixed\r\n\r\n\xe9\r\n", "without a boundary"),
        (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n\xe9\r\n", "never uses its boundary"),
        (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n\xe9\r\n", "x-uuencode"),
        (b"Content-Type: message/rfc822\r\n\r\n" * (MAX_DEPTH + 2) + b"\xe9\r\n", "nested deeper"),
    ],
)
def test_unconvertible_bodies_rejected(message: bytes, reason: str) -> None:
    with pytest.raises(DowngradeError, match=reason):
        downgrade_to_7bit(message)


def test_digest_default_part_is_message() -> None:
    original = (
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: one\r\n\r\n\xe9\r\n--d--\r\n"
    )
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    # The part is a message/rfc822 by default, so the enclosed message gets the labels.
    enclosed = b"--d\r\n\r\nSubject: one\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=unknown-8bit\r\n"
    assert enclosed in converted


PREFIXES = [
    b"",
    b"Subject: s\r\n\r\n",
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n",
    b"Content-Type: multipart/digest; boundary=b\r\n\r\n--b\r\n\r\n",
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
]


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from(PREFIXES),
       data=st.lists(st.sampled_from([b"\r\n", b"--b", b"--b--", b"\xc3\xa9", b"=", b" ", b"x" * 80, b"\r",
                                      b"Content-Type: text/plain\r\n", b"\x00", b"\xff"])).map(b"".join))
def test_any_input_converts_or_raises(prefix: bytes, data: bytes) -> None:
    # One invariant: 7-bit output, or DowngradeError and nothing else.
    try:
        converted = downgrade_to_7bit(prefix + data)
    except DowngradeError:
        return
    assert converted.isascii()


# A converter that copies the rest of a long line for each 76-octet piece, or
# a whole field for each continuation line, does quadratic work.  Such code
# took over 20 s per case where these tests were written, and linear code
# takes well under a second.
LINEAR_TIME_LIMIT = 5.0


def test_long_8bit_line_converts_in_linear_time() -> None:
    # SMTP servers accept body lines of any length, and the client breaks them only after conversion.
    original = b"Content-Type: text/plain; charset=latin1\r\n\r\n\xe9" + b"a" * 16_000_000 + b"\r\n"
    started = time.perf_counter()
    converted = downgrade_to_7bit(original)
    assert time.perf_counter() - started < LINEAR_TIME_LIMIT
    body = converted.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= QP_LINE_LIMIT


def test_long_quoted_printable_line_escaped_in_linear_time() -> None:
    original = (
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\xe9"
        + b"a" * 16_000_000 + b"\r\n"
    )
    started = time.perf_counter()
    converted = downgrade_to_7bit(original)
    assert time.perf_counter() - started < LINEAR_TIME_LIMIT
    assert converted.isascii()


def test_long_folded_field_splits_in_linear_time() -> None:
    original = b"Subject: x\r\n" + b" y\r\n" * 1_000_000 + b"\r\n\xe9\r\n"
    started = time.perf_counter()
    converted = downgrade_to_7bit(original)
    assert time.perf_counter() - started < LINEAR_TIME_LIMIT
    assert converted.startswith(b"Subject: x\r\n y\r\n")
    assert converted.endswith(b"\r\n\r\n=E9\r\n")


def test_invalid_content_type_replaced_not_repeated() -> None:
    # RFC 2045 section 5.2 reads an invalid Content-Type as text/plain.  The
    # label the converter adds must replace it, because RFC 2045 allows one
    # Content-Type field per entity and readers take the first.
    original = b"MIME-Version: 1.0\r\nContent-Type: text\r\nSubject: s\r\n\r\n\xe9\r\n"
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    assert header_fields(converted) == [
        b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=unknown-8bit", b"Subject: s",
        b"Content-Transfer-Encoding: quoted-printable",
    ]


def multipart_with_boundary(content_type_parameters: bytes, boundary: bytes) -> bytes:
    """Return a multipart/mixed message with one 8-bit text part, whose boundary is ``boundary``."""
    return (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n " + content_type_parameters + b"\r\n\r\n"
        b"--" + boundary + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9\r\n"
        b"--" + boundary + b"--\r\n"
    )


@pytest.mark.parametrize(
    "parameters",
    [
        # RFC 2231 section 3: numbered continuations, quoted or not, in any order.
        b'boundary*1="-part two"; boundary*0="=_outer"',
        b'boundary*0="=_outer"; boundary*1=-part; boundary*2=" two"',
        # Section 4: the whole value percent-encoded after charset and language.
        b"boundary*=us-ascii'en-us'%3D_outer-part%20two",
        # Section 4.1: encoded and plain continuations mixed; only *0* has the charset.
        b"boundary*0*=us-ascii''%3D_out; boundary*1*=er-part%20; boundary*2=\"two\"",
        # A plain boundary wins over the extended forms, as in Python's email package.
        b'boundary="=_outer-part two"; boundary*0=another',
    ],
)
def test_rfc2231_boundary_read(parameters: bytes) -> None:
    original = multipart_with_boundary(parameters, b"=_outer-part two")
    converted = downgrade_to_7bit(original)
    check_converted(original, converted)
    assert b"\r\n\r\ncaf=C3=A9\r\n--=_outer-part two--\r\n" in converted


def test_rfc2231_boundary_stops_at_gap() -> None:
    # RFC 2231 allows no gaps, so the value ends before the missing *1.
    original = multipart_with_boundary(b"boundary*0=ab; boundary*2=cd", b"abcd")
    with pytest.raises(DowngradeError, match="never uses its boundary 'ab'"):
        downgrade_to_7bit(original)


def test_many_rfc2231_continuations_in_linear_time() -> None:
    count = 200_000
    parameters = b";\r\n ".join(b"boundary*%d=x" % number for number in range(count))
    original = multipart_with_boundary(parameters, b"x" * count)
    started = time.perf_counter()
    converted = downgrade_to_7bit(original)
    assert time.perf_counter() - started < LINEAR_TIME_LIMIT
    assert converted.isascii()
