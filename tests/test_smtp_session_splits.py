"""Seeded random SMTP sessions, each fed in many splits: the replies must not change.

Each transcript is a few transactions built from real commands, with faults
mixed in.  The faults are bad parameters, bare CR and LF, NUL and 8-bit
octets in command lines, dot-stuffing, and BDAT chunks of the declared size
and off by one.  BDAT sizes come with signs and leading zeros, and messages
come near a small message size limit.  AUTH exchanges run too.  It is fed whole, one octet at a time, with an
empty read before every octet, cut inside every CRLF and ``.`` CRLF, and at
random points.

Every run must give the same replies, the same stored messages and the
same close, with one documented exception: pipelining that the session
forbids (message text before the 354, text after a refused DATA, a line
read with the end of a dropped overlong line) gets ``554 5.5.0`` only when
the bytes arrive in one read.  So runs are compared up to the first
``554 5.5.0`` in either.  Every 4xx and 5xx reply line must carry an
enhanced status code of the same class, and no reply line may pass 512
octets (RFC 5321 section 4.5.3.1.5).

The loop is seeded and bounded in count and time.
"""

from __future__ import annotations

import base64
import functools
import random
import re
import time
from collections.abc import Iterator

import pytest

from relay.config import Config
from tests.smtp_transcript import TRUSTED, UNTRUSTED, Outcome, feed, hostile_config, make_session

CASES = 1200
TIME_BUDGET = 12.0  # seconds; the loop stops early once past it

PLAIN = base64.b64encode(b"\0user\0pass")
GREETINGS = [b"EHLO c.example\r\n", b"HELO c.example\r\n", b"ehlo c.example\n"]
BAD_GREETINGS = [b"EHLO \xc3\xa9\r\n", b"EHLO\r\n", b"EHLO a b\r\n", b"HELO \xff\r\n"]
MAIL = [
    b"MAIL FROM:<s@example.com>\r\n",
    b"MAIL FROM:<> SIZE=20\r\n",
    b"MAIL FROM:<s@example.com> SIZE=99999999\r\n",
    b"MAIL FROM:<\xc3\xa9@example.com> SMTPUTF8\r\n",
    b"MAIL FROM:<s@example.com> BODY=8BITMIME RET=HDRS ENVID=x\r\n",
    b"MAIL FROM:<s@example.com> AUTH=<>\r\n",
    b"MAIL FROM:<s@example.com> X=1\r\n",
    b"MAIL FROM:s@example.com\n",
    b"MAIL FROM:<>x\r\n",
]
RCPT = [
    b"RCPT TO:<rcpt@example.net>\r\n",
    b"RCPT TO:<RCPT@example.net> NOTIFY=NEVER\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"RCPT TO:<x@elsewhere.example>\r\n",
    b"RCPT TO:<nobody@example.net>\r\n",
    b"RCPT TO:<\xc3\xa9@example.net>\r\n",
    b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;rcpt+40example.net\r\n",
]
BODY = [
    b"Subject: x\r\n\r\nhello\r\n", b"..dot\r\n", b".\r\n", b"a\nb\r\n", b"a\rb\r\n", b"Received: x\r\n",
    b"\r\n", b"x" * 50 + b"\r\n", b"\xff\x00\r\n", b"line\r\n.", b"\r\n.\r", b"\n.\r\n", b"\r\n.\n",
]
AUTH = [
    b"AUTH PLAIN " + PLAIN + b"\r\n", b"AUTH PLAIN\r\n", PLAIN + b"\r\n", b"AUTH LOGIN\r\n",
    base64.b64encode(b"user") + b"\r\n", base64.b64encode(b"pass") + b"\r\n", b"*\r\n", b"AUTH PLAIN =\r\n",
    b"AUTH PLAIN !!!\r\n", b"AUTH FOO\r\n",
]
OTHER = [
    b"RSET\r\n", b"NOOP\r\n", b"NOOP x\r\n", b"HELP\r\n", b"VRFY u\r\n", b"EXPN u\r\n", b"QUIT\r\n", b"\r\n",
    b"\x00\r\n", b"\xff\r\n", b"MAIL\r\n", b"RCPT\r\n", b"DATA x\r\n", b"RSET x\r\n", b"FOO\r\n",
    b"NOOP\rNOOP\r\n", b"N\x00OP\r\n", b"BDAT\r\n", b"BDAT x\r\n", b"BDAT +1\r\n", b"BDAT -0\r\n",
    b"BDAT 1099511627777\r\n", b"BDAT " + b"9" * 25 + b"\r\n", b"BDAT 0\r\n", b"BDAT 2 LAST\r\nab",
    b"NOOP " + b"x" * 505 + b"\r\n", b"NOOP " + b"x" * 506 + b"\r\n", b"x" * 1600 + b"\r\n",
]
CONFIGS: list[Config] = [
    hostile_config(),
    hostile_config(bare_lf="normalize"),
    hostile_config(max_message_size=20, max_recipients=2),
]

# A reply line with an enhanced status code: class digit, then subject and detail.
ENHANCED = re.compile(r"^([2-5])\d\d[ -]([245])\.\d{1,3}\.\d{1,3}( |$)")


def random_bdat(rng: random.Random) -> bytes:
    data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 5, 30])))
    if rng.random() < 0.5:
        data = data.replace(b"\r", b"").replace(b"\n", b"")
    size = len(data)
    if rng.random() < 0.1:
        size = max(0, size + rng.choice([-1, 1]))
    digits = str(size).encode()
    if rng.random() < 0.1:
        digits = b"0" * rng.choice([1, 25]) + digits
    last = rng.random() < 0.5
    return b"BDAT " + digits + (b" LAST" if last else b"") + b"\r\n" + data


def transcript(rng: random.Random) -> bytes:
    out: list[bytes] = []
    for _ in range(rng.randrange(1, 6)):
        out.append(rng.choice(GREETINGS if rng.random() < 0.8 else BAD_GREETINGS))
        if rng.random() < 0.3:
            out += [rng.choice(AUTH) for _ in range(rng.randrange(1, 3))]
        if rng.random() < 0.9:
            out.append(rng.choice(MAIL))
        out += [rng.choice(RCPT) for _ in range(rng.randrange(0, 4))]
        kind = rng.random()
        if kind < 0.45:
            body = b"".join(rng.choice(BODY) for _ in range(rng.randrange(0, 6)))
            if rng.random() < 0.2:
                # Around the 20-octet limit of the small configuration.
                body += b"z" * rng.choice([1, 19, 20, 21, 40])
            out.append(b"DATA\r\n" + body + rng.choice([b"\r\n.\r\n", b".\r\n"]))
        elif kind < 0.8:
            out += [random_bdat(rng) for _ in range(rng.randrange(1, 4))]
        out += [rng.choice(OTHER) for _ in range(rng.randrange(0, 3))]
    if rng.random() < 0.5:
        out.append(b"QUIT\r\n")
    return b"".join(out)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    chunks = []
    start = 0
    for point in sorted(set(points)):
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


def splits(data: bytes, rng: random.Random) -> Iterator[tuple[str, list[bytes]]]:
    yield "byte by byte", [data[i : i + 1] for i in range(len(data))]
    yield "empty reads between", [piece for octet in data for piece in (b"", bytes([octet]))]
    inside = [i for i in range(1, len(data)) if data[i - 1 : i + 1] in (b"\r\n", b"\n.", b".\r")]
    yield "inside line ends", cut(data, inside)
    yield "random", cut(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 12))])


def check_replies(outcome: Outcome) -> None:
    for reply in outcome.replies:
        for line in reply.split("|"):
            assert len(line.encode()) + 2 <= 512, line
            if line[0] in "45":
                match = ENHANCED.match(line)
                assert match is not None, f"no enhanced status code: {line!r}"
                assert match.group(1) == match.group(2), f"enhanced code of another class: {line!r}"


def first_sync_error(replies: list[str]) -> int:
    for index, reply in enumerate(replies):
        if reply.startswith("554 5.5.0"):
            return index
    return len(replies)


def check_same(whole: Outcome, other: Outcome, label: str) -> None:
    cut_at = min(first_sync_error(whole.replies), first_sync_error(other.replies))
    if cut_at < max(len(whole.replies), len(other.replies)):
        assert other.replies[:cut_at] == whole.replies[:cut_at], label
        return
    assert other.replies == whole.replies, label
    assert [m.body for m in other.messages] == [m.body for m in whole.messages], label
    assert [m.transaction.recipients for m in other.messages] == [m.transaction.recipients for m in whole.messages]
    assert other.closed == whole.closed, label


def test_splits_give_same_replies() -> None:
    rng = random.Random(5321)
    deadline = time.monotonic() + TIME_BUDGET
    for case in range(CASES):
        if time.monotonic() > deadline:
            break
        data = transcript(rng)
        config = rng.choice(CONFIGS)
        client = rng.choice([TRUSTED, UNTRUSTED])
        auth_plaintext = rng.random() < 0.5
        max_errors = rng.choice([None, 3])

        factory = functools.partial(
            make_session, config, client=client, auth_plaintext=auth_plaintext, max_errors=max_errors
        )

        whole = feed(factory(), [data])
        check_replies(whole)
        for name, chunks in splits(data, rng):
            other = feed(factory(), chunks)
            check_replies(other)
            check_same(whole, other, f"case {case}, {name}: {data[:200]!r}")


@pytest.mark.parametrize("client", [TRUSTED, UNTRUSTED])
def test_many_commands_in_one_read(client: str) -> None:
    # 300 transactions in one read from a trusted client, or in one read
    # each from an untrusted one, which may not pipeline past DATA.
    transaction = (
        b"MAIL FROM:<s@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nNOOP\r\nRSET\r\n"
        b"MAIL FROM:<s@example.com>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
    )
    body = b"Subject: x\r\n\r\n..line\r\n.\r\n"
    if client == TRUSTED:
        chunks = [b"EHLO c.example\r\n" + (transaction + body) * 300 + b"QUIT\r\n"]
    else:
        chunks = [b"EHLO c.example\r\n"]
        for _ in range(300):
            chunks += [transaction, body]
        chunks.append(b"QUIT\r\n")
    outcome = feed(make_session(client=client), chunks)
    check_replies(outcome)
    assert len(outcome.messages) == 300
    assert {m.body for m in outcome.messages} == {b"Subject: x\r\n\r\n.line\r\n"}
    assert outcome.replies[-1] == "221 2.0.0 Bye"
    assert outcome.closed
