"""Tests of the spool schema: message keys, key clashes, and the migrations of version 1 and 3 spools."""

from __future__ import annotations

import email
import sqlite3
import time
import zlib
from pathlib import Path

import orjson
import pytest
from spool_helpers import make_envelope, run

from relay.delivery.dsn import build_report
from relay.spool import (
    CorruptRecord,
    DeliveryResult,
    DsnState,
    Envelope,
    Outcome,
    Recipient,
    RecipientState,
    Spool,
    SpoolStore,
    StoredMessage,
    new_queue_id,
)
from relay.spool.ids import (
    ALPHABET,
    KEY_SLOTS,
    message_key,
    message_key_range,
    new_queue_id_and_key,
    queue_id_time,
)
from relay.spool.store import SCHEMA_VERSION, database_path

# The version 1 schema as relay created it, before the body moved into the message row.
VERSION_1_SCHEMA = """
CREATE TABLE message (
    queue_id TEXT PRIMARY KEY,
    arrival REAL NOT NULL,
    sender TEXT NOT NULL,
    size INTEGER NOT NULL,
    client_address TEXT,
    helo_name TEXT,
    auth_user TEXT,
    envelope BLOB NOT NULL
);
CREATE TABLE body (
    queue_id TEXT PRIMARY KEY,
    crc32 INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE recipient (
    queue_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    orcpt TEXT,
    notify TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_attempt REAL,
    last_reply TEXT,
    last_host TEXT,
    dsn TEXT NOT NULL DEFAULT 'none',
    lease_token TEXT,
    lease_until REAL,
    PRIMARY KEY (queue_id, idx)
) WITHOUT ROWID;
CREATE INDEX recipient_due ON recipient (next_attempt) WHERE state IN ('queued', 'deferred');
CREATE INDEX recipient_dsn ON recipient (queue_id) WHERE dsn = 'pending';
CREATE TABLE attempt (
    queue_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    time REAL NOT NULL,
    outcome TEXT NOT NULL,
    reply TEXT NOT NULL,
    host TEXT NOT NULL
);
CREATE INDEX attempt_message ON attempt (queue_id);
PRAGMA user_version = 1;
"""

DOCUMENT = orjson.dumps(
    {"size": None, "body_type": None, "smtputf8": False, "ret": None, "envid": None, "protocol": "ESMTP"}
)


def _same_key_ids() -> tuple[str, str]:
    """Return two queue IDs of one microsecond that differ only in the random bits a key drops."""
    first = new_queue_id()
    last = ALPHABET.index(first[-1])
    second = first[:-1] + ALPHABET[(last + 1) % 32]
    assert message_key(first) == message_key(second)
    return first, second


def _write_version_1(path: Path, messages: list[tuple[str, bytes | None]], now: float) -> None:
    """Create a version 1 spool holding ``messages`` (queue ID, body or None for a lost body row)."""
    path.mkdir()
    connection = sqlite3.connect(database_path(path), isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(VERSION_1_SCHEMA)
        connection.execute("BEGIN")
        for number, (queue_id, body) in enumerate(messages):
            connection.execute(
                "INSERT INTO message VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (queue_id, now + number, f"sender{number}@example.test", len(body or b""),
                 "127.0.0.1", "client.example.test", None, DOCUMENT),
            )
            if body is not None:
                connection.execute("INSERT INTO body VALUES (?, ?, ?)", (queue_id, zlib.crc32(body), body))
            for index in range(2):
                connection.execute(
                    "INSERT INTO recipient (queue_id, idx, address, domain, orcpt, notify, state, next_attempt)"
                    " VALUES (?, ?, ?, 'example.test', NULL, '', 'queued', ?)",
                    (queue_id, index, f"user{index}@example.test", now - 10),
                )
        connection.execute("COMMIT")
    finally:
        connection.close()


def test_version_1_spool_migrated(tmp_path: Path) -> None:
    now = time.time()
    twin_a, twin_b = _same_key_ids()
    plain = [new_queue_id() for _ in range(3)]
    lost_body = new_queue_id()
    odd = "legacy-id-1"  # version 1 stored any caller-chosen text
    messages = [(queue_id, f"body of {queue_id}".encode()) for queue_id in [*plain, twin_a, twin_b, odd]]
    messages.append((lost_body, None))
    path = tmp_path / "spool"
    _write_version_1(path, messages, now)
    with sqlite3.connect(database_path(path)) as connection:
        connection.execute(
            "UPDATE recipient SET state = 'deferred', attempts = 1, last_reply = '451 later', dsn = 'pending'"
            " WHERE queue_id = ? AND idx = 1",
            (plain[0],),
        )
        connection.execute(
            "INSERT INTO attempt VALUES (?, 1, ?, 'deferred', '451 later', 'mx.example.test')", (plain[0], now)
        )

    spool = Spool.open(path)
    try:
        for queue_id, body in messages:
            message = run(spool.load(queue_id))
            assert message is not None, queue_id
            assert [r.address for r in message.recipients] == ["user0@example.test", "user1@example.test"]
            if body is not None:
                assert run(spool.load_body(queue_id)) == body
        first = run(spool.load(plain[0]))
        assert first is not None
        assert first.recipients[1].state is RecipientState.DEFERRED
        assert first.recipients[1].dsn is DsnState.PENDING
        assert first.recipients[1].last_reply == "451 later"
        with pytest.raises(CorruptRecord, match="body row missing"):
            run(spool.load_body(lost_body))
        # Reading the missing body moved the message aside.
        assert (path / "corrupt" / f"{lost_body}.json").exists()
        claims = run(spool.claim("migrated"))
        claimed = {claim.queue_id for claim in claims}
        assert claimed == {queue_id for queue_id, _ in messages} - {lost_body}
        later = run(spool.commit(make_envelope(), b"after migration"))
        assert run(spool.load_body(later)) == b"after migration"
    finally:
        spool.close()

    with SpoolStore(path) as store:
        assert store.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {name for (name,) in store.connection.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        assert "body" not in tables
        assert store.integrity_check() == ["ok"]
        assert [attempt.reply for attempt in store.history(plain[0])] == ["451 later"]
        listed = store.queue_ids()
    assert set(listed) == {queue_id for queue_id, _ in messages} - {lost_body} | {later}
    assert listed.index(plain[0]) < listed.index(plain[1]) < listed.index(later)


def test_version_1_migration_runs_once(tmp_path: Path) -> None:
    queue_id = new_queue_id()
    path = tmp_path / "spool"
    _write_version_1(path, [(queue_id, b"kept")], time.time())
    for _ in range(2):
        with SpoolStore(path) as store:
            assert store.load_body(queue_id) == b"kept"
            assert store.queue_ids() == [queue_id]


def test_message_key_sorts_like_queue_id() -> None:
    # new_queue_id never goes back in time, so IDs of future times would change later tests' IDs.
    ids = [new_queue_id() for _ in range(5)]
    keys = [message_key(queue_id) for queue_id in ids]
    assert keys == sorted(keys)
    assert all(0 <= key < 2**63 for key in keys)
    for queue_id in ids:
        low, high = message_key_range(queue_id)
        assert low <= message_key(queue_id) <= high
        assert high - low + 1 == KEY_SLOTS
        assert abs(low // KEY_SLOTS / 1e6 - queue_id_time(queue_id)) < 1e-6


def test_new_id_key_matches_message_key() -> None:
    # The spool stores a fresh message under the key made with its ID.  Lookups
    # later use message_key of the ID, so the two must agree.
    for _ in range(100):
        queue_id, key = new_queue_id_and_key()
        assert key == message_key(queue_id)


def test_shared_key_keeps_both_ids(tmp_path: Path) -> None:
    first, second = _same_key_ids()
    spool = Spool.open(tmp_path / "spool")
    try:
        assert run(spool.commit(make_envelope(), b"first", queue_id=first)) == first
        assert run(spool.commit(make_envelope(), b"second", queue_id=second)) == second
        assert run(spool.load_body(first)) == b"first"
        assert run(spool.load_body(second)) == b"second"
        run(spool.delete(first))
        assert run(spool.load(first)) is None
        assert run(spool.load_body(second)) == b"second"
    finally:
        spool.close()


def test_invalid_chosen_queue_id_rejected(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    try:
        with pytest.raises(ValueError, match="invalid queue ID"):
            run(spool.commit(make_envelope(), b"x", queue_id="not-a-queue-id"))
        assert run(spool.commit(make_envelope(), b"y")) is not None
    finally:
        spool.close()


def _table_columns(connection: sqlite3.Connection, table: str) -> list[tuple[str, str, int, object]]:
    """Return each column of ``table`` as (name, type, not null, default), in order."""
    return [(name, kind, notnull, default) for _, name, kind, notnull, default, _ in
            connection.execute(f"PRAGMA table_info({table})")]


def _report_text(message: StoredMessage) -> str:
    """Return the plain-text part of the DSN that reports every recipient of ``message``."""
    report = build_report(message, b"Subject: s\r\n\r\nx\r\n", message.recipients, "mx.local.test", time.time())
    parsed = email.message_from_bytes(report.body)
    text = parsed.get_payload()[0].get_payload(decode=True)
    return " ".join(text.decode().split())


def _bounce_with_4xx(spool: Spool, expired: bool) -> str:
    """Commit a message to bob@ and record its bounce with a 4xx reply; return the queue ID."""
    envelope = Envelope(sender="alice@local.test", recipients=(Recipient(address="bob@remote.test"),))
    queue_id = spool.commit_blocking(envelope, b"Subject: s\r\n\r\nx\r\n")
    with SpoolStore(spool.directory) as store:
        result = DeliveryResult(queue_id, 0, Outcome.FAILED, "450 4.2.1 mailbox busy", "mx", expired=expired)
        store.record_results([result], None, time.time())
    return queue_id


def test_version_3_spool_keeps_inferred_expiry(tmp_path: Path) -> None:
    # A version 3 spool stored no expiry fact: its bounces with a 4xx reply
    # are still reported as expired, as a version 3 relay reported them.
    path = tmp_path / "spool"
    spool = Spool.open(path)
    try:
        old = _bounce_with_4xx(spool, expired=True)
    finally:
        spool.close()
    with sqlite3.connect(database_path(path)) as connection:
        for column in ("expired", "dsn_attempts", "dsn_due"):
            connection.execute(f"ALTER TABLE recipient DROP COLUMN {column}")
        connection.execute("PRAGMA user_version = 3")
    connection.close()

    spool = Spool.open(path)
    try:
        stored = run(spool.load(old))
        new = _bounce_with_4xx(spool, expired=False)
        stored_new = run(spool.load(new))
    finally:
        spool.close()

    assert stored is not None
    assert stored.recipients[0].expired is None
    assert stored.recipients[0].dsn is DsnState.PENDING
    assert stored.recipients[0].dsn_attempts == 0
    assert "(the message expired after" in _report_text(stored)
    assert stored_new is not None
    assert stored_new.recipients[0].expired is False
    assert "expired" not in _report_text(stored_new)
    fresh_path = tmp_path / "fresh"
    Spool.open(fresh_path).close()
    with sqlite3.connect(database_path(path)) as migrated, sqlite3.connect(database_path(fresh_path)) as fresh:
        assert _table_columns(migrated, "recipient") == _table_columns(fresh, "recipient")
        assert migrated.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    migrated.close()
    fresh.close()


@pytest.mark.parametrize("expired", [True, False])
def test_expiry_fact_decides_dsn_note(tmp_path: Path, expired: bool) -> None:
    # Only a recipient bounced for its queue lifetime gets the expiry note,
    # whatever the class of its last reply.
    spool = Spool.open(tmp_path / "spool")
    try:
        stored = run(spool.load(_bounce_with_4xx(spool, expired)))
    finally:
        spool.close()
    assert stored is not None
    assert stored.recipients[0].expired is expired
    assert ("(the message expired after" in _report_text(stored)) is expired
