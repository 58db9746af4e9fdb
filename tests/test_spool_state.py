"""Unit tests of the spool: commit, recipient state changes, leases, deletion, corruption."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest
from spool_helpers import LOOP_KINDS, make_body, make_envelope, run

from relay.config import load_config
from relay.spool import (
    CorruptRecord,
    DeliveryResult,
    DsnRequest,
    DsnState,
    Envelope,
    MessageNotFound,
    Outcome,
    Recipient,
    RecipientState,
    Spool,
    SpoolError,
    SpoolStore,
    is_queue_id,
    new_queue_id,
)
from relay.spool.checkpoint import CHECKPOINT_BYTES
from relay.spool.ids import queue_id_time
from relay.spool.store import _OWED_DSN_QUERY, SCHEMA_VERSION, PendingCommit, database_path
from relay.spool.writer import WRITER_LOCK


def _state(spool: Spool, queue_id: str) -> list[RecipientState]:
    message = run(spool.load(queue_id))
    assert message is not None
    return [recipient.state for recipient in message.recipients]


# -- queue IDs -------------------------------------------------------------------


def test_queue_ids_sort_by_arrival() -> None:
    now = time.time()
    ids = [new_queue_id(now) for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    assert all(is_queue_id(queue_id) for queue_id in ids)
    later = new_queue_id(now + 1)
    assert later > ids[-1]


def test_queue_id_encodes_arrival_time() -> None:
    now = time.time() + 5
    queue_id = new_queue_id(now)
    assert abs(queue_id_time(queue_id) - now) < 0.01
    with pytest.raises(ValueError):
        queue_id_time("not-an-id")


# -- commit ------------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_commit_round_trip(tmp_path: Path, loop_kind: str) -> None:
    envelope = Envelope(
        sender="sender@example.test",
        recipients=(
            Recipient("a@one.example.test", orcpt="rfc822;a@one.example.test", notify=("SUCCESS", "FAILURE")),
            Recipient("B@Two.Example.Test", notify=("NEVER",)),
        ),
        size=4096,
        body_type="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="QQ314159",
        client_address="127.0.0.1",
        helo_name="client.example.test",
        auth_user="alice",
        protocol="ESMTPSA",
    )
    body = make_body("round-trip", 5000) + b"\x00\xff bytes pass unchanged\r\n"

    async def scenario() -> None:
        spool = Spool.open(tmp_path / "spool")
        try:
            queue_id = await spool.commit(envelope, body)
            message = await spool.load(queue_id)
            stored_body = await spool.load_body(queue_id)
        finally:
            await spool.aclose()
        assert is_queue_id(queue_id)
        assert message is not None
        assert message.envelope == envelope
        assert message.size == len(body)
        assert stored_body == body
        assert [r.state for r in message.recipients] == [RecipientState.QUEUED] * 2
        assert message.recipients[1].domain == "two.example.test"
        assert all(r.attempts == 0 and r.dsn is DsnState.NONE for r in message.recipients)

    run(scenario(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_concurrent_commits_share_batches(tmp_path: Path, loop_kind: str) -> None:
    async def scenario() -> tuple[list[str], int]:
        spool = Spool.open(tmp_path / "spool")
        try:
            envelope = make_envelope()
            ids = await asyncio.gather(*(spool.commit(envelope, make_body(str(i), 1000)) for i in range(300)))
            return list(ids), spool.committed_batches
        finally:
            await spool.aclose()

    ids, batches = run(scenario(), loop_kind)
    assert len(set(ids)) == 300
    # Group commit: 300 commits handed over at once need far fewer transactions.
    assert batches < 100
    with SpoolStore(tmp_path / "spool") as store:
        assert len(store.queue_ids()) == 300


def test_filters_fold_unicode_and_idna(spool: Spool, tmp_path: Path) -> None:
    envelope = Envelope("jörg@client.test", (Recipient("user@bücher.test"),), smtputf8=True)
    queue_id = spool.commit_blocking(envelope, b"Subject: x\r\n\r\nbody\r\n")
    other = spool.commit_blocking(make_envelope(), b"Subject: y\r\n\r\nbody\r\n")

    with SpoolStore(tmp_path / "spool") as store:
        assert store.queue_ids(sender="JÖRG@Client.TEST") == [queue_id]
        assert store.queue_ids(domain="xn--bcher-kva.test") == [queue_id]
        assert store.queue_ids(domain="BÜCHER.test") == [queue_id]
        assert store.queue_ids(domain="one.example.test") == [other]
    result = DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 4.3.0 later", "mx.test", time.time() + 3600)
    run(spool.record_results([result]))
    with SpoolStore(tmp_path / "spool") as store, store.transaction():
        assert store.flush(time.time(), domain="xn--bcher-kva.test") == 1


def test_commit_without_recipients_rejected(spool: Spool) -> None:
    with pytest.raises(ValueError, match="recipient"):
        run(spool.commit(Envelope("a@example.test", ()), b"x"))


def test_commit_blocking_from_thread(spool: Spool) -> None:
    queue_id = spool.commit_blocking(make_envelope(), b"Subject: t\r\n\r\nbody\r\n")
    assert run(spool.load_body(queue_id)) == b"Subject: t\r\n\r\nbody\r\n"


def test_commit_keeps_chosen_queue_id(spool: Spool) -> None:
    chosen = new_queue_id()
    assert run(spool.commit(make_envelope(), b"x", queue_id=chosen)) == chosen


def test_commit_replaces_clashing_queue_id(spool: Spool) -> None:
    chosen = new_queue_id()
    first = run(spool.commit(make_envelope(), b"first", queue_id=chosen))
    second = run(spool.commit(make_envelope(), b"second", queue_id=chosen))
    assert first == chosen
    assert second != chosen
    assert run(spool.load_body(second)) == b"second"


def test_clash_inside_one_batch(spool: Spool) -> None:
    chosen = new_queue_id()

    async def scenario() -> list[str]:
        commits = [spool.commit(make_envelope(), f"body {n}".encode(), queue_id=chosen) for n in range(5)]
        return list(await asyncio.gather(*commits))

    ids = run(scenario())
    assert len(set(ids)) == 5
    assert chosen in ids
    bodies = {run(spool.load_body(queue_id)) for queue_id in ids}
    assert bodies == {f"body {n}".encode() for n in range(5)}


@pytest.mark.parametrize("may_wait", [True, False])
def test_commit_delay_gathers_later_message(tmp_path: Path, may_wait: bool) -> None:
    # The second message comes 0.2 s after the first: inside the 1 s delay that
    # may_wait allows, and long after a commit that does not wait has finished.
    spool = Spool.open(tmp_path / "spool", commit_delay=1.0)

    async def scenario() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        first = spool.submit_commit(make_envelope(), b"first", loop=loop, may_wait=may_wait)
        await asyncio.sleep(0.2)
        second = spool.submit_commit(make_envelope(), b"second", loop=loop)
        return await first, await second

    try:
        ids = run(scenario())
        assert spool.committed_batches == (1 if may_wait else 2)
        assert run(spool.load_body(ids[0])) == b"first"
        assert run(spool.load_body(ids[1])) == b"second"
    finally:
        spool.close()


def test_batch_over_parameter_limit(tmp_path: Path) -> None:
    # 30 parameters fit two message rows (11 values each) per statement, so the
    # batch is split into several statements inside a savepoint.
    with SpoolStore(tmp_path / "spool") as store:
        store.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 30)
        clash = new_queue_id()
        with store.transaction():
            store.insert_messages([PendingCommit(make_envelope(), b"first", time.time(), clash)])
        batch = [
            PendingCommit(make_envelope(), f"body {n}".encode(), time.time(), new_queue_id()) for n in range(5)
        ]
        with store.transaction():
            ids = store.insert_messages(batch)
        assert ids == [pending.queue_id for pending in batch]
        clashing = [
            PendingCommit(make_envelope(), b"second", time.time(), new_queue_id()),
            PendingCommit(make_envelope(), b"third", time.time(), clash),
            PendingCommit(make_envelope(), b"fourth", time.time(), new_queue_id()),
        ]
        with store.transaction():
            replaced = store.insert_messages(clashing)
        assert replaced[0] == clashing[0].queue_id
        assert replaced[1] != clash
        assert replaced[2] == clashing[2].queue_id
        for queue_id, pending in zip([*ids, *replaced], [*batch, *clashing], strict=True):
            assert store.load_body(queue_id) == pending.body
        assert store.load_body(clash) == b"first"


def test_cancelled_commit_still_stored(spool: Spool) -> None:
    async def scenario() -> None:
        task = asyncio.ensure_future(spool.commit(make_envelope(), b"cancelled"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The next commit is durable only after any earlier one is.
        await spool.commit(make_envelope(), b"after")

    run(scenario())
    with SpoolStore(spool.directory) as store:
        assert len(store.queue_ids()) == 2


def test_closed_spool_rejects_commit(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        run(spool.commit(make_envelope(), b"x"))


def test_reopen_keeps_messages(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    queue_id = spool.commit_blocking(make_envelope(), b"kept")
    spool.close()
    reopened = Spool.open(tmp_path / "spool")
    try:
        assert run(reopened.load_body(queue_id)) == b"kept"
    finally:
        reopened.close()


def test_newer_schema_rejected(tmp_path: Path) -> None:
    Spool.open(tmp_path / "spool").close()
    with sqlite3.connect(database_path(tmp_path / "spool")) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SpoolError, match="upgrade relay"):
        Spool.open(tmp_path / "spool")


def test_unopenable_spool_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open spool"):
        Spool.open(blocker / "spool")


# -- claims and leases ---------------------------------------------------------------


def test_claim_returns_due_recipients(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=3), b"x"))
    claims = run(spool.claim("scheduler-a"))
    assert len(claims) == 1
    claim = claims[0]
    assert claim.queue_id == queue_id
    assert [r.index for r in claim.recipients] == [0, 1, 2]
    assert claim.envelope.sender == "sender@example.test"
    assert claim.lease_until > time.time()


def test_claim_without_bodies_has_none(spool: Spool) -> None:
    run(spool.commit(make_envelope(), b"small body"))
    claims = run(spool.claim("scheduler-a"))
    assert len(claims) == 1
    assert claims[0].body is None


def test_claim_returns_small_bodies(tmp_path: Path) -> None:
    small = make_body("small", 1000)
    large = make_body("large", 5000)
    spool = Spool.open(tmp_path / "spool", claim_body_max_bytes=len(small))
    try:
        small_id = run(spool.commit(make_envelope(), small))
        large_id = run(spool.commit(make_envelope(), large))
        claims = {claim.queue_id: claim for claim in run(spool.claim("scheduler-a", bodies=True))}
        assert set(claims) == {small_id, large_id}
        assert claims[small_id].body == small
        assert claims[large_id].body is None
        assert run(spool.load_body(large_id)) == large
    finally:
        spool.close()


def test_claim_body_limit_from_config(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[spool]\npath = "spool"\nclaim_body_max_bytes = "2K"\n')
    config = load_config(path)
    assert config.spool.claim_body_max_bytes == 2048
    spool = Spool.from_config(config.spool)
    try:
        fits = run(spool.commit(make_envelope(), make_body("fits", 2000)))
        too_large = run(spool.commit(make_envelope(), make_body("too large", 3000)))
        bodies = {claim.queue_id: claim.body for claim in run(spool.claim("scheduler-a", bodies=True))}
    finally:
        spool.close()
    assert bodies[fits] == make_body("fits", 2000)
    assert bodies[too_large] is None


def test_claim_moves_corrupt_body_aside(spool: Spool) -> None:
    broken = run(spool.commit(make_envelope(recipients=1), b"original"))
    sound = run(spool.commit(make_envelope(recipients=1), b"sound"))
    with sqlite3.connect(database_path(spool.directory)) as connection:
        connection.execute("UPDATE message SET body = ? WHERE queue_id = ?", (b"damaged!", broken))
    claims = run(spool.claim("scheduler-a", bodies=True))
    assert [claim.queue_id for claim in claims] == [sound]
    assert claims[0].body == b"sound"
    assert (spool.directory / "corrupt" / f"{broken}.body").read_bytes() == b"damaged!"
    assert run(spool.load(broken)) is None


def test_only_lease_batches_skip_fsync(spool: Spool) -> None:
    # PRAGMA synchronous inside a job shows the mode its batch commits with:
    # 1 is NORMAL (no fsync at commit), 2 is FULL.
    def synchronous(store: SpoolStore) -> int:
        value: int = store.connection.execute("PRAGMA synchronous").fetchone()[0]
        return value

    writer = spool._writer
    assert writer.submit_blocking(synchronous, durable=False).result() == 1
    assert writer.submit_blocking(synchronous).result() == 2
    assert writer.submit_blocking(synchronous, durable=False).result() == 1
    queue_id = spool.commit_blocking(make_envelope(), b"x")
    assert writer.submit_blocking(synchronous).result() == 2
    assert run(spool.load(queue_id)) is not None


def test_large_claim_and_result_batch(spool: Spool, tmp_path: Path) -> None:
    # More messages than one lookup statement takes, a third of them sharing an
    # arrival microsecond, so their key ranges overlap.
    shared = time.time()
    queue_ids = []
    for number in range(250):
        queue_id = new_queue_id(shared) if number % 3 == 0 else None
        body = f"body {number}".encode()
        queue_ids.append(run(spool.commit(make_envelope(recipients=1), body, queue_id=queue_id)))

    claims = run(spool.claim("a", limit=1000, bodies=True))

    assert sorted(claim.queue_id for claim in claims) == sorted(queue_ids)
    bodies = {claim.queue_id: claim.body for claim in claims}
    for number, queue_id in enumerate(queue_ids):
        assert bodies[queue_id] == f"body {number}".encode()
    results = [DeliveryResult(claim.queue_id, 0, Outcome.DELIVERED, "250 ok", "mx") for claim in claims]
    assert run(spool.record_results(results, lease_token=claims[0].lease_token)) == 250
    with SpoolStore(tmp_path / "spool") as store:
        assert store.counts() == {}


def test_claim_skips_leased_recipients(spool: Spool) -> None:
    run(spool.commit(make_envelope(), b"x"))
    assert len(run(spool.claim("scheduler-a"))) == 1
    assert run(spool.claim("scheduler-b")) == []


def test_expired_lease_claimed_again(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(), b"x"))
    now = time.time()
    first = run(spool.claim("scheduler-a", lease_time=60, now=now))
    assert run(spool.claim("scheduler-b", now=now + 59)) == []
    second = run(spool.claim("scheduler-b", now=now + 61))
    assert [claim.queue_id for claim in second] == [queue_id]
    assert second[0].lease_token != first[0].lease_token


def test_renew_lease_only_while_held(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    now = time.time()
    (claim,) = run(spool.claim("scheduler-a", lease_time=1))
    # Fresh message: one lease for every recipient.
    until = run(spool.renew_lease(queue_id, [1], claim.lease_token))
    assert until is not None and until > now + spool.lease_time - 5
    assert run(spool.claim("scheduler-b", now=now + 2)) == []

    # After a result the recipients have rows of their own, still under the lease.
    delivered = DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250 2.0.0 ok", "mx.test")
    run(spool.record_results([delivered], lease_token=claim.lease_token))
    assert run(spool.renew_lease(queue_id, [1], claim.lease_token)) is not None
    assert run(spool.renew_lease(queue_id, [0, 1], claim.lease_token)) is None
    assert run(spool.renew_lease(queue_id, [1], "scheduler-b#00")) is None


def test_renew_lease_fails_after_expiry(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    (claim,) = run(spool.claim("scheduler-a", lease_time=0.05))
    time.sleep(0.1)
    assert run(spool.renew_lease(queue_id, [0], claim.lease_token)) is None
    assert len(run(spool.claim("scheduler-b"))) == 1


def test_claim_honours_limit_and_domain(spool: Spool) -> None:
    for _ in range(3):
        run(spool.commit(make_envelope(recipients=2), b"x"))
    limited = run(spool.claim("a", limit=2))
    assert sum(len(claim.recipients) for claim in limited) == 2
    by_domain = run(spool.claim("b", domain="TWO.example.test"))
    addresses = {r.address for claim in by_domain for r in claim.recipients}
    assert addresses == {"user1@two.example.test"}
    assert sum(len(claim.recipients) for claim in by_domain) <= 3


def test_claim_skips_future_and_held(spool: Spool) -> None:
    deferred_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    held_id = run(spool.commit(make_envelope(recipients=1), b"y"))
    claim = run(spool.claim("a", limit=1))[0]
    assert claim.queue_id == deferred_id
    result = DeliveryResult(deferred_id, 0, Outcome.DEFERRED, "451 4.3.0 later", "mx.test", time.time() + 300)
    run(spool.record_results([result], lease_token=claim.lease_token))
    assert run(spool.hold(held_id)) == 1
    assert run(spool.claim("b")) == []
    assert len(run(spool.claim("c", now=time.time() + 301))) == 1


def test_claim_ignores_other_leases_after_result(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    claim = run(spool.claim("a"))[0]
    deferral = DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451", "mx", next_attempt=time.time() - 1)
    run(spool.record_results([deferral], lease_token=claim.lease_token))
    # The result ended the lease, so the recipient is due again at once.
    assert len(run(spool.claim("b"))) == 1


# -- results and deletion ----------------------------------------------------------------


def test_concurrent_results_share_one_job(spool: Spool) -> None:
    done_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    partial_id = run(spool.commit(make_envelope(recipients=2), b"y"))
    claims = {claim.queue_id: claim for claim in run(spool.claim("a"))}
    jobs_before = spool.committed_jobs

    async def record_both() -> list[int]:
        delivered = DeliveryResult(done_id, 0, Outcome.DELIVERED, "250 ok", "mx")
        deferred = DeliveryResult(partial_id, 1, Outcome.DEFERRED, "451 later", "mx", time.time() + 600)
        both = asyncio.gather(
            spool.record_results([delivered], lease_token=claims[done_id].lease_token),
            spool.record_results([deferred], lease_token=claims[partial_id].lease_token),
        )
        # One turn of the loop runs both calls up to their wait for the writer,
        # because the tasks that gather made are ready before this one resumes.
        await asyncio.sleep(0)
        fcntl.flock(holder, fcntl.LOCK_UN)
        return list(await both)

    # Another open file description of writer.lock keeps the writer thread
    # waiting with the first call's job, so the second call is made before
    # the writer starts that job however the threads are scheduled.
    holder = os.open(spool.directory / WRITER_LOCK, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert run(record_both()) == [1, 1]
    finally:
        os.close(holder)
    assert spool.committed_jobs == jobs_before + 1
    assert run(spool.load(done_id)) is None
    assert _state(spool, partial_id) == [RecipientState.QUEUED, RecipientState.DEFERRED]
    with SpoolStore(spool.directory) as store:
        assert [attempt.outcome for attempt in store.history(partial_id)] == ["deferred"]
        assert store.history(done_id) == []


def test_results_in_one_call_apply_in_order(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    claim = run(spool.claim("a"))[0]
    deferred = DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 later", "mx", time.time() + 600)
    delivered = DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250 ok", "mx")
    failed = DeliveryResult(queue_id, 0, Outcome.FAILED, "550 no", "mx")
    # The failure comes after the delivery made the recipient final, so it is ignored.
    applied = run(spool.record_results([deferred, delivered, failed], lease_token=claim.lease_token))
    assert applied == 2
    assert run(spool.load(queue_id)) is None


def test_deferred_result_updates_recipient(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    claim = run(spool.claim("a"))[0]
    next_attempt = time.time() + 600
    result = DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 4.4.1 no answer", "mx1.test", next_attempt)
    assert run(spool.record_results([result], lease_token=claim.lease_token)) == 1
    message = run(spool.load(queue_id))
    assert message is not None
    recipient = message.recipients[0]
    assert recipient.state is RecipientState.DEFERRED
    assert recipient.attempts == 1
    assert recipient.next_attempt == pytest.approx(next_attempt)
    assert recipient.last_reply == "451 4.4.1 no answer"
    assert recipient.last_host == "mx1.test"


def test_deferral_needs_next_attempt(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    with pytest.raises(ValueError, match="next_attempt"):
        run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451")]))
    assert _state(spool, queue_id) == [RecipientState.QUEUED]


def test_all_delivered_deletes_message(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    claim = run(spool.claim("a"))[0]
    run(
        spool.record_results(
            [DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250 ok", "mx")], lease_token=claim.lease_token
        )
    )
    # One recipient is still unresolved, so the message stays.
    assert _state(spool, queue_id) == [RecipientState.DELIVERED, RecipientState.QUEUED]
    run(
        spool.record_results(
            [DeliveryResult(queue_id, 1, Outcome.DELIVERED, "250 ok", "mx")], lease_token=claim.lease_token
        )
    )
    assert run(spool.load(queue_id)) is None
    with pytest.raises(MessageNotFound):
        run(spool.load_body(queue_id))


def test_failure_keeps_message_until_dsn_queued(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    result = DeliveryResult(queue_id, 0, Outcome.FAILED, "550 5.1.1 unknown user", "mx")
    run(spool.record_results([result]))
    message = run(spool.load(queue_id))
    assert message is not None
    assert message.recipients[0].state is RecipientState.BOUNCED
    assert message.recipients[0].dsn is DsnState.PENDING
    assert [m.queue_id for m in run(spool.pending_dsns())] == [queue_id]

    dsn_envelope = Envelope("", (Recipient("sender@example.test"),))
    with caplog.at_level(logging.INFO, logger="relay.spool"):
        dsn_id = run(spool.commit(dsn_envelope, b"DSN", dsn_for=DsnRequest(queue_id, (0,))))
    assert run(spool.load(queue_id)) is None
    assert run(spool.pending_dsns()) == []
    assert run(spool.load_body(dsn_id)) == b"DSN"

    # The original's log reads in order: its DSN is queued, then it is removed.
    fields = [getattr(record, "fields", {}) for record in caplog.records]
    events = [
        (record.getMessage(), field.get("dsn_id"), field.get("to"))
        for record, field in zip(caplog.records, fields, strict=True)
        if field.get("queue_id") == queue_id
    ]
    assert events == [("dsn_queued", dsn_id, "sender@example.test"), ("removed", None, None)]


def _dsn_scan_steps(spool: Spool) -> tuple[list[str], int]:
    """Return the queue IDs of the owed-DSN scan and the SQLite VM instructions it ran."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    with SpoolStore(spool.directory) as store:
        store.connection.set_progress_handler(count, 1)
        queue_ids = store.dsn_queue_ids(time.time(), 100)
    return queue_ids, steps


def test_dsn_scan_cost_ignores_other_messages(spool: Spool) -> None:
    # The scan runs every queue_scan_interval while any DSN is owed, so its
    # cost must follow the messages owing one, not the whole spool.
    owing = run(spool.commit(make_envelope(recipients=1), b"x"))
    run(spool.record_results([DeliveryResult(owing, 0, Outcome.FAILED, "550 5.1.1 unknown user", "mx")]))
    found, steps_alone = _dsn_scan_steps(spool)
    assert found == [owing]

    # 300 messages with recipient rows (deferred) and 300 without (fresh), none owing a DSN.
    deferred = [run(spool.commit(make_envelope(recipients=2), b"x")) for _ in range(300)]
    later = time.time() + 3600
    results = [DeliveryResult(q, i, Outcome.DEFERRED, "451 later", "mx", later) for q in deferred for i in (0, 1)]
    run(spool.record_results(results))
    for _ in range(300):
        run(spool.commit(make_envelope(recipients=1), b"x"))
    found, steps_with_others = _dsn_scan_steps(spool)
    assert found == [owing]
    assert steps_with_others == steps_alone

    with SpoolStore(spool.directory) as store:
        plan = store.connection.execute(f"EXPLAIN QUERY PLAN {_OWED_DSN_QUERY}", (time.time(), 100)).fetchall()
    details = " | ".join(row[-1] for row in plan)
    assert "USING INDEX recipient_dsn" in details, details
    assert "message" not in details, details


def test_deferred_dsn_left_out_until_due(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    failures = [DeliveryResult(queue_id, i, Outcome.FAILED, "550 5.1.1 unknown user", "mx") for i in (0, 1)]
    run(spool.record_results(failures))

    assert run(spool.defer_dsn(queue_id, [0, 1], time.time() + 0.5)) == 2
    assert run(spool.pending_dsns()) == []
    message = run(spool.load(queue_id))
    assert message is not None
    assert [r.dsn_attempts for r in message.recipients] == [1, 1]
    assert all(r.dsn is DsnState.PENDING for r in message.recipients)

    time.sleep(0.6)
    assert [m.queue_id for m in run(spool.pending_dsns())] == [queue_id]
    # A second failed attempt adds to the count, except for a recipient whose DSN was queued meanwhile.
    run(spool.commit(Envelope("", (Recipient("sender@example.test"),)), b"DSN", dsn_for=DsnRequest(queue_id, (0,))))
    assert run(spool.defer_dsn(queue_id, [0, 1], time.time() + 60)) == 1
    message = run(spool.load(queue_id))
    assert message is not None
    assert [r.dsn for r in message.recipients] == [DsnState.QUEUED, DsnState.PENDING]
    assert [r.dsn_attempts for r in message.recipients] == [1, 2]


def test_dsn_owed_anew_starts_without_backoff(spool: Spool) -> None:
    # The delay warning's DSN failed once and then went out.  The failure
    # that follows owes a new DSN, which must not inherit that backoff.
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    later = time.time() + 3600
    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 later", "mx", later,
                                             delay_warning=True)]))
    run(spool.defer_dsn(queue_id, [0], time.time() - 1))
    run(spool.commit(Envelope("", (Recipient("sender@example.test"),)), b"DSN", dsn_for=DsnRequest(queue_id, (0,))))
    warned = run(spool.load(queue_id))
    assert warned is not None
    assert warned.recipients[0].dsn is DsnState.QUEUED
    assert warned.recipients[0].dsn_attempts == 1

    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.FAILED, "550 5.1.1 unknown user", "mx")]))
    failed = run(spool.load(queue_id))
    assert failed is not None
    assert failed.recipients[0].dsn is DsnState.PENDING
    assert failed.recipients[0].dsn_attempts == 0
    assert failed.recipients[0].dsn_due == 0.0
    assert [m.queue_id for m in run(spool.pending_dsns())] == [queue_id]


def test_second_dsn_for_same_failure_dropped(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    # Two schedulers on one spool may both read a failure as owing a DSN
    # before either has queued it.  The sender gets one report.
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.FAILED, "550 5.1.1 unknown user", "mx")]))
    dsn_envelope = Envelope("", (Recipient("sender@example.test"),))

    first = run(spool.commit(dsn_envelope, b"DSN 1", dsn_for=DsnRequest(queue_id, (0,))))
    with caplog.at_level(logging.INFO, logger="relay.spool"):
        second = run(spool.commit(dsn_envelope, b"DSN 2", dsn_for=DsnRequest(queue_id, (0,))))

    assert run(spool.load_body(first)) == b"DSN 1"
    assert run(spool.load(second)) is None
    assert "dsn_dropped" in [record.getMessage() for record in caplog.records]
    # The original stays for its other recipient.
    assert _state(spool, queue_id) == [RecipientState.BOUNCED, RecipientState.QUEUED]


def test_dsn_overlapping_queued_one_dropped(spool: Spool) -> None:
    # One scheduler read recipient 0 as owing a DSN; another read 0 and 1
    # after 1 failed too, and the first queued its report meanwhile.  The
    # second report would tell the sender about 0 again, so it goes, and 1
    # stays owed for the next look.
    queue_id = run(spool.commit(make_envelope(recipients=3), b"x"))
    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.FAILED, "550 5.1.1 unknown user", "mx")]))
    run(spool.record_results([DeliveryResult(queue_id, 1, Outcome.FAILED, "550 5.1.1 unknown user", "mx")]))
    dsn_envelope = Envelope("", (Recipient("sender@example.test"),))

    run(spool.commit(dsn_envelope, b"DSN for 0", dsn_for=DsnRequest(queue_id, (0,))))
    both = run(spool.commit(dsn_envelope, b"DSN for 0 and 1", dsn_for=DsnRequest(queue_id, (0, 1))))

    assert run(spool.load(both)) is None
    message = run(spool.load(queue_id))
    assert message is not None
    assert [r.dsn for r in message.recipients] == [DsnState.QUEUED, DsnState.PENDING, DsnState.NONE]


def test_failure_to_null_sender_needs_no_dsn(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(sender="", recipients=1), b"x"))
    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.FAILED, "550", "mx")]))
    assert run(spool.load(queue_id)) is None


@pytest.mark.parametrize(
    ("notify", "outcome", "dsn"),
    [
        ((), Outcome.FAILED, DsnState.PENDING),
        (("FAILURE",), Outcome.FAILED, DsnState.PENDING),
        (("NEVER",), Outcome.FAILED, DsnState.NONE),
        (("SUCCESS",), Outcome.FAILED, DsnState.NONE),
        (("SUCCESS",), Outcome.DELIVERED, DsnState.PENDING),
        ((), Outcome.DELIVERED, DsnState.NONE),
        (("DELAY", "FAILURE"), Outcome.DELIVERED, DsnState.NONE),
    ],
)
def test_notify_decides_dsn(spool: Spool, notify: tuple[str, ...], outcome: Outcome, dsn: DsnState) -> None:
    envelope = Envelope(
        "sender@example.test", (Recipient("a@example.test", notify=notify), Recipient("b@example.test"))
    )
    queue_id = run(spool.commit(envelope, b"x"))
    run(spool.record_results([DeliveryResult(queue_id, 0, outcome, "reply", "mx")]))
    message = run(spool.load(queue_id))
    assert message is not None
    assert message.recipients[0].dsn is dsn


def test_result_for_final_recipient_ignored(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250", "mx")]))
    with caplog.at_level(logging.WARNING, logger="relay.spool"):
        applied = run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.FAILED, "550", "mx")]))
    assert applied == 0
    assert _state(spool, queue_id) == [RecipientState.DELIVERED, RecipientState.QUEUED]
    assert "result_ignored" in [getattr(record, "event", None) for record in caplog.records]


def test_result_for_unknown_message_ignored(spool: Spool) -> None:
    assert run(spool.record_results([DeliveryResult(new_queue_id(), 0, Outcome.DELIVERED)])) == 0


def test_lost_lease_deferral_ignored(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    now = time.time()
    stale = run(spool.claim("a", lease_time=10, now=now))[0]
    fresh = run(spool.claim("b", lease_time=600, now=now + 11))[0]
    late = DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451", "mx", next_attempt=now + 3600)
    assert run(spool.record_results([late], lease_token=stale.lease_token, now=now + 12)) == 0
    # The live lease of the second scheduler still protects the recipient.
    assert run(spool.claim("c", now=now + 13)) == []
    done = DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250", "mx")
    assert run(spool.record_results([done], lease_token=fresh.lease_token, now=now + 14)) == 1
    assert run(spool.load(queue_id)) is None


def test_lost_lease_delivery_counts(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    now = time.time()
    stale = run(spool.claim("a", lease_time=10, now=now))[0]
    run(spool.claim("b", lease_time=600, now=now + 11))
    done = DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250", "mx")
    assert run(spool.record_results([done], lease_token=stale.lease_token, now=now + 12)) == 1
    assert run(spool.load(queue_id)) is None


# -- operator actions -------------------------------------------------------------


def test_hold_and_release(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451", "mx", time.time() + 900)]))
    assert run(spool.hold(queue_id)) == 2
    assert _state(spool, queue_id) == [RecipientState.HELD, RecipientState.HELD]
    assert run(spool.claim("a")) == []
    assert run(spool.release(queue_id)) == 2
    # A recipient tried before comes back deferred, one never tried as queued; both due now.
    assert _state(spool, queue_id) == [RecipientState.DEFERRED, RecipientState.QUEUED]
    assert sum(len(c.recipients) for c in run(spool.claim("a"))) == 2


def test_held_recipient_stays_held_after_deferral(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    claim = run(spool.claim("a"))[0]
    run(spool.hold(queue_id))
    deferral = DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451", "mx", time.time() + 60)
    run(spool.record_results([deferral], lease_token=claim.lease_token))
    assert _state(spool, queue_id) == [RecipientState.HELD]


def test_held_message_not_deleted(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=2), b"x"))
    run(spool.hold(queue_id))
    run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.DELIVERED, "250", "mx")]))
    assert run(spool.load(queue_id)) is not None


def test_flush_makes_deferred_due(spool: Spool) -> None:
    first = run(spool.commit(make_envelope(recipients=2), b"x"))
    later = time.time() + 3600
    for index in (0, 1):
        run(spool.record_results([DeliveryResult(first, index, Outcome.DEFERRED, "451", "mx", later)]))
    assert run(spool.claim("a")) == []
    assert run(spool.flush(domain="two.example.test")) == 1
    claimed = run(spool.claim("a"))
    assert [r.address for c in claimed for r in c.recipients] == ["user1@two.example.test"]
    # The recipient the domain flush made due is not counted again.
    assert run(spool.flush(queue_id=first)) == 1
    assert run(spool.flush(queue_id=first)) == 0
    assert run(spool.flush()) == 0


def test_delete_removes_message(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(), b"x"))
    run(spool.delete(queue_id))
    assert run(spool.load(queue_id)) is None


@pytest.mark.parametrize("action", ["hold", "release", "delete"])
def test_unknown_id_not_found(spool: Spool, action: str) -> None:
    missing = new_queue_id()
    with pytest.raises(MessageNotFound, match=missing):
        run(getattr(spool, action)(missing))


def test_history_lists_attempts(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    try:
        queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
        run(spool.record_results([DeliveryResult(queue_id, 0, Outcome.DEFERRED, "451 a", "mx1", time.time())]))
        run(spool.hold(queue_id))
        run(spool.release(queue_id))
    finally:
        spool.close()
    with SpoolStore(tmp_path / "spool") as store:
        history = store.history(queue_id)
    assert [attempt.outcome for attempt in history] == ["deferred", "held", "released"]
    assert history[0].reply == "451 a"
    assert history[0].host == "mx1"


# -- corrupt records --------------------------------------------------------------


def test_corrupt_body_moved_aside(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    queue_id = run(spool.commit(make_envelope(), b"original body"))
    with sqlite3.connect(database_path(spool.directory)) as connection:
        connection.execute("UPDATE message SET body = ? WHERE queue_id = ?", (b"damaged body!", queue_id))
    with caplog.at_level(logging.ERROR, logger="relay.spool"), pytest.raises(CorruptRecord, match="CRC-32"):
        run(spool.load_body(queue_id))
    assert run(spool.load(queue_id)) is None
    assert (spool.directory / "corrupt" / f"{queue_id}.json").exists()
    assert (spool.directory / "corrupt" / f"{queue_id}.body").read_bytes() == b"damaged body!"
    assert "corrupt_moved_aside" in [getattr(record, "event", None) for record in caplog.records]


def test_corrupt_envelope_not_claimed(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    broken = run(spool.commit(make_envelope(recipients=1), b"x"))
    sound = run(spool.commit(make_envelope(recipients=1), b"y"))
    with sqlite3.connect(database_path(spool.directory)) as connection:
        connection.execute("UPDATE message SET envelope = ? WHERE queue_id = ?", (b"{not json", broken))
    with caplog.at_level(logging.ERROR, logger="relay.spool"):
        claims = run(spool.claim("a"))
    assert [claim.queue_id for claim in claims] == [sound]
    assert (spool.directory / "corrupt" / f"{broken}.json").exists()
    moved = [getattr(record, "fields", {}).get("queue_id") for record in caplog.records]
    assert broken in moved


def test_corrupt_state_moved_aside_on_load(spool: Spool) -> None:
    queue_id = run(spool.commit(make_envelope(recipients=1), b"x"))
    # A commit writes no recipient rows (see test_spool_fresh); holding the message does.
    run(spool.hold(queue_id))
    with sqlite3.connect(database_path(spool.directory)) as connection:
        connection.execute("UPDATE recipient SET state = 'lost' WHERE queue_id = ?", (queue_id,))
    with pytest.raises(CorruptRecord):
        run(spool.load(queue_id))
    assert (spool.directory / "corrupt" / f"{queue_id}.json").exists()
    with SpoolStore(spool.directory) as store:
        assert store.queue_ids() == []


# -- checkpoints -------------------------------------------------------------------


def test_background_checkpoint_runs(spool: Spool) -> None:
    body = make_body("checkpoint", 100_000)
    # Enough rounds of 20 messages of 100 kB to pass the checkpoint point at least once.
    for _ in range(CHECKPOINT_BYTES // (20 * 100_000) + 1):
        run(asyncio.wait_for(_commit_many(spool, body, 20), timeout=60))
    deadline = time.monotonic() + 10
    while spool.background_checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spool.background_checkpoints > 0


def test_held_writer_lock_fails_commit(tmp_path: Path) -> None:
    """A commit waiting longer than busy_timeout for writer.lock fails, and is not stored later."""
    spool = Spool.open(tmp_path / "spool", busy_timeout=0.3)
    try:
        # Another open file description of writer.lock stands for a stopped process
        # that holds the lock.
        holder = os.open(tmp_path / "spool" / WRITER_LOCK, os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            started = time.monotonic()
            with pytest.raises(SpoolError, match="for more than 0.3 s"):
                spool.commit_blocking(make_envelope(), b"waited too long")
            assert time.monotonic() - started < 2
            # A commit queued while the lock is still held fails too.
            with pytest.raises(SpoolError, match=WRITER_LOCK):
                spool.commit_blocking(make_envelope(), b"queued during the wait")
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)

        queue_id = spool.commit_blocking(make_envelope(), b"after the release")
        with SpoolStore(tmp_path / "spool") as store:
            assert store.queue_ids() == [queue_id]
        assert run(spool.load_body(queue_id)) == b"after the release"
    finally:
        spool.close()


def test_wal_limit_forces_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("relay.spool.writer.WAL_LIMIT_BYTES", 1)
    spool = Spool.open(tmp_path / "spool")
    try:
        with caplog.at_level(logging.INFO, logger="relay.spool"):
            ids = [spool.commit_blocking(make_envelope(), make_body(str(n), 5000)) for n in range(5)]
        assert all(run(spool.load_body(queue_id)) == make_body(str(n), 5000) for n, queue_id in enumerate(ids))
    finally:
        spool.close()
    assert "checkpoint_restart" in [getattr(record, "event", None) for record in caplog.records]


def test_delete_leaves_body_pages_unwritten(tmp_path: Path) -> None:
    body = make_body("freed", 1024 * 1024)
    store = SpoolStore(tmp_path / "spool")
    try:
        now = time.time()
        with store.transaction():
            queue_id = store.insert_message(PendingCommit(make_envelope(), body, now, new_queue_id(now)))
        store.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        with store.transaction():
            store.delete(queue_id)
        wal_bytes = (tmp_path / "spool" / "spool.db-wal").stat().st_size
    finally:
        store.close()
    # Only the pages of the rows and the free-list trunk reach the WAL, not the 256 freed body pages.
    assert wal_bytes < len(body) // 8


async def _commit_many(spool: Spool, body: bytes, count: int) -> list[str]:
    return list(await asyncio.gather(*(spool.commit(make_envelope(), body) for _ in range(count))))
