"""The delivery scheduler: claims due recipients from the spool and delivers them.

One ``Scheduler`` runs per relay, as an asyncio task in the delivery
process or in the only worker (``asyncio.create_task(scheduler.run())``,
ended by ``await scheduler.stop()``).

Cycle: claim due recipients with a lease (``Spool.claim``), route each one
(``relay.delivery.router``), and queue a job per message, route and group of
at most ``recipients_per_transaction`` (50, Postfix's
``smtp_destination_recipient_limit``) on the destination's queue.  Each
destination runs at most ``destination_concurrency_limit`` (20) workers and
all destinations together at most ``connection_limit`` (100) sessions.  A
worker sends job after job over one session and parks the session for the
next worker when its queue is empty.  While it sends a job it takes the next
one of the same route, so the client can pipeline that job's commands after
the body (``SMTPSession.send``).  New mail wakes the scheduler, and a wake-up
within ``claim_min_interval`` (10 ms) of the last claim waits for the rest of
that interval, so that mail arriving together shares one claim.

Retries: a deferred recipient waits ``minimal_backoff_time`` (300 s) times
two to the number of earlier attempts, plus up to a quarter more at random
so retries spread out, and never more than ``maximal_backoff_time`` (4 h).
When ``destination_failure_limit`` (1) sessions in a row to a destination
fail before any transaction, the destination itself is backed off: its
queued and newly claimed recipients are deferred to the same time without a
connection.  A recipient still undelivered ``maximal_queue_lifetime`` (5 d)
after arrival fails with its last temporary reply, or after
``bounce_queue_lifetime`` (5 d) for a message with the null reverse-path.
No retry is put off past that lifetime.  A backoff that would end later
ends at it, and that last attempt bounces the recipient unless it delivers.
The scheduler keeps a destination's queue, backoff and failure count in
memory only while they matter: with no job, no backoff running and no
failure in the last ``maximal_backoff_time``, the entry is dropped.

After results are recorded, the spool marks recipients that owe a DSN; the
scheduler builds those DSNs (``relay.delivery.dsn``) and commits them as new
messages.  It waits until no job of the message is left in memory, so the
recipients of one claim that fail at different destinations share one DSN.
It looks for owed DSNs after its own failures and at least once per
``queue_scan_interval``, so a DSN owed for a failure that another
process recorded is queued within that interval.  A DSN that cannot be
queued because of a spool error waits like a deferred recipient, from
``minimal_backoff_time`` doubled at each failure up to
``maximal_backoff_time``, and the spool keeps that wait, so a look for owed
DSNs skips it meanwhile.  A failed message from the null sender gets no DSN; with
``bounce_copy_to_postmaster`` it is copied to postmaster instead.  A
recipient delivered to a next hop that offers DSN gets no success DSN from
here, because the NOTIFY parameter went on with it and that hop reports
(RFC 3461 section 5.2.1).  When ``delay_warning_time`` is set (off by
default), a recipient deferred after waiting that long since arrival owes
one ``Action: delayed`` DSN; the spool sends it at most once per recipient
and only when NOTIFY is absent or contains DELAY.  The check runs at each
attempt, so the warning comes with the first deferral past that time.

Leases: the scheduler claims under an owner name that identifies its
process (``relay.delivery.owner``).  On start it releases the leases of
owners on this host whose process no longer runs (a scheduler killed with
SIGKILL), so their recipients do not wait out ``spool.lease_time``; a live
scheduler's leases are never touched.  On stop it releases its own.  No
transaction outlives its lease, so no other claim can get its recipients
while it runs:

- A job whose lease ran out while it waited in memory is not sent.
- While a worker opens a session and sends a job, ``_LeaseKeeper`` renews
  the lease of the job and of the next job pipelined after it
  (``RENEW_AFTER``, every 10 of the 30 minutes), and cuts the session off
  without QUIT when a renewal finds a lease lost, or when renewals fail
  until ``LEASE_MARGIN`` of it is left.  A session to a backup MX runs
  under a keeper of its own in the same way, for the recipients it sends.
  A transaction that ends within the first third of the lease costs no
  spool write for this.
- A session cut off or failed in the middle of a transaction keeps the
  results that replies decided before: a 5xx to RCPT fails its recipient
  and a 4xx defers it.  A 250 to RCPT decides nothing, because only the
  reply to the end of data delivers.

Clock steps: the spool stores due times in wall-clock time, and the
scheduler keeps destination backoffs in monotonic time.  When the wall clock
is set back while the scheduler runs, it moves every due time back by the
same step.  A claim also takes a recipient due more than
``maximal_backoff_time`` ahead, because no deferral waits that long, and a
message that no claim has taken yet, even when it arrived after now.  That
covers a step taken while the relay was stopped.

Every attempt result is logged as one line: queue ID, recipient, relay,
delay, DSN status and the reply.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import time
import traceback
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from relay.config import Config, DeliveryConfig
from relay.delivery.client import (
    OutboundMessage,
    OutboundRecipient,
    RecipientResult,
    SessionError,
    SMTPSession,
    Timeouts,
)
from relay.delivery.dns import DEFAULT_LOOKUP_CONCURRENCY, LookupFailure, MXResolver
from relay.delivery.dsn import build_report, status_of
from relay.delivery.local import LocalProgress, already_delivered, deliver_local, delivered_reply
from relay.delivery.maildir import LocalDelivery
from relay.delivery.owner import owner_is_dead, scheduler_owner
from relay.delivery.router import ERROR, LOCAL, Route, Router
from relay.delivery.sessions import SessionPool
from relay.log import RepeatCounter, log_event
from relay.spool import (
    Claim,
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
    StoredMessage,
    StoredRecipient,
    domain_of,
)
from relay.spool.store import FLUSH_REQUEST

logger = logging.getLogger("relay.delivery")

# Jobs held in memory per allowed connection: enough to keep every session
# busy between claims without leasing the whole queue at once.
JOBS_PER_CONNECTION = 4
# How long ``stop`` lets running transactions finish before cancelling them.
STOP_GRACE = 10.0
# How long a transaction cancelled by ``stop`` may take to store the results that
# replies decided before.  One record waits for one writer batch, normally a few
# milliseconds, and this bound keeps a stuck spool from holding up the shutdown.
STOP_RECORD_TIME = 5.0
# Messages owing a DSN that one pass of the loop reads and queues DSNs for.
DSN_BATCH = 100
# A job that waited longer than this in memory reads its recipients' state again
# before it is sent, so that a hold or delete since the claim takes effect.
RECHECK_AFTER = 1.0
# Share of ``spool.lease_time`` left when a session is cut off because its lease
# renewals keep failing, so that its results are recorded under the lease.  It
# is 3 of the default 30 minutes, far more than a record waits for the spool's
# writer (its busy timeout is 10 s).
LEASE_MARGIN = 0.1
# Share of ``spool.lease_time`` after which the lease of a job being sent is
# renewed, and then renewed again: every 10 of the default 30 minutes.  A
# renewal that fails with a spool error is tried again a third later, unless
# the session was cut off at ``LEASE_MARGIN`` before that.
RENEW_AFTER = 1 / 3
# Share of a backoff added at random, so that recipients deferred together are
# not retried together; the sum stays within maximal_backoff_time.
BACKOFF_JITTER = 0.25
# Seconds that the wall clock may fall behind the monotonic clock between two
# passes of the loop before the scheduler takes it for a step back (by an
# operator, or NTP at start).  Slewing moves it at most 0.5 ms a second.
CLOCK_STEP = 1.0
# Seconds between two log lines of a failing claim, and likewise of a failing
# look for owed DSNs.  Both fail again at every pass of the loop while their
# cause (a damaged or unreadable spool) lasts, so a line carries the count of
# failures since the one before.
SPOOL_FAILURE_LOG_INTERVAL = 60.0


@dataclass(eq=False, slots=True)
class Job:
    """Recipients of one message that go out in one transaction over one route."""

    claim: Claim
    route: Route
    recipients: tuple[StoredRecipient, ...]
    # time.time() when the lease on ``recipients`` ends: the claim's, moved on by each renewal.
    lease_until: float = field(init=False)

    def __post_init__(self) -> None:
        self.lease_until = self.claim.lease_until


class LeaseCutOff(Exception):
    """A session was cut off because the lease of a job it was sending is lost or about to end."""


class _CutOffScope:
    """The ``async with`` block of ``_LeaseKeeper.cutoff``: an asyncio timeout that the keeper moves.

    A class rather than a generator-based context manager, because every job
    enters one or two of these, and a generator nearly doubles their cost.
    """

    __slots__ = ("_keeper", "_timeout")

    def __init__(self, keeper: _LeaseKeeper) -> None:
        self._keeper = keeper
        self._timeout = asyncio.timeout_at(keeper._cut_at)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self._keeper._scope = self._timeout

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._keeper._scope = None
        try:
            await self._timeout.__aexit__(exc_type, exc, traceback)
        except TimeoutError:
            # The timeout turns the cancellation into TimeoutError; only its own expiry is a cut-off.
            if self._timeout.expired():
                raise LeaseCutOff from None
            raise


class _LeaseKeeper:
    """Renew the leases of the jobs one worker is sending, and cut its session off when one is lost.

    A timer fires ``RENEW_AFTER`` of ``spool.lease_time`` after the earliest
    of the leases was set, and then renews every job's lease, so a
    transaction that ends sooner costs no spool write.  Work awaited in
    ``cutoff()`` raises LeaseCutOff when a renewal finds a lease lost (it ran
    out, another claim took it, or an operator held or deleted the message),
    or when renewals keep failing until ``LEASE_MARGIN`` of the lease is left.
    """

    def __init__(self, scheduler: Scheduler, job: Job) -> None:
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        self._lease_time = scheduler.spool.lease_time
        self._jobs = [job]
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        # Loop time at which work in ``cutoff()`` is cancelled; None while the leases are renewed in time.
        self._cut_at: float | None = None
        self._scope: asyncio.Timeout | None = None
        self._closed = False
        self._schedule(job.lease_until - self._lease_time * (1 - RENEW_AFTER))

    def add(self, job: Job) -> None:
        """Keep the lease of ``job`` too: the next job, whose commands go out over the same session."""
        self._jobs.append(job)
        self._schedule(job.lease_until - self._lease_time * (1 - RENEW_AFTER))

    def close(self) -> None:
        """Stop renewing; a renewal already running still finishes."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def cutoff(self) -> _CutOffScope:
        """Return a block that is cancelled with LeaseCutOff when a lease is lost or about to end."""
        return _CutOffScope(self)

    def _schedule(self, when: float) -> None:
        """Renew at ``when`` (time.time()), unless a renewal is due earlier."""
        at = self._loop.time() + (when - time.time())
        if self._closed or (self._timer is not None and self._timer_when <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._renew_due)
        self._timer_when = at

    def _cut_off_at(self, when: float | None) -> None:
        self._cut_at = when
        if self._scope is not None:
            self._scope.reschedule(when)

    def _renew_due(self) -> None:
        self._timer = None
        if self._closed:
            return
        # Should the renewal hang or fail, the session still ends LEASE_MARGIN
        # before the leases do.  A job that waited in memory until less than
        # that was left is cut off at the end of its lease instead, because
        # this renewal is its first chance to be renewed.
        left = min(job.lease_until for job in self._jobs) - time.time()
        margin = self._lease_time * LEASE_MARGIN
        self._cut_off_at(self._loop.time() + (left - margin if left > margin else left))
        self._scheduler._spawn(self._renew())

    async def _renew(self) -> None:
        renewed = True
        for job in list(self._jobs):
            claim = job.claim
            indexes = [recipient.index for recipient in job.recipients]
            try:
                until = await self._scheduler.spool.renew_lease(claim.queue_id, indexes, claim.lease_token)
            except SpoolError as exc:
                log_event(logger, "lease_renew_failed", logging.WARNING, queue_id=claim.queue_id, error=str(exc))
                renewed = False
                continue
            if self._closed:
                # The transaction ended meanwhile, and recording its results ended the lease.
                return
            if until is None:
                log_event(logger, "lease_lost", logging.WARNING, queue_id=claim.queue_id, owner=self._scheduler.owner)
                self._cut_off_at(self._loop.time())
                return
            job.lease_until = until
        if self._closed:
            return
        if renewed:
            self._cut_off_at(None)
        self._schedule(time.time() + self._lease_time * RENEW_AFTER)


@dataclass
class _Destination:
    queue: collections.deque[Job] = field(default_factory=collections.deque)
    workers: int = 0
    failures: int = 0  # sessions in a row that failed before any transaction
    # time.monotonic(), so that setting the wall clock back does not lengthen a backoff.
    suspended_until: float = 0.0
    last_failure: float = 0.0  # time.monotonic() of the last of those failures

    def idle(self, now: float, failure_memory: float) -> bool:
        """Return whether the entry holds nothing in force, so dropping it changes no decision.

        That is no queued job, no worker, no backoff running, and no failure
        count from the last ``failure_memory`` seconds, which the next
        failure's backoff would grow from.
        """
        if self.queue or self.workers or self.suspended_until > now:
            return False
        return self.failures == 0 or now - self.last_failure >= failure_memory


def backoff_delay(attempts: int, minimum: float, maximum: float, jitter: float) -> float:
    """Return the wait before the next attempt after ``attempts`` earlier ones.

    ``jitter`` in [0, 1) adds up to a quarter of the delay, but the result
    never passes ``maximum``, which is a hard cap like Postfix's
    maximal_backoff_time.
    """
    delay = minimum * float(2 ** min(attempts, 32))
    return min(maximum, delay * (1.0 + BACKOFF_JITTER * jitter))


def log_picked_up(claim: Claim) -> None:
    """Log ``picked_up`` for the first claim of a message that ``relay sendmail`` stored.

    That command's own ``received`` line reaches no log, so this is the
    message's first line in the relay's log, as Postfix's pickup logs mail
    from its sendmail.  A DSN that relay sendmail queued for the recipients
    it rejected names the original message as ``original_queue_id``.
    """
    envelope = claim.envelope
    fields: dict[str, Any] = {
        "queue_id": claim.queue_id,
        "sender": envelope.sender,
        "recipients": len(claim.recipients),
        "size": claim.size,
        "protocol": envelope.protocol,
    }
    if envelope.original_queue_id is not None:
        fields["original_queue_id"] = envelope.original_queue_id
    log_event(logger, "picked_up", **fields)


def _make_resolver(delivery: DeliveryConfig) -> MXResolver:
    # mx_address_limit = 0 lifts the address limit, but the lookups stay bounded.
    concurrency = delivery.mx_address_limit or DEFAULT_LOOKUP_CONCURRENCY
    return MXResolver(delivery.nameservers, timeout=delivery.dns_timeout, lookup_concurrency=concurrency)


def _wall_time(moment: float) -> float:
    """Return the time.time() value for a time.monotonic() ``moment``."""
    return time.time() + (moment - time.monotonic())


class Scheduler:
    """Deliver what the spool holds, within the configured limits, until stopped."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        *,
        resolver: MXResolver | None = None,
        owner: str | None = None,
    ) -> None:
        delivery = config.delivery
        self.config = config
        self.spool = spool
        self.owner = owner or scheduler_owner()
        self.router = Router(config)
        self.local = LocalDelivery.from_config(config.local)
        # A resolver passed in (by tests) is kept across reloads.
        self._own_resolver = resolver is None
        self.resolver = resolver or _make_resolver(delivery)
        self.sessions = self._session_pool(config, self.resolver)
        self._connections = asyncio.Semaphore(delivery.connection_limit)
        # Tasks that hold connection slots taken away by a reload that lowered the limit.
        self._slot_holders: set[asyncio.Task[bool]] = set()
        self._retired_pools: set[asyncio.Task[None]] = set()
        # Entries come and go with the jobs: an idle one is dropped (``_prune_destination``),
        # so the table holds only destinations with work or a backoff in force.
        self._destinations: dict[str, _Destination] = {}
        self._last_prune = 0.0  # time.monotonic() of the last sweep for idle entries
        self._flush_request_path = spool.directory / FLUSH_REQUEST
        # A flush from before this scheduler started has nothing to lift.
        self._flush_request_seen = self._flush_request_stamp()
        self._jobs_in_memory = 0
        # Jobs in memory per queue ID.  A message with one here gets no DSN yet,
        # so recipients that fail in the same claim share one DSN.
        self._jobs_by_message: collections.Counter[str] = collections.Counter()
        # Queue IDs whose DSN waits for the message's last job in memory to end.
        self._dsn_held: set[str] = set()
        self._max_jobs = delivery.connection_limit * JOBS_PER_CONNECTION
        self._wake = asyncio.Event()
        self._last_claim = 0.0  # time.monotonic() when the last claim started
        self._dsn_due = True
        self._last_dsn_scan = 0.0  # time.monotonic() of the last look for owed DSNs
        self._claim_failures = RepeatCounter(SPOOL_FAILURE_LOG_INTERVAL)
        self._dsn_scan_failures = RepeatCounter(SPOOL_FAILURE_LOG_INTERVAL)
        self._stopping = False
        self._running = False
        self._run_ended = asyncio.Event()
        self._workers: set[asyncio.Task[None]] = set()
        self._random = random.Random()
        self._clock_offset = time.time() - time.monotonic()

    def _session_pool(self, config: Config, resolver: MXResolver) -> SessionPool:
        delivery = config.delivery
        return SessionPool(
            resolver,
            config.server.hostname,
            Timeouts.from_config(delivery),
            ca_file=delivery.tls_ca_file,
            tls_min_version=delivery.tls_min_version,
            tls_mandatory_min_version=delivery.tls_mandatory_min_version,
            cache_time=delivery.connection_cache_time,
            address_limit=delivery.mx_address_limit,
            allow_loopback_mx=delivery.allow_loopback_mx,
            chunking=delivery.chunking,
            line_length_limit=delivery.line_length_limit,
            reply_line_limit=delivery.reply_line_limit,
            mime_downgrade=delivery.mime_downgrade,
        )

    @staticmethod
    def check_config(config: Config) -> None:
        """Build the routing and local delivery of ``config`` without using them, raising what ``apply_config`` would.

        Every process of ``relay serve`` runs this on a reload, so a config
        that the scheduler cannot use is rejected by the listeners too.
        """
        Router(config)
        LocalDelivery.from_config(config.local)
        # Without nameservers it reads the system's resolver configuration, which may be missing.
        MXResolver(config.delivery.nameservers, timeout=config.delivery.dns_timeout)

    def apply_config(self, config: Config) -> None:
        """Route and deliver with a reloaded config from the next claim on.

        Routing, local delivery, the nameservers, the outbound timeouts, the
        CA file and the connection limit all change.  Deliveries in flight
        finish with the settings they started with, and sessions open at the
        reload keep their timeouts until they close.  Parked sessions are
        closed, so the next message opens one with the new settings.
        """
        old = self.config.delivery
        delivery = config.delivery
        # Everything that can fail is built before anything changes, so a
        # failed reload leaves the running settings whole.
        router = Router(config)
        local = LocalDelivery.from_config(config.local)
        resolver = self.resolver
        resolver_settings = (delivery.nameservers, delivery.dns_timeout, delivery.mx_address_limit)
        if self._own_resolver and resolver_settings != (old.nameservers, old.dns_timeout, old.mx_address_limit):
            resolver = _make_resolver(delivery)
        sessions = self._session_pool(config, resolver)

        self.config = config
        self.router = router
        self.local = local
        self.resolver = resolver
        retired = self.sessions
        self.sessions = sessions
        closing = asyncio.get_running_loop().create_task(retired.close())
        self._retired_pools.add(closing)
        closing.add_done_callback(self._retired_pools.discard)

        self._resize_connections(delivery.connection_limit - old.connection_limit)
        self._max_jobs = delivery.connection_limit * JOBS_PER_CONNECTION

    def _resize_connections(self, change: int) -> None:
        """Add ``change`` (negative: remove) connection slots, keeping the semaphore that open sessions release."""
        for _ in range(max(0, change)):
            self._connections.release()
        for _ in range(max(0, -change)):
            # The slot is taken as soon as a session gives one back, and never returned.
            holder = asyncio.get_running_loop().create_task(self._connections.acquire())
            self._slot_holders.add(holder)

    def wake(self) -> None:
        """Look for due recipients now instead of at the next scan."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and deliver until ``stop`` is called."""
        log_event(logger, "scheduler_start", owner=self.owner)
        self._running = True
        try:
            await self._release_dead_leases()
            await self._move_aside_orphans()
            await self._loop()
        finally:
            self._run_ended.set()
        log_event(logger, "scheduler_stop", owner=self.owner)

    async def _loop(self) -> None:
        interval = self.config.delivery.queue_scan_interval
        while not self._stopping:
            await self._follow_clock_step()
            now = time.monotonic()
            # Other processes record failures too (relay sendmail, or a scheduler
            # that died before queuing the DSN) without notifying this one, so
            # owed DSNs are also looked for once per interval.
            if self._dsn_due or now - self._last_dsn_scan >= interval:
                self._dsn_due = False
                self._last_dsn_scan = now
                await self._queue_dsns()
            self._prune_destinations()
            claimed_full = await self._claim_once()
            if claimed_full:
                continue
            self._wake.clear()
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                continue
            await self._space_claims()

    async def _follow_clock_step(self) -> None:
        """Move the spool's due times back by as much as the wall clock was set back since the last pass.

        The spool stores next attempts in wall-clock time, so without this a
        recipient deferred for five minutes before the clock went back an
        hour would wait an hour and five minutes.
        """
        offset = time.time() - time.monotonic()
        step = self._clock_offset - offset
        self._clock_offset = offset
        if step <= CLOCK_STEP:
            return
        try:
            moved = await self.spool.move_due_earlier(step)
        except SpoolError as exc:
            # The claim's max_wait still bounds the wait at maximal_backoff_time.
            log_event(logger, "clock_step_failed", logging.ERROR, seconds=round(step, 3), error=str(exc))
            return
        log_event(logger, "clock_set_back", logging.WARNING, seconds=round(step, 3), recipients=moved)

    async def _space_claims(self) -> None:
        """After a wake-up, wait until ``claim_min_interval`` has passed since the last claim.

        Under a steady stream of new mail every commit wakes the scheduler,
        and a claim per wake-up would take one or two messages, each claim a
        spool transaction of its own.  Waiting collects the mail of the
        interval into one claim.  Mail after a quiet spell is claimed at once.
        """
        delay = self._last_claim + self.config.delivery.claim_min_interval - time.monotonic()
        if delay > 0 and not self._stopping:
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Stop claiming, let running transactions finish (up to ``STOP_GRACE`` s), close sessions.

        A transaction still running then is cancelled, and the results that
        replies decided before are stored (for up to ``STOP_RECORD_TIME`` s).
        A cancelled local delivery first waits for its Maildir write or
        forwarded copy in flight, within the same bound, and stores which
        targets have the message.
        Then this scheduler's leases are released, so the recipients still
        queued in memory, and the undecided ones of cancelled transactions,
        are due again at once for the next scheduler.
        """
        self._stopping = True
        self._wake.set()
        if self._running:
            # A claim in progress may still hand out jobs; wait for it to end.
            await self._run_ended.wait()
        for destination in self._destinations.values():
            destination.queue.clear()
        if self._workers:
            _, pending = await asyncio.wait(self._workers, timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.sessions.close()
        for holder in self._slot_holders:
            holder.cancel()
        await asyncio.gather(*self._slot_holders, *self._retired_pools, return_exceptions=True)
        try:
            released = await self.spool.release_leases(self.owner)
        except SpoolError as exc:
            log_event(logger, "lease_release_failed", logging.ERROR, owner=self.owner, error=str(exc))
            return
        if released:
            log_event(logger, "leases_released", owner=self.owner, recipients=released)

    async def _release_dead_leases(self) -> None:
        try:
            owners = await self.spool.lease_owners()
            for owner in owners:
                if owner == self.owner or not owner_is_dead(owner):
                    continue
                released = await self.spool.release_leases(owner)
                log_event(logger, "leases_released", logging.WARNING, owner=owner, recipients=released,
                          reason="owner process no longer runs")
        except SpoolError as exc:
            # The leases then run out after spool.lease_time instead.
            log_event(logger, "lease_release_failed", logging.ERROR, error=str(exc))

    async def _move_aside_orphans(self) -> None:
        # No claim selects a message whose recipient rows are gone, so it is
        # looked for here, once per start, and each one logs corrupt_moved_aside.
        try:
            await self.spool.move_aside_orphans()
        except (SpoolError, OSError) as exc:
            # OSError: the corrupt/ folder or its files could not be written.
            log_event(logger, "orphan_scan_failed", logging.ERROR, error=str(exc))

    # -- claiming and queueing ------------------------------------------------

    async def _claim_once(self) -> bool:
        room = self._max_jobs - self._jobs_in_memory
        if room <= 0:
            return False
        self._check_flush_request()
        self._last_claim = time.monotonic()
        try:
            # Small bodies come with the claim, which saves a read per message.  At
            # most max_jobs claims of claim_body_max_bytes each are held at once.
            # Every wait that _record sets is within maximal_backoff_time, so a
            # recipient due later than that was deferred before the clock was set back.
            claims = await self.spool.claim(
                self.owner, limit=room, bodies=True, max_wait=self.config.delivery.maximal_backoff_time
            )
        except SpoolError as exc:
            failures = self._claim_failures.note()
            if failures is not None:
                log_event(logger, "claim_failed", logging.ERROR, error=str(exc), failures=failures)
            return False
        claimed = 0
        for claim in claims:
            claimed += len(claim.recipients)
            if claim.picked_up:
                log_picked_up(claim)
            self._dispatch(claim)
        return claimed >= room

    def _prune_destinations(self) -> None:
        """Drop every idle destination entry, at most once per ``queue_scan_interval``.

        Workers drop their destination's entry when they leave it idle.  This
        sweep drops the entries that stayed for a backoff or a failure count,
        once that has run out.
        """
        now = time.monotonic()
        if now - self._last_prune < self.config.delivery.queue_scan_interval:
            return
        self._last_prune = now
        memory = self.config.delivery.maximal_backoff_time
        for name in [name for name, entry in self._destinations.items() if entry.idle(now, memory)]:
            del self._destinations[name]

    def _prune_destination(self, name: str, destination: _Destination) -> None:
        """Drop ``name``'s entry when it is ``destination`` and idle."""
        if self._destinations.get(name) is destination and destination.idle(
            time.monotonic(), self.config.delivery.maximal_backoff_time
        ):
            del self._destinations[name]

    def _check_flush_request(self) -> None:
        """Lift every destination's backoff when ``relay queue flush`` ran since the last check.

        Like ``postqueue -f``, a flush requests delivery now, also to
        destinations whose connections failed.  Without this, the flushed
        recipients would be deferred again until the backoff ran out.
        """
        stamp = self._flush_request_stamp()
        if stamp is None or stamp == self._flush_request_seen:
            return
        self._flush_request_seen = stamp
        lifted = 0
        for destination in self._destinations.values():
            if destination.suspended_until or destination.failures:
                lifted += 1
            destination.suspended_until = 0.0
            destination.failures = 0
        log_event(logger, "flush_requested", destinations_lifted=lifted)

    def _flush_request_stamp(self) -> tuple[int, int, int] | None:
        """Return the flush request file's (inode, mtime, size), or None while there is none."""
        try:
            info = os.stat(self._flush_request_path)
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def _dispatch(self, claim: Claim) -> None:
        by_route: dict[Route, list[StoredRecipient]] = {}
        for recipient in claim.recipients:
            route = self.router.route(domain_of(recipient.address))
            by_route.setdefault(route, []).append(recipient)
        size = self.config.delivery.recipients_per_transaction
        for route, recipients in by_route.items():
            for start in range(0, len(recipients), size):
                self._enqueue(Job(claim, route, tuple(recipients[start : start + size])))

    def _enqueue(self, job: Job) -> None:
        self._jobs_in_memory += 1
        self._jobs_by_message[job.claim.queue_id] += 1
        if job.route.kind == ERROR:
            self._spawn(self._fail_job(job))
            return
        destination = self._destinations.setdefault(job.route.destination, _Destination())
        destination.queue.append(job)
        limit = self.config.delivery.destination_concurrency_limit
        if destination.workers < min(limit, len(destination.queue)):
            destination.workers += 1
            self._spawn(self._worker(job.route.destination, destination))

    def _job_done(self, job: Job) -> None:
        """Count ``job`` out of memory, whether it was recorded or dropped."""
        self._jobs_in_memory -= 1
        queue_id = job.claim.queue_id
        self._jobs_by_message[queue_id] -= 1
        if self._jobs_by_message[queue_id] > 0:
            return
        del self._jobs_by_message[queue_id]
        if queue_id in self._dsn_held:
            self._dsn_held.discard(queue_id)
            self._dsn_due = True
            self._wake.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    async def _fail_job(self, job: Job) -> None:
        try:
            await self._record(job, [(r, Outcome.FAILED, job.route.error) for r in job.recipients], "")
        except Exception as exc:
            # NOTE: no test reaches this branch, because _record handles every
            # spool error itself and no known input makes it raise anything else.
            await self._handle_job_error(job.route.destination, job, exc)
        finally:
            self._job_done(job)

    # -- workers -------------------------------------------------------------

    async def _worker(self, name: str, destination: _Destination) -> None:
        session: SMTPSession | None = None
        route: Route | None = None
        # A job taken with the previous one, and its message when already loaded.
        carried: tuple[Job, OutboundMessage | None] | None = None
        try:
            while carried is not None or (destination.queue and not self._stopping):
                if carried is not None:
                    job, message = carried
                    carried = None
                else:
                    job, message = destination.queue.popleft(), None
                try:
                    if job.route.kind == LOCAL:
                        await self._deliver_local(job)
                        continue
                    keeper = _LeaseKeeper(self, job)
                    try:
                        if session is None or not session.usable:
                            # A broken session gives its connection slot back before a new one opens.
                            self._drop_session(session)
                            session = None
                            session = await self._open_session(name, destination, job, keeper)
                            if session is None:
                                continue
                            route = job.route
                        carried = await self._send(session, job, message, destination, keeper)
                    finally:
                        keeper.close()
                except Exception as exc:
                    # A bug met by one job must not stop the destination, whose other
                    # jobs would wait for a new worker or for their leases to run out.
                    # The session may be in any state, so the next job gets a new one.
                    self._drop_session(session)
                    session = None
                    await self._handle_job_error(name, job, exc)
                finally:
                    self._job_done(job)
        finally:
            destination.workers -= 1
            self._prune_destination(name, destination)
            if session is not None:
                self._connections.release()
                # A session left with a pipelined job's commands (after a cancellation) cannot be reused.
                if route is not None and session.usable and session.pipelined is None and not self._stopping:
                    self.sessions.release(route, session)
                else:
                    await session.close()

    def _drop_session(self, session: SMTPSession | None) -> None:
        """Close ``session``, when there is one, without QUIT, and give its connection slot back."""
        if session is not None:
            session.abort()
            self._connections.release()

    async def _handle_job_error(
        self, name: str, job: Job, error: Exception, progress: LocalProgress | None = None
    ) -> None:
        """Log an unexpected error of one job and defer its recipients.

        Every task that works on a job ends this way after an error it did
        not expect, so the scheduler goes on and the queue shows the cause.
        ``progress`` is what a local delivery did before the error.
        """
        self._log_delivery_error(name, job, error)
        await self._defer_after_error(job, error, progress)

    def _log_delivery_error(self, name: str, job: Job, error: Exception) -> None:
        """Log an unexpected error of one job once, with its queue ID."""
        # The end of the traceback, which names the error and where it was raised, fits the log's value limit.
        exception = "".join(traceback.format_exception(error))[-400:]
        log_event(
            logger, "delivery_error", logging.ERROR, queue_id=job.claim.queue_id, relay=name,
            error=f"{type(error).__name__}: {error}", exception=exception,
        )

    async def _defer_after_error(self, job: Job, error: Exception, progress: LocalProgress | None = None) -> None:
        """Defer the recipients of a job that failed with an unexpected error, so the queue shows why and retries them.

        Without this they would wait, with no reply recorded, until their lease ran out.
        With the ``progress`` of a local delivery, the recipients it finished
        keep their outcomes, and the others are stored with the targets that
        already have the message, so that the retry skips those targets.
        """
        reply = f"451 4.3.0 internal error during delivery: {type(error).__name__}: {error}"
        outcomes = list(progress.outcomes) if progress is not None else []
        finished = {recipient.index for recipient, _, _ in outcomes}
        for recipient in job.recipients:
            if recipient.index in finished:
                continue
            note = already_delivered(progress, recipient) if progress is not None else ""
            outcomes.append((recipient, Outcome.DEFERRED, reply + note))
        delivered_targets = progress.delivered if progress is not None else None
        try:
            await self._record(job, outcomes, "", delivered_targets=delivered_targets)
        except Exception:
            logger.exception("could not defer %s after a delivery worker failed", job.claim.queue_id)

    async def _open_session(
        self, name: str, destination: _Destination, job: Job, keeper: _LeaseKeeper
    ) -> SMTPSession | None:
        if destination.suspended_until > time.monotonic():
            reply = f"451 4.4.1 delivery to {name} is backed off after failed connections"
            await self._defer_until(job, reply, _wall_time(destination.suspended_until))
            return None
        await self._connections.acquire()
        try:
            # Up to mx_address_limit connects, each with its greeting, EHLO, STARTTLS and AUTH timeouts.
            async with keeper.cutoff():
                session = await self.sessions.acquire(job.route)
        except LeaseCutOff:
            self._connections.release()
            self._log_cut_off(job, "")
            return None
        except LookupFailure as exc:
            self._connections.release()
            outcome = Outcome.DEFERRED if exc.temporary else Outcome.FAILED
            await self._record(job, [(r, outcome, exc.reply) for r in job.recipients], "")
            return None
        except SessionError as exc:
            self._connections.release()
            await self._session_failed(name, destination, job, exc)
            return None
        except BaseException:
            # An unexpected error or a cancellation: the slot belongs to no session.
            self._connections.release()
            raise
        destination.failures = 0
        return session

    async def _session_failed(self, name: str, destination: _Destination, job: Job, error: SessionError) -> None:
        if not error.temporary:
            await self._record(job, [(r, Outcome.FAILED, error.reply) for r in job.recipients], error.peer)
            return
        if destination.suspended_until > time.monotonic():
            # A session opened before another one's failure suspended the destination:
            # the same outage, so it neither counts again nor lengthens the backoff.
            await self._defer_until(job, error.reply, _wall_time(destination.suspended_until), error.peer)
            return
        destination.failures += 1
        destination.last_failure = time.monotonic()
        if destination.failures < self.config.delivery.destination_failure_limit:
            await self._record(job, [(r, Outcome.DEFERRED, error.reply) for r in job.recipients], error.peer)
            return
        delivery = self.config.delivery
        jitter = self._random.random()
        delay = backoff_delay(
            destination.failures - 1, delivery.minimal_backoff_time, delivery.maximal_backoff_time, jitter
        )
        destination.suspended_until = time.monotonic() + delay
        retry_at = _wall_time(destination.suspended_until)
        log_event(logger, "destination_backoff", logging.WARNING, destination=name,
                  failures=destination.failures, seconds=round(delay, 1), reply=error.reply)
        await self._defer_until(job, error.reply, retry_at, error.peer)
        # The queued jobs would meet the same dead hosts; defer them together.
        while destination.queue:
            queued = destination.queue.popleft()
            try:
                await self._defer_until(queued, error.reply, retry_at, error.peer)
            finally:
                self._job_done(queued)

    async def _send(
        self,
        session: SMTPSession,
        job: Job,
        message: OutboundMessage | None,
        destination: _Destination,
        keeper: _LeaseKeeper,
    ) -> tuple[Job, OutboundMessage | None] | None:
        """Deliver a job over ``session`` and record its results.

        Returns the destination's next job when it was taken to go with this
        one: its MAIL, RCPT and DATA commands may already be on the wire, so
        the worker must send it next over the same session.  When the session
        fails, that job goes back to the front of the queue instead.

        ``keeper`` renews the leases of both jobs while the transaction runs.
        When it cuts the session off, only the results that replies decided
        before that are recorded (``_record_decided``).  The other recipients
        belong to another claim or to an operator's hold now, or their lease,
        still held, runs out and lets them be claimed again.
        """
        if message is None:
            message = await self._load_message(job)
            if message is None:
                return None
        following = self._take_following(session, job, destination)
        following_message: OutboundMessage | None = None
        if following is not None:
            following_message = await self._load_following(following, destination)
            if following_message is None:
                following = None
            else:
                keeper.add(following)
        try:
            return await self._transact(session, job, message, following, following_message, destination, keeper)
        except Exception:
            # The worker drops the session after an unexpected error, so the next
            # job, whose body was never sent, waits in the queue for another one.
            if following is not None and following not in destination.queue:
                destination.queue.appendleft(following)
            raise

    async def _load_following(self, following: Job, destination: _Destination) -> OutboundMessage | None:
        """Return the message of the job taken to go after the current one, or None when it is not sent now."""
        try:
            message = await self._load_message(following)
        except SpoolError:
            # Back at the front of the queue, its own turn meets the error again and defers it.
            # The current job goes out meanwhile.
            destination.queue.appendleft(following)
            return None
        if message is None:
            self._job_done(following)
        return message

    async def _transact(
        self,
        session: SMTPSession,
        job: Job,
        message: OutboundMessage,
        following: Job | None,
        following_message: OutboundMessage | None,
        destination: _Destination,
        keeper: _LeaseKeeper,
    ) -> tuple[Job, OutboundMessage | None] | None:
        """Send ``job`` (and the commands of ``following``) over ``session`` and record the results, for ``_send``."""
        by_index = {r.index: r for r in job.recipients}
        try:
            try:
                async with keeper.cutoff():
                    results = await session.send(message, following_message)
            finally:
                # Recording the results ends the lease, and a renewal after that would
                # take the recipients for lost.  The next job gets a keeper of its own.
                keeper.close()
        except LeaseCutOff:
            # The session may be inside DATA, where a QUIT would be message text.
            session.abort()
            if following is not None:
                destination.queue.appendleft(following)
            self._log_cut_off(job, session.peer)
            await self._record_decided(job, session)
            return None
        except SessionError as exc:
            # Replies that decided a recipient before the failure stand; the rest wait.
            outcomes = []
            for recipient in job.recipients:
                decided = exc.decided.get(recipient.index)
                if decided is None:
                    outcomes.append((recipient, Outcome.DEFERRED, exc.reply))
                else:
                    outcomes.append((recipient, decided.outcome, decided.reply))
            if following is not None:
                # Its body was never sent, so it waits in the queue for the next session like any other job.
                destination.queue.appendleft(following)
            await self._record_with_backup_mx(
                job, message, session, outcomes, False, local=_local_indexes(exc.decided.values())
            )
            return None
        except asyncio.CancelledError:
            # stop() cancelled the transaction after STOP_GRACE.  Replies read before
            # that still decided their recipients (a 5xx to RCPT, say), which would
            # otherwise be tried again after the restart.
            session.abort()
            if self._stopping:
                await self._record_at_stop(job, self._record_decided(job, session))
            raise
        # The client passes NOTIFY on exactly when the next hop offers DSN.
        outcomes = [(by_index[r.index], r.outcome, r.reply) for r in results]
        notifies = "DSN" in session.capabilities
        downgraded = any(r.downgraded for r in results)
        # With a next job taken, its commands may be on the wire and the host waits
        # for its body, so the backup session runs beside it instead of first.
        await self._record_with_backup_mx(
            job, message, session, outcomes, notifies, downgraded, beside=following is not None,
            local=_local_indexes(results),
        )
        return (following, following_message) if following is not None else None

    async def _record_with_backup_mx(
        self,
        job: Job,
        message: OutboundMessage,
        session: SMTPSession,
        outcomes: list[tuple[StoredRecipient, Outcome, str]],
        notifies: bool,
        downgraded: bool = False,
        *,
        beside: bool = False,
        local: frozenset[int] = frozenset(),
    ) -> None:
        """Record a transaction's outcomes, then send the deferred recipients to the next MX host once.

        RFC 5321 section 5.1 has a client try the MX hosts in order, and
        Postfix moves a soft failure on to the next host (two sessions per
        delivery by default, smtp_mx_session_limit).  The final outcomes are
        recorded first: a 250 is final, and the backup session may take
        minutes or fail.  With ``beside``, the backup session then runs as a
        task of its own, so the caller can go on with its session at once.
        Without a free connection slot, a next host, or a usable session
        there, the deferrals stand.  Each outcome is recorded with the host
        that gave it.
        """
        deferred = [item for item in outcomes if item[1] is Outcome.DEFERRED]
        if not deferred or not job.route.use_mx or self._stopping:
            await self._record(
                job, outcomes, session.peer, next_hop_notifies=notifies, downgraded=downgraded, local=local
            )
            return
        final = [item for item in outcomes if item[1] is not Outcome.DEFERRED]
        # Failures at both hosts belong to one attempt, so a null-sender message gets one postmaster copy.
        copied = False
        if final:
            copied = await self._record(
                job, final, session.peer, next_hop_notifies=notifies, downgraded=downgraded, local=local
            )
        retry = self._retry_at_backup_mx(
            job, message, session.host, session.peer, deferred, notifies, downgraded, copied
        )
        if beside:
            # stop() waits for this task as for a worker.
            self._spawn(self._retry_beside(job, deferred, retry))
        else:
            await retry

    async def _retry_beside(
        self,
        job: Job,
        deferred: list[tuple[StoredRecipient, Outcome, str]],
        retry: Coroutine[Any, Any, None],
    ) -> None:
        """Await a backup-MX ``retry`` that runs as a task of its own, handling an unexpected error as a worker does.

        Without this, the error would reach only asyncio's exception handler,
        with no queue ID, and the recipients would wait for their lease to run out.
        """
        try:
            await retry
        except Exception as exc:
            # NOTE: no test reaches this branch, because no known input makes the retry raise.
            # Recipients that the retry recorded as final before the error stay
            # final, because the spool ignores results for them.
            retried = tuple(recipient for recipient, _, _ in deferred)
            await self._handle_job_error(job.route.destination, Job(job.claim, job.route, retried), exc)

    async def _retry_at_backup_mx(
        self,
        job: Job,
        message: OutboundMessage,
        tried: str,
        peer: str,
        deferred: list[tuple[StoredRecipient, Outcome, str]],
        notifies: bool,
        downgraded: bool,
        copied: bool,
    ) -> None:
        """Send recipients that MX host ``tried`` (``peer``) deferred to the next MX host, and record the outcomes.

        ``copied`` says whether the failures at ``tried`` already made a postmaster copy.

        The backup session runs under a ``_LeaseKeeper`` of its own, like a
        first session, for the recipients it sends.  When it is cut off or
        fails, the replies that decided a recipient there stand, and the
        other recipients keep the first host's deferral.  A session cut off
        after the end of data counts as deferred, like a timeout waiting for
        the final reply.  QUIT goes out only after the results are stored.
        """
        retried_job = Job(job.claim, job.route, tuple(recipient for recipient, _, _ in deferred))
        # The first session's keeper moved ``job.lease_until`` on, so the claim's own end may be long past.
        retried_job.lease_until = job.lease_until
        # Checked right before the acquire, with no await in between: a worker that
        # waited for a second slot while holding one could deadlock with the others.
        if self._stopping or retried_job.lease_until <= time.time() or self._connections.locked():
            await self._record(job, deferred, peer, next_hop_notifies=notifies, downgraded=downgraded)
            return

        await self._connections.acquire()
        backup: SMTPSession | None = None
        try:
            backup, results, cancelled = await self._send_to_backup_mx(job, message, tried, retried_job)
            recording = self._record_backup_results(
                job, deferred, results, backup, peer, notifies, downgraded, copied
            )
            if cancelled is not None:
                await self._record_at_stop(job, recording)
                raise cancelled
            await recording
        finally:
            try:
                if backup is not None:
                    # QUIT only after the results are stored, so a stop that cancels it loses none.
                    await backup.close()
            finally:
                self._connections.release()

    async def _send_to_backup_mx(
        self, job: Job, message: OutboundMessage, tried: str, retried_job: Job
    ) -> tuple[SMTPSession | None, dict[int, RecipientResult], asyncio.CancelledError | None]:
        """Send the recipients of ``retried_job`` to the MX host after ``tried``, for ``_retry_at_backup_mx``.

        Returns the session, the results that replies decided there, and the
        cancellation by ``stop`` to raise again once they are recorded.  A
        session cut off or failed is aborted, and the caller closes the others.
        """
        keeper = _LeaseKeeper(self, retried_job)
        backup: SMTPSession | None = None
        results: dict[int, RecipientResult] = {}
        sent = False
        cancelled: asyncio.CancelledError | None = None
        try:
            async with keeper.cutoff():
                backup = await self.sessions.open_backup(job.route, tried)
                if backup is not None:
                    indexes = {recipient.index for recipient in retried_job.recipients}
                    retry = dataclasses.replace(
                        message, recipients=tuple(r for r in message.recipients if r.index in indexes)
                    )
                    results = {result.index: result for result in await backup.send(retry)}
                    sent = True
        except LeaseCutOff:
            results = dict(backup.decided) if backup is not None else {}
            self._log_cut_off(job, backup.peer if backup is not None else "")
        except asyncio.CancelledError as exc:
            if not self._stopping:
                raise
            # stop() cancelled the session after STOP_GRACE, and the replies read
            # before still decided their recipients.  The caller raises it again.
            cancelled = exc
            results = dict(backup.decided) if backup is not None else {}
        except Exception as exc:
            results = dict(exc.decided) if isinstance(exc, SessionError) else {}
            log_event(logger, "backup_mx_failed", logging.INFO, queue_id=job.claim.queue_id, error=repr(exc))
        finally:
            # Recording the results ends the lease, and a renewal after that would take it for lost.
            keeper.close()
            if backup is not None and not sent:
                # Cut off or failed: the session may be inside DATA, where a QUIT would be message text.
                backup.abort()
        return backup, results, cancelled

    async def _record_backup_results(
        self,
        job: Job,
        deferred: list[tuple[StoredRecipient, Outcome, str]],
        results: dict[int, RecipientResult],
        backup: SMTPSession | None,
        peer: str,
        notifies: bool,
        downgraded: bool,
        copied: bool,
    ) -> None:
        """Record the ``results`` of the backup session, and the first host's deferral of the other recipients."""
        rest = [item for item in deferred if item[0].index not in results]
        if rest:
            await self._record(job, rest, peer, next_hop_notifies=notifies, downgraded=downgraded)
        if results and backup is not None:
            retried = [
                (recipient, results[recipient.index].outcome, results[recipient.index].reply)
                for recipient, _, _ in deferred
                if recipient.index in results
            ]
            await self._record(
                job, retried, backup.peer, next_hop_notifies="DSN" in backup.capabilities,
                downgraded=any(result.downgraded for result in results.values()), postmaster_copy=not copied,
                local=_local_indexes(results.values()),
            )

    async def _record_decided(self, job: Job, session: SMTPSession) -> None:
        """Record the results that replies decided before ``session`` was cut off in the middle of ``job``.

        A 5xx to RCPT failed its recipient and a 4xx deferred it, whatever
        came after.  Under a lease lost to another claim the spool keeps a
        failure but adds a deferral only to the attempt history.
        """
        decided = session.decided
        outcomes = [
            (recipient, decided[recipient.index].outcome, decided[recipient.index].reply)
            for recipient in job.recipients
            if recipient.index in decided
        ]
        if outcomes:
            await self._record(
                job, outcomes, session.peer, next_hop_notifies="DSN" in session.capabilities,
                downgraded=any(decided[recipient.index].downgraded for recipient, _, _ in outcomes),
                local=_local_indexes(decided.values()),
            )

    async def _record_at_stop(self, job: Job, recording: Coroutine[Any, Any, None]) -> None:
        """Await ``recording`` of a transaction that ``stop`` cancelled, for at most STOP_RECORD_TIME seconds."""
        try:
            async with asyncio.timeout(STOP_RECORD_TIME):
                await recording
        except TimeoutError:
            log_event(
                logger, "record_failed", logging.ERROR, queue_id=job.claim.queue_id,
                error=f"storing the results of a transaction cut off by the shutdown took over {STOP_RECORD_TIME:g} s",
            )

    def _log_cut_off(self, job: Job, peer: str) -> None:
        log_event(
            logger, "delivery_cut_off", logging.WARNING, queue_id=job.claim.queue_id,
            relay=peer or job.route.destination, reason="lease lost or about to end",
        )

    def _take_following(self, session: SMTPSession, job: Job, destination: _Destination) -> Job | None:
        """Take the destination's next job when the session can pipeline its commands after ``job``."""
        if self._stopping or not destination.queue or not session.pipelines_transactions:
            return None
        following = destination.queue[0]
        if following.route != job.route:
            return None
        return destination.queue.popleft()

    async def _load_message(self, job: Job) -> OutboundMessage | None:
        """Return the message a job sends, or None when the job must not be sent any more.

        That is when the message left the spool (or was moved aside as
        corrupt), when its lease ran out while
        the job waited (another claim may own the recipients now), or when an
        operator held or deleted it after the claim.
        """
        claim = job.claim
        if not await self._may_deliver(job):
            return None
        body = claim.body
        if body is None:
            try:
                body = await self.spool.load_body(claim.queue_id)
            except (MessageNotFound, CorruptRecord):
                # load_body moved a corrupt message aside and logged it.
                return None
        return OutboundMessage(
            queue_id=claim.queue_id,
            sender=claim.envelope.sender,
            recipients=tuple(
                OutboundRecipient(r.index, r.address, r.notify, r.orcpt) for r in job.recipients
            ),
            body=body,
            body_type=claim.envelope.body_type,
            smtputf8=claim.envelope.smtputf8,
            ret=claim.envelope.ret,
            envid=claim.envelope.envid,
        )

    async def _may_deliver(self, job: Job) -> bool:
        """Return whether a job may still be delivered: its lease holds, and no hold or delete came after the claim."""
        claim = job.claim
        now = time.time()
        if job.lease_until <= now:
            log_event(logger, "lease_expired", logging.WARNING, queue_id=claim.queue_id, owner=self.owner)
            return False
        if now - (claim.lease_until - self.spool.lease_time) > RECHECK_AFTER:
            if await self._still_pending(job):
                return True
            # Held (or gone): give the lease back, or a release would leave the
            # recipients waiting for it to run out.
            try:
                await self.spool.end_lease(claim.queue_id, [r.index for r in job.recipients], claim.lease_token)
            except SpoolError as exc:
                log_event(logger, "lease_end_failed", logging.WARNING, queue_id=claim.queue_id, error=str(exc))
            return False
        return True

    async def _still_pending(self, job: Job) -> bool:
        """Return whether every recipient of a job that waited in memory is still queued or deferred."""
        try:
            stored = await self.spool.load(job.claim.queue_id)
        except CorruptRecord:
            return False  # moved aside and logged by load
        except SpoolError as exc:
            # The lease still holds the recipients, so sending is safe; only a hold could be missed.
            log_event(logger, "recheck_failed", logging.WARNING, queue_id=job.claim.queue_id, error=str(exc))
            return True
        if stored is None:
            return False
        pending = {r.index for r in stored.recipients if r.state in (RecipientState.QUEUED, RecipientState.DEFERRED)}
        return all(recipient.index in pending for recipient in job.recipients)

    async def _deliver_local(self, job: Job) -> None:
        if not await self._may_deliver(job):
            return
        progress = LocalProgress()
        try:
            outcomes = await deliver_local(self.local, self.spool, job.claim, job.recipients, progress)
        except asyncio.CancelledError:
            # stop() cancelled the job after STOP_GRACE.  A Maildir write in flight
            # still completes in its thread, and a copy that is not recorded would
            # be delivered again after the restart.
            if self._stopping:
                await self._record_at_stop(job, self._record_local_cut_off(job, progress))
            raise
        except Exception as exc:
            # An unexpected error (a bug), handled here and not by the worker,
            # because only here are the targets in ``progress`` known.  Without
            # them the retry would write to those targets again.
            # NOTE: no test reaches this branch, because no known input makes
            # deliver_local raise anything but the errors it handles itself.
            await self._handle_job_error(job.route.destination, job, exc, progress)
            return
        await self._record(job, outcomes, "", delivered_targets=progress.delivered)

    async def _record_local_cut_off(self, job: Job, progress: LocalProgress) -> None:
        """Record what a local delivery cancelled by ``stop`` did, once its write or forward in flight has ended.

        Finished recipients get their outcomes.  The recipient in progress is
        delivered when its last target was.  Otherwise it keeps its state and
        due time, and only the targets that got the message are stored.  The
        recipients not started are due again once ``stop`` releases the lease.
        """
        await progress.finish_step()
        outcomes = list(progress.outcomes)
        recipient, expansion = progress.current, progress.expansion
        partial = None
        if recipient is not None and all(item[0] is not recipient for item in outcomes):
            delivered = progress.targets_of(recipient)
            if expansion is not None and set(delivered) >= {*expansion.users, *expansion.remote}:
                outcomes.append((recipient, Outcome.DELIVERED, delivered_reply(expansion)))
            elif delivered != recipient.delivered_targets:
                partial = (recipient, delivered)
        if outcomes:
            await self._record(job, outcomes, "", delivered_targets=progress.delivered)
        if partial is None:
            return
        recipient, delivered = partial
        try:
            stored = await self.spool.record_delivered_targets(
                job.claim.queue_id, recipient.index, delivered, job.claim.lease_token
            )
        except SpoolError as exc:
            log_event(logger, "record_failed", logging.ERROR, queue_id=job.claim.queue_id, error=str(exc))
            return
        log_event(
            logger, "local_delivery_cut_off", logging.WARNING, queue_id=job.claim.queue_id, to=recipient.address,
            delivered=list(delivered), stored=stored,
        )

    # -- results ---------------------------------------------------------------

    async def _defer_until(self, job: Job, reply: str, when: float, host: str = "") -> None:
        await self._record(job, [(r, Outcome.DEFERRED, reply) for r in job.recipients], host, next_attempt=when)

    async def _record(
        self,
        job: Job,
        outcomes: Sequence[tuple[StoredRecipient, Outcome, str]],
        host: str,
        next_attempt: float | None = None,
        next_hop_notifies: bool = False,
        downgraded: bool = False,
        postmaster_copy: bool = True,
        delivered_targets: Mapping[int, tuple[str, ...]] | None = None,
        local: frozenset[int] = frozenset(),
    ) -> bool:
        """Store the outcomes and log one line for each.  With ``downgraded``, the lines carry ``converted=7bit``.

        ``local`` holds the recipient indexes whose reply relay wrote itself
        before sending them to ``host``.  They are stored without a host, so
        their DSN names no Remote-MTA and gives the reply as relay's own
        diagnostic (RFC 3464 sections 2.3.5 and 2.3.6).

        ``delivered_targets`` are the local delivery targets that each
        recipient index has got the message at, stored with a deferral.

        Returns whether a copy of a failed null-sender message went to
        postmaster (``bounce_copy_to_postmaster``); ``postmaster_copy=False``
        leaves it out for a failure that an earlier call already copied.
        """
        claim = job.claim
        delivery = self.config.delivery
        now = time.time()
        waited = now - claim.arrival
        lifetime = delivery.bounce_queue_lifetime if claim.envelope.sender == "" else delivery.maximal_queue_lifetime
        expired = waited >= lifetime
        warn = 0 < delivery.delay_warning_time <= waited
        results: list[DeliveryResult] = []
        dsn_possible = False
        for recipient, outcome, reply in outcomes:
            when = None
            reason = ""
            expired_now = False
            if outcome is Outcome.DEFERRED:
                if expired:
                    # The reply stays the next hop's own text, because the DSN's
                    # Diagnostic-Code carries it. The DSN's plain text and the
                    # log line state that the message expired.
                    outcome = Outcome.FAILED
                    expired_now = True
                    reason = f"message expired after {lifetime:.0f} s in the queue"
                else:
                    jitter = self._random.random()
                    delay = backoff_delay(
                        recipient.attempts, delivery.minimal_backoff_time, delivery.maximal_backoff_time, jitter
                    )
                    # The last retry comes when the lifetime ends, not a backoff after it,
                    # so the bounce is on time and a delay DSN's Will-Retry-Until holds.
                    when = min(max(now + delay, next_attempt or 0.0), claim.arrival + lifetime)
            results.append(
                DeliveryResult(
                    claim.queue_id, recipient.index, outcome, reply, "" if recipient.index in local else host, when,
                    next_hop_notifies=next_hop_notifies,
                    delay_warning=warn and outcome is Outcome.DEFERRED and recipient.dsn is DsnState.NONE,
                    delivered_targets=(delivered_targets or {}).get(recipient.index, ()),
                    expired=expired_now,
                )
            )
            # A superset of the spool's DSN rule: it only decides when to look for owed DSNs.
            dsn_possible = dsn_possible or outcome is Outcome.FAILED or results[-1].delay_warning or (
                outcome is Outcome.DELIVERED and "SUCCESS" in recipient.notify and not next_hop_notifies
            )
            fields: dict[str, object] = {
                "queue_id": claim.queue_id,
                "to": recipient.address,
                "relay": host or job.route.destination,
                "delay": round(now - claim.arrival, 3),
                "dsn": status_of(reply) if reply else "2.0.0",
                "reply": reply,
            }
            if reason:
                fields["reason"] = reason
            if downgraded:
                # The next hop lacks 8BITMIME and got the message converted to 7 bit.
                fields["converted"] = "7bit"
            event = {Outcome.DELIVERED: "delivered", Outcome.DEFERRED: "deferred", Outcome.FAILED: "bounced"}[outcome]
            # A next hop defers mail routinely, but a local deferral means a fault on
            # this host (a failed Maildir write or fsync, an unreadable maildir_root).
            level = logging.WARNING if outcome is Outcome.DEFERRED and job.route.kind == LOCAL else logging.INFO
            log_event(logger, event, level, **fields)
        copy_body: bytes | None = None
        if claim.envelope.sender == "" and delivery.bounce_copy_to_postmaster and postmaster_copy:
            copy_body = await self._postmaster_copy_body(claim, outcomes, results)
        try:
            await self.spool.record_results(results, lease_token=claim.lease_token)
        except SpoolError as exc:
            # The lease runs out and the recipients are claimed again later.
            log_event(logger, "record_failed", logging.ERROR, queue_id=claim.queue_id, error=str(exc))
            return False
        if dsn_possible:
            self._dsn_due = True
        # Finished jobs make room for the next claim.
        self._wake.set()
        if copy_body is None:
            return False
        await self._copy_to_postmaster(claim, copy_body)
        return True

    async def _postmaster_copy_body(
        self,
        claim: Claim,
        outcomes: Sequence[tuple[StoredRecipient, Outcome, str]],
        results: Sequence[DeliveryResult],
    ) -> bytes | None:
        """Return the body to copy to postmaster for a failed null-sender message, or None for no copy.

        Read before the results are recorded, because recording the last
        failure deletes the message.  A failed delivery to postmaster itself
        gets no copy: it would go where it just failed, again and again.
        """
        failed = {result.index for result in results if result.outcome is Outcome.FAILED}
        if not failed:
            return None
        if all(recipient.address.lower().startswith("postmaster@") for recipient, _, _ in outcomes
               if recipient.index in failed):
            return None
        if claim.body is not None:
            return claim.body
        try:
            return await self.spool.load_body(claim.queue_id)
        except (SpoolError, MessageNotFound, CorruptRecord) as exc:
            # load_body moved a corrupt message aside, and the copy goes with it.
            log_event(logger, "postmaster_copy_failed", logging.ERROR, queue_id=claim.queue_id, error=str(exc))
            return None

    async def _copy_to_postmaster(self, claim: Claim, body: bytes) -> None:
        domain = self.config.policy.local_domains[0] if self.config.policy.local_domains else "localhost"
        try:
            envelope = Envelope(sender="", recipients=(Recipient(address=f"postmaster@{domain}"),))
            copy_id = await self.spool.commit(envelope, body)
        except SpoolError as exc:
            log_event(logger, "postmaster_copy_failed", logging.ERROR, queue_id=claim.queue_id, error=str(exc))
            return
        log_event(logger, "postmaster_copy", queue_id=claim.queue_id, copy_id=copy_id)

    async def _queue_dsns(self) -> None:
        try:
            messages = await self.spool.pending_dsns(DSN_BATCH)
        except SpoolError as exc:
            failures = self._dsn_scan_failures.note()
            if failures is not None:
                log_event(logger, "dsn_scan_failed", logging.ERROR, error=str(exc), failures=failures)
            return
        if len(messages) == DSN_BATCH:
            # More may owe a DSN: look again on the next pass of the loop, not only
            # at the next failure or restart, or they would wait indefinitely.
            self._dsn_due = True
        now = time.time()
        for message in messages:
            # A recipient whose DSN failed before waits for its dsn_due, even when another one is due now.
            owed = [r for r in message.recipients if r.dsn is DsnState.PENDING and r.dsn_due <= now]
            if not owed:
                continue
            if message.queue_id in self._jobs_by_message:
                # Other recipients of the message are still being sent.  The DSN
                # waits for their results, so their failures join it.
                # NOTE: a slow transaction at another destination delays the DSN
                # for as long as that transaction runs.
                self._dsn_held.add(message.queue_id)
                continue
            try:
                body = await self.spool.load_body(message.queue_id)
                retry_until = message.arrival + self.config.delivery.maximal_queue_lifetime
                report = build_report(
                    message, body, owed, self.config.server.hostname, time.time(), retry_until=retry_until
                )
                # The spool logs dsn_queued inside the commit, before the original's removed.
                await self.spool.commit(
                    report.envelope, report.body, dsn_for=DsnRequest(message.queue_id, report.indexes)
                )
            except (MessageNotFound, CorruptRecord) as exc:
                # load_body moved a corrupt message aside, and its DSN goes with it.
                log_event(logger, "dsn_failed", logging.ERROR, queue_id=message.queue_id, error=str(exc))
                continue
            except SpoolError as exc:
                await self._defer_dsn(message, owed, exc)
                continue
            self._wake.set()

    async def _defer_dsn(self, message: StoredMessage, owed: Sequence[StoredRecipient], error: SpoolError) -> None:
        """Put off a DSN that could not be queued, for a backoff that grows with its failed attempts.

        Without this, a DSN that keeps failing would be built again at every
        look for owed DSNs, once per ``queue_scan_interval``.
        """
        delivery = self.config.delivery
        attempts = max(recipient.dsn_attempts for recipient in owed)
        delay = backoff_delay(
            attempts, delivery.minimal_backoff_time, delivery.maximal_backoff_time, self._random.random()
        )
        log_event(
            logger, "dsn_failed", logging.ERROR, queue_id=message.queue_id, error=str(error),
            attempts=attempts + 1, retry_in=round(delay, 1),
        )
        try:
            await self.spool.defer_dsn(message.queue_id, [recipient.index for recipient in owed], time.time() + delay)
        except SpoolError as exc:
            # The DSN is then tried again at the next look for owed DSNs.
            log_event(logger, "dsn_defer_failed", logging.ERROR, queue_id=message.queue_id, error=str(exc))


def _local_indexes(results: Iterable[RecipientResult]) -> frozenset[int]:
    """Return the recipient indexes of ``results`` whose reply relay wrote itself (``RecipientResult.local``)."""
    return frozenset(result.index for result in results if result.local)
