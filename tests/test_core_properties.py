"""Property tests of the compiled core, with Hypothesis.

The invariant for every parser: any input either parses or raises the
core's SMTPError, never another exception and never a hang.  The result
does not depend on how the input is split into chunks.

``RELAY_FUZZ_EXAMPLES`` sets the examples per property (default 200, which
keeps the normal suite fast).  A long fuzz run raises it, for example:

    RELAY_FUZZ_EXAMPLES=200000 pytest -p no:timeout tests/test_core_properties.py
"""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay._buffer import DataEnd, Event, Line, SMTPBuffer
from relay._errors import SMTPError
from relay._parser import Command, parse_command
from relay._reply import Reply, ReplyParser
from relay._stuffing import DotStuffer, dot_stuff, fold_long_lines, normalize_line_ends

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Pieces that make the interesting byte sequences likely: line ends of every
# kind, dots at line starts, commands that switch the buffer's mode.
PIECES = [
    b"\r\n", b"\n", b"\r", b".", b"..", b".\r\n", b"\r\n.\r\n", b"\n.\r\n", b"\r\n.\n",
    b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 0 LAST\r\n", b"BDAT 7 LAST\r\n", b"NOOP\r\n",
    b"MAIL FROM:<a@example.com>\r\n", b"x" * 40, b"a", b"\x00", b"\xff",
]
transcripts = st.lists(st.sampled_from(PIECES) | st.binary(max_size=20), max_size=40).map(
    b"".join
)
line_bytes = st.lists(
    st.sampled_from([b"MAIL FROM:", b"RCPT TO:", b"<", b">", b"@", b'"', b"\\", b" ", b".",
                     b"[", b"]", b"IPv6:", b"::", b"192.0.2.1", b"SIZE=", b"BODY=8BITMIME",
                     b"SMTPUTF8", b"NOTIFY=", b"ORCPT=rfc822;", b"+0A", b"+41", b"=", b",",
                     b"postmaster", b"example.com", b"\xc3\xa9", b"\xe9", b"-", b"a", b"1",
                     b"AUTH ", b"BDAT ", b"\xc2\xa0", b"\xe3\x80\x80", b"9" * 25])
    | st.binary(max_size=8),
    max_size=30,
).map(b"".join)


def drive(chunks: list[bytes], line_limit: int = 64, max_size: int = 200) -> list[Event]:
    buffer = SMTPBuffer(line_limit)
    events: list[Event] = []
    for chunk in chunks:
        buffer.feed(chunk)
        while (event := buffer.next_event()) is not None:
            events.append(event)
            if isinstance(event, Line):
                if event.line == b"DATA":
                    buffer.start_data(max_size)
                elif event.line.startswith(b"BDAT "):
                    # Like a session, switch modes only for a well-formed chunk size.
                    words = event.line.split()
                    if len(words) > 1 and words[1].isdigit() and words[1].isascii():
                        buffer.start_bdat(int(words[1]))
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks = []
    start = 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


@FUZZ
@given(transcripts, st.lists(st.integers(min_value=0), max_size=20))
def test_chunking_gives_same_events(data: bytes, cuts: list[int]) -> None:
    whole = drive([data])
    assert drive(split(data, cuts)) == whole
    assert drive([data[i:i + 1] for i in range(len(data))]) == whole


@FUZZ
@given(transcripts)
def test_trailing_bytes_keep_events(data: bytes) -> None:
    # Extra bytes after a transcript never change the events before them.
    whole = drive([data])
    extended = drive([data + b"NOOP"])
    assert extended[: len(whole)] == whole


@FUZZ
@given(st.binary(max_size=300))
def test_stuff_then_unstuff(body: bytes) -> None:
    expected = normalize_line_ends(body)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    buffer = SMTPBuffer()
    buffer.start_data(1 << 20)
    buffer.feed(dot_stuff(body) + b"NOOP\r\n")
    end = buffer.next_event()
    assert isinstance(end, DataEnd)
    assert end.body == expected
    assert end.octets == len(expected)
    assert end.bare_lf == -1
    assert end.bare_cr == -1
    assert buffer.next_event() == Line(b"NOOP")


crlf_lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"a", b"x" * 10]), max_size=30)


@FUZZ
@given(crlf_lines)
def test_crlf_body_round_trips(lines: list[bytes]) -> None:
    # A body with CRLF line ends only, ending in CRLF, comes back unchanged.
    body = b"".join(line + b"\r\n" for line in lines)
    buffer = SMTPBuffer()
    buffer.start_data(1 << 20)
    buffer.feed(dot_stuff(body))
    end = buffer.next_event()
    assert isinstance(end, DataEnd)
    assert end.body == body


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=10))
def test_streaming_stuffer(body: bytes, cuts: list[int]) -> None:
    stuffer = DotStuffer()
    pieces = [stuffer.encode(chunk) for chunk in split(body, cuts)]
    pieces.append(stuffer.finish())
    assert b"".join(pieces) == dot_stuff(body)


def check_command(line: bytes) -> None:
    try:
        command = parse_command(line)
    except SMTPError as error:
        assert 500 <= error.code <= 555
        assert error.enhanced.startswith("5.")
        return
    assert isinstance(command, Command)
    if command.path is not None:
        assert not any(ord(c) < 32 or ord(c) == 127 for c in command.path)
        if not command.smtputf8:
            assert command.path.isascii()
        assert command.local_part is not None
        assert command.domain is not None
        if command.domain:
            assert command.path == f"{command.local_part}@{command.domain}"


@FUZZ
@given(st.binary(max_size=120))
def test_parser_any_bytes(line: bytes) -> None:
    check_command(line)


@FUZZ
@given(line_bytes)
def test_parser_address_like_bytes(line: bytes) -> None:
    check_command(line)
    check_command(b"MAIL FROM:" + line)
    check_command(b"RCPT TO:<" + line)


def parse_replies(chunks: list[bytes]) -> tuple[list[Reply], str | None]:
    parser = ReplyParser(max_line=64, max_reply=256)
    replies = []
    for chunk in chunks:
        parser.feed(chunk)
        try:
            while (reply := parser.next_reply()) is not None:
                replies.append(reply)
        except SMTPError as error:
            assert (error.code, error.enhanced) == (451, "4.5.0")
            return replies, error.text
    return replies, None


reply_bytes = st.lists(
    st.sampled_from([b"250", b"250-", b"250 ", b"550 5.1.1 ", b"251 ", b"2.0.0", b"\r\n",
                     b"\n", b"ok", b"x" * 30, b"-", b" "])
    | st.binary(max_size=6),
    max_size=30,
).map(b"".join)


@FUZZ
@given(reply_bytes, st.lists(st.integers(min_value=0), max_size=10))
def test_reply_parser_any_bytes(data: bytes, cuts: list[int]) -> None:
    whole = parse_replies([data])
    # Replies before a failure may differ only in how far parsing got before
    # the failure was seen, so compare complete outcomes without failures.
    if whole[1] is None:
        assert parse_replies(split(data, cuts)) == whole
    for reply in whole[0]:
        assert 200 <= reply.code <= 559
        if reply.enhanced is not None:
            assert reply.enhanced[0] == str(reply.code)[0]


def reference_data(wire: bytes) -> tuple[bytes, int, int, int]:
    """Scan DATA octet by octet, the slow way; return (body, bare_lf, bare_cr, end)."""
    body = bytearray()
    bare_lf = bare_cr = -1
    line_start = True
    i = 0
    while i < len(wire):
        if line_start and wire[i:i + 3] == b".\r\n":
            return bytes(body), bare_lf, bare_cr, i + 3
        if line_start and wire[i:i + 1] == b".":
            i += 1
            line_start = False
            continue
        octet = wire[i]
        if octet == 13 and wire[i + 1:i + 2] != b"\n" and bare_cr < 0:
            bare_cr = len(body)
        if octet == 10 and (i == 0 or wire[i - 1] != 13) and bare_lf < 0:
            bare_lf = len(body)
        line_start = octet == 10 and i > 0 and wire[i - 1] == 13
        body.append(octet)
        i += 1
    raise AssertionError("no end of data")


# Long plain CRLF lines at every alignment, so the 16-octet block skip runs,
# with the octets that make it fall back to the per-line path mixed in.  No
# line is a lone ".", which would end the data early.
long_lines = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=40),
        st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"]),
        st.sampled_from([b"", b"", b"", b".b", b"..", b"x."]),
    ),
    max_size=40,
).map(lambda rows: b"".join(lead + b"a" * count + end for count, end, lead in rows))


@FUZZ
@given(long_lines, st.lists(st.integers(min_value=0), max_size=5))
def test_scan_matches_reference(text: bytes, cuts: list[int]) -> None:
    wire = (text + b"\r\n" if text else b"") + b".\r\nNOOP\r\n"
    body, bare_lf, bare_cr, end = reference_data(wire)
    assert wire[end:] == b"NOOP\r\n"
    buffer = SMTPBuffer()
    buffer.start_data(1 << 20)
    events: list[Event] = []
    for chunk in split(wire, cuts):
        buffer.feed(chunk)
        while (event := buffer.next_event()) is not None:
            events.append(event)
    assert events[-2:] == [DataEnd(body, len(body), False, bare_lf, bare_cr), Line(b"NOOP")]


fold_input = st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"\t", b"x" * 7, b"\xc3\xa9", b"\xe2\x82\xac", b"\xff", b"."]),
    max_size=120,
).map(b"".join)


@FUZZ
@given(fold_input, st.integers(min_value=8, max_value=40))
def test_fold_bounds_lines_keeps_text(body: bytes, limit: int) -> None:
    folded = fold_long_lines(body, limit)
    assert max(len(line) for line in folded.replace(b"\r", b"\n").split(b"\n")) <= limit
    # Only CRLF and a space are ever inserted; every other octet stays, in order.
    def strip(data: bytes) -> bytes:
        return data.replace(b"\r", b"").replace(b"\n", b"").replace(b" ", b"")
    assert strip(folded) == strip(body)
    assert fold_long_lines(folded, limit) == folded
