"""The spool's single writer thread and its group commit.

Every change to the spool in a process goes through one ``Writer``: callers
put a job on its queue and wait for the job's future.  The thread takes the
first job, then every job already waiting (up to the batch limits), applies
them all inside one transaction and commits once.  Jobs that arrive during a
commit wait for the next one, so N concurrent sessions pay about one fsync
per batch instead of N (group commit).  A future is resolved only after the
``COMMIT`` holding its job has returned, which with ``synchronous=FULL``
means the change is on stable storage.

Messages in a batch are inserted first, with one statement per table for the
whole batch.  Every other job then runs inside its own SAVEPOINT: a job that raises an ordinary error
(a missing queue ID, a bad argument) is rolled back alone and its future gets
the error.  A ``SpoolError`` (disk full, I/O error, lock timeout) aborts the
whole transaction and fails every job in the batch with it, because SQLite
may have left the transaction unusable.

A message commit submitted with ``may_wait`` (the server sets it when other
clients are connected to the same worker) lets the writer wait
``commit_delay`` before it takes the rest of the batch, so that the
messages of those clients join the same transaction.  Each transaction has
a fixed cost (the fsync, the pages rewritten at the end of each table, the
hand-offs between threads) that the messages inside it share; the wait
trades that much latency for fewer transactions, like PostgreSQL's
``commit_delay`` with ``commit_siblings``.

A batch made only of jobs submitted with ``durable=False`` (lease claims)
commits with ``synchronous=NORMAL``: atomic and at once visible to other
connections, but without an fsync.  The next ``FULL`` commit syncs the WAL
and with it every earlier frame.  A power loss before that can only undo
leases, so their recipients are claimed again.  Every other batch, and so
every message commit, runs with ``synchronous=FULL``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.log import collect_lines, log_event
from relay.spool.checkpoint import (
    CATCH_UP_BYTES,
    CHECKPOINT_BYTES,
    PAGE_ESTIMATE,
    WAL_LIMIT_BYTES,
    Checkpointer,
    wal_size,
)
from relay.spool.errors import SpoolError
from relay.spool.store import PendingCommit, SpoolStore

logger = logging.getLogger("relay.spool")

Operation = Callable[[SpoolStore], Any]


@dataclass(slots=True)
class Job:
    """One operation for the writer and the future that receives its result."""

    operation: Operation | None  # None for a message commit, which ``pending`` describes
    size: int  # octets the job adds to the transaction, for the batch byte limit
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | concurrent.futures.Future[Any]
    pending: PendingCommit | None = None
    outcome: tuple[bool, Any] = field(default=(False, None))  # (succeeded, result or exception)
    durable: bool = True  # False: the change may be lost in a power failure (see the module docs)
    may_wait: bool = False  # True: the writer may wait commit_delay for more jobs (see the module docs)


_STOP = object()

# Lock file in the spool directory that the writer threads of all processes
# sharing the spool take in turn, one transaction at a time; see ``Writer._run``.
WRITER_LOCK = "writer.lock"


def _settle(jobs: list[Job]) -> None:
    for job in jobs:
        if job.future.done():
            # The awaiting task was cancelled (client gone); the change stays committed.
            continue
        succeeded, value = job.outcome
        if succeeded:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


class Writer:
    """The thread that owns the spool's write connection."""

    def __init__(
        self,
        directory: Path,
        *,
        busy_timeout: float,
        batch_max_messages: int,
        batch_max_bytes: int,
        commit_delay: float = 0.0,
    ) -> None:
        self.directory = directory
        self.busy_timeout = busy_timeout
        self.commit_delay = commit_delay
        self.batch_max_messages = batch_max_messages
        self.batch_max_bytes = batch_max_bytes
        self._queue: queue.SimpleQueue[Job | object] = queue.SimpleQueue()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="relay-spool-writer", daemon=True)
        self._checkpointer = Checkpointer(directory, busy_timeout)
        # The batch waiting for writer.lock and since when; the watchdog fails its
        # jobs once the wait passes busy_timeout (see ``_watch``).  ``_guard``
        # orders those failures against the writer taking the batch to commit.
        self._guard = threading.Lock()
        self._waiting: list[Job] | None = None
        self._waiting_since = 0.0
        self._stuck = False  # the watchdog gave up on the current wait
        self._watch_interval = min(0.5, max(0.01, busy_timeout / 4))
        self._watch_stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="relay-spool-lock-watch", daemon=True)
        self._wal_growth = 0  # estimated octets added to the WAL since the last checkpoint request
        self._unchecked_growth = 0  # estimated octets added since the writer last read the WAL's size
        self._checkpoints_seen = 0  # background checkpoints whose completion the writer has handled
        # The write connection's synchronous setting; SpoolStore opens it with FULL.
        self._synchronous = "FULL"
        self.batches = 0  # committed transactions, for tests and the benchmark
        self.jobs = 0  # jobs in those transactions

    @property
    def checkpoints(self) -> int:
        """Background checkpoints run so far."""
        return self._checkpointer.checkpoints

    def start(self) -> None:
        """Start the thread and wait until its connection is open; raise SpoolError if it fails."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        self._checkpointer.start()
        self._watchdog.start()

    def submit_async(self, operation: Operation, *, durable: bool = True) -> asyncio.Future[Any]:
        """Queue an operation; return an asyncio future of the running loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._put(Job(operation, 0, loop, future, durable=durable))
        return future

    def submit_blocking(self, operation: Operation, *, durable: bool = True) -> concurrent.futures.Future[Any]:
        """Queue an operation; return a thread-safe future for callers without an event loop."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._put(Job(operation, 0, None, future, durable=durable))
        return future

    def commit_async(
        self, pending: PendingCommit, loop: asyncio.AbstractEventLoop, *, may_wait: bool = False
    ) -> asyncio.Future[str]:
        """Queue a message; return a future of its queue ID on ``loop``.

        ``may_wait`` lets the writer wait ``commit_delay`` for more messages
        before it commits this one.
        """
        future: asyncio.Future[str] = loop.create_future()
        # Positional: a keyword argument makes the dataclass's __init__ slower, once per message.
        self._put(Job(None, len(pending.body), loop, future, pending, (False, None), True, may_wait))
        return future

    def commit_blocking(self, pending: PendingCommit) -> concurrent.futures.Future[str]:
        """Queue a message; return a thread-safe future of its queue ID."""
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._put(Job(None, len(pending.body), None, future, pending))
        return future

    def _put(self, job: Job) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.directory} is closed")
        self._queue.put(job)

    def close(self) -> None:
        """Finish the queued jobs, stop the thread and close the connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        while self._thread.is_alive():
            self._thread.join(self._watch_interval)
            if self._stuck:
                # Another process still holds writer.lock.  The watchdog has failed every
                # queued job, and the writer thread (a daemon) ends with the process.
                log_event(logger, "writer_abandoned", logging.ERROR, spool=str(self.directory),
                          error=f"{WRITER_LOCK} still held by another process at close")
                break
        if self._start_error is None:
            self._watch_stop.set()
            self._watchdog.join()
            if not self._stuck:
                self._checkpointer.stop()

    def _run(self) -> None:
        try:
            store = SpoolStore(self.directory, busy_timeout=self.busy_timeout, autocheckpoint=False)
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        try:
            lock = os.open(self.directory / WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            store.close()
            self._start_error = SpoolError(f"spool {self.directory}: cannot open {WRITER_LOCK}: {exc.strerror}")
            self._started.set()
            return
        self._started.set()
        try:
            while True:
                batch, stop = self._next_batch()
                if batch:
                    # One write for the batch's log lines (each removed message logs one).
                    with collect_lines():
                        stop = self._write(store, lock, batch, stop)
                if stop:
                    break
        finally:
            os.close(lock)
            store.close()

    def _write(self, store: SpoolStore, lock: int, batch: list[Job], stop: bool) -> bool:
        """Commit ``batch`` under writer.lock; return whether stop was requested."""
        try:
            self._take_lock(lock, batch)
        except SpoolError as exc:
            self._fail(batch, str(exc))
            return stop
        try:
            if not stop:
                # Jobs that arrived while another process held the lock join this batch.
                stop = self._drain(batch)
            if batch:  # empty when the watchdog has failed its jobs
                self._commit(store, batch)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        if batch:
            self._checkpoint(store, batch)
        return stop

    def _take_lock(self, lock: int, batch: list[Job]) -> None:
        """Take writer.lock for ``batch``; raise SpoolError when flock fails.

        Writers of other processes wait here, in the kernel, and not on
        SQLite's write lock.  SQLite's default busy handler sleeps 1, 2, 5, 10
        ms and longer between retries (sqliteDefaultBusyCallback), which is
        several fsyncs of waiting for a lock held during one.  flock wakes the
        next writer as soon as this one has committed.  flock has no timeout,
        so ``_watch`` applies busy_timeout to the wait.
        """
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise self._lock_error(exc) from exc
        with self._guard:
            self._waiting = batch
            self._waiting_since = time.monotonic()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:
            raise self._lock_error(exc) from exc
        finally:
            with self._guard:
                self._waiting = None
                self._stuck = False

    def _lock_error(self, exc: OSError) -> SpoolError:
        return SpoolError(
            f"spool {self.directory}: locking {WRITER_LOCK} failed: {exc.strerror};"
            " keep the spool on a local file system"
        )

    def _watch(self) -> None:
        """Fail the jobs of a writer that has waited for writer.lock longer than busy_timeout.

        Their callers get the SpoolError (the server replies ``452 4.3.1``)
        instead of waiting as long as another process holds the lock, for
        example one stopped with SIGSTOP.  Jobs queued during the wait fail
        too.  The writer commits none of them once it has the lock.
        """
        while not self._watch_stop.wait(self._watch_interval):
            with self._guard:
                waiting = self._waiting
                if waiting is None or time.monotonic() - self._waiting_since < self.busy_timeout:
                    continue
                failed = list(waiting)
                waiting.clear()
                stop = False
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                    else:
                        assert isinstance(item, Job)
                        failed.append(item)
                if stop:
                    self._queue.put(_STOP)
                self._stuck = True
            if failed:
                self._fail(
                    failed,
                    f"spool {self.directory}: another process has held {WRITER_LOCK} for more than"
                    f" {self.busy_timeout:g} s; look for a stopped relay serve process",
                )

    def _fail(self, jobs: list[Job], message: str) -> None:
        """Log the failure once and fail every job's future with a SpoolError of ``message``."""
        log_event(logger, "commit_failed", logging.ERROR, jobs=len(jobs), error=message)
        for job in jobs:
            # One exception per future: a shared one would collect every awaiting task's traceback.
            job.outcome = (False, SpoolError(message))
        self._deliver(jobs)

    def _checkpoint(self, store: SpoolStore, batch: list[Job]) -> None:
        # Estimate the WAL growth: the bodies plus about one page of rows and index
        # entries per job.  A checkpoint per commit would add an fsync per commit.
        growth = sum(job.size for job in batch) + PAGE_ESTIMATE * len(batch)
        self._wal_growth += growth
        self._unchecked_growth += growth
        if self._checkpointer.checkpoints != self._checkpoints_seen:
            self._checkpoints_seen = self._checkpointer.checkpoints
            if self._wal_growth <= CATCH_UP_BYTES:
                self._catch_up(store)
            else:
                self._wal_growth = 0
                self._checkpointer.request()
        elif self._wal_growth >= CHECKPOINT_BYTES:
            self._wal_growth = 0
            self._checkpointer.request()
        # A stat per batch would cost a system call per batch, so the size is read
        # each time the estimate has grown by a sixteenth of the limit.  Small
        # batches rewrite several pages each, more than the estimate counts, so
        # the WAL can pass the limit by a few sixteenths before the RESTART below.
        if self._unchecked_growth < WAL_LIMIT_BYTES // 16:
            return
        self._unchecked_growth = 0
        if wal_size(self.directory) <= WAL_LIMIT_BYTES:
            return
        try:
            store.connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.Error as exc:
            log_event(logger, "checkpoint_failed", logging.WARNING, spool=str(self.directory), error=str(exc))
        else:
            log_event(logger, "checkpoint_restart", spool=str(self.directory), wal_bytes=wal_size(self.directory))

    def _catch_up(self, store: SpoolStore) -> None:
        """Copy the frames committed since the last background checkpoint, so the WAL starts again."""
        try:
            store.connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            # The pages stay in the WAL, and the next background checkpoint copies them.
            log_event(logger, "checkpoint_failed", logging.WARNING, spool=str(self.directory), error=str(exc))
            return
        self._wal_growth = 0

    def _next_batch(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        assert isinstance(first, Job)
        batch = [first]
        if first.may_wait and self.commit_delay > 0:
            # A sleep, not a wait on the queue: one wake-up however many jobs arrive.
            time.sleep(self.commit_delay)
        return batch, self._drain(batch)

    def _drain(self, batch: list[Job]) -> bool:
        """Add the jobs already queued to ``batch``, up to the limits; return whether stop was requested."""
        size = sum(job.size for job in batch)
        while len(batch) < self.batch_max_messages and size < self.batch_max_bytes:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return True
            assert isinstance(item, Job)
            batch.append(item)
            size += item.size
        return False

    def _commit(self, store: SpoolStore, batch: list[Job]) -> None:
        started = time.monotonic()
        try:
            self._set_synchronous(store, "FULL" if any(job.durable for job in batch) else "NORMAL")
            with store.transaction():
                commits = [job for job in batch if job.pending is not None]
                if commits:
                    queue_ids = store.insert_messages([job.pending for job in commits if job.pending])
                    for job, queue_id in zip(commits, queue_ids, strict=True):
                        job.outcome = (True, queue_id)
                for job in batch:
                    if job.operation is not None:
                        self._apply(store, job)
        except (SpoolError, sqlite3.Error) as exc:
            self._fail(batch, str(exc) if isinstance(exc, SpoolError) else f"spool {self.directory}: {exc}")
            return
        except Exception as exc:
            # A bug in an operation must not kill the thread and strand every caller.
            logger.exception("spool writer failed")
            for job in batch:
                job.outcome = (False, SpoolError(f"spool {self.directory}: internal error: {exc!r}"))
        else:
            self.batches += 1
            self.jobs += len(batch)
            log_event(logger, "committed", logging.DEBUG, jobs=len(batch),
                      seconds=time.monotonic() - started)
        self._deliver(batch)

    def _set_synchronous(self, store: SpoolStore, mode: str) -> None:
        # Set before BEGIN, and the state is updated only after the PRAGMA succeeded,
        # so a durable batch never commits under NORMAL.
        if self._synchronous != mode:
            store.connection.execute(f"PRAGMA synchronous = {mode}")
            self._synchronous = mode

    def _apply(self, store: SpoolStore, job: Job) -> None:
        assert job.operation is not None
        connection = store.connection
        connection.execute("SAVEPOINT job")
        try:
            result = job.operation(store)
        except SpoolError:
            raise
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.directory}: {exc}") from exc
        except Exception as exc:
            connection.execute("ROLLBACK TO job")
            connection.execute("RELEASE job")
            job.outcome = (False, exc)
            return
        connection.execute("RELEASE job")
        job.outcome = (True, result)

    def _deliver(self, batch: list[Job]) -> None:
        # One call_soon_threadsafe per event loop and batch, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        blocking: list[Job] = []
        first = batch[0].loop if batch else None
        if first is not None and all(job.loop is first for job in batch):
            # The common case: every job came from the sessions of one worker's loop.
            by_loop[first] = batch
        else:
            for job in batch:
                if job.loop is None:
                    blocking.append(job)
                else:
                    by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop was closed while we committed
                loop.call_soon_threadsafe(_settle, jobs)
        _settle(blocking)

