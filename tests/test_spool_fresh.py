"""Tests of fresh messages: recipients kept in the envelope document until an attempt needs rows.

A commit writes one ``fresh`` row per message and no ``recipient`` rows.
Every reader must still see each recipient queued and due at arrival, and
every writer must turn the fresh row into recipient rows before it changes
one recipient.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
from spool_helpers import make_envelope, run

from relay.spool import (
    CorruptRecord,
    DeliveryResult,
    Envelope,
    Outcome,
    Recipient,
    RecipientState,
    Spool,
    SpoolStore,
    new_queue_id,
)
from relay.spool.store import SCHEMA_VERSION, PendingCommit, database_path
from relay.status import summarize


def _rows(spool: Spool, table: str) -> int:
    with sqlite3.connect(database_path(spool.directory)) as connection:
        (count,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(count)


def _states(spool: Spool, queue_id: str) -> list[RecipientState]:
    message = run(spool.load(queue_id))
    assert message is not None
    return [recipient.state for recipient in message.recipients]


def test_commit_writes_no_recipient_rows(spool: Spool) -> None:
    envelope = Envelope(
        sender="a@example.test",
        recipients=(
            Recipient("b@one.example.test", "rfc822;b@one.example.test", ("SUCCESS", "FAILURE")),
            Recipient("postmaster"),
        ),
    )
    before = time.time()
    queue_id = run(spool.commit(envelope, b"Subject: x\r\n\r\nbody\r\n"))

    assert _rows(spool, "recipient") == 0
    assert _rows(spool, "fresh") == 1
    message = run(spool.load(queue_id))
    assert message is not None
    assert message.envelope.recipients == envelope.recipients
    first, second = message.recipients
    assert (first.index, first.address, first.orcpt, first.notify) == (
        0, "b@one.example.test", "rfc822;b@one.example.test", ("SUCCESS", "FAILURE"),
    )
    assert (second.index, second.address, second.domain) == (1, "postmaster", "")
    assert all(r.state is RecipientState.QUEUED and r.attempts == 0 for r in message.recipients)
    assert before - 1 <= first.next_attempt <= time.time()


def test_delivery_at_first_attempt_never_writes_recipient_rows(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=3), b"x"))
    (claim,) = run(spool.claim("a"))
    assert [r.index for r in claim.recipients] == [0, 1, 2]

    results = [DeliveryResult(queue_id, index, Outcome.DELIVERED, "250 ok", "mx") for index in range(3)]
    assert run(spool.record_results(results, lease_token=claim.lease_token)) == 3

    assert run(spool.load(queue_id)) is None
    for table in ("message", "fresh", "recipient", "attempt"):
        assert _rows(spool, table) == 0, table


def test_deferral_writes_rows_for_what_is_left(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=3), b"x"))
    (claim,) = run(spool.claim("a"))
    later = time.time() + 300
    results = [
        DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250 ok", "mx"),
        DeliveryResult(queue_id, 1, Outcome.DEFERRED, "451 later", "mx", next_attempt=later),
        DeliveryResult(queue_id, 2, Outcome.FAILED, "550 no", "mx"),
    ]
    assert run(spool.record_results(results, lease_token=claim.lease_token)) == 3

    assert _rows(spool, "fresh") == 0
    assert _rows(spool, "recipient") == 3
    message = run(spool.load(queue_id))
    assert message is not None
    delivered, deferred, bounced = message.recipients
    assert delivered.state is RecipientState.DELIVERED
    assert (deferred.state, deferred.attempts, deferred.next_attempt, deferred.last_reply) == (
        RecipientState.DEFERRED, 1, later, "451 later",
    )
    assert bounced.state is RecipientState.BOUNCED
    # Not due until the deferral ends, and free of the old lease.
    assert run(spool.claim("b")) == []
    (again,) = run(spool.claim("b", now=later + 1))
    assert [r.index for r in again.recipients] == [1]


def test_fresh_lease_blocks_second_claim(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    now = time.time()
    (first,) = run(spool.claim("a", lease_time=60, now=now))
    assert run(spool.claim("b", now=now + 30)) == []
    assert run(spool.lease_owners()) == {"a": 2}

    (second,) = run(spool.claim("b", lease_time=60, now=now + 61))
    assert second.queue_id == queue_id
    # The first scheduler's late deferral lost its lease and is not applied.
    late = [DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451", "mx", next_attempt=now + 999)]
    assert run(spool.record_results(late, lease_token=first.lease_token, now=now + 62)) == 0
    assert _states(spool, queue_id) == [RecipientState.QUEUED, RecipientState.QUEUED]


def test_release_leases_frees_fresh_messages(spool: Spool) -> None:
    run(spool.commit(make_envelope(recipients=2), b"x"))
    run(spool.commit(make_envelope(recipients=1), b"y"))
    assert len(run(spool.claim("dead"))) == 2
    assert run(spool.release_leases("dead")) == 3
    assert run(spool.lease_owners()) == {}
    assert len(run(spool.claim("alive"))) == 2


def test_claim_limit_splits_a_fresh_message(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=5), b"x"))
    (first,) = run(spool.claim("a", limit=2))
    assert [r.index for r in first.recipients] == [0, 1]
    (second,) = run(spool.claim("a", limit=10))
    assert [r.index for r in second.recipients] == [2, 3, 4]
    assert run(spool.claim("a")) == []
    assert _rows(spool, "fresh") == 0

    results = [DeliveryResult(queue_id, i, Outcome.DELIVERED, "250", "mx") for i in (0, 1)]
    run(spool.record_results(results, lease_token=first.lease_token))
    results = [DeliveryResult(queue_id, i, Outcome.DELIVERED, "250", "mx") for i in (2, 3, 4)]
    run(spool.record_results(results, lease_token=second.lease_token))
    assert run(spool.load(queue_id)) is None


def test_claim_takes_oldest_first(tmp_path: Path) -> None:
    now = time.time()

    def commit(store: SpoolStore, arrival: float) -> str:
        pending = PendingCommit(make_envelope(recipients=1), b"x", arrival, new_queue_id(arrival))
        with store.transaction():
            return store.insert_message(pending)

    def claim(store: SpoolStore, at: float, limit: int) -> list[str]:
        with store.transaction():
            claims = store.claim("a", "a#1", now=at, lease_time=60, limit=limit, domain=None)
        return [c.queue_id for c in claims]

    with SpoolStore(tmp_path / "spool") as store:
        old = commit(store, now - 100)
        assert claim(store, now - 100, 10) == [old]
        deferral = DeliveryResult(old, 0, Outcome.DEFERRED, "451", "mx", next_attempt=now - 10)
        with store.transaction():
            store.record_results([deferral], "a#1", now - 99)
        new = commit(store, now - 5)
        older = commit(store, now - 50)

        assert claim(store, now, 2) == [older, old]
        assert claim(store, now, 2) == [new]


def test_claim_by_domain_takes_only_that_domain(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=4), b"x"))
    (claim,) = run(spool.claim("a", domain="TWO.example.test"))
    assert [r.address for r in claim.recipients] == ["user1@two.example.test", "user3@two.example.test"]
    (rest,) = run(spool.claim("a"))
    assert rest.queue_id == queue_id
    assert [r.index for r in rest.recipients] == [0, 2]


def test_claim_by_domain_writes_rows_up_to_limit(spool: Spool) -> None:
    queue_ids = [run(spool.commit(make_envelope(recipients=2), b"x")) for _ in range(5)]
    claims = run(spool.claim("a", domain="one.example.test", limit=2))
    assert [c.queue_id for c in claims] == queue_ids[:2]
    # Only the two oldest messages got recipient rows; the rest stay fresh.
    assert _rows(spool, "fresh") == 3
    assert _rows(spool, "recipient") == 4


def test_hold_and_release_a_fresh_message(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    assert run(spool.hold(queue_id)) == 2
    assert _states(spool, queue_id) == [RecipientState.HELD, RecipientState.HELD]
    assert run(spool.claim("a")) == []
    assert run(spool.release(queue_id)) == 2
    assert _states(spool, queue_id) == [RecipientState.QUEUED, RecipientState.QUEUED]
    assert len(run(spool.claim("a"))) == 1


def test_flush_of_a_fresh_message_changes_nothing(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    assert run(spool.flush(queue_id)) == 0
    assert run(spool.flush(domain="one.example.test")) == 0
    assert _rows(spool, "recipient") == 0
    with SpoolStore(spool.directory) as store:
        assert store.history(queue_id) == []
    (claim,) = run(spool.claim("a"))
    assert claim.queue_id == queue_id


def test_delete_a_fresh_message(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    run(spool.delete(queue_id))
    assert _rows(spool, "fresh") == 0
    assert run(spool.claim("a")) == []


def test_filters_counts_and_status_see_fresh_recipients(spool: Spool) -> None:
    fresh = run(spool.commit(make_envelope(recipients=3), b"x"))
    deferred = run(spool.commit(make_envelope(sender="other@example.test", recipients=1), b"y"))
    claims = run(spool.claim("a", domain="one.example.test"))
    deferred_claim = next(c for c in claims if c.queue_id == deferred)
    result = DeliveryResult(deferred, 0, Outcome.DEFERRED, "451", "mx", next_attempt=time.time() + 300)
    run(spool.record_results([result], lease_token=deferred_claim.lease_token))
    # The claim by domain gave `fresh` recipient rows; commit a third, untouched.
    untouched = run(spool.commit(make_envelope(recipients=2), b"z"))
    run(spool.release_leases("a"))

    with SpoolStore(spool.directory) as store:
        assert store.queue_ids(domain="two.example.test") == [fresh, untouched]
        assert store.queue_ids(domain="one.example.test") == [fresh, deferred, untouched]
        assert store.queue_ids(domain="nowhere.test") == []
        assert store.queue_ids(state=RecipientState.QUEUED) == [fresh, untouched]
        assert store.queue_ids(state=RecipientState.DEFERRED) == [deferred]
        assert store.queue_ids(state=RecipientState.QUEUED, domain="two.example.test") == [fresh, untouched]
        assert store.queue_ids(dsn_pending=True) == []
        assert store.counts() == {"queued": 5, "deferred": 1}
        summary = summarize(store)
    assert summary.messages == 3
    assert summary.recipients == {"queued": 5, "deferred": 1}
    by_domain = {d.domain: (d.queued, d.deferred) for d in summary.destinations}
    assert by_domain == {"one.example.test": (3, 1), "two.example.test": (2, 0)}


def test_damaged_recipient_list_moved_aside(spool: Spool) -> None:
    sound = run(spool.commit(make_envelope(recipients=1), b"y"))
    broken = run(spool.commit(make_envelope(recipients=2), b"x"))
    with sqlite3.connect(database_path(spool.directory)) as connection:
        (document,) = connection.execute("SELECT envelope FROM message WHERE queue_id = ?", (broken,)).fetchone()
        damaged = orjson.loads(document)
        damaged["recipients"] = [["user@example.test", None]]
        connection.execute("UPDATE message SET envelope = ? WHERE queue_id = ?", (orjson.dumps(damaged), broken))

    with pytest.raises(CorruptRecord):
        run(spool.load(broken))
    claims = run(spool.claim("a"))
    assert [claim.queue_id for claim in claims] == [sound]
    aside = orjson.loads((spool.directory / "corrupt" / f"{broken}.json").read_bytes())
    assert aside["fresh"][0]["recipients"] == 2
    assert _rows(spool, "fresh") == 1


def test_damaged_fresh_message_gets_no_rows(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    broken = run(spool.commit(make_envelope(recipients=2), b"x"))
    with sqlite3.connect(database_path(spool.directory)) as connection:
        (document,) = connection.execute("SELECT envelope FROM message WHERE queue_id = ?", (broken,)).fetchone()
        damaged = orjson.loads(document)
        damaged["recipients"] = "user@one.example.test"
        connection.execute("UPDATE message SET envelope = ? WHERE queue_id = ?", (orjson.dumps(damaged), broken))

    with caplog.at_level(logging.ERROR, logger="relay.spool"):
        assert run(spool.claim("a", domain="one.example.test")) == []
    unreadable = [record for record in caplog.records if getattr(record, "event", None) == "fresh_unreadable"]
    assert [getattr(record, "fields", {}).get("queue_id") for record in unreadable] == [broken]
    assert _rows(spool, "recipient") == 0
    assert _rows(spool, "fresh") == 1

    # A claim without a domain reads the message and moves it aside.
    assert run(spool.claim("a")) == []
    assert (spool.directory / "corrupt" / f"{broken}.json").exists()
    assert _rows(spool, "fresh") == 0


def test_load_sees_one_snapshot(tmp_path: Path) -> None:
    """Another connection writing a fresh message's recipient rows between load's reads changes nothing."""
    directory = tmp_path / "spool"
    with SpoolStore(directory) as writer, SpoolStore(directory) as reader:
        pending = PendingCommit(make_envelope(recipients=2), b"x", time.time(), new_queue_id(time.time()))
        with writer.transaction():
            queue_id = writer.insert_message(pending)

        def hold_during_fresh_read(statement: str) -> None:
            # Runs as load starts reading the fresh table, after its recipient rows.
            if "FROM fresh" in statement and not holds:
                holds.append(statement)
                with writer.transaction():
                    writer.hold(queue_id, time.time())

        holds: list[str] = []
        reader.connection.set_trace_callback(hold_during_fresh_read)
        message = reader.load(queue_id)
        reader.connection.set_trace_callback(None)

        assert len(holds) == 1
        assert message is not None
        assert [r.state for r in message.recipients] == [RecipientState.QUEUED, RecipientState.QUEUED]
        after = reader.load(queue_id)
        assert after is not None
        assert [r.state for r in after.recipients] == [RecipientState.HELD, RecipientState.HELD]


def test_recipient_count_mismatch_is_moved_aside(spool: Spool) -> None:
    sound = run(spool.commit(make_envelope(recipients=1), b"y"))
    broken = run(spool.commit(make_envelope(recipients=3), b"x"))
    with sqlite3.connect(database_path(spool.directory)) as connection:
        connection.execute("UPDATE fresh SET recipients = 5 WHERE id = (SELECT id FROM message WHERE queue_id = ?)",
                           (broken,))

    with pytest.raises(CorruptRecord):
        run(spool.load(broken))
    # A claim too small for the five recipients the fresh row counts reads the message and moves it aside.
    claims = run(spool.claim("a", limit=2))
    assert [claim.queue_id for claim in claims] == [sound]
    assert (spool.directory / "corrupt" / f"{broken}.json").exists()
    assert run(spool.claim("b")) == []


def test_domain_with_space_matches_nothing(spool: Spool) -> None:
    fresh = run(spool.commit(make_envelope(recipients=3), b"x"))
    attempted = run(spool.commit(make_envelope(recipients=3), b"y"))
    run(spool.hold(attempted))
    with SpoolStore(spool.directory) as store:
        for domain in ("one.example.test two.example.test", " one.example.test", "two.example.test "):
            assert store.queue_ids(domain=domain) == [], domain
        assert store.queue_ids(domain="one.example.test") == [fresh, attempted]
    assert run(spool.claim("a", domain="one.example.test two.example.test")) == []


def test_flush_makes_fresh_due_after_clock_step(tmp_path: Path) -> None:
    now = time.time()
    with SpoolStore(tmp_path / "spool") as store:
        pending = PendingCommit(make_envelope(recipients=2), b"x", now, new_queue_id(now))
        with store.transaction():
            queue_id = store.insert_message(pending)
        earlier = now - 60
        with store.transaction():
            assert store.flush(earlier, domain="two.example.test") == 1
        with store.transaction():
            assert store.flush(earlier, queue_id=queue_id) == 1
        message = store.load(queue_id)
        assert message is not None
        assert [r.next_attempt for r in message.recipients] == [earlier, earlier]
        with store.transaction():
            claims = store.claim("a", "a#1", now=earlier, lease_time=60, limit=10, domain=None)
        assert [r.index for c in claims for r in c.recipients] == [0, 1]


def test_version_2_spool_gains_the_fresh_table(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool.open(directory)
    try:
        queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
        # Version 2 wrote recipient rows at commit; holding the message writes them here.
        run(spool.hold(queue_id))
        run(spool.release(queue_id))
    finally:
        spool.close()
    with sqlite3.connect(database_path(directory)) as connection:
        connection.execute("DROP TABLE fresh")
        for column in ("expired", "dsn_attempts", "dsn_due"):
            connection.execute(f"ALTER TABLE recipient DROP COLUMN {column}")
        connection.execute("PRAGMA user_version = 2")

    spool = Spool.open(directory)
    try:
        with SpoolStore(directory) as store:
            assert store.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        (claim,) = run(spool.claim("a"))
        assert [r.index for r in claim.recipients] == [0, 1]
        results = [DeliveryResult(queue_id, i, Outcome.DELIVERED, "250", "mx") for i in (0, 1)]
        run(spool.record_results(results, lease_token=claim.lease_token))
        assert run(spool.load(queue_id)) is None
        fresh = run(spool.commit(make_envelope(recipients=1), b"y"))
        assert _states(spool, fresh) == [RecipientState.QUEUED]
    finally:
        spool.close()


def test_deferral_stores_delivered_targets(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    (claim,) = run(spool.claim("a"))
    later = time.time() + 60
    results = [
        DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 4.3.0 failed", "", later, delivered_targets=("alice",)),
        DeliveryResult(queue_id, 1, Outcome.DEFERRED, "451 4.3.0 failed", "", later),
    ]
    run(spool.record_results(results, lease_token=claim.lease_token))
    message = run(spool.load(queue_id))
    assert message is not None
    assert [r.delivered_targets for r in message.recipients] == [("alice",), ()]

    # A later deferral without targets keeps the stored ones.
    (claim,) = run(spool.claim("a", now=later + 1))
    retry = [DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 4.3.0 failed", "", later + 60)]
    run(spool.record_results(retry, lease_token=claim.lease_token))
    message = run(spool.load(queue_id))
    assert message is not None
    assert message.recipients[0].delivered_targets == ("alice",)


def test_delivered_targets_need_live_lease(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    (claim,) = run(spool.claim("a"))
    assert not run(spool.record_delivered_targets(queue_id, 0, ["alice"], "other#1"))
    assert run(spool.record_delivered_targets(queue_id, 0, ["alice", "bob"], claim.lease_token))
    message = run(spool.load(queue_id))
    assert message is not None
    (recipient,) = message.recipients
    assert recipient.delivered_targets == ("alice", "bob")
    assert recipient.state is RecipientState.QUEUED
    assert recipient.attempts == 0


def test_version_3_spool_gains_delivered_targets(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool.open(directory)
    try:
        queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
        run(spool.hold(queue_id))
    finally:
        spool.close()
    with sqlite3.connect(database_path(directory)) as connection:
        connection.execute("ALTER TABLE recipient DROP COLUMN delivered_targets")
        connection.execute("PRAGMA user_version = 3")

    with SpoolStore(directory) as store:
        assert store.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        message = store.load(queue_id)
    assert message is not None
    assert message.recipients[0].state is RecipientState.HELD
    assert message.recipients[0].delivered_targets == ()
