"""The compiled input buffer against a slow reference, under every kind of split.

``reference_events`` reads a whole transcript octet by octet, the way the
buffer's module docstring describes command lines, DATA and BDAT.  The
compiled ``SMTPBuffer`` must give the same events however the transcript is
split into reads: whole, one octet at a time, with empty reads between, cut
inside every CRLF and every ``.`` CRLF, and at seeded random points.  The
line limits and message sizes are small, so transcripts cross them often.

The loops are seeded and bounded, so every run uses the same inputs and
takes a few seconds at most.
"""

from __future__ import annotations

import random
import time

from relay._buffer import BareLineEnd, BdatChunk, DataEnd, Event, Line, LineTooLong, SMTPBuffer

CASES = 4000
TIME_BUDGET = 10.0  # seconds; the random loop stops early once past it

PIECES = [
    b"NOOP\r\n", b"NOOP\n", b"DATA\r\n", b"BDAT 0\r\n", b"BDAT 3\r\n", b"BDAT 5 LAST\r\n",
    b"\r\n", b"\n", b"\r", b".", b"..", b".\r\n", b"\r\n.\r\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
    b"abc", b"x" * 7, b"y" * 15, b"\x00", b"\xff", b"\xc3\xa9", b" ",
    # Repeated so that DATA starts and ends in most transcripts.
    b"DATA\r\n", b"\r\n.\r\n", b"\r\n.\r\n",
]


def command_word(line: bytes) -> tuple[str, int] | None:
    """Return the mode a line switches to, as the test drivers decide it: ("data", 0) or ("bdat", size)."""
    if line == b"DATA":
        return ("data", 0)
    words = line.split(b" ")
    if words[0] == b"BDAT" and len(words) > 1 and words[1].isdigit():
        return ("bdat", int(words[1]))
    return None


def reference_events(wire: bytes, line_limit: int, max_size: int) -> list[Event]:
    """Return the events of every complete line, message and chunk in ``wire``."""
    events: list[Event] = []
    i = 0
    n = len(wire)
    while i < n:
        # Command mode: a line ends at LF, and with its line end it must fit line_limit.
        lf = wire.find(b"\n", i)
        if lf < 0 or lf + 1 - i > line_limit:
            if n - i < line_limit:
                break
            events.append(LineTooLong(line_limit))
            if lf < 0:
                break
            i = lf + 1
            continue
        bare = lf == i or wire[lf - 1] != 13
        line = wire[i:lf] if bare else wire[i : lf - 1]
        events.append(Line(line, bare))
        i = lf + 1
        mode = command_word(line)
        if mode is None:
            continue
        if mode[0] == "bdat":
            size = mode[1]
            if n - i < size:
                break
            events.append(BdatChunk(wire[i : i + size], size))
            i += size
            continue
        end = reference_data(wire, i, max_size, events)
        if end < 0:
            break
        i = end
    return events


def reference_data(wire: bytes, i: int, max_size: int, events: list[Event]) -> int:
    """Append the events of the DATA at ``wire[i:]``, and return the offset after its end or -1."""
    body = bytearray()
    octets = 0
    bare_lf = bare_cr = -1
    reported = False
    line_start = True
    n = len(wire)
    while i < n:
        if line_start and wire[i : i + 1] == b".":
            if i + 3 > n and wire[i : n] in (b".", b".\r"):
                return -1
            if wire[i : i + 3] == b".\r\n":
                oversized = octets > max_size
                events.append(DataEnd(b"" if oversized else bytes(body), octets, oversized, bare_lf, bare_cr))
                return i + 3
            i += 1
            line_start = False
            continue
        octet = wire[i]
        if octet == 13:
            if i + 1 >= n:
                return -1
            if wire[i + 1] != 10 and bare_cr < 0:
                bare_cr = octets
                if not reported:
                    reported = True
                    events.append(BareLineEnd(octets, b"\r"))
        if octet == 10 and (i == 0 or wire[i - 1] != 13) and bare_lf < 0:
            bare_lf = octets
            if not reported:
                reported = True
                events.append(BareLineEnd(octets, b"\n"))
        line_start = octet == 10 and wire[i - 1] == 13
        body.append(octet)
        octets += 1
        i += 1
    return -1


def compiled_events(chunks: list[bytes], line_limit: int, max_size: int) -> list[Event]:
    buffer = SMTPBuffer(line_limit)
    events: list[Event] = []
    for chunk in chunks:
        buffer.feed(chunk)
        while (event := buffer.next_event()) is not None:
            events.append(event)
            if isinstance(event, Line):
                mode = command_word(event.line)
                if mode is not None and mode[0] == "data":
                    buffer.start_data(max_size)
                elif mode is not None:
                    buffer.start_bdat(mode[1])
        # A command line in progress is bounded by the line limit, and DATA
        # keeps at most the two octets of a possible CR or ".\r".
        if buffer.mode == "command" and not buffer.discarding:
            assert buffer.buffered < line_limit
        elif buffer.mode == "data":
            assert buffer.buffered <= 2
    return events


def cut(data: bytes, points: list[int]) -> list[bytes]:
    chunks = []
    start = 0
    for point in sorted(set(points)):
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


def splits(data: bytes, rng: random.Random) -> dict[str, list[bytes]]:
    inside = [i for i in range(1, len(data)) if data[i - 1 : i + 1] in (b"\r\n", b".\r", b"\n.")]
    return {
        "byte by byte": [data[i : i + 1] for i in range(len(data))],
        "empty reads between": [piece for octet in data for piece in (b"", bytes([octet]))] + [b""],
        "inside line ends": cut(data, inside),
        "random": cut(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 8))]),
    }


def transcript(rng: random.Random) -> bytes:
    return b"".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 30)))


def test_reference_samples() -> None:
    # After a bare LF a dot is not stuffing, and ".\r\n" does not end the data.
    wire = b"NOOP\r\nDATA\r\na\r\n..b\n.\r\n.\r\nBDAT 2\r\nxyNOOP"
    assert reference_events(wire, 16, 100) == [
        Line(b"NOOP"),
        Line(b"DATA"),
        BareLineEnd(5, b"\n"),
        DataEnd(b"a\r\n.b\n.\r\n", 9, False, 5, -1),
        Line(b"BDAT 2"),
        BdatChunk(b"xy", 2),
    ]
    assert reference_events(b"x" * 20 + b"\r\nNOOP\r\n", 16, 100) == [LineTooLong(16), Line(b"NOOP")]


def test_buffer_matches_reference() -> None:
    rng = random.Random(20260105)
    deadline = time.monotonic() + TIME_BUDGET
    for case in range(CASES):
        if time.monotonic() > deadline:
            break
        data = transcript(rng)
        line_limit = rng.choice([3, 8, 16, 64])
        max_size = rng.choice([0, 1, 5, 20, 1000])
        expected = reference_events(data, line_limit, max_size)
        assert compiled_events([data], line_limit, max_size) == expected, (case, data)
        for name, chunks in splits(data, rng).items():
            assert compiled_events(chunks, line_limit, max_size) == expected, (case, name, data)


def test_every_two_way_split() -> None:
    # Every cut point of transcripts that cross the line limit, end DATA and
    # hold a BDAT chunk: the cut lands inside each CRLF and ".\r\n" once.
    wires = [
        b"NOOP\r\nDATA\r\n.x\r\n..\r\n\r\n.\r\nBDAT 3\r\n\r\n.NOOP\r\n",
        b"DATA\r\na\rb\nc\r\n.\r\nxxxxxxxxxxxxxxxxxxxx\r\nNOOP\n",
        b"xxxxxxxxxxxxxxx\r\nyyyyyyyyyyyyyyyy\r\nDATA\r\n\r\n.\r\n",
    ]
    for wire in wires:
        expected = reference_events(wire, 16, 4)
        for point in range(len(wire) + 1):
            assert compiled_events([wire[:point], wire[point:]], 16, 4) == expected, (wire, point)


def test_giant_read_of_many_lines() -> None:
    # One read with 100000 pipelined commands and a message in the middle.
    wire = b"NOOP\r\n" * 50000 + b"DATA\r\n" + b"line\r\n" * 1000 + b".\r\n" + b"RSET\r\n" * 50000
    events = compiled_events([wire], 512, 1 << 20)
    assert len(events) == 100002
    assert events[50001] == DataEnd(b"line\r\n" * 1000, 6000)
    assert events[-1] == Line(b"RSET")
