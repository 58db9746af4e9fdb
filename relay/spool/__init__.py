"""The durable spool: every accepted message, its recipients and their state.

Purpose: the SMTP server hands each message to ``Spool.commit`` and replies
``250 2.0.0 Ok: queued as ID`` only when the returned awaitable finishes,
because only then is the message on stable storage (RFC 5321 section 6.1:
accepting a message means taking responsibility for it).  The scheduler
claims due recipients with ``Spool.claim``, reports each attempt with
``Spool.record_results`` and queues DSNs with ``Spool.commit(...,
dsn_for=...)``; ``relay queue`` inspects and changes the same database.

Storage: one SQLite database (standard-library ``sqlite3``) in WAL mode with
``synchronous=FULL`` under the ``[spool] path`` directory.  One writer thread
per process commits in batches (group commit): jobs that arrive while a
commit runs share the next transaction and its fsync.  Worker processes each
run their own writer, and the writers take turns through an flock on
``writer.lock`` in the spool directory.  Other programs that write (``relay
queue``) wait for SQLite's write lock up to the busy timeout.  Readers never
block writers.  A background thread copies
the WAL into the database (checkpoints) so commits do not wait for that copy
(see ``relay.spool.checkpoint``).  After a crash the next open replays the
WAL by itself, with no repair step, and every message whose commit had
returned is present.  The tests prove this for SIGKILL; after a power loss
it also needs a disk that honours fsync.

Limits, with their defaults (all set in ``[spool]``, see ``relay.config``):
``commit_batch_messages`` (512) and ``commit_batch_bytes`` (64 MiB) bound
one transaction, ``busy_timeout`` (10 s) bounds the wait for another
process's write lock, ``lease_time`` (30 min) is how long a claim holds its
recipients, and ``claim_body_max_bytes`` (64 KiB) is the largest body a
claim returns with its recipients.

Failures: disk full, an I/O error or a lock timeout raise ``SpoolError``,
which the server maps to ``452 4.3.1``; the failed transaction is rolled back
whole, so no partial message remains.  A record that cannot be decoded is
copied to ``DIR/corrupt/`` and deleted, with an error logged, never skipped
silently.  A message is deleted only when no recipient is queued, deferred
or held and every DSN it owes is itself in the spool, or when an operator
runs ``relay queue delete``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from relay.config import SpoolConfig
from relay.spool.errors import CorruptRecord, MessageNotFound, SpoolError
from relay.spool.ids import is_queue_id, message_key, new_queue_id, new_queue_id_and_key
from relay.spool.store import PendingCommit, ResultGroup, SpoolStore
from relay.spool.types import (
    Attempt,
    Claim,
    DeliveryResult,
    DsnRequest,
    DsnState,
    Envelope,
    Outcome,
    Recipient,
    RecipientState,
    StoredMessage,
    StoredRecipient,
    domain_of,
)
from relay.spool.writer import Writer

__all__ = [
    "Attempt",
    "Claim",
    "CorruptRecord",
    "DeliveryResult",
    "DsnRequest",
    "DsnState",
    "Envelope",
    "MessageNotFound",
    "Outcome",
    "Recipient",
    "RecipientState",
    "Spool",
    "SpoolError",
    "SpoolStore",
    "StoredMessage",
    "StoredRecipient",
    "domain_of",
    "is_queue_id",
    "new_queue_id",
]

# Defaults for callers without a config; SpoolConfig repeats them as config keys.
# 512 messages or 64 MiB keep one transaction (and so one reply delay) short
# while still sharing one fsync among hundreds of sessions.
_T = TypeVar("_T")

DEFAULT_BATCH_MESSAGES = 512
DEFAULT_BATCH_BYTES = 64 * 1024 * 1024
DEFAULT_BUSY_TIMEOUT = 10.0
# The sum of the RFC 5321 section 4.5.3.2 client timeouts in minutes: 5 greeting,
# 5 MAIL, 5 RCPT, 2 DATA, 3 data block, 10 end of data.  A transaction with many
# RCPT commands or data blocks can take longer, so the scheduler renews the lease
# while one runs (renew_lease).
DEFAULT_LEASE_TIME = 30 * 60.0
DEFAULT_CLAIM_BODY_MAX_BYTES = 64 * 1024


@dataclass
class _ResultsJob:
    """A writer job that records the results of every ``record_results`` call that joined it."""

    loop: asyncio.AbstractEventLoop
    groups: list[ResultGroup] = field(default_factory=list)
    future: asyncio.Future[list[int]] | None = None


class Spool:
    """An open spool: the writer thread plus two reader threads with their own connections.

    Create it with ``Spool.open(path)``.  The ``async`` methods do no I/O on the
    event loop's thread: writes go to the writer thread and reads to the reader
    threads.  ``commit_blocking`` serves callers without a loop.
    """

    def __init__(
        self,
        directory: Path,
        writer: Writer,
        busy_timeout: float,
        lease_time: float,
        claim_body_max_bytes: int = DEFAULT_CLAIM_BODY_MAX_BYTES,
    ) -> None:
        self.directory = directory
        self.lease_time = lease_time
        self.claim_body_max_bytes = claim_body_max_bytes
        self._writer = writer
        self._busy_timeout = busy_timeout
        # Two threads are enough because reads are short indexed lookups.
        self._readers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="relay-spool-reader")
        self._reader_local = threading.local()
        # Every reader thread's connection, so that ``close`` can close them.
        self._reader_stores: list[SpoolStore] = []
        # Results waiting for the writer job that records them all (see ``record_results``).
        self._results_lock = threading.Lock()
        self._results_open: _ResultsJob | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        batch_messages: int = DEFAULT_BATCH_MESSAGES,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        lease_time: float = DEFAULT_LEASE_TIME,
        claim_body_max_bytes: int = DEFAULT_CLAIM_BODY_MAX_BYTES,
        commit_delay: float = 0.0,
    ) -> Spool:
        """Open (creating if needed) the spool in directory ``path`` and start its writer.

        ``commit_delay`` applies to commits submitted with ``may_wait`` (see
        ``relay.spool.writer``).  Raises SpoolError when the directory or
        database cannot be opened.
        """
        directory = Path(path)
        writer = Writer(
            directory,
            busy_timeout=busy_timeout,
            batch_max_messages=batch_messages,
            batch_max_bytes=batch_bytes,
            commit_delay=commit_delay,
        )
        writer.start()
        return cls(directory, writer, busy_timeout, lease_time, claim_body_max_bytes)

    @classmethod
    def from_config(cls, config: SpoolConfig) -> Spool:
        """Open the spool that a ``[spool]`` config section describes."""
        return cls.open(
            config.path,
            batch_messages=config.commit_batch_messages,
            batch_bytes=config.commit_batch_bytes,
            busy_timeout=config.busy_timeout,
            lease_time=config.lease_time,
            claim_body_max_bytes=config.claim_body_max_bytes,
            commit_delay=config.commit_delay,
        )

    def close(self) -> None:
        """Finish the reads, close their connections, commit what is queued, then stop the writer.

        Blocks; see ``aclose``.  The writer's connection closes last, so that
        when it is the last one to the database it checkpoints the WAL and
        SQLite removes ``-wal`` and ``-shm``, leaving ``spool.db`` alone to
        hold every commit once the relay has stopped.
        """
        self._readers.shutdown(wait=True)
        for store in self._reader_stores:
            store.close()
        self._reader_stores.clear()
        self._writer.close()

    async def aclose(self) -> None:
        """Commit what is queued, then stop the writer, without blocking the loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    @property
    def committed_batches(self) -> int:
        """Transactions the writer has committed since the spool was opened."""
        return self._writer.batches

    @property
    def committed_jobs(self) -> int:
        """Changes (commits, claims, results, ...) inside those transactions."""
        return self._writer.jobs

    @property
    def background_checkpoints(self) -> int:
        """WAL checkpoints the background thread has run since the spool was opened."""
        return self._writer.checkpoints

    # -- the server -----------------------------------------------------------

    async def commit(
        self,
        envelope: Envelope,
        body: bytes,
        *,
        queue_id: str | None = None,
        dsn_for: DsnRequest | None = None,
    ) -> str:
        """Store a message durably and return its queue ID.

        Returns only after the transaction holding the message has committed,
        so the caller may then reply 250.  ``queue_id`` lets a caller log an ID
        chosen earlier (from ``new_queue_id``); the returned ID is the one
        stored and differs only after a clash.  ``dsn_for`` marks, in the same
        transaction, the original recipients whose DSN this message is.
        Raises SpoolError (reply ``452 4.3.1``), and ValueError for an envelope
        without recipients or a ``queue_id`` that is not a queue ID.  Cancelling
        the await does not withdraw the message.
        """
        loop = asyncio.get_running_loop()
        return await self.submit_commit(envelope, body, loop=loop, queue_id=queue_id, dsn_for=dsn_for)

    def submit_commit(
        self,
        envelope: Envelope,
        body: bytes,
        *,
        loop: asyncio.AbstractEventLoop,
        queue_id: str | None = None,
        dsn_for: DsnRequest | None = None,
        may_wait: bool = False,
    ) -> asyncio.Future[str]:
        """Queue a message like ``commit`` and return a future of ``loop`` for its queue ID.

        The future is resolved only after the commit is durable.  For callers on
        the hot path that already hold their loop: ``commit`` looks the loop up
        on each call, and in Python 3.11 that costs a getpid system call.
        ``may_wait`` lets the writer wait the spool's ``commit_delay`` for
        other messages to share the transaction.  Raises like ``commit`` when
        the message cannot be queued.
        """
        pending = self._pending(envelope, body, queue_id, dsn_for)
        return self._writer.commit_async(pending, loop, may_wait=may_wait)

    def commit_blocking(
        self,
        envelope: Envelope,
        body: bytes,
        *,
        queue_id: str | None = None,
        dsn_for: DsnRequest | None = None,
    ) -> str:
        """Store a message like ``commit``, blocking the calling thread until it is durable."""
        pending = self._pending(envelope, body, queue_id, dsn_for)
        return self._writer.commit_blocking(pending).result()

    def commit_with_failures_blocking(
        self,
        envelope: Envelope,
        body: bytes,
        failed: Mapping[int, str],
        *,
        queue_id: str | None = None,
        report: Callable[[StoredMessage], tuple[Envelope, bytes, tuple[int, ...]] | None] | None = None,
    ) -> str:
        """Store a message like ``commit_blocking``, with the recipients at the ``failed`` indexes bounced.

        Each failed recipient gets the reply it maps to, such as ``501 5.1.3
        Invalid recipient address syntax``, in the same transaction as the
        message, so no scheduler ever claims it.  Those that owe a DSN (by
        their NOTIFY, never for the null sender) get ``dsn = pending``.
        ``report`` then builds that DSN from the stored message, as the DSN's
        envelope, body and the indexes it reports on (or None for no DSN).
        It is queued in the same transaction too, so it goes out at once
        instead of at the scheduler's next look for owed DSNs (each
        ``delivery.queue_scan_interval``).
        ``relay sendmail`` uses this for recipients it cannot accept when
        others of the same message are valid.  Raises like ``commit``, and
        ValueError when an index is out of range or every recipient is
        failed, because such a message would be deleted at once.
        """
        count = len(envelope.recipients)
        if any(not 0 <= index < count for index in failed):
            raise ValueError(f"failed recipient index out of range for {count} recipients")
        if len(failed) >= count:
            raise ValueError("a message needs at least one recipient that has not failed")
        pending = self._pending(envelope, body, queue_id, None)

        def operation(store: SpoolStore) -> str:
            stored_id = store.insert_message(pending)
            results = [
                DeliveryResult(stored_id, index, Outcome.FAILED, reply) for index, reply in sorted(failed.items())
            ]
            store.record_results(results, None, pending.arrival)
            if report is None:
                return stored_id
            stored = store.load(stored_id)
            dsn = report(stored) if stored is not None else None
            if dsn is not None:
                dsn_envelope, dsn_body, indexes = dsn
                store.insert_message(self._pending(dsn_envelope, dsn_body, None, DsnRequest(stored_id, indexes)))
            return stored_id

        stored_id: str = self._writer.submit_blocking(operation).result()
        return stored_id

    @staticmethod
    def _pending(
        envelope: Envelope, body: bytes, queue_id: str | None, dsn_for: DsnRequest | None
    ) -> PendingCommit:
        if not envelope.recipients:
            raise ValueError("a message needs at least one recipient")
        if dsn_for is not None and envelope.original_queue_id is None:
            # Stored with the DSN, so the log can link it to the message it reports on.
            envelope = replace(envelope, original_queue_id=dsn_for.queue_id)
        arrival = time.time()
        if queue_id is None:
            queue_id, key = new_queue_id_and_key(arrival)
        elif is_queue_id(queue_id):
            key = message_key(queue_id)
        else:
            raise ValueError(f"invalid queue ID {queue_id!r}; use one from new_queue_id")
        return PendingCommit(
            envelope, body if type(body) is bytes else bytes(body), arrival, queue_id, dsn_for, key
        )

    # -- the scheduler --------------------------------------------------------

    async def claim(
        self,
        owner: str,
        *,
        limit: int = 100,
        lease_time: float | None = None,
        domain: str | None = None,
        now: float | None = None,
        bodies: bool = False,
        max_wait: float | None = None,
    ) -> list[Claim]:
        """Lease up to ``limit`` due recipients and return them grouped by message.

        A recipient is due when queued or deferred with ``next_attempt <= now``
        and not under a live lease.  ``max_wait`` is the longest wait the
        caller ever sets: with it, a recipient due further ahead than that, or
        a message that no claim has taken yet and arrived after ``now``, was
        stored before the clock was set back and is due too.  The lease lasts ``lease_time`` seconds
        (default: the spool's); until then no other claim, in this or another
        process, returns the recipient.  ``owner`` names the claimer in logs
        and starts the lease token (``OWNER#HEX``), so ``release_leases`` can
        end a dead owner's leases; it must not contain ``#``.
        ``domain`` limits the claim to recipients at that domain.
        With ``bodies`` each claim carries its message's body in ``Claim.body``
        when the body is at most ``claim_body_max_bytes`` octets, read in the
        same writer operation, so the caller needs no ``load_body`` for it.
        ``Claim.picked_up`` is set on the first claim of a message that ``relay
        sendmail`` stored, once per message.
        """
        if "#" in owner:
            raise ValueError(f"lease owner {owner!r} contains '#'")
        token = f"{owner}#{secrets.token_hex(8)}"
        seconds = self.lease_time if lease_time is None else lease_time
        body_max_bytes = self.claim_body_max_bytes if bodies else None

        def operation(store: SpoolStore) -> list[Claim]:
            moment = time.time() if now is None else now
            return store.claim(
                owner, token, now=moment, lease_time=seconds, limit=limit, domain=domain,
                body_max_bytes=body_max_bytes, max_wait=max_wait,
            )

        # A lease lost in a power failure only lets the recipients be claimed again,
        # so the claim skips the fsync (see relay.spool.writer).
        claims: list[Claim] = await self._writer.submit_async(operation, durable=False)
        return claims

    async def lease_owners(self) -> dict[str, int]:
        """Return each owner (as passed to ``claim``) holding live leases, with its number of leased recipients."""
        owners: dict[str, int] = await self._read(lambda store: store.lease_owners(time.time()))
        return owners

    async def release_leases(self, owner: str) -> int:
        """End every live lease of ``owner``, making its recipients due for claims again; return how many.

        For a scheduler that died holding leases: only the caller can tell
        that an owner is dead, and releasing a live owner's leases lets two
        schedulers deliver the same recipients.
        """
        count: int = await self._writer.submit_async(lambda store: store.release_leases(owner, time.time()))
        return count

    async def move_aside_orphans(self) -> list[str]:
        """Move every message without recipient rows to ``corrupt/``, logging each; return their queue IDs."""
        moved: list[str] = await self._writer.submit_async(lambda store: store.move_aside_orphans())
        return moved

    async def end_lease(self, queue_id: str, indexes: Sequence[int], lease_token: str) -> int:
        """End a claim's lease on some recipients of a message, so they can be claimed again; return how many."""
        count: int = await self._writer.submit_async(lambda store: store.end_lease(queue_id, indexes, lease_token))
        return count

    async def renew_lease(self, queue_id: str, indexes: Sequence[int], lease_token: str) -> float | None:
        """Extend a claim's live lease on some recipients by ``lease_time`` from now.

        Returns the new end of the lease, or None when the claim no longer
        holds every one of them (the lease ran out or was released, or a
        recipient was held, delivered or bounced); nothing is sent to those
        recipients then.  A partial renewal leaves the renewed ones leased
        until the new end, which only delays their next claim.
        """

        def operation(store: SpoolStore) -> float | None:
            now = time.time()
            until = now + self.lease_time
            return until if store.renew_lease(queue_id, indexes, lease_token, now=now, lease_until=until) else None

        # Like a claim, a renewal lost in a power failure only lets the recipients be claimed again.
        until: float | None = await self._writer.submit_async(operation, durable=False)
        return until

    async def record_delivered_targets(
        self, queue_id: str, index: int, targets: Sequence[str], lease_token: str
    ) -> bool:
        """Store durably which local delivery targets of one leased recipient have the message; return whether stored.

        The state, attempt count, due time and lease stay as they are.
        Nothing is stored, and False returned, once ``lease_token`` no longer
        holds a live lease on a pending recipient.
        """
        stored: bool = await self._writer.submit_async(
            lambda store: store.record_delivered_targets(queue_id, index, targets, lease_token, time.time())
        )
        return stored

    async def record_results(
        self, results: Sequence[DeliveryResult], *, lease_token: str | None = None, now: float | None = None
    ) -> int:
        """Store the outcome of delivery attempts durably; return how many took effect.

        Delivered and failed recipients become final (failed ones bounced), and
        those that owe the sender a DSN get ``dsn = pending``.  Deferred ones
        wait for their ``next_attempt`` and keep their DSN state, unless
        ``delay_warning`` makes a delay warning owed.  The lease on each reported recipient
        ends.  A message whose recipients are all final and owe no DSN is
        deleted in the same transaction.  Results for recipients already final
        are ignored (and logged).  Raises ValueError for a deferral without
        ``next_attempt``.  Calls from one event loop made before the writer
        starts on the first of them share one writer job, so a SpoolError in
        that job fails all of them.
        """
        batch = tuple(results)
        for result in batch:
            if result.outcome is Outcome.DEFERRED and result.next_attempt is None:
                raise ValueError(f"deferred result for {result.queue_id}[{result.index}] needs next_attempt")
        loop = asyncio.get_running_loop()
        group = ResultGroup(batch, lease_token, time.time() if now is None else now)
        with self._results_lock:
            # Calls made while the writer has not yet started the queued job join it,
            # so the results of many transactions share one writer job.
            job = self._results_open
            if job is None or job.loop is not loop:
                job = _ResultsJob(loop)
                job.future = self._writer.submit_async(lambda store: self._record_job(store, job))
                self._results_open = job
            job.groups.append(group)
            position = len(job.groups) - 1
            future = job.future
        assert future is not None
        counts: list[int] = await future
        return counts[position]

    def _record_job(self, store: SpoolStore, job: _ResultsJob) -> list[int]:
        # Runs in the writer thread.  From here on, calls start the next job.
        with self._results_lock:
            if self._results_open is job:
                self._results_open = None
        return store.record_result_groups(job.groups)

    async def pending_dsns(self, limit: int = 100) -> list[StoredMessage]:
        """Return messages with recipients that owe a DSN not yet queued (``dsn = pending``), due now.

        After a crash between recording a failure and committing its DSN, or
        after a failure that another process recorded, this is how the
        scheduler finds the DSNs still to send.  A message whose owed DSNs
        ``defer_dsn`` put off is left out until the earliest ``dsn_due``.
        Messages that cannot be decoded are moved aside and left out.
        """
        now = time.time()

        def operation(store: SpoolStore) -> list[StoredMessage | CorruptRecord]:
            # The scheduler calls this every queue_scan_interval, so it reads only
            # the messages that owe a DSN, never the whole spool.
            return list(store.messages(store.dsn_queue_ids(now, limit)))

        messages: list[StoredMessage] = []
        for item in await self._read(operation):
            if isinstance(item, CorruptRecord):
                await self._move_aside(item)
            else:
                messages.append(item)
        return messages

    async def defer_dsn(self, queue_id: str, indexes: Sequence[int], until: float) -> int:
        """Count a failed attempt to queue the DSN owed for ``indexes`` and put it off until ``until``.

        Returns how many recipients still owed it.  Raises SpoolError.
        """
        count: int = await self._writer.submit_async(lambda store: store.defer_dsn(queue_id, indexes, until))
        return count

    async def load(self, queue_id: str) -> StoredMessage | None:
        """Return a message's envelope and recipients, or None if it is not in the spool.

        A message whose record cannot be decoded is moved aside and reported
        as CorruptRecord.
        """
        try:
            return await self._read(lambda store: store.load(queue_id))
        except CorruptRecord as exc:
            await self._move_aside(exc)
            raise

    async def load_body(self, queue_id: str) -> bytes:
        """Return a message's body, checked against its CRC-32.

        Raises MessageNotFound, or CorruptRecord after moving the message aside.
        """
        try:
            return await self._read(lambda store: store.load_body(queue_id))
        except CorruptRecord as exc:
            await self._move_aside(exc)
            raise

    # -- operator actions (also available synchronously through SpoolStore) ---

    async def hold(self, queue_id: str) -> int:
        """Hold a message's pending recipients; return how many. Raises MessageNotFound."""
        count: int = await self._writer.submit_async(lambda store: store.hold(queue_id, time.time()))
        return count

    async def release(self, queue_id: str) -> int:
        """Release a message's held recipients, due now; return how many. Raises MessageNotFound."""
        count: int = await self._writer.submit_async(lambda store: store.release(queue_id, time.time()))
        return count

    async def flush(self, queue_id: str | None = None, domain: str | None = None) -> int:
        """Make pending recipients due now (one message, one domain or all); return how many."""
        count: int = await self._writer.submit_async(
            lambda store: store.flush(time.time(), queue_id=queue_id, domain=domain)
        )
        return count

    async def move_due_earlier(self, seconds: float) -> int:
        """Make every pending recipient due ``seconds`` sooner, but not before now; return how many changed.

        For a clock set back by ``seconds``, so that each recipient waits as
        long as its deferral meant and not that much longer.
        """
        count: int = await self._writer.submit_async(lambda store: store.move_due_earlier(seconds, time.time()))
        return count

    async def delete(self, queue_id: str) -> None:
        """Delete a message without sending any DSN. Raises MessageNotFound."""
        await self._writer.submit_async(lambda store: store.delete(queue_id))

    # -- internals -------------------------------------------------------------

    async def _read(self, operation: Callable[[SpoolStore], _T]) -> _T:
        # Reads run on the spool's reader threads, each with its own connection, so
        # they neither block the event loop nor wait behind the writer's batches.
        def run() -> _T:
            store: SpoolStore | None = getattr(self._reader_local, "store", None)
            if store is None:
                # Used by this thread only, but closed by ``close`` from another
                # one once the reader threads have ended.
                store = SpoolStore(self.directory, busy_timeout=self._busy_timeout, check_same_thread=False)
                self._reader_local.store = store
                self._reader_stores.append(store)
            return operation(store)

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    async def _move_aside(self, error: CorruptRecord) -> None:
        await self._writer.submit_async(lambda store: store.move_aside(error.queue_id, error.reason))
