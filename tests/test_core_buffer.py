"""Tests of the compiled input buffer (relay._buffer).

Transcripts are fed whole, byte by byte, in random splits and with trailing
bytes, and must give the same events every way.  A small driver plays the
session's part: it parses each line and switches the buffer to DATA or BDAT
mode when the command requests it.
"""

import random
import tracemalloc
from collections.abc import Iterable, Iterator

import pytest

from relay._buffer import (
    DEFAULT_LINE_LIMIT,
    BareLineEnd,
    BdatChunk,
    DataEnd,
    Event,
    Line,
    LineTooLong,
    SMTPBuffer,
)
from relay._errors import SMTPError
from relay._parser import parse_command

MAX_SIZE = 10 * 1024 * 1024


def pull(buffer: SMTPBuffer, max_size: int) -> Iterator[Event]:
    """Yield the buffer's events, switching modes as a session would."""
    while (event := buffer.next_event()) is not None:
        yield event
        if not isinstance(event, Line):
            continue
        try:
            command = parse_command(event.line)
        except SMTPError:
            continue
        if command.verb == "DATA":
            buffer.start_data(max_size)
        elif command.verb == "BDAT" and command.chunk_size is not None:
            buffer.start_bdat(command.chunk_size)


def drive(chunks: Iterable[bytes], max_size: int = MAX_SIZE,
          line_limit: int = DEFAULT_LINE_LIMIT) -> list[Event]:
    buffer = SMTPBuffer(line_limit)
    events: list[Event] = []
    for chunk in chunks:
        buffer.feed(chunk)
        events.extend(pull(buffer, max_size))
    return events


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def random_splits(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    chunks = []
    position = 0
    while position < len(data):
        size = rng.randint(1, 64)
        chunks.append(data[position:position + size])
        position += size
    return chunks


def all_feeds(data: bytes, max_size: int = MAX_SIZE) -> list[Event]:
    """Return the events of ``data`` after checking every way of feeding it agrees."""
    whole = drive([data], max_size)
    assert drive(byte_by_byte(data), max_size) == whole
    for seed in range(5):
        assert drive(random_splits(data, seed), max_size) == whole
    return whole


def lines(events: list[Event]) -> list[bytes]:
    return [event.line for event in events if isinstance(event, Line)]


def data_ends(events: list[Event]) -> list[DataEnd]:
    return [event for event in events if isinstance(event, DataEnd)]


def test_command_lines() -> None:
    events = all_feeds(b"EHLO client.example.com\r\nNOOP\r\nQUIT\r\n")
    assert events == [
        Line(b"EHLO client.example.com"),
        Line(b"NOOP"),
        Line(b"QUIT"),
    ]


def test_bare_lf_ends_command_line() -> None:
    events = all_feeds(b"EHLO client.example.com\nMAIL FROM:<spoof@example.org>\r\n")
    assert events == [
        Line(b"EHLO client.example.com", bare_lf=True),
        Line(b"MAIL FROM:<spoof@example.org>", bare_lf=False),
    ]


def test_bare_cr_stays_in_command_line() -> None:
    events = all_feeds(b"EHLO client.example.com\rX-Evil: 1\r\n")
    assert events == [Line(b"EHLO client.example.com\rX-Evil: 1")]


def test_empty_lines() -> None:
    assert all_feeds(b"\r\n\n\r\n") == [Line(b""), Line(b"", True), Line(b"")]


def test_incomplete_line_waits() -> None:
    buffer = SMTPBuffer()
    buffer.feed(b"NOOP")
    assert buffer.next_event() is None
    assert buffer.buffered == 4
    buffer.feed(b"\r")
    assert buffer.next_event() is None
    buffer.feed(b"\n")
    assert buffer.next_event() == Line(b"NOOP")
    assert buffer.buffered == 0


def test_line_limit_boundary() -> None:
    fits = b"EHLO " + b"a" * (DEFAULT_LINE_LIMIT - 7) + b"\r\n"
    assert len(fits) == DEFAULT_LINE_LIMIT
    assert all_feeds(fits) == [Line(fits[:-2])]
    too_long = b"EHLO " + b"a" * (DEFAULT_LINE_LIMIT - 6) + b"\r\n"
    assert all_feeds(too_long + b"NOOP\r\n") == [
        LineTooLong(DEFAULT_LINE_LIMIT),
        Line(b"NOOP"),
    ]


def test_long_ehlo_reported_once() -> None:
    # Exim CVE-2019-16928: one long EHLO, then the session goes on.
    data = (b"EHLO " + b"a" * 10000 + b"\r\n"
            + b"EHLO " + b"a" * 490 + b"\r\n"
            + b"EHLO client.example.com\r\n")
    assert all_feeds(data) == [
        LineTooLong(DEFAULT_LINE_LIMIT),
        Line(b"EHLO " + b"a" * 490),
        Line(b"EHLO client.example.com"),
    ]


def test_endless_line_memory_bounded() -> None:
    # Mailpit CVE-2026-67445: a line without end must not be buffered whole.
    buffer = SMTPBuffer()
    buffer.feed(b"NOOP ")
    reported = []
    for _ in range(2000):
        buffer.feed(b"A" * 4096)
        while (event := buffer.next_event()) is not None:
            reported.append(event)
        assert buffer.buffered <= DEFAULT_LINE_LIMIT
    assert reported == [LineTooLong(DEFAULT_LINE_LIMIT)]
    buffer.feed(b"tail\r\nQUIT\r\n")
    assert buffer.next_event() == Line(b"QUIT")


def test_discarding_until_long_line_ends() -> None:
    buffer = SMTPBuffer()
    buffer.feed(b"A" * (DEFAULT_LINE_LIMIT + 100))
    assert not buffer.discarding
    assert buffer.next_event() == LineTooLong(DEFAULT_LINE_LIMIT)
    assert buffer.discarding
    assert buffer.next_event() is None
    assert buffer.discarding
    buffer.feed(b"AAA\r\nNOOP\r\n")
    assert buffer.next_event() == Line(b"NOOP")
    assert not buffer.discarding


def test_line_limit_raised_for_auth() -> None:
    buffer = SMTPBuffer()
    buffer.line_limit = 12288
    response = b"A" * 10000
    buffer.feed(response + b"\r\n")
    assert buffer.next_event() == Line(response)
    buffer.line_limit = DEFAULT_LINE_LIMIT
    buffer.feed(response + b"\r\n")
    assert buffer.next_event() == LineTooLong(DEFAULT_LINE_LIMIT)


def test_data_transaction() -> None:
    data = (b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    events = all_feeds(data)
    body = b"Subject: x\r\n\r\nbody\r\n"
    assert events == [
        Line(b"MAIL FROM:<sender@example.com>"),
        Line(b"RCPT TO:<rcpt@example.net>"),
        Line(b"DATA"),
        DataEnd(body, len(body)),
        Line(b"QUIT"),
    ]


def test_empty_message() -> None:
    assert all_feeds(b"DATA\r\n.\r\n") == [Line(b"DATA"), DataEnd(b"", 0)]


def test_dot_unstuffing() -> None:
    data = b"DATA\r\n..\r\n...x\r\n.a\r\nb.\r\n..\r\n.\r\n"
    body = b".\r\n..x\r\na\r\nb.\r\n.\r\n"
    assert data_ends(all_feeds(data)) == [DataEnd(body, len(body))]


def test_data_end_needs_crlf_dot_crlf() -> None:
    # ".\r\n" only ends DATA at the start of a line.
    data = b"DATA\r\nx.\r\n\r\n.x\r\n.\r\n"
    body = b"x.\r\n\r\nx\r\n"
    assert data_ends(all_feeds(data)) == [DataEnd(body, len(body))]


def test_lf_dot_crlf_never_ends_data() -> None:
    # aiosmtpd CVE-2024-27305: <LF>.<CR><LF> must not end DATA.
    data = (b"DATA\r\nFrom: <sender@example.com>\r\nSubject: one\r\n\r\nbody\n.\r\n"
            b"MAIL FROM:<spoof@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nx\r\n.\r\n")
    events = all_feeds(data)
    ends = data_ends(events)
    assert len(ends) == 1
    assert b"MAIL FROM:<spoof@example.org>" in ends[0].body
    assert lines(events) == [b"DATA"]
    offset = ends[0].body.index(b"body\n") + 4
    assert ends[0].bare_lf == offset
    assert BareLineEnd(offset, b"\n") in events


def test_lf_dot_lf_never_ends_data() -> None:
    # Sendmail CVE-2023-51765: LF . LF.
    data = (b"DATA\r\nSubject: a\r\n\r\nbody\n.\nMAIL FROM:<spoof@example.org>\n"
            b"RCPT TO:<rcpt@example.net>\nDATA\nx\r\n.\r\n")
    events = all_feeds(data)
    assert lines(events) == [b"DATA"]
    assert len(data_ends(events)) == 1
    assert b"MAIL FROM:<spoof@example.org>" in data_ends(events)[0].body


def test_crlf_dot_lf_never_ends_data() -> None:
    # Exim CVE-2023-51766: CRLF . LF, then a smuggled BDAT transaction.
    data = (b"DATA\r\nSubject: a\r\n\r\nbody\r\n.\nMAIL FROM:<spoof@example.org>\r\n"
            b"RCPT TO:<rcpt@example.net>\r\nBDAT 5 LAST\r\nhello\r\n.\r\n")
    events = all_feeds(data)
    assert lines(events) == [b"DATA"]
    assert not any(isinstance(event, BdatChunk) for event in events)
    (end,) = data_ends(events)
    assert b"BDAT 5 LAST" in end.body
    # The dot after CRLF is taken as stuffing and removed, so the bare LF
    # sits right after the CRLF in the unstuffed message.
    assert end.bare_lf == len(b"Subject: a\r\n\r\nbody\r\n")


def test_bare_lf_in_body_reported() -> None:
    # chasquid CVE-2023-52354 and Postfix CVE-2023-51764: LF inside a line.
    data = b"DATA\r\nSubject: a\r\n\r\nfirst\nsecond\r\n.\r\n"
    events = all_feeds(data)
    offset = len(b"Subject: a\r\n\r\nfirst")
    assert events == [
        Line(b"DATA"),
        BareLineEnd(offset, b"\n"),
        DataEnd(b"Subject: a\r\n\r\nfirst\nsecond\r\n", 28, bare_lf=offset),
    ]


def test_bare_cr_in_body_reported() -> None:
    data = b"DATA\r\nab\rcd\r\n.\r\n"
    assert all_feeds(data) == [
        Line(b"DATA"),
        BareLineEnd(2, b"\r"),
        DataEnd(b"ab\rcd\r\n", 7, bare_cr=2),
    ]


def test_bare_cr_before_lf_in_body() -> None:
    # "\r\r\n": the first CR is bare, the second starts the line end.
    data = b"DATA\r\nab\r\r\n.\r\n"
    assert all_feeds(data) == [
        Line(b"DATA"),
        BareLineEnd(2, b"\r"),
        DataEnd(b"ab\r\r\n", 5, bare_cr=2),
    ]


def test_bare_cr_dot_cr_never_ends_data() -> None:
    data = b"DATA\r\nbody\r.\r\n.\r\n"
    events = all_feeds(data)
    assert data_ends(events) == [DataEnd(b"body\r.\r\n", 8, bare_cr=4)]


def test_first_bare_line_end_reported_once() -> None:
    data = b"DATA\r\na\nb\rc\nd\r\n.\r\n"
    events = all_feeds(data)
    assert [event for event in events if isinstance(event, BareLineEnd)] == [
        BareLineEnd(1, b"\n"),
    ]
    assert data_ends(events) == [DataEnd(b"a\nb\rc\nd\r\n", 9, bare_lf=1, bare_cr=3)]


def test_bare_lf_header_block() -> None:
    # A bare LF inside the header block (Exim list 2003, KumoMTA #22).
    data = (b"DATA\r\nFrom: <sender@example.com>\r\nX-A: one\ntwo\r\n"
            b"To: <rcpt@example.net>\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
    (end,) = data_ends(all_feeds(data))
    assert end.bare_lf == len(b"From: <sender@example.com>\r\nX-A: one")
    assert end.body.endswith(b"Subject: s\r\n\r\nbody\r\n")


def test_size_limit_stops_storing() -> None:
    # aiosmtpd GitHub issue 9: past the limit, nothing until the end, then one result.
    data = b"DATA\r\nSubject: big\r\n\r\n" + (b"a" * 120 + b"\r\n") * 2 + b".\r\nRSET\r\n"
    events = all_feeds(data, max_size=100)
    octets = len(b"Subject: big\r\n\r\n") + 2 * 122
    assert events == [
        Line(b"DATA"),
        DataEnd(b"", octets, oversized=True),
        Line(b"RSET"),
    ]


def test_size_limit_boundary() -> None:
    body = b"x" * 98 + b"\r\n"
    data = b"DATA\r\n" + body + b".\r\n"
    assert data_ends(all_feeds(data, max_size=100)) == [DataEnd(body, 100)]
    assert data_ends(all_feeds(data, max_size=99)) == [DataEnd(b"", 100, oversized=True)]


def test_size_counts_unstuffed_octets() -> None:
    data = b"DATA\r\n..x\r\n.\r\n"
    assert data_ends(all_feeds(data, max_size=4)) == [DataEnd(b".x\r\n", 4)]


def test_oversized_stream_memory_bounded() -> None:
    # nodemailer smtp-server GitHub issue 262: a large DATA over the limit must not
    # be stored.  5 MiB keeps the test quick; the bound does not depend on it.
    buffer = SMTPBuffer()
    buffer.feed(b"DATA\r\n")
    assert buffer.next_event() == Line(b"DATA")
    buffer.start_data(1024 * 1024)
    chunk = b"x\r\n" * 21846
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        peak_growth = 0
        for _ in range(80):
            buffer.feed(chunk)
            assert buffer.next_event() is None
            peak_growth = max(peak_growth, tracemalloc.get_traced_memory()[0] - baseline)
    finally:
        tracemalloc.stop()
    assert buffer.data_octets == 80 * len(chunk)
    assert peak_growth < 2 * 1024 * 1024
    buffer.feed(b".\r\nNOOP\r\n")
    end = buffer.next_event()
    assert isinstance(end, DataEnd)
    assert end.oversized
    assert end.body == b""
    assert end.octets == 80 * len(chunk)
    assert buffer.next_event() == Line(b"NOOP")


def traced_growth(buffer: SMTPBuffer, chunk: bytes, count: int) -> int:
    """Feed ``chunk`` ``count`` times, expecting no event; return the max growth of traced memory."""
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        peak_growth = 0
        for _ in range(count):
            buffer.feed(chunk)
            assert buffer.next_event() is None
            peak_growth = max(peak_growth, tracemalloc.get_traced_memory()[0] - baseline)
    finally:
        tracemalloc.stop()
    return peak_growth


# 3 MiB: a store that doubles from 4 KiB would reach 4 MiB for it.
STORE_LIMIT = 3 * 1024 * 1024
STORE_CHUNK = (b"x" * 1022 + b"\r\n") * 64


@pytest.mark.parametrize("mode", ["data", "bdat"])
def test_store_allocation_within_limit(mode: str) -> None:
    buffer = SMTPBuffer()
    if mode == "data":
        buffer.start_data(STORE_LIMIT)
    else:
        buffer.start_bdat(STORE_LIMIT)
    # Stop one chunk short of the limit, so the message is still stored.
    count = STORE_LIMIT // len(STORE_CHUNK) - 1

    growth = traced_growth(buffer, STORE_CHUNK, count)

    assert buffer.data_octets == count * len(STORE_CHUNK)
    # The store itself, plus the receive buffer, which contains one read.
    assert growth <= STORE_LIMIT + 2 * len(STORE_CHUNK)


def test_store_limit_boundary_message() -> None:
    buffer = SMTPBuffer()
    buffer.start_data(10)
    buffer.feed(b"0123456789\r\n.\r\n")
    end = buffer.next_event()
    assert isinstance(end, DataEnd)
    assert end.oversized
    buffer.start_data(12)
    buffer.feed(b"0123456789\r\n.\r\n")
    end = buffer.next_event()
    assert isinstance(end, DataEnd)
    assert not end.oversized
    assert end.body == b"0123456789\r\n"


def test_long_body_lines_kept() -> None:
    # maddy GitHub issue 352, aiosmtpd GitHub issue 285: body lines over 1000 octets.
    data = (b"DATA\r\nSubject: long\r\n\r\n" + b"b" * 3000 + b"\r\n.." + b"b" * 3000
            + b"\r\n.\r\nNOOP\r\n")
    events = all_feeds(data)
    body = b"Subject: long\r\n\r\n" + b"b" * 3000 + b"\r\n." + b"b" * 3000 + b"\r\n"
    assert events == [Line(b"DATA"), DataEnd(body, len(body)), Line(b"NOOP")]


def test_many_folded_header_lines() -> None:
    # Exim CVE-2020-28020: 100000 continuation lines in one header.
    body = b"Subject: a\r\n" + b" b\r\n" * 100000 + b"\r\nbody\r\n"
    events = drive([b"DATA\r\n" + body + b".\r\n"])
    assert events == [Line(b"DATA"), DataEnd(body, len(body))]


def test_pipelined_after_data_kept() -> None:
    data = b"DATA\r\nx\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
    assert lines(all_feeds(data)) == [
        b"DATA",
        b"MAIL FROM:<a@example.com>",
        b"RCPT TO:<b@example.net>",
    ]


def test_smuggling_before_354() -> None:
    # Postfix's smuggling note: the whole transaction in one write.
    data = (b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nbody\r\n.\r\n")
    buffer = SMTPBuffer()
    buffer.feed(data)
    assert buffer.next_event() == Line(b"MAIL FROM:<sender@example.com>")
    assert buffer.next_event() == Line(b"RCPT TO:<rcpt@example.net>")
    assert buffer.next_event() == Line(b"DATA")
    # Input already waits behind DATA, so a session may reject it as a
    # synchronization error before sending 354.
    assert buffer.buffered == len(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    buffer.start_data(MAX_SIZE)
    assert buffer.next_event() == DataEnd(b"Subject: x\r\n\r\nbody\r\n", 20)


def test_bdat_chunks() -> None:
    data = b"BDAT 5\r\nhelloBDAT 3 LAST\r\n.\r\nRSET\r\n"
    events = all_feeds(data)
    assert events == [
        Line(b"BDAT 5"),
        BdatChunk(b"hello", 5),
        Line(b"BDAT 3 LAST"),
        BdatChunk(b".\r\n", 3),
        Line(b"RSET"),
    ]


def test_bdat_no_unstuffing() -> None:
    chunk = b"..x\r\n.\r\nbare\nlf"
    data = b"BDAT %d LAST\r\n" % len(chunk) + chunk
    assert all_feeds(data) == [Line(b"BDAT %d LAST" % len(chunk)), BdatChunk(chunk, len(chunk))]


def test_bdat_zero() -> None:
    assert all_feeds(b"BDAT 0 LAST\r\nQUIT\r\n") == [
        Line(b"BDAT 0 LAST"),
        BdatChunk(b"", 0),
        Line(b"QUIT"),
    ]


def test_refused_bdat_consumes_chunk() -> None:
    # go-smtp GitHub issue 315: a refused BDAT must still swallow its chunk.
    buffer = SMTPBuffer()
    buffer.feed(b"BDAT 9 LAST\r\nMAIL FROM")
    assert buffer.next_event() == Line(b"BDAT 9 LAST")
    buffer.start_bdat(9, store=False)
    assert buffer.next_event() == BdatChunk(b"", 9)
    buffer.feed(b"NOOP\r\n")
    assert buffer.next_event() == Line(b"NOOP")


def test_bdat_incomplete_chunk() -> None:
    buffer = SMTPBuffer()
    buffer.start_bdat(100)
    buffer.feed(b"0123456789")
    assert buffer.next_event() is None
    assert buffer.data_octets == 10
    assert buffer.mode == "bdat"


def test_discard_after_starttls() -> None:
    # aiosmtpd CVE-2024-34083, Postfix CVE-2011-0411: plaintext after
    # STARTTLS must not run after the handshake.
    buffer = SMTPBuffer()
    buffer.feed(b"STARTTLS\r\nMAIL FROM:<spoof@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n")
    assert buffer.next_event() == Line(b"STARTTLS")
    assert buffer.discard() == len(b"MAIL FROM:<spoof@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n")
    assert buffer.next_event() is None
    buffer.feed(b"EHLO client.example.com\r\n")
    assert buffer.next_event() == Line(b"EHLO client.example.com")


def test_discard_leaves_data_mode() -> None:
    buffer = SMTPBuffer()
    buffer.start_data(100)
    buffer.feed(b"partial")
    assert buffer.next_event() is None
    buffer.discard()
    assert buffer.mode == "command"
    buffer.feed(b"NOOP\r\n")
    assert buffer.next_event() == Line(b"NOOP")


def mode_of(buffer: SMTPBuffer) -> str:
    return buffer.mode


def test_modes_and_counters() -> None:
    buffer = SMTPBuffer()
    assert mode_of(buffer) == "command"
    buffer.start_data(10)
    assert mode_of(buffer) == "data"
    buffer.feed(b"abc\r\n")
    assert buffer.next_event() is None
    assert buffer.data_octets == 5
    buffer.feed(b".\r\n")
    assert isinstance(buffer.next_event(), DataEnd)
    assert mode_of(buffer) == "command"
    assert buffer.data_octets == 0


def test_feed_accepts_buffers() -> None:
    buffer = SMTPBuffer()
    buffer.feed(bytearray(b"NO"))
    buffer.feed(memoryview(b"OP\r\n"))
    assert buffer.next_event() == Line(b"NOOP")


@pytest.mark.parametrize("limit", [-1, 0, 2])
def test_line_limit_too_small(limit: int) -> None:
    with pytest.raises(ValueError):
        SMTPBuffer(limit)


@pytest.mark.parametrize("limit", [-1, 0, 2])
def test_line_limit_setter_rejects_small(limit: int) -> None:
    # The limit is a memchr length: -1 used to read past the buffer and
    # return heap octets as part of a Line.
    buffer = SMTPBuffer(16)
    with pytest.raises(ValueError):
        buffer.line_limit = limit
    assert buffer.line_limit == 16
    buffer.feed(b"NOOP")
    assert buffer.next_event() is None
    buffer.feed(b"\r\n")
    assert buffer.next_event() == Line(b"NOOP")


def test_negative_sizes_rejected() -> None:
    buffer = SMTPBuffer()
    with pytest.raises(ValueError):
        buffer.start_data(-1)
    with pytest.raises(ValueError):
        buffer.start_bdat(-1)


def test_trailing_bytes_stay() -> None:
    # Extra bytes after a transcript leave its events unchanged and wait in
    # the buffer as the start of the next line.
    data = b"DATA\r\na\r\n.\r\nBDAT 2\r\nxyNOOP\r\n"
    expected = drive([data])
    for tail in (b"MAIL FROM", b"\r", b".", b"x" * 100):
        buffer = SMTPBuffer()
        buffer.feed(data + tail)
        assert list(pull(buffer, MAX_SIZE)) == expected
        assert buffer.buffered == len(tail)
