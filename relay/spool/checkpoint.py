"""Background WAL checkpoints, so that commits do not wait for them.

In WAL mode SQLite appends every commit to ``spool.db-wal`` and later copies
the pages into ``spool.db`` (a checkpoint).  By default the connection that
commits runs the checkpoint once the WAL contains 1000 pages (SQLite's
``wal_autocheckpoint`` default, about 4 MiB), and every session waiting on
that commit waits for the copy and its fsync too.  The spool's writer turns
that off and wakes this thread instead, each time its commits have added
about ``CHECKPOINT_BYTES`` to the WAL: the thread runs a PASSIVE checkpoint
on its own connection while the writer goes on committing.
SQLite releases the GIL while it copies, so the copy uses another core.

PASSIVE checkpoints never block the writer, so under a load with no pause
they never catch up with it: the writer appends while the thread copies.
SQLite writes the WAL from its start again only when a checkpoint has
copied every frame, so the writer finishes the job.  After a background
checkpoint, when its own commits have added at most ``CATCH_UP_BYTES``
since that checkpoint was requested, it runs a PASSIVE checkpoint itself,
which copies only those frames.  Its next transaction then reuses the start
of the WAL file, whose pages are already allocated and cached, instead of
extending the file.  Two bounds stop the WAL from growing without end if
that fails: ``journal_size_limit`` truncates the file when SQLite restarts
the WAL, and the writer runs a blocking RESTART checkpoint whenever the WAL
file passes ``WAL_LIMIT_BYTES``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

from relay.log import log_event
from relay.spool.store import database_path

logger = logging.getLogger("relay.spool")

# Four times SQLite's own checkpoint point (wal_autocheckpoint = 1000 pages of
# 4 KiB).  Fewer and larger checkpoints cost less per message, for two reasons.
# The writer's catch-up after each background checkpoint ends with an fsync of
# spool.db, which the waiting sessions pay.  And pages that every commit rewrites
# (the header page, B-tree interior pages) are copied once per checkpoint.
CHECKPOINT_BYTES = 4 * 1000 * 4096
# WAL octets per committed job besides the body: its rows and index entries
# change about one page; an estimate, used only to pace checkpoints.
PAGE_ESTIMATE = 4096

# The writer copies the remaining frames itself (see the module docs) only when
# its commits added at most this much since the background checkpoint was
# requested, so that the copy delays its next batch by little.  Otherwise it
# requests another background checkpoint.
CATCH_UP_BYTES = 512 * 1024

# Above this size the writer runs a RESTART checkpoint itself, so that its next
# commit starts the WAL again from the beginning, even though that delays the
# batch.  64 MiB is 16 times SQLite's default checkpoint point, so it is
# reached only when background checkpoints fall behind.
WAL_LIMIT_BYTES = 64 * 1024 * 1024


def wal_path(directory: Path) -> Path:
    """Return the path of the spool's write-ahead log."""
    return database_path(directory).with_name(database_path(directory).name + "-wal")


class Checkpointer:
    """A thread that runs a PASSIVE checkpoint each time the writer requests one."""

    def __init__(self, directory: Path, busy_timeout: float) -> None:
        self.directory = directory
        self.busy_timeout = busy_timeout
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="relay-spool-checkpoint", daemon=True)
        self.checkpoints = 0  # completed PASSIVE checkpoints, for tests and the writer

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def request(self) -> None:
        """Ask for a checkpoint soon; requests made while one runs are merged."""
        self._wanted.set()

    def stop(self) -> None:
        """Stop the thread after the checkpoint in progress, if any."""
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(
                database_path(self.directory), timeout=self.busy_timeout, isolation_level=None
            )
        except sqlite3.Error as exc:
            log_event(logger, "checkpoint_failed", logging.ERROR, spool=str(self.directory), error=str(exc))
            return
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    break
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                except sqlite3.Error as exc:
                    # Harmless for durability: the pages stay in the WAL and the next
                    # checkpoint, or the writer's RESTART at the size limit, copies them.
                    log_event(logger, "checkpoint_failed", logging.WARNING, spool=str(self.directory), error=str(exc))
        finally:
            connection.close()


def wal_size(directory: Path) -> int:
    """Return the size of the WAL file in octets (0 if there is none)."""
    try:
        return os.stat(wal_path(directory)).st_size
    except FileNotFoundError:
        return 0
