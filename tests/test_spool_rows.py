"""The compiled queue IDs and spool rows (csrc/spoolrows.pyx) against plain Python.

The reference functions below restate the format of ``relay.spool.ids`` and
the row layout of ``relay.spool.store`` in the most direct Python, so that
the compiled code is checked against the definition and not against itself.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

import orjson
import pytest

from relay._spoolrows import add_message_rows, is_queue_id, message_key, new_queue_id_and_key
from relay.spool import Envelope, Recipient, Spool
from relay.spool.ids import ALPHABET, DROPPED_BITS, QUEUE_ID_LENGTH, queue_id_time
from relay.spool.store import PendingCommit, SpoolStore, fresh_domains


def reference_value(queue_id: str) -> int:
    value = 0
    for char in queue_id:
        value = value * 32 + ALPHABET.index(char)
    return value


def reference_rows(pending: PendingCommit) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    envelope = pending.envelope
    key = reference_value(pending.queue_id) >> DROPPED_BITS if pending.key is None else pending.key
    fields: dict[str, Any] = {
        "size": envelope.size,
        "body_type": envelope.body_type,
        "smtputf8": envelope.smtputf8,
        "ret": envelope.ret,
        "envid": envelope.envid,
        "protocol": envelope.protocol,
        "recipients": [[r.address, r.orcpt, ",".join(r.notify)] for r in envelope.recipients],
    }
    if envelope.local_submission:
        fields["local_submission"] = True
    if envelope.original_queue_id is not None:
        fields["original_queue_id"] = envelope.original_queue_id
    if envelope.forwarded_from is not None:
        fields["forwarded_from"] = envelope.forwarded_from
    document = orjson.dumps(fields)
    domains = [r.address.rpartition("@")[2].lower() if "@" in r.address else "" for r in envelope.recipients]
    message = (
        key, pending.queue_id, pending.arrival, envelope.sender, len(pending.body), envelope.client_address,
        envelope.helo_name, envelope.auth_user, document, zlib.crc32(pending.body), pending.body,
    )
    return message, (key, len(envelope.recipients), " " + " ".join(domains) + " ")


ENVELOPES = [
    Envelope(sender="", recipients=(Recipient("postmaster"),)),
    Envelope(
        sender="sender@example.test",
        recipients=(
            Recipient("a@One.Example.TEST", orcpt="rfc822;a@one.example.test", notify=("SUCCESS", "FAILURE")),
            Recipient("b@[192.0.2.1]", notify=("NEVER",)),
            Recipient('"odd@local"@two.example.test'),
        ),
        size=1234,
        body_type="8BITMIME",
        ret="HDRS",
        envid="env+2Bid",
        client_address="::1",
        helo_name="client.example.test",
        auth_user="alice",
        protocol="ESMTPSA",
    ),
    Envelope(
        sender="jörg@bücher.example",
        recipients=(Recipient("ÜSER@BÜCHER.EXAMPLE"), Recipient("x@ΔΟΚΙΜΉ.example")),
        smtputf8=True,
        protocol="UTF8SMTP",
    ),
    # A DSN that relay sendmail queued: local_submission and original_queue_id set.
    Envelope(
        sender="",
        recipients=(Recipient("app@example.test"),),
        protocol="local",
        local_submission=True,
        original_queue_id="0ABCDEFGHJK0000",
    ),
    # A copy that an alias forwarded.
    Envelope(
        sender="sender@example.test",
        recipients=(Recipient("member@example.test", orcpt="rfc822;team@local.test"),),
        forwarded_from="0ABCDEFGHJK0001",
    ),
]


def test_queue_id_round_trip() -> None:
    now = time.time()
    queue_id, key = new_queue_id_and_key(now)

    assert len(queue_id) == QUEUE_ID_LENGTH
    assert is_queue_id(queue_id)
    value = reference_value(queue_id)
    assert value >> 20 >= int(now * 1_000_000)
    assert key == value >> DROPPED_BITS == message_key(queue_id)
    assert abs(queue_id_time(queue_id) - now) < 0.001


def test_queue_ids_monotonic_when_clock_goes_back() -> None:
    now = time.time()
    queue_ids = [new_queue_id_and_key(now)[0] for _ in range(500)]
    queue_ids += [new_queue_id_and_key(now - 3600)[0] for _ in range(500)]
    queue_ids += [new_queue_id_and_key()[0] for _ in range(500)]

    assert len(set(queue_ids)) == len(queue_ids)
    assert queue_ids == sorted(queue_ids)


def test_queue_id_time_out_of_range() -> None:
    for now in (-1.0, 2.0**55 / 1e6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="arrival time"):
            new_queue_id_and_key(now)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_queue_id_bits_after_fork() -> None:
    reader, writer = os.pipe()
    parent_bits = reference_value(new_queue_id_and_key()[0]) & 0xFFFFF
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(writer, new_queue_id_and_key()[0].encode())
        os._exit(0)
    os.close(writer)
    child_id = os.read(reader, 64).decode()
    os.close(reader)
    os.waitpid(child, 0)

    # Equal bits would happen by chance once in 2**20 runs.
    assert reference_value(child_id) & 0xFFFFF != parent_bits


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0" * 14,
        "0" * 16,
        "0" * 14 + "I",
        "0" * 14 + "u",
        "0" * 14 + "a",
        "0" * 14 + "\u0660",  # ARABIC-INDIC DIGIT ZERO
        "0" * 14 + "\U0001d7ce",  # MATHEMATICAL BOLD DIGIT ZERO
        "0" * 14 + "-",
        b"000000000000000",
        None,
        12345,
    ],
)
def test_queue_id_malformed(text: object) -> None:
    assert not is_queue_id(text)
    with pytest.raises(ValueError, match="invalid queue ID"):
        message_key(text)  # type: ignore[arg-type]


def test_queue_id_every_character() -> None:
    for position in range(QUEUE_ID_LENGTH):
        for digit, char in enumerate(ALPHABET):
            queue_id = "0" * position + char + "0" * (QUEUE_ID_LENGTH - position - 1)
            assert is_queue_id(queue_id)
            assert message_key(queue_id) == (digit << 5 * (QUEUE_ID_LENGTH - 1 - position)) >> DROPPED_BITS
    highest = ALPHABET[-1] * QUEUE_ID_LENGTH
    assert message_key(highest) == (1 << 63) - 1


@pytest.mark.parametrize("envelope", ENVELOPES, ids=["null-sender", "all-fields", "utf8", "local-dsn", "alias-copy"])
def test_rows_match_python_layout(envelope: Envelope) -> None:
    body = b"Subject: rows\r\n\r\n" + bytes(range(256)) * 4
    batch = [Spool._pending(envelope, body, None, None) for _ in range(3)]
    batch.append(PendingCommit(envelope, body, time.time(), new_queue_id_and_key()[0], None, None))

    message_values: list[Any] = []
    fresh_values: list[Any] = []
    add_message_rows(batch, message_values, fresh_values)

    expected_message: list[Any] = []
    expected_fresh: list[Any] = []
    for pending in batch:
        message, fresh = reference_rows(pending)
        expected_message.extend(message)
        expected_fresh.extend(fresh)
    assert message_values == expected_message
    assert fresh_values == expected_fresh
    assert fresh_domains(fresh_values[2]) == [
        r.address.rpartition("@")[2].lower() if "@" in r.address else "" for r in envelope.recipients
    ]


def test_rows_bad_message_raises_first() -> None:
    good = Spool._pending(ENVELOPES[1], b"x\r\n", None, None)
    bad_id = PendingCommit(ENVELOPES[1], b"x\r\n", time.time(), "not-a-queue-id", None, None)
    no_recipients = PendingCommit(Envelope(sender="a@b.test", recipients=()), b"x\r\n", time.time(), good.queue_id)

    for bad, message in ((bad_id, "invalid queue ID"), (no_recipients, "at least one recipient")):
        message_values: list[Any] = []
        fresh_values: list[Any] = []
        with pytest.raises(ValueError, match=message):
            add_message_rows([good, bad], message_values, fresh_values)
        assert len(message_values) == 11
        assert len(fresh_values) == 3



@pytest.mark.parametrize("size", [1024, 64 * 1024, 64 * 1024 + 1], ids=["1k", "copy-limit", "above-limit"])
def test_rows_stored_as_blobs(spool: Spool, size: int) -> None:
    body = (b"Subject: blob\r\n\r\n" + bytes(range(256)) * (size // 256 + 1))[:size]
    queue_id = spool.commit_blocking(ENVELOPES[0], body)

    with SpoolStore(spool.directory) as store:
        row = store.connection.execute(
            "SELECT typeof(envelope), typeof(body), typeof(auth_user), body, crc32 FROM message WHERE queue_id = ?",
            (queue_id,),
        ).fetchone()
        assert row[0] == "blob"
        assert row[1] == "blob"
        assert row[2] == "null"
        assert row[3] == body
        assert row[4] == zlib.crc32(body)
        assert store.load_body(queue_id) == body
