"""Tests of the reply parser and formatter (relay._reply), the
dot-stuffing encoder and the line-length fold (relay._stuffing)."""

import pytest

from relay._buffer import DataEnd, SMTPBuffer
from relay._errors import SMTPError
from relay._reply import (
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_REPLY,
    Reply,
    ReplyParser,
    format_reply,
    parse_ehlo,
)
from relay._stuffing import DotStuffer, dot_stuff, fold_long_lines, normalize_line_ends


def parse_all(data: bytes, splits: int = 1) -> list[Reply]:
    parser = ReplyParser()
    replies = []
    step = max(1, len(data) // splits) if splits > 1 else len(data) or 1
    for start in range(0, len(data), step):
        parser.feed(data[start:start + step])
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    return replies


def unstuff(wire: bytes) -> bytes:
    """Run encoder output through the server-side buffer and return the body."""
    buffer = SMTPBuffer()
    buffer.start_data(1 << 30)
    buffer.feed(wire)
    end = buffer.next_event()
    assert isinstance(end, DataEnd)
    assert buffer.buffered == 0
    return end.body


VALID_REPLIES = [
    (b"220 mx.example.net ESMTP\r\n", [Reply(220, ["mx.example.net ESMTP"])]),
    (b"220-mx.example.net\r\n220 ESMTP\r\n", [Reply(220, ["mx.example.net", "ESMTP"])]),
    (b"250-mx.example.net\r\n250-\r\n250\r\n", [Reply(250, ["mx.example.net", "", ""])]),
    (b"250 2.1.0 Ok\r\n", [Reply(250, ["Ok"], "2.1.0")]),
    (b"250 2.0.0\r\n", [Reply(250, [""], "2.0.0")]),
    (b"550 5.1.1 <x@example.net>: no such user\r\n",
     [Reply(550, ["<x@example.net>: no such user"], "5.1.1")]),
    (b"451-4.3.0 one\r\n451 4.3.0 two\r\n", [Reply(451, ["one", "two"], "4.3.0")]),
    (b"421 4.4.2 Timeout\r\n", [Reply(421, ["Timeout"], "4.4.2")]),
    (b"354 End data with <CR><LF>.<CR><LF>\r\n", [Reply(354, ["End data with <CR><LF>.<CR><LF>"])]),
    (b"334 \r\n", [Reply(334, [""])]),
    (b"334 VXNlcm5hbWU6\r\n", [Reply(334, ["VXNlcm5hbWU6"])]),
    # A code of another class than the reply stays in the text.
    (b"250 5.1.1 odd\r\n", [Reply(250, ["5.1.1 odd"])]),
    (b"250 2.0.0.1 not a code\r\n", [Reply(250, ["2.0.0.1 not a code"])]),
    (b"250 2.1234.0 too long\r\n", [Reply(250, ["2.1234.0 too long"])]),
    (b"250 ok\n", [Reply(250, ["ok"])]),
    (b"250 ok\r\n221 bye\r\n", [Reply(250, ["ok"]), Reply(221, ["bye"])]),
    (b"250 caf\xc3\xa9\r\n", [Reply(250, ["caf\u00e9"])]),
    (b"250 \xff\r\n", [Reply(250, ["\ufffd"])]),
]


@pytest.mark.parametrize(("data", "expected"), VALID_REPLIES)
def test_valid_reply(data: bytes, expected: list[Reply]) -> None:
    assert parse_all(data) == expected
    assert parse_all(data, splits=len(data)) == expected


MALFORMED_REPLIES = [
    b"250-a\r\n251 b\r\n",          # codes differ (OpenSMTPD CVE-2020-8794 scenario b)
    b"25\r\n",                      # too short
    b"\r\n",
    b"2500 ok\r\n",                 # no separator
    b"250_ok\r\n",
    b"abc ok\r\n",
    b"150 ok\r\n",                  # first digit 2 to 5
    b"650 ok\r\n",
    b"260 ok\r\n",                  # second digit 0 to 5
    b"25x ok\r\n",
    b"250-" + b"x" * 600 + b"\r\n251 ok\r\n",  # cut, then the codes differ
    b"2" + b"x" * 600,                            # a line past the limit still needs a code
]


@pytest.mark.parametrize("data", MALFORMED_REPLIES)
def test_malformed_reply(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    with pytest.raises(SMTPError) as caught:
        parser.next_reply()
    assert (caught.value.code, caught.value.enhanced) == (451, "4.5.0")
    # The parser stays failed.
    parser.feed(b"250 ok\r\n")
    with pytest.raises(SMTPError):
        parser.next_reply()


def test_endless_reply_capped() -> None:
    # OpenSMTPD CVE-2020-8794 scenario e: a reply that never ends.
    parser = ReplyParser()
    with pytest.raises(SMTPError):
        for _ in range(20000):
            parser.feed(b"250-x\r\n")
            assert parser.next_reply() is None
            assert parser.buffered <= DEFAULT_MAX_REPLY


def test_incomplete_reply_waits() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first\r\n250 la")
    assert parser.next_reply() is None
    parser.feed(b"st\r\n")
    assert parser.next_reply() == Reply(250, ["first", "last"])
    assert parser.next_reply() is None
    assert parser.buffered == 0


def test_reply_limits_configurable() -> None:
    parser = ReplyParser(max_line=2048)
    parser.feed(b"250 " + b"x" * 1000 + b"\r\n")
    reply = parser.next_reply()
    assert reply is not None
    assert reply.lines == ["x" * 1000]
    with pytest.raises(ValueError):
        ReplyParser(max_line=4)
    assert DEFAULT_MAX_LINE == 512


def test_long_line_cut_at_limit() -> None:
    parser = ReplyParser(max_line=20)
    parser.feed(b"250-" + b"x" * 50 + b"\r\n250 ok\r\n")

    reply = parser.next_reply()

    assert reply == Reply(250, ["x" * 14, "ok"])
    assert parser.next_reply() is None


def test_long_last_line_complete_at_its_end() -> None:
    parser = ReplyParser(max_line=20)
    parser.feed(b"250 2.0.0 " + b"y" * 30)

    # Returned only at the line end, so that no octet of it arrives after the
    # caller has taken the reply and sent its next command.
    assert parser.next_reply() is None
    parser.feed(b"y" * 100)
    assert parser.next_reply() is None
    assert parser.buffered == 20
    parser.feed(b"y\r\n220 next\r\n")
    assert parser.next_reply() == Reply(250, ["y" * 8], "2.0.0")
    assert parser.next_reply() == Reply(220, ["next"])
    assert parser.buffered == 0


def test_cut_keeps_the_separator() -> None:
    parser = ReplyParser(max_line=6)
    parser.feed(b"250-abc\r\n250 ok\r\n")

    # Both lines are cut to their first 4 octets, "250-" and "250 ": one reply, not two.
    assert parser.next_reply() == Reply(250, ["", ""])
    assert parser.next_reply() is None
    with pytest.raises(ValueError):
        ReplyParser(max_line=5)


def test_reply_classes() -> None:
    assert Reply(250, ["ok"]).positive
    assert Reply(354, ["go"]).positive
    assert Reply(451, ["later"]).transient
    assert Reply(550, ["no"]).permanent
    assert not Reply(550, ["no"]).positive
    assert Reply(250, ["a", "b"]).text == "a b"


def test_parse_ehlo_capabilities() -> None:
    (reply,) = parse_all(
        b"250-mx.example.net greets you\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
        b"250-auth PLAIN LOGIN\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
    )
    assert parse_ehlo(reply) == {
        "PIPELINING": [],
        "SIZE": ["10240000"],
        "AUTH": ["PLAIN", "LOGIN"],
        "8BITMIME": [],
        "ENHANCEDSTATUSCODES": [],
    }


def test_parse_ehlo_single_line() -> None:
    assert parse_ehlo(Reply(250, ["mx.example.net"])) == {}


def test_format_reply() -> None:
    assert format_reply(250, "2.0.0", "Ok") == b"250 2.0.0 Ok\r\n"
    assert format_reply(250, None, ["mx", "PIPELINING", "SIZE 10"]) == (
        b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    )
    assert format_reply(334, None, "") == b"334 \r\n"
    assert format_reply(220, None, []) == b"220 \r\n"


def test_format_reply_round_trip() -> None:
    wire = format_reply(451, "4.3.0", ["one", "two"])
    assert parse_all(wire) == [Reply(451, ["one", "two"], "4.3.0")]


@pytest.mark.parametrize(
    ("code", "enhanced", "text"),
    [(250, None, "a\r\nb"), (250, None, "a\nb"), (250, None, "a\rb"), (199, None, "x"),
     (600, None, "x"), (250, "5.0.0", "x")],
)
def test_format_reply_rejects(code: int, enhanced: str | None, text: str) -> None:
    with pytest.raises(ValueError):
        format_reply(code, enhanced, text)


STUFFING = [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b"a\n.b\n", b"a\r\n..b\r\n.\r\n"),
    (b"a\r.b\r", b"a\r\n..b\r\n.\r\n"),
    (b"a\r\r\n", b"a\r\n\r\n.\r\n"),
    (b"a\n\r", b"a\r\n\r\n.\r\n"),
    (b"x.\r\n", b"x.\r\n.\r\n"),
    (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
    (b"...", b"....\r\n.\r\n"),
]


@pytest.mark.parametrize(("body", "wire"), STUFFING)
def test_dot_stuff(body: bytes, wire: bytes) -> None:
    assert dot_stuff(body) == wire


def test_stored_dot_lines_restuffed() -> None:
    # Haraka message-stream 2.0.7: stored dot lines must be stuffed again.
    stored = b"Subject: t\r\n.\r\nRCPT TO:<spoof@example.org>\r\n\r\n.\r\n.x\r\n"
    assert dot_stuff(stored) == (
        b"Subject: t\r\n..\r\nRCPT TO:<spoof@example.org>\r\n\r\n..\r\n..x\r\n.\r\n"
    )
    assert unstuff(dot_stuff(stored)) == stored


def test_streaming_stuffer_matches() -> None:
    body = b".a\r\nb\r\n.\r\nc\rd\ne\r"
    for size in range(1, len(body) + 1):
        stuffer = DotStuffer()
        pieces = [stuffer.encode(body[i:i + size]) for i in range(0, len(body), size)]
        pieces.append(stuffer.finish())
        assert b"".join(pieces) == dot_stuff(body)


def test_stuffer_finish_once() -> None:
    stuffer = DotStuffer()
    stuffer.finish()
    with pytest.raises(ValueError):
        stuffer.finish()
    with pytest.raises(ValueError):
        stuffer.encode(b"x")


def test_normalize_line_ends() -> None:
    assert normalize_line_ends(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"
    assert normalize_line_ends(b".x\n") == b".x\r\n"
    assert normalize_line_ends(b"") == b""


def wire_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def test_fold_leaves_short_lines_alone() -> None:
    body = b"Subject: t\r\n\r\n" + b"x" * 998 + b"\r\n" + b"y" * 998
    assert fold_long_lines(body, 998) is body
    assert fold_long_lines(bytearray(b"a\r\nb"), 998) == b"a\r\nb"


def test_fold_header_before_last_blank() -> None:
    value = b" ".join([b"word%d" % i for i in range(300)])
    header = b"X-Long: " + value + b"\r\n"
    folded = fold_long_lines(header + b"\r\nbody\r\n", 998)
    lines = wire_lines(folded)
    assert max(len(line) for line in lines) <= 998
    assert len(lines[0]) >= 998 // 2
    assert all(line.startswith(b" ") for line in lines[1:-3])
    # RFC 5322 section 2.2.3: unfolding removes the CRLF before each blank and restores the field.
    assert folded.replace(b"\r\n ", b" ") == header + b"\r\nbody\r\n"


def test_fold_leaves_no_blank_only_line() -> None:
    # RFC 5322 section 3.2.2: a folded header line must not consist of blanks only.
    folded = fold_long_lines(b" xxx xx x  x    x  x  ", 11)
    assert [line.strip(b" ") != b"" for line in wire_lines(folded)] == [True] * len(wire_lines(folded))
    assert folded.replace(b"\r\n ", b" ") == b" xxx xx x  x    x  x  "


def test_fold_bare_cr_lines_in_one_pass() -> None:
    body = (b"x" * 76 + b"\r") * 20000
    assert fold_long_lines(body, 1 << 20) is body
    assert fold_long_lines(body + b"y" * 30, 100) is not body


def test_fold_without_blank_inserts_crlf_space() -> None:
    line = b"y" * 2500
    assert wire_lines(fold_long_lines(line + b"\r\n", 998)) == [
        b"y" * 998, b" " + b"y" * 997, b" " + b"y" * 505, b""
    ]


def test_fold_counts_bare_line_ends() -> None:
    assert fold_long_lines(b"x" * 10 + b"\n" + b"x" * 10 + b"\r" + b"x" * 10, 10) == (
        b"x" * 10 + b"\n" + b"x" * 10 + b"\r" + b"x" * 10
    )
    assert fold_long_lines(b"x" * 11 + b"\n", 10) == b"x" * 10 + b"\r\n x\n"


@pytest.mark.parametrize("limit", [8, 9, 10, 77, 78, 997, 998])
@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600"])
def test_fold_keeps_utf8_sequences_whole(limit: int, char: str) -> None:
    text = char * 2000
    folded = fold_long_lines(text.encode(), limit)
    for number, line in enumerate(wire_lines(folded)):
        assert len(line) <= limit
        piece = line.decode()  # raises when a sequence was split
        assert piece == (char * len(piece) if number == 0 else " " + char * (len(piece) - 1))


def test_fold_limit_below_eight_rejected() -> None:
    with pytest.raises(ValueError, match="below 8"):
        fold_long_lines(b"x" * 20, 7)
