"""SQL access to one spool database through one ``sqlite3`` connection.

``SpoolStore`` contains every statement the spool runs.  The writer thread uses
one store for all writes and wraps a batch of operations in one transaction.
Reader threads and ``relay queue`` open stores of their own, and ``relay
queue`` wraps each change in ``transaction()``.

Layout: ``DIR/spool.db`` (with SQLite's ``-wal`` and ``-shm`` files) and
``DIR/corrupt/``, where records that cannot be decoded are moved aside.
The database runs in WAL mode with ``synchronous=FULL``, so a committed
transaction is on stable storage when ``COMMIT`` returns and readers never
block the writer.  A crashed writer leaves a WAL that the next connection
replays by itself: no repair step is needed.

Each message is one row in ``message`` (structured fields as columns, the
rest of the envelope, recipients included, as an orjson document, and the
body with a CRC-32 to detect damage) and one ``attempt`` row per delivery
attempt or operator action.  A message row's key is the integer
``relay.spool.ids.message_key`` derives from its queue ID, so a commit
inserts into one B-tree for the message and needs no index on the queue ID.

The document of a message that ``relay sendmail`` stored also records,
as ``picked_up``, that a claim has returned it (see ``claim``).  The
document of a copy that a local alias forwarded records ``forwarded_from``,
the queue ID of the message the sender submitted.  Both keys are written
only when set, and a document without them reads as before.

Per-recipient state lives in ``recipient`` rows, but a commit writes none.
It adds one small ``fresh`` row, which means "every recipient queued, due
at arrival".  The first delivery attempt that leaves the message in the
spool (a recipient pending or a DSN owed), an operator action, or a claim of
part of the message writes the recipient rows from the envelope document.
A message delivered at its first attempt never has any.  The reason: ``recipient`` is an index B-tree keyed by queue
ID and index, which SQLite rebalances on appends at its right edge, so its
rows cost about half of a commit's pages.  Appends to the rowid table
``fresh`` are cheap.

Schema version 1 kept the body in a table of its own, and both tables were
keyed by the queue ID text.  Opening such a spool migrates it.  Version 2
had no ``fresh`` table, and opening such a spool adds it.  Versions before 4
had no ``delivered_targets``, ``expired``, ``dsn_attempts`` and ``dsn_due``
columns in ``recipient``, and opening such a spool adds them: ``expired``
stays NULL in the rows recorded before, and ``delivered_targets`` is NULL
for every recipient.  A read-only store reads a version 3 spool without
converting it, and reads those values for the columns it lacks.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import idna
import orjson

from relay._spoolrows import add_message_rows
from relay.config import effective_user
from relay.log import log_event
from relay.spool.errors import CorruptRecord, MessageNotFound, SpoolError
from relay.spool.ids import KEY_SLOTS, MALFORMED_KEYS, is_queue_id, message_key, message_key_range, new_queue_id
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

logger = logging.getLogger("relay.spool")


def _bind_unchanged(value: bytes | None) -> bytes | None:
    return value


# CPython's sqlite3 module (need_adapt in Modules/_sqlite/cursor.c, 3.11)
# binds int, float, str and bytearray parameters directly, but sends bytes and
# None through its adapter lookup.  Without a registered adapter, that lookup
# raises and clears an AttributeError for ``PrepareProtocol.__adapt__``, which
# costs more than binding the value.  A commit binds three such values per
# message (the envelope document, the body and a missing AUTH user).  These
# adapters return the value itself, so SQLite stores exactly what it stored
# without them.  The registry is global to the process, so an adapter that
# other code registers for bytes or None replaces this one, or is replaced by it.
sqlite3.register_adapter(bytes, _bind_unchanged)
sqlite3.register_adapter(type(None), _bind_unchanged)

DATABASE_NAME = "spool.db"
CORRUPT_DIRECTORY = "corrupt"
# The reason of a CorruptRecord for a message that has neither recipient rows nor a fresh row.
NO_RECIPIENTS = "message has no recipients"
# File in the spool directory that a flush rewrites before it makes recipients
# due, so a running scheduler also lifts the backoff of whole destinations,
# which it keeps in memory (see relay.delivery.scheduler).
FLUSH_REQUEST = "flush-request"
SCHEMA_VERSION = 4

# ``crc32`` and ``body`` are NULL only for a message migrated from version 1
# without its body row; reading that body raises CorruptRecord.
_MESSAGE_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL,
    arrival REAL NOT NULL,
    sender TEXT NOT NULL,
    size INTEGER NOT NULL,
    client_address TEXT,
    helo_name TEXT,
    auth_user TEXT,
    envelope BLOB NOT NULL,
    crc32 INTEGER,
    body BLOB
)"""

# A message nobody has tried to deliver yet has no ``recipient`` rows: its
# recipients are in its envelope document, and one row here stands for all
# of them (state queued, due at arrival).  ``domains`` lists each recipient's
# domain in index order between spaces, for filters by domain.
_FRESH_TABLE = """
CREATE TABLE IF NOT EXISTS fresh (
    id INTEGER PRIMARY KEY,
    recipients INTEGER NOT NULL,
    domains TEXT NOT NULL,
    lease_token TEXT,
    lease_until REAL
)"""

# Columns that schema version 4 added to ``recipient``, as ``_SCHEMA`` has
# them.  ``delivered_targets`` is a JSON list of the local delivery targets
# (Maildir users and forwarded addresses) of an alias recipient that already
# got the message, stored with a deferral so that the retry skips them, and
# NULL when there are none.  ``expired`` is 1 for a recipient bounced because
# its queue lifetime ran out, 0 for any other recorded result, and NULL in
# rows recorded before version 4.  A DSN that failed to be queued is tried
# again from ``dsn_due`` (time.time()), after a backoff that grows with
# ``dsn_attempts``.
_VERSION_4_COLUMNS = (
    "delivered_targets TEXT",
    "expired INTEGER",
    "dsn_attempts INTEGER NOT NULL DEFAULT 0",
    "dsn_due REAL NOT NULL DEFAULT 0",
)

_SCHEMA = _MESSAGE_TABLE.format(name="message") + """;
CREATE TABLE IF NOT EXISTS recipient (
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
    delivered_targets TEXT,
    expired INTEGER,
    dsn_attempts INTEGER NOT NULL DEFAULT 0,
    dsn_due REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (queue_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipient_due ON recipient (next_attempt)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS recipient_dsn ON recipient (queue_id) WHERE dsn = 'pending';
CREATE TABLE IF NOT EXISTS attempt (
    queue_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    time REAL NOT NULL,
    outcome TEXT NOT NULL,
    reply TEXT NOT NULL,
    host TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempt_message ON attempt (queue_id);
""" + _FRESH_TABLE

_INSERT_MESSAGE = (
    "INSERT INTO message"
    " (id, queue_id, arrival, sender, size, client_address, helo_name, auth_user, envelope, crc32, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The condition that finds a message by queue ID, with the parameters from ``_match``.
_BY_QUEUE_ID = "id BETWEEN ? AND ? AND queue_id = ?"
# Queue IDs that one statement looks up or deletes.  Each adds a term to an OR
# or an IN list, and SQLite limits an expression's depth to 1000 by default.
LOOKUP_CHUNK = 100
# Messages per page of ``queue_id_pages``, so ``relay queue list`` keeps one
# page in memory however long the queue is.
LIST_PAGE = 500
_Item = TypeVar("_Item")
_INSERT_RECIPIENT = (
    "INSERT INTO recipient"
    " (queue_id, idx, address, domain, orcpt, notify, state, next_attempt, lease_token, lease_until)"
    " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)"
)

# Queue IDs of messages owing a DSN that is due, with ``now`` and a limit as
# parameters.  Queue IDs sort by arrival, so the oldest come first.
_OWED_DSN_QUERY = (
    "SELECT DISTINCT queue_id FROM recipient WHERE dsn = 'pending' AND dsn_due <= ? ORDER BY queue_id LIMIT ?"
)
_INSERT_FRESH = "INSERT INTO fresh (id, recipients, domains) VALUES (?, ?, ?)"
# A fresh message that no live lease holds, with ``now`` as the parameter.
_FRESH_UNLEASED = "(f.lease_until IS NULL OR f.lease_until <= ?)"

_MESSAGE_VALUES = _INSERT_MESSAGE.count("?")
_FRESH_VALUES = _INSERT_FRESH.count("?")


@functools.lru_cache(maxsize=64)
def _insert_many(statement: str, rows: int) -> str:
    """Return an ``INSERT ... VALUES (...)`` statement extended to insert ``rows`` rows.

    NOTE: each row count is a statement of its own in sqlite3's statement
    cache (128 entries by default), so batches of many different sizes
    prepare their statements again.
    """
    head, _, values = statement.partition(" VALUES ")
    return head + " VALUES " + ",".join([values] * rows)


_RECIPIENT_COLUMNS = (
    "idx, address, orcpt, notify, state, attempts, next_attempt, last_attempt, last_reply, last_host, dsn,"
    " delivered_targets, expired, dsn_attempts, dsn_due"
)


def _column_default(definition: str) -> str:
    """Return the SQL value that ``ALTER TABLE ... ADD COLUMN definition`` gives existing rows."""
    words = definition.split()
    return words[words.index("DEFAULT") + 1] if "DEFAULT" in words else "NULL"


# Values that a read-only store selects in place of the version 4 columns
# that a version 3 spool lacks, the same values that converting it stores.
_VERSION_4_DEFAULTS = {definition.split()[0]: _column_default(definition) for definition in _VERSION_4_COLUMNS}
# The oldest schema version that a read-only store reads without converting it.
OLDEST_READABLE_VERSION = 3


@dataclass(frozen=True, slots=True)
class ResultGroup:
    """Results of one ``record_results`` call: the lease they were claimed under and the time."""

    results: tuple[DeliveryResult, ...]
    lease_token: str | None
    now: float


@dataclass(slots=True)
class _ResultRow:
    """The columns of one recipient that recording a result reads, kept current during a batch."""

    state: str
    notify: str
    lease_token: str | None
    lease_until: float | None
    dsn: str
    sender: str


# Not frozen: a frozen dataclass takes about three times as long to create, and
# one is created per message on the event loop's thread.
@dataclass(slots=True)
class PendingCommit:
    """One message on its way into the spool, as the writer thread inserts it."""

    envelope: Envelope
    body: bytes
    arrival: float
    queue_id: str
    dsn_for: DsnRequest | None = None
    # ``message_key(queue_id)`` when the caller has checked the ID's form and
    # derived the key already; None makes the writer check and derive them.
    key: int | None = None


def database_path(directory: str | os.PathLike[str]) -> Path:
    """Return the path of the spool database inside a spool directory."""
    return Path(directory) / DATABASE_NAME


def wal_paths(directory: str | os.PathLike[str]) -> list[Path]:
    """Return the paths of the spool database's ``-wal`` and ``-shm`` files, which exist while it is open."""
    database = database_path(directory)
    return [database.with_name(database.name + suffix) for suffix in ("-wal", "-shm")]


def read_only_uri(directory: str | os.PathLike[str]) -> str:
    """Return the SQLite URI that opens the spool database in ``directory`` for reading only.

    The URI adds ``immutable=1`` when neither ``-wal`` nor ``-shm`` exists (see
    ``SpoolStore``), so that opening creates neither.
    """
    database = database_path(directory)
    uri = database.resolve().as_uri() + "?mode=ro"
    if not any(os.path.exists(path) for path in wal_paths(directory)):
        # NOTE: a relay that starts during the read writes to a new WAL, which
        # this connection does not see, and a checkpoint it runs before the
        # read ends changes spool.db under it.  SQLite then reports the
        # database as malformed, and the command exits with that error.
        uri += "&immutable=1"
    return uri


def fresh_domains(domain_list: str) -> list[str]:
    """Return the recipient domains, one per recipient, of a ``fresh`` row's ``domains`` column."""
    return domain_list[1:-1].split(" ")


def _casefold(value: str | None) -> str | None:
    return value.casefold() if value is not None else None


def _domain_forms(domain: str) -> list[str]:
    """Return ``domain`` lower-cased, plus its A-label and U-label forms when they differ.

    The forms come from IDNA2008 with the UTS #46 mapping and without its
    transitional processing, as delivery looks domains up, so ``straße.test``
    matches ``xn--strae-oqa.test`` and never ``strasse.test``, which Python's
    IDNA2003 codec would map it to.
    """
    name = domain.lower().rstrip(".")
    forms = [name]
    try:
        ascii_name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        unicode_name = idna.decode(ascii_name)
    except UnicodeError:
        # idna.IDNAError is a UnicodeError: a name IDNA2008 rejects is matched as written.
        return forms
    for form in (ascii_name.lower(), unicode_name.lower()):
        if form not in forms:
            forms.append(form)
    return forms


def _chunks(items: Sequence[_Item]) -> Iterator[Sequence[_Item]]:
    """Yield ``items`` in slices of ``LOOKUP_CHUNK``, one per statement."""
    for start in range(0, len(items), LOOKUP_CHUNK):
        yield items[start : start + LOOKUP_CHUNK]


def _checked_body(queue_id: str, crc: int | None, data: bytes | None) -> bytes:
    """Return a stored body after checking it against its CRC-32; raise CorruptRecord when it fails."""
    if data is None:
        # Only a version 1 spool could lose a body row, and migration kept such messages.
        raise CorruptRecord(queue_id, "body row missing")
    if not isinstance(data, bytes) or zlib.crc32(data) != crc:
        raise CorruptRecord(queue_id, "body does not match its CRC-32")
    return data


def _match(queue_id: str) -> tuple[int, int, str]:
    """Return the parameters of ``_BY_QUEUE_ID`` for one queue ID."""
    low, high = message_key_range(queue_id)
    return low, high, queue_id


def _sql_message_key(queue_id: object) -> int | None:
    # The key a version 1 row moves to, or NULL when its queue ID is not well formed.
    if isinstance(queue_id, str) and is_queue_id(queue_id):
        return message_key(queue_id)
    return None


def _fsync_directory(path: Path) -> None:
    # A new file's directory entry is durable only once the directory is fsynced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolStore:
    """One connection to the spool database, with every query the spool runs.

    Methods that change data do not commit: callers wrap them in
    ``transaction()`` (``relay queue``) or in the writer's batch transaction.
    Any ``sqlite3.Error`` is raised as ``SpoolError``.  ``check_same_thread``
    goes to ``sqlite3.connect``: False lets another thread close a
    connection that its own thread has stopped using.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        autocheckpoint: bool = True,
        read_only: bool = False,
        check_same_thread: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.read_only = read_only
        self._recipient_columns = _RECIPIENT_COLUMNS
        if read_only:
            self._open_read_only(busy_timeout)
            return
        try:
            # Path.exists raises PermissionError for a directory this user cannot search.
            created = not database_path(self.directory).exists()
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Checked here because SQLite reports a folder it cannot write only as
            # "unable to open database file".
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.directory))
            # isolation_level=None: the module's implicit transactions are off and
            # every BEGIN/COMMIT below is explicit.
            self.connection = sqlite3.connect(
                database_path(self.directory),
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=check_same_thread,
            )
        except FileExistsError as exc:
            # mkdir found something other than a directory at the path.
            raise SpoolError(
                f"cannot open spool {self.directory}: it is not a directory;"
                " give a directory in --spool or [spool] path"
            ) from exc
        except PermissionError as exc:
            raise SpoolError(
                f"cannot open spool {self.directory}: permission denied; let user {effective_user()} write it,"
                " or give another directory in --spool or [spool] path"
            ) from exc
        except OSError as exc:
            raise SpoolError(
                f"cannot open spool {self.directory}: {exc.strerror or exc};"
                " give a directory that this user can create and write, in --spool or [spool] path"
            ) from exc
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {self.directory}: {exc}") from exc
        try:
            self._configure(busy_timeout, autocheckpoint)
            if created:
                _fsync_directory(self.directory)
        except BaseException:
            self.connection.close()
            raise

    def _open_read_only(self, busy_timeout: float) -> None:
        """Open an existing spool for reading only: no migration, no checkpoint, no file created or changed.

        While a relay has the spool open, its ``-wal`` and ``-shm`` files
        exist, and SQLite (3.22 and later) reads through them with read
        access alone.  When neither exists, the last connection closed after
        copying the whole WAL into ``spool.db``, so the database file alone
        holds every commit, and ``immutable=1`` reads it without creating
        them, which a user without write access to the directory could not do.

        A version 3 spool differs only in the ``recipient`` columns that
        version 4 added, so it is read as it is, with each missing column
        read as the conversion would fill it.  Raises SpoolError for an
        older schema version.
        """
        try:
            self.connection = sqlite3.connect(
                read_only_uri(self.directory), uri=True, timeout=busy_timeout, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open spool {self.directory}: {exc}") from exc
        try:
            with self._errors("open"):
                version = self._schema_version()
                if version < OLDEST_READABLE_VERSION:
                    raise SpoolError(
                        f"spool {self.directory} has schema version {version}, and this relay reads versions"
                        f" {OLDEST_READABLE_VERSION} to {SCHEMA_VERSION} without changing the spool;"
                        " start `relay serve` on it once, as the user that owns it, to migrate it"
                    )
                if version < SCHEMA_VERSION:
                    self._recipient_columns = self._readable_recipient_columns()
        except BaseException:
            self.connection.close()
            raise

    def _configure(self, busy_timeout: float, autocheckpoint: bool) -> None:
        with self._errors("open"):
            # SQLite takes milliseconds as a signed 32-bit number and treats more as 0 (no wait).
            self.connection.execute(f"PRAGMA busy_timeout = {min(int(busy_timeout * 1000), 2**31 - 1)}")
            mode = self._enable_wal(busy_timeout)
            if mode != "wal":
                raise SpoolError(f"spool {self.directory}: the file system does not support WAL mode ({mode})")
            # FULL: each commit fsyncs the WAL, so a committed message survives power loss.
            self.connection.execute("PRAGMA synchronous = FULL")
            if not autocheckpoint:
                # The writer leaves checkpoints to relay.spool.checkpoint's thread.
                self.connection.execute("PRAGMA wal_autocheckpoint = 0")
            # Truncate the WAL file to this size when SQLite restarts it: 64 MiB.
            self.connection.execute(f"PRAGMA journal_size_limit = {64 * 1024 * 1024}")
            # Debian builds SQLite with SQLITE_SECURE_DELETE (see PRAGMA compile_options
            # of its 3.40.1), so secure_delete defaults to ON and every freed page is
            # overwritten with zeros.  Deleting a delivered 100 KiB body then writes
            # 100 KiB of zeros to the WAL, and a checkpoint copies them again.  FAST
            # clears deleted cells only in pages that are written anyway, so a freed
            # body page keeps its old content until SQLite reuses it, as the disk
            # blocks of a deleted queue file do.
            self.connection.execute("PRAGMA secure_delete = FAST")
            version = self._schema_version()
            if version == SCHEMA_VERSION:
                return
            with self.transaction():
                # Read again under the write lock: another process may have created
                # or migrated the spool since.
                version = self._schema_version()
                if version == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self.connection.execute(statement)
                if version == 1:
                    self._migrate_from_version_1()
                if version in (1, 2):
                    # Version 2 wrote recipient rows for every message; its messages keep them.
                    self.connection.execute(_FRESH_TABLE)
                if version in (1, 2, 3):
                    self._add_version_4_columns()
                self.connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _add_version_4_columns(self) -> None:
        """Add the ``recipient`` columns of version 4 that the table does not have yet."""
        columns = self._recipient_table_columns()
        for column in _VERSION_4_COLUMNS:
            # Adding a column rewrites no row: old rows read NULL or the default.
            if column.split()[0] not in columns:
                self.connection.execute(f"ALTER TABLE recipient ADD COLUMN {column}")

    def _recipient_table_columns(self) -> set[str]:
        return {row[1] for row in self.connection.execute("PRAGMA table_info(recipient)")}

    def _readable_recipient_columns(self) -> str:
        """Return ``_RECIPIENT_COLUMNS`` with a default in place of each version 4 column the table lacks."""
        present = self._recipient_table_columns()
        columns = [name.strip() for name in _RECIPIENT_COLUMNS.split(",")]
        return ", ".join(
            name if name in present or name not in _VERSION_4_DEFAULTS else _VERSION_4_DEFAULTS[name]
            for name in columns
        )

    def _schema_version(self) -> int:
        version: int = self.connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.directory} has schema version {version}; this relay reads"
                f" version {SCHEMA_VERSION}, so upgrade relay"
            )
        return version

    def _migrate_from_version_1(self) -> None:
        """Move version 1's ``message`` and ``body`` rows into one ``message`` table keyed by integer.

        Runs inside the caller's transaction, so a crash leaves the spool
        entirely at version 1 or entirely at version 2.  Queue IDs, and with
        them everything that refers to a message, stay as they were.
        """
        connection = self.connection
        connection.execute(_MESSAGE_TABLE.format(name="message_v2"))
        # Most rows move in one statement.  Rows whose key is taken (two IDs of one
        # microsecond and slot) or that have no key (an ID that is not well
        # formed) are skipped here and placed one by one below.
        connection.create_function("relay_message_key", 1, _sql_message_key, deterministic=True)
        try:
            connection.execute(
                "INSERT OR IGNORE INTO message_v2"
                " (id, queue_id, arrival, sender, size, client_address, helo_name, auth_user, envelope, crc32, body)"
                " SELECT relay_message_key(m.queue_id), m.queue_id, m.arrival, m.sender, m.size,"
                " m.client_address, m.helo_name, m.auth_user, m.envelope, b.crc32, b.data"
                " FROM message m LEFT JOIN body b USING (queue_id)"
                " WHERE relay_message_key(m.queue_id) IS NOT NULL"
            )
            # A row moved above sits at its own key, so finding it needs no index on queue_id.
            left = connection.execute(
                "SELECT m.queue_id FROM message m WHERE NOT EXISTS (SELECT 1 FROM message_v2 n"
                " WHERE n.id = relay_message_key(m.queue_id) AND n.queue_id = m.queue_id) ORDER BY m.queue_id"
            ).fetchall()
        finally:
            connection.create_function("relay_message_key", 1, None)
        for (queue_id,) in left:
            key = self._free_key(queue_id, table="message_v2")
            if key is None:
                raise SpoolError(f"spool {self.directory}: no free message key for {queue_id} during migration")
            connection.execute(
                "INSERT INTO message_v2"
                " (id, queue_id, arrival, sender, size, client_address, helo_name, auth_user, envelope, crc32, body)"
                " SELECT ?, m.queue_id, m.arrival, m.sender, m.size,"
                " m.client_address, m.helo_name, m.auth_user, m.envelope, b.crc32, b.data"
                " FROM message m LEFT JOIN body b USING (queue_id) WHERE m.queue_id = ?",
                (key, queue_id),
            )
        connection.execute("DROP TABLE message")
        connection.execute("DROP TABLE body")
        connection.execute("ALTER TABLE message_v2 RENAME TO message")
        (count,) = connection.execute("SELECT count(*) FROM message").fetchone()
        log_event(logger, "spool_migrated", spool=str(self.directory), version=SCHEMA_VERSION, messages=count)

    def _free_key(self, queue_id: str, table: str = "message") -> int | None:
        """Return a key not yet used in ``table`` within ``queue_id``'s key range, or None when all are used.

        A well-formed ID prefers its own key and then the next slots of its
        microsecond.  An ID that is not well formed gets the key below the
        lowest negative one.
        """
        low, high = message_key_range(queue_id)
        if (low, high) == MALFORMED_KEYS:
            lowest = self.connection.execute(f"SELECT min(id) FROM {table} WHERE id < 0").fetchone()[0]
            key = -1 if lowest is None else lowest - 1
            return key if key >= low else None
        rows = self.connection.execute(f"SELECT id FROM {table} WHERE id BETWEEN ? AND ?", (low, high))
        used = {key for (key,) in rows}
        own = message_key(queue_id)
        for step in range(KEY_SLOTS):
            key = low + (own - low + step) % KEY_SLOTS
            if key not in used:
                return key
        return None

    def _enable_wal(self, busy_timeout: float) -> str:
        """Switch to WAL mode and return the mode now in force.

        When several processes open a new spool at once, switching the
        journal mode can fail with "database is locked" at once, without
        SQLite's busy handler waiting, so the switch is retried here until
        the busy timeout has passed.
        """
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                mode: str = self.connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                return mode
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()

    def __enter__(self) -> SpoolStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.directory}: {action} failed: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in one write transaction, committed durably at the end."""
        with self._errors("begin transaction"):
            # IMMEDIATE takes the write lock now, waiting up to busy_timeout, so a
            # lock held by another process fails the transaction here and not half-way.
            self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.connection.execute("ROLLBACK")
            raise
        try:
            self.connection.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.connection.execute("ROLLBACK")
            raise SpoolError(f"spool {self.directory}: commit failed: {exc}") from exc

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Run the block in one read transaction, so every row it reads comes from the same commit.

        Inside a transaction already (a writer's batch), the block joins it.
        """
        if self.connection.in_transaction:
            yield
            return
        with self._errors("begin read"):
            self.connection.execute("BEGIN")
        try:
            yield
        finally:
            with self._errors("end read"):
                self.connection.execute("COMMIT")

    # -- writes -------------------------------------------------------------

    def insert_message(self, pending: PendingCommit) -> str:
        """Insert one message and its recipients; return its queue ID.

        A queue ID already in the spool (a clash between processes) is replaced by
        a fresh one, so the returned ID is the one to report.  When only the
        ID's key is taken, the message takes another free key of its microsecond
        and keeps its ID.
        """
        envelope = pending.envelope
        if not envelope.recipients:
            raise ValueError("a message needs at least one recipient")
        queue_id = pending.queue_id
        with self._errors("insert message"):
            for _ in range(5):
                existing = self.connection.execute(f"SELECT 1 FROM message WHERE {_BY_QUEUE_ID}", _match(queue_id))
                key = None if existing.fetchone() else self._free_key(queue_id)
                if key is not None:
                    break
                queue_id = new_queue_id(pending.arrival)
            else:
                raise SpoolError("could not find an unused queue ID after 5 tries")
            message_values: list[Any] = []
            fresh_values: list[Any] = []
            add_message_rows((replace(pending, queue_id=queue_id, key=key),), message_values, fresh_values)
            self.connection.execute(_INSERT_MESSAGE, message_values)
            self.connection.execute(_INSERT_FRESH, fresh_values)
            if pending.dsn_for is not None:
                self._mark_dsn_queued(pending.dsn_for, queue_id, pending.envelope)
        return queue_id

    def insert_messages(self, batch: Sequence[PendingCommit]) -> list[str]:
        """Insert several messages with one statement per table; return their queue IDs.

        This is the group commit's fast path.  One multi-row ``INSERT`` per
        table costs one statement execution per batch instead of one per row.
        When any key clashes the insert is undone and each message is
        inserted alone by ``insert_message``, which picks a free key or a
        fresh ID for the clashing one.
        """
        message_values: list[Any] = []
        fresh_values: list[Any] = []
        add_message_rows(batch, message_values, fresh_values)
        limit = self.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        with self._errors("insert messages"):
            if len(message_values) <= limit:
                # A failed statement undoes only its own rows, and the message rows
                # go first in one statement, so a clash leaves nothing to undo.
                try:
                    self.connection.execute(_insert_many(_INSERT_MESSAGE, len(batch)), message_values)
                except sqlite3.IntegrityError:
                    return [self.insert_message(pending) for pending in batch]
                self.connection.execute(_insert_many(_INSERT_FRESH, len(batch)), fresh_values)
            elif not self._insert_in_parts(message_values, fresh_values, limit):
                return [self.insert_message(pending) for pending in batch]
            for pending in batch:
                if pending.dsn_for is not None:
                    self._mark_dsn_queued(pending.dsn_for, pending.queue_id, pending.envelope)
        return [pending.queue_id for pending in batch]

    def _insert_in_parts(self, message_values: list[Any], fresh_values: list[Any], limit: int) -> bool:
        """Insert rows too many for one statement in several, inside a savepoint; return False on a clash.

        SQLite before 3.32 allows 999 parameters per statement, which is 90
        message rows.
        """
        self.connection.execute("SAVEPOINT bulk_insert")
        try:
            for statement, values, width in (
                (_INSERT_MESSAGE, message_values, _MESSAGE_VALUES),
                (_INSERT_FRESH, fresh_values, _FRESH_VALUES),
            ):
                step = max(1, limit // width) * width
                for start in range(0, len(values), step):
                    part = values[start : start + step]
                    self.connection.execute(_insert_many(statement, len(part) // width), part)
        except sqlite3.IntegrityError:
            self.connection.execute("ROLLBACK TO bulk_insert")
            self.connection.execute("RELEASE bulk_insert")
            return False
        self.connection.execute("RELEASE bulk_insert")
        return True

    def _mark_dsn_queued(self, request: DsnRequest, dsn_id: str, dsn: Envelope) -> None:
        marks = ",".join("?" * len(request.indexes))
        condition = f"queue_id = ? AND idx IN ({marks}) AND dsn = 'pending'"
        parameters = (request.queue_id, *request.indexes)
        (owed,) = self.connection.execute(f"SELECT COUNT(*) FROM recipient WHERE {condition}", parameters).fetchone()
        if owed < len(set(request.indexes)):
            # Another scheduler on this spool queued a DSN for some of these
            # recipients after this one read them as owed, or the message was
            # deleted since.  The sender must not get a report twice, so this
            # copy goes, and recipients still owed get one at the next look.
            self._delete_rows(dsn_id)
            log_event(logger, "dsn_dropped", queue_id=request.queue_id, dsn_id=dsn_id,
                      reason="a recipient of it owes no DSN any more")
            return
        self.connection.execute(f"UPDATE recipient SET dsn = 'queued' WHERE {condition}", parameters)
        # Logged here, before delete_if_done may log the original's ``removed``.
        log_event(logger, "dsn_queued", queue_id=request.queue_id, dsn_id=dsn_id,
                  to=dsn.recipients[0].address, recipients=len(request.indexes))
        self.delete_if_done(request.queue_id)

    def claim(
        self,
        owner: str,
        token: str,
        *,
        now: float,
        lease_time: float,
        limit: int,
        domain: str | None,
        body_max_bytes: int | None = None,
        max_wait: float | None = None,
    ) -> list[Claim]:
        """Lease up to ``limit`` due recipients to ``token`` and return them by message.

        Due means queued or deferred, ``next_attempt <= now`` and no live lease.
        ``max_wait`` is the longest wait the caller ever sets.  With it, a
        recipient whose ``next_attempt`` is further ahead than that is due too,
        and so is a fresh message that arrived after ``now``.  Their times were
        stored before the clock was set back, and would otherwise wait out the
        step as well.
        With ``body_max_bytes`` each claim carries its message's body when the
        body is at most that many octets.  Messages whose records cannot be
        decoded, or whose body read for the claim fails its CRC-32, are moved
        aside, not returned.  The first claim of a local submission marks it
        as picked up and sets ``Claim.picked_up``.
        """
        until = now + lease_time
        select = (
            "SELECT queue_id, idx, next_attempt FROM recipient WHERE state IN ('queued', 'deferred')"
            " AND (lease_until IS NULL OR lease_until <= ?)"
        )
        parameters: list[Any] = [now]
        if domain is not None:
            select += " AND domain = ?"
            parameters.append(domain.lower())
        with self._errors("claim recipients"):
            if domain is not None:
                # Only some recipients of a fresh message may be at the domain, and
                # only recipient rows can be leased one by one.
                at_domain, domain_parameters = _fresh_domain_condition([domain.lower()])
                self._materialize_fresh(
                    f"{at_domain} AND {_FRESH_UNLEASED}", [*domain_parameters, now], limit=limit
                )
            due = self.connection.execute(
                f"{select} AND next_attempt <= ? ORDER BY next_attempt LIMIT ?", [*parameters, now, limit]
            ).fetchall()
            if max_wait is not None:
                # A separate range on the next_attempt index, which is empty unless the
                # clock was set back.  These rows count as due now for the ordering.
                late = self.connection.execute(
                    f"{select} AND next_attempt > ? LIMIT ?", [*parameters, now + max_wait, limit]
                ).fetchall()
                due += [(queue_id, index, now) for queue_id, index, _ in late]
            fresh = []
            if domain is None:
                # A fresh message is due at arrival, which is only after ``now`` when the clock was set back.
                arrived_by = now if max_wait is None else math.inf
                fresh = self.connection.execute(
                    "SELECT m.queue_id, f.id, m.arrival, f.recipients FROM fresh f JOIN message m ON m.id = f.id"
                    f" WHERE {_FRESH_UNLEASED} AND m.arrival <= ? ORDER BY f.id LIMIT ?",
                    (now, arrived_by, limit),
                ).fetchall()
            rows, fresh_keys = self._choose_due(due, fresh, limit)
            self.connection.executemany(
                "UPDATE recipient SET lease_token = ?, lease_until = ? WHERE queue_id = ? AND idx = ?",
                [(token, until, queue_id, index) for queue_id, index in rows],
            )
            self.connection.executemany(
                "UPDATE fresh SET lease_token = ?, lease_until = ? WHERE id = ?",
                [(token, until, key) for key in fresh_keys],
            )
        claimed: dict[str, set[int]] = {}
        for queue_id, index in rows:
            claimed.setdefault(queue_id, set()).add(index)
        claims = []
        messages = self._load_claimed(list(claimed), body_max_bytes)
        picked_up = self._mark_picked_up(messages)
        for queue_id, indexes in claimed.items():
            loaded = messages.get(queue_id)
            if loaded is None:
                continue
            if isinstance(loaded, CorruptRecord):
                self.move_aside(queue_id, str(loaded))
                continue
            message, body = loaded
            recipients = tuple(r for r in message.recipients if r.index in indexes)
            claims.append(
                Claim(
                    queue_id=queue_id,
                    arrival=message.arrival,
                    size=message.size,
                    envelope=message.envelope,
                    recipients=recipients,
                    lease_token=token,
                    lease_until=until,
                    body=body,
                    picked_up=queue_id in picked_up,
                )
            )
        if claims:
            log_event(logger, "claimed", logging.DEBUG, owner=owner, messages=len(claims), recipients=len(rows))
        return claims

    def _mark_picked_up(
        self, messages: dict[str, tuple[StoredMessage, bytes | None] | CorruptRecord]
    ) -> set[str]:
        """Mark each local submission among ``messages`` that no claim returned before; return their queue IDs.

        The mark goes into the envelope document in the claim's transaction,
        so the ``picked_up`` line is due once per message, however many
        claims its recipients take and across restarts.  Only ``relay
        sendmail``'s messages are read and written again here.
        """
        first = [
            queue_id
            for queue_id, loaded in messages.items()
            if not isinstance(loaded, CorruptRecord) and loaded[0].envelope.local_submission and not loaded[0].picked_up
        ]
        if not first:
            return set()
        marked = set()
        with self._errors("mark picked up"):
            for queue_id, row in self._message_rows("queue_id, envelope, id", first).items():
                # _load_claimed decoded this document already, so it is an object.
                document = orjson.loads(row[1])
                document["picked_up"] = True
                marked_document = orjson.dumps(document)
                self.connection.execute("UPDATE message SET envelope = ? WHERE id = ?", (marked_document, row[2]))
                marked.add(queue_id)
        return marked

    def _choose_due(
        self, due: Sequence[Sequence[Any]], fresh: Sequence[Sequence[Any]], limit: int
    ) -> tuple[list[tuple[str, int]], list[int]]:
        """Pick up to ``limit`` recipients from due recipient rows and fresh messages, oldest first.

        Returns the chosen (queue ID, index) pairs, in the order their
        messages should be delivered, and the keys of the fresh messages among
        them.  A fresh message with more recipients than the room left gets
        recipient rows, and as many of them as fit are chosen.
        """
        candidates = sorted(
            [(float(due_at), 0, queue_id, index, 1) for queue_id, index, due_at in due]
            + [(float(arrival), 1, queue_id, key, count) for queue_id, key, arrival, count in fresh],
            key=lambda item: (item[0], item[1]),
        )
        rows: list[tuple[str, int]] = []
        fresh_keys: list[int] = []
        room = limit
        for _, is_fresh, queue_id, number, count in candidates:
            if room <= 0:
                break
            if not is_fresh:
                rows.append((queue_id, number))
                room -= 1
            elif count <= room:
                rows.extend((queue_id, index) for index in range(count))
                fresh_keys.append(number)
                room -= count
            else:
                self._materialize_fresh("f.id = ?", (number,))
                rows.extend((queue_id, index) for index in range(room))
                room = 0
        return rows, fresh_keys

    def _materialize_fresh(self, condition: str, parameters: Sequence[Any], *, limit: int | None = None) -> int:
        """Write the recipient rows of the fresh messages matching ``condition``; return how many messages.

        ``condition`` is on ``fresh f``.  With ``limit``, only that many of
        the oldest matching messages get rows.  Each recipient is queued and
        due at arrival and keeps the message's lease.  A message whose
        envelope document lists no usable recipients keeps its ``fresh`` row,
        so reading it reports the damage.
        """
        query = (
            "SELECT m.queue_id, f.id, m.arrival, m.envelope, f.recipients, f.lease_token, f.lease_until"
            f" FROM fresh f JOIN message m ON m.id = f.id WHERE {condition}"
        )
        if limit is not None:
            query += " ORDER BY f.id LIMIT ?"
            parameters = (*parameters, limit)
        selected = self.connection.execute(query, parameters).fetchall()
        values: list[tuple[Any, ...]] = []
        done: list[int] = []
        for queue_id, key, arrival, document, count, token, until in selected:
            try:
                recipients = _document_recipients(document, count)
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                log_event(logger, "fresh_unreadable", logging.ERROR, queue_id=queue_id, reason=str(exc))
                continue
            for index, (address, orcpt, notify) in enumerate(recipients):
                values.append((queue_id, index, address, domain_of(address), orcpt, notify, arrival, token, until))
            done.append(key)
        self.connection.executemany(_INSERT_RECIPIENT, values)
        for chunk in _chunks(done):
            self.connection.execute(f"DELETE FROM fresh WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        return len(done)

    def _materialize(self, queue_id: str) -> None:
        """Write the recipient rows of one message if it is fresh."""
        self._materialize_fresh("f.id BETWEEN ? AND ? AND m.queue_id = ?", _match(queue_id))

    def _fresh_rows(self, keys: Sequence[int]) -> dict[int, tuple[int, str | None, float | None]]:
        """Return the recipient count and lease of each fresh message among ``keys``; the others are left out."""
        found: dict[int, tuple[int, str | None, float | None]] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            for key, count, token, until in self.connection.execute(
                f"SELECT id, recipients, lease_token, lease_until FROM fresh WHERE id IN ({marks})", chunk
            ):
                found[key] = (count, token, until)
        return found

    def lease_owners(self, now: float) -> dict[str, int]:
        """Return each owner holding live leases, with its number of leased recipients.

        A lease token is ``OWNER#HEX`` (see ``Spool.claim``): trimming the
        trailing hex digits leaves ``OWNER#``.  Tokens without ``#`` are left out.
        """
        with self._errors("list lease owners"):
            rows = self.connection.execute(
                "SELECT rtrim(lease_token, '0123456789abcdef') AS prefix, count(*) FROM recipient"
                " WHERE lease_until > ? AND lease_token IS NOT NULL GROUP BY prefix"
                " UNION ALL SELECT rtrim(lease_token, '0123456789abcdef') AS prefix, sum(recipients) FROM fresh"
                " WHERE lease_until > ? AND lease_token IS NOT NULL GROUP BY prefix",
                (now, now),
            ).fetchall()
        owners: dict[str, int] = {}
        for prefix, count in rows:
            if prefix.endswith("#"):
                owners[prefix[:-1]] = owners.get(prefix[:-1], 0) + count
        return owners

    def release_leases(self, owner: str, now: float) -> int:
        """End every live lease of ``owner`` so its recipients can be claimed at once; return how many."""
        prefix = owner + "#"
        condition = "WHERE lease_until > ? AND substr(lease_token, 1, ?) = ?"
        parameters = (now, len(prefix), prefix)
        with self._errors("release leases"):
            (fresh,) = self.connection.execute(
                f"SELECT coalesce(sum(recipients), 0) FROM fresh {condition}", parameters
            ).fetchone()
            self.connection.execute(f"UPDATE fresh SET lease_token = NULL, lease_until = NULL {condition}", parameters)
            rows = self.connection.execute(
                f"UPDATE recipient SET lease_token = NULL, lease_until = NULL {condition}", parameters
            ).rowcount
        return int(fresh) + rows

    def end_lease(self, queue_id: str, indexes: Sequence[int], lease_token: str) -> int:
        """End ``lease_token``'s lease on some recipients of a message; return how many rows changed.

        For a claim dropped before delivery (its recipients were held): so
        that a release makes them due at once, not when the lease runs out.
        """
        marks = ",".join("?" * len(indexes))
        with self._errors("end lease"):
            rows = self.connection.execute(
                "UPDATE recipient SET lease_token = NULL, lease_until = NULL"
                f" WHERE queue_id = ? AND idx IN ({marks}) AND lease_token = ?",
                (queue_id, *indexes, lease_token),
            ).rowcount
            rows += self.connection.execute(
                f"UPDATE fresh SET lease_token = NULL, lease_until = NULL WHERE id IN"
                f" (SELECT id FROM message WHERE {_BY_QUEUE_ID}) AND lease_token = ?",
                (*_match(queue_id), lease_token),
            ).rowcount
        return int(rows)

    def renew_lease(
        self, queue_id: str, indexes: Sequence[int], lease_token: str, *, now: float, lease_until: float
    ) -> bool:
        """Move ``lease_token``'s lease on some pending recipients to ``lease_until``; return whether all held it.

        A recipient whose lease ran out, went to another token or was ended,
        or that is no longer queued or deferred, keeps its row as it is.
        """
        marks = ",".join("?" * len(indexes))
        live = "lease_token = ? AND lease_until > ?"
        with self._errors("renew lease"):
            fresh = self.connection.execute(
                f"UPDATE fresh SET lease_until = ? WHERE id IN (SELECT id FROM message WHERE {_BY_QUEUE_ID})"
                f" AND {live}",
                (lease_until, *_match(queue_id), lease_token, now),
            ).rowcount
            if fresh:
                # A fresh message has no recipient rows: its one lease covers every recipient.
                return True
            rows = self.connection.execute(
                f"UPDATE recipient SET lease_until = ? WHERE queue_id = ? AND idx IN ({marks}) AND {live}"
                " AND state IN ('queued', 'deferred')",
                (lease_until, queue_id, *indexes, lease_token, now),
            ).rowcount
        return int(rows) == len(set(indexes))

    def record_delivered_targets(
        self, queue_id: str, index: int, targets: Sequence[str], lease_token: str, now: float
    ) -> bool:
        """Store which local delivery targets of one pending recipient have the message; return whether stored.

        Unlike a result, this counts no attempt and leaves the state and due
        time alone.  It is for a delivery cut off by a shutdown, which is no
        failure of the recipient.  Only the live lease ``lease_token`` may
        store them, so a claim that lost the recipient changes nothing.
        """
        with self._errors("record delivered targets"):
            self._materialize(queue_id)
            rows = self.connection.execute(
                "UPDATE recipient SET delivered_targets = ? WHERE queue_id = ? AND idx = ?"
                " AND state IN ('queued', 'deferred') AND lease_token = ? AND lease_until > ?",
                (_encode_targets(targets), queue_id, index, lease_token, now),
            ).rowcount
        return rows == 1

    def record_results(self, results: Sequence[DeliveryResult], lease_token: str | None, now: float) -> int:
        """Store delivery results; return how many changed a recipient's state.

        A result for a recipient already delivered or bounced is ignored.  A
        result whose lease was lost to another live lease still counts when it
        is final (delivered or failed), because that attempt really happened.
        A deferral with a lost lease is only added to the history.
        """
        return self.record_result_groups([ResultGroup(tuple(results), lease_token, now)])[0]

    def record_result_groups(self, groups: Sequence[ResultGroup]) -> list[int]:
        """Store several groups of results like ``record_results``; return each group's count.

        The groups share their statements.  One query reads the recipients of
        every message concerned, and one ``executemany`` per table writes the
        attempts and the new states.  A message that is done is deleted
        without either write, because its attempt rows would go with it.
        Raises ValueError, before any change, for a deferral without
        ``next_attempt``.
        """
        for group in groups:
            for result in group.results:
                if result.outcome is Outcome.DEFERRED and result.next_attempt is None:
                    raise ValueError(f"deferred result for {result.queue_id}[{result.index}] needs next_attempt")
        queue_ids = list(dict.fromkeys(result.queue_id for group in groups for result in group.results))
        counts: list[int] = []
        attempts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        with self._errors("record results"):
            keys, recipients, fresh = self._result_rows(queue_ids)
            for group in groups:
                applied = 0
                for result in group.results:
                    if self._apply_result(result, recipients, group.lease_token, group.now, attempts, updates):
                        applied += 1
                counts.append(applied)
            done = {queue_id for queue_id in queue_ids if _message_done(recipients.get(queue_id))}
            # A fresh message that is not done needs rows for the updates below to change.
            for chunk in _chunks([keys[queue_id] for queue_id in fresh if queue_id not in done]):
                self._materialize_fresh(f"f.id IN ({','.join('?' * len(chunk))})", chunk)
            self.connection.executemany(
                "INSERT INTO attempt (queue_id, idx, time, outcome, reply, host) VALUES (?, ?, ?, ?, ?, ?)",
                [row for row in attempts if row[0] not in done],
            )
            self.connection.executemany(
                "UPDATE recipient SET state = ?, attempts = attempts + 1, next_attempt = ?,"
                " last_attempt = ?, last_reply = ?, last_host = ?, expired = ?,"
                " delivered_targets = coalesce(?, delivered_targets),"
                # A DSN still owed keeps its backoff, and one owed anew starts without.
                " dsn_attempts = CASE WHEN dsn = 'pending' THEN dsn_attempts ELSE 0 END,"
                " dsn_due = CASE WHEN dsn = 'pending' THEN dsn_due ELSE 0 END, dsn = ?,"
                " lease_token = CASE WHEN ? THEN lease_token END,"
                " lease_until = CASE WHEN ? THEN lease_until END"
                " WHERE queue_id = ? AND idx = ?",
                [row for row in updates if row[-2] not in done],
            )
            if done:
                self._delete_messages([keys[queue_id] for queue_id in done], list(done))
        for queue_id in queue_ids:
            if queue_id in done:
                log_event(logger, "removed", queue_id=queue_id)
        return counts

    def _result_rows(
        self, queue_ids: Sequence[str]
    ) -> tuple[dict[str, int], dict[str, dict[int, _ResultRow]], list[str]]:
        """Return the given messages' keys, their recipients by queue ID and index, and the fresh ones.

        A fresh message's recipients come from its envelope document, queued
        and under the message's lease.  Messages not found are left out.
        """
        messages = self._message_rows("queue_id, id, sender, envelope", queue_ids)
        columns = "idx, state, notify, lease_token, lease_until, dsn"
        recipients: dict[str, dict[int, _ResultRow]] = {}
        for queue_id, rows in self._recipient_rows_of(columns, list(messages)).items():
            sender = messages[queue_id][2]
            recipients[queue_id] = {
                index: _ResultRow(state, notify, token, until, dsn, sender)
                for index, state, notify, token, until, dsn in rows
            }
        missing = [queue_id for queue_id in messages if queue_id not in recipients]
        fresh_rows = self._fresh_rows([messages[queue_id][1] for queue_id in missing])
        fresh: list[str] = []
        for queue_id in missing:
            _, key, sender, document = messages[queue_id]
            if key not in fresh_rows:
                continue
            count, token, until = fresh_rows[key]
            try:
                listed = _document_recipients(document, count)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                # Without recipients its results are ignored, and the next claim moves it aside.
                continue
            recipients[queue_id] = {
                index: _ResultRow(RecipientState.QUEUED.value, notify, token, until, DsnState.NONE.value, sender)
                for index, (_, _, notify) in enumerate(listed)
            }
            fresh.append(queue_id)
        return {queue_id: row[1] for queue_id, row in messages.items()}, recipients, fresh

    def _delete_messages(self, keys: Sequence[int], queue_ids: Sequence[str]) -> None:
        """Delete messages with their recipients and attempts, one statement per table and chunk."""
        for chunk_keys, chunk_ids in zip(_chunks(keys), _chunks(queue_ids), strict=True):
            marks = ",".join("?" * len(chunk_ids))
            self.connection.execute(f"DELETE FROM message WHERE id IN ({marks})", chunk_keys)
            self.connection.execute(f"DELETE FROM fresh WHERE id IN ({marks})", chunk_keys)
            for table in ("recipient", "attempt"):
                self.connection.execute(f"DELETE FROM {table} WHERE queue_id IN ({marks})", chunk_ids)

    def _apply_result(
        self,
        result: DeliveryResult,
        recipients: dict[str, dict[int, _ResultRow]],
        lease_token: str | None,
        now: float,
        attempts: list[tuple[Any, ...]],
        updates: list[tuple[Any, ...]],
    ) -> bool:
        """Add one result's attempt row and update to the lists; return whether it changed the recipient.

        The row in ``recipients`` changes with it, so a later result for the
        same recipient in the batch starts from the state this one leaves.
        """
        row = recipients.get(result.queue_id, {}).get(result.index)
        if row is None:
            log_event(
                logger, "result_ignored", logging.WARNING,
                queue_id=result.queue_id, index=result.index, reason="recipient not in spool",
            )
            return False

        attempts.append((result.queue_id, result.index, now, result.outcome.value, result.reply, result.host))
        if row.state in (RecipientState.DELIVERED, RecipientState.BOUNCED):
            log_event(
                logger, "result_ignored", logging.WARNING,
                queue_id=result.queue_id, index=result.index, state=row.state, reason="recipient already final",
            )
            return False

        lease_lost = (
            lease_token is not None
            and row.lease_token is not None
            and row.lease_token != lease_token
            and row.lease_until is not None
            and row.lease_until > now
        )
        if lease_lost and result.outcome is Outcome.DEFERRED:
            return False

        notify = tuple(item for item in row.notify.split(",") if item)
        new_state, wants_dsn = _after_result(result.outcome, RecipientState(row.state), notify)
        if result.outcome is Outcome.DELIVERED and result.next_hop_notifies:
            wants_dsn = False
        # No DSN ever goes to the null reverse-path (RFC 5321), which bounces use,
        # so two relays cannot bounce a bounce back and forth.
        dsn = DsnState.PENDING if wants_dsn and row.sender != "" else DsnState.NONE
        if result.outcome is Outcome.DEFERRED:
            # A deferral keeps the DSN state, so a queued delay warning marks the
            # recipient as warned and no second warning follows.
            dsn = DsnState(row.dsn)
            if result.delay_warning and dsn is DsnState.NONE and row.sender != "" and _wants_delay_dsn(notify):
                dsn = DsnState.PENDING
        next_attempt = result.next_attempt if result.next_attempt is not None else now
        targets = None
        if result.outcome is Outcome.DEFERRED and result.delivered_targets:
            targets = _encode_targets(result.delivered_targets)
        # A lost lease belongs to the scheduler now holding it, so it stays.
        updates.append(
            (
                new_state.value, next_attempt, now, result.reply, result.host,
                result.expired and result.outcome is Outcome.FAILED, targets, dsn.value,
                lease_lost, lease_lost, result.queue_id, result.index,
            )
        )
        row.state = new_state.value
        row.dsn = dsn.value
        if not lease_lost:
            row.lease_token = None
            row.lease_until = None
        return True

    def delete_if_done(self, queue_id: str) -> bool:
        """Delete a message once no recipient is pending and no DSN is owed; return whether deleted."""
        if self._is_fresh(queue_id):
            return False
        row = self.connection.execute(
            "SELECT 1 FROM recipient WHERE queue_id = ?"
            " AND (state IN ('queued', 'deferred', 'held') OR dsn = 'pending') LIMIT 1",
            (queue_id,),
        ).fetchone()
        if row is not None:
            return False
        if not self._delete_rows(queue_id):
            return False
        log_event(logger, "removed", queue_id=queue_id)
        return True

    def _is_fresh(self, queue_id: str, arrived_by: float | None = None) -> bool:
        """Return whether a message is fresh, and with ``arrived_by`` also arrived by then."""
        query = (
            "SELECT m.arrival FROM fresh f JOIN message m ON m.id = f.id"
            " WHERE m.id BETWEEN ? AND ? AND m.queue_id = ?"
        )
        row = self.connection.execute(query, _match(queue_id)).fetchone()
        return row is not None and (arrived_by is None or row[0] <= arrived_by)

    def _delete_rows(self, queue_id: str) -> bool:
        self.connection.execute(
            f"DELETE FROM fresh WHERE id IN (SELECT id FROM message WHERE {_BY_QUEUE_ID})", _match(queue_id)
        )
        cursor = self.connection.execute(f"DELETE FROM message WHERE {_BY_QUEUE_ID}", _match(queue_id))
        self.connection.execute("DELETE FROM recipient WHERE queue_id = ?", (queue_id,))
        self.connection.execute("DELETE FROM attempt WHERE queue_id = ?", (queue_id,))
        return cursor.rowcount > 0

    def delete(self, queue_id: str, uid: int | None = None) -> None:
        """Delete a message and all its recipients without any DSN (``relay queue delete`` as user ``uid``)."""
        with self._errors("delete message"):
            if not self._delete_rows(queue_id):
                raise MessageNotFound(queue_id)
        log_event(logger, "removed", queue_id=queue_id, reason="deleted by operator", uid=uid)

    def _operator_action(
        self, queue_id: str, action: str, now: float, update: str, condition: str, *, skip_due_fresh: bool = False
    ) -> int:
        """Apply ``update`` to the recipients of one message matching ``condition``; return how many.

        Each changed recipient gets a history row.  With ``skip_due_fresh``
        a fresh message that arrived by ``now`` is left as it is, without
        recipient rows, and the action returns 0 for it.
        """
        self._require(queue_id)
        if skip_due_fresh and self._is_fresh(queue_id, arrived_by=now):
            return 0
        self._materialize(queue_id)
        rows = self.connection.execute(
            f"SELECT idx FROM recipient WHERE queue_id = ? AND {condition}", (queue_id,)
        ).fetchall()
        self.connection.execute(f"UPDATE recipient SET {update} WHERE queue_id = ? AND {condition}", (queue_id,))
        self.connection.executemany(
            "INSERT INTO attempt (queue_id, idx, time, outcome, reply, host) VALUES (?, ?, ?, ?, '', '')",
            [(queue_id, index, now, action) for (index,) in rows],
        )
        return len(rows)

    def hold(self, queue_id: str, now: float) -> int:
        """Hold every pending recipient of a message; return how many changed."""
        with self._errors("hold message"):
            return self._operator_action(queue_id, "held", now, "state = 'held'", "state IN ('queued', 'deferred')")

    def release(self, queue_id: str, now: float) -> int:
        """Release held recipients and make them due now; return how many changed.

        Like ``flush``, it first rewrites ``FLUSH_REQUEST``, so a running
        scheduler lifts the backoff of every destination and does not defer
        the released recipients at once without trying to connect.
        """
        self._announce_flush(now)
        with self._errors("release message"):
            return self._operator_action(
                queue_id,
                "released",
                now,
                f"state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END, next_attempt = {now!r}",
                "state = 'held'",
            )

    def flush(self, now: float, queue_id: str | None = None, domain: str | None = None) -> int:
        """Make queued and deferred recipients that are not yet due, due now; return how many changed.

        With ``queue_id`` only that message's recipients, with ``domain`` only
        recipients at that domain (in its Unicode or ASCII form), with neither
        every pending recipient.  A recipient already due is not counted.  A
        fresh message is due at arrival, so it gets recipient rows and counts
        only when it arrived after ``now`` (the clock was set back).
        """
        self._announce_flush(now)
        with self._errors("flush"):
            if queue_id is not None:
                return self._operator_action(
                    queue_id,
                    "flushed",
                    now,
                    f"next_attempt = {now!r}",
                    f"state IN ('queued', 'deferred') AND next_attempt > {now!r}",
                    skip_due_fresh=True,
                )
            query = "UPDATE recipient SET next_attempt = ? WHERE state IN ('queued', 'deferred') AND next_attempt > ?"
            parameters: list[Any] = [now, now]
            # A fresh message is due at arrival, so only one that arrived after ``now``
            # (the clock was set back) needs recipient rows to be made due.
            fresh_condition = "m.arrival > ?"
            fresh_parameters: list[Any] = [now]
            if domain is not None:
                forms = _domain_forms(domain)
                query += f" AND domain IN ({','.join('?' * len(forms))})"
                parameters.extend(forms)
                at_domain, domain_parameters = _fresh_domain_condition(forms)
                fresh_condition += f" AND {at_domain}"
                fresh_parameters.extend(domain_parameters)
            self._materialize_fresh(fresh_condition, fresh_parameters)
            return self.connection.execute(query, parameters).rowcount

    def move_due_earlier(self, seconds: float, now: float) -> int:
        """Move the ``next_attempt`` of every pending recipient ``seconds`` earlier, but not before ``now``."""
        with self._errors("move due times"):
            return self.connection.execute(
                "UPDATE recipient SET next_attempt = MAX(?, next_attempt - ?)"
                " WHERE state IN ('queued', 'deferred') AND next_attempt > ?",
                (now, seconds, now),
            ).rowcount

    def _announce_flush(self, now: float) -> None:
        # Written before the recipients become due, so a scheduler that claims
        # them has already seen the request.
        path = self.directory / FLUSH_REQUEST
        try:
            path.write_text(f"{now!r}\n")
        except OSError as exc:
            raise SpoolError(
                f"spool {self.directory}: writing {FLUSH_REQUEST} failed: {exc.strerror};"
                " check that the spool directory is writable"
            ) from exc

    def _require(self, queue_id: str) -> None:
        if self.connection.execute(f"SELECT 1 FROM message WHERE {_BY_QUEUE_ID}", _match(queue_id)).fetchone() is None:
            raise MessageNotFound(queue_id)

    def move_aside_orphans(self) -> list[str]:
        """Move aside every message that has neither recipient rows nor a ``fresh`` row; return their queue IDs.

        Every write adds or deletes a message together with its recipients, so
        such a message is damage, and no claim would ever select it.
        """
        with self._errors("find messages without recipients"):
            rows = self.connection.execute(
                "SELECT m.queue_id FROM message m"
                " WHERE NOT EXISTS (SELECT 1 FROM fresh f WHERE f.id = m.id)"
                " AND NOT EXISTS (SELECT 1 FROM recipient r WHERE r.queue_id = m.queue_id)"
            ).fetchall()
        for (queue_id,) in rows:
            self.move_aside(queue_id, NO_RECIPIENTS)
        return [queue_id for (queue_id,) in rows]

    def move_aside(self, queue_id: str, reason: str) -> Path:
        """Copy what can be read of a damaged message to ``corrupt/``, then delete it.

        Returns the file written.  The copy contains every readable column, so an
        operator can still recover the message by hand.
        """
        aside = self.directory / CORRUPT_DIRECTORY
        aside.mkdir(mode=0o700, exist_ok=True)
        record: dict[str, Any] = {"queue_id": queue_id, "reason": reason, "moved": time.time()}
        for table in ("message", "fresh", "recipient", "attempt"):
            try:
                if table == "fresh":
                    cursor = self.connection.execute(
                        f"SELECT * FROM fresh WHERE id IN (SELECT id FROM message WHERE {_BY_QUEUE_ID})",
                        _match(queue_id),
                    )
                elif table == "message":
                    # The body goes to a file of its own below.
                    cursor = self.connection.execute(
                        "SELECT queue_id, arrival, sender, size, client_address, helo_name, auth_user, envelope,"
                        f" crc32 FROM message WHERE {_BY_QUEUE_ID}",
                        _match(queue_id),
                    )
                else:
                    cursor = self.connection.execute(f"SELECT * FROM {table} WHERE queue_id = ?", (queue_id,))
                names = [column[0] for column in cursor.description]
                record[table] = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            except sqlite3.Error as exc:
                record[table] = f"unreadable: {exc}"
        path = aside / f"{queue_id}.json"
        path.write_bytes(orjson.dumps(record, default=_json_fallback, option=orjson.OPT_INDENT_2))
        body_path = aside / f"{queue_id}.body"
        try:
            body_row = self.connection.execute(
                f"SELECT body FROM message WHERE {_BY_QUEUE_ID}", _match(queue_id)
            ).fetchone()
            if body_row is not None and body_row[0] is not None:
                body_path.write_bytes(body_row[0])
        except sqlite3.Error as exc:
            record["body"] = f"unreadable: {exc}"
        _fsync_directory(aside)
        with self._errors("delete corrupt message"):
            self._delete_rows(queue_id)
        log_event(logger, "corrupt_moved_aside", logging.ERROR, queue_id=queue_id, reason=reason, file=str(path))
        return path

    # -- reads --------------------------------------------------------------

    def load(self, queue_id: str) -> StoredMessage | None:
        """Return a message's envelope and recipients, or None if it is not in the spool.

        Raises CorruptRecord when its rows cannot be decoded.
        """
        # One snapshot: a writer that gives a fresh message its recipient rows between
        # two of the reads below would otherwise leave it with neither.
        with self._errors("read message"), self.snapshot():
            row = self.connection.execute(
                "SELECT queue_id, arrival, sender, size, client_address, helo_name, auth_user, envelope, id"
                f" FROM message WHERE {_BY_QUEUE_ID}",
                _match(queue_id),
            ).fetchone()
            if row is None:
                return None
            recipient_rows = self._recipient_rows_of(self._recipient_columns, [queue_id]).get(queue_id, [])
            fresh = self._fresh_rows([row[8]]) if not recipient_rows else {}
        return _decode_message(row, recipient_rows, fresh[row[8]][0] if fresh else None)

    def _load_claimed(
        self, queue_ids: Sequence[str], body_max_bytes: int | None
    ) -> dict[str, tuple[StoredMessage, bytes | None] | CorruptRecord]:
        """Read claimed messages like ``load``, with each body when at most ``body_max_bytes`` octets.

        Two statements per ``LOOKUP_CHUNK`` messages read the rows, the
        recipients and the bodies.  The CASE leaves a larger body unselected,
        so SQLite does not read its overflow pages.  Messages not in the spool
        are left out, and one that cannot be decoded maps to its CorruptRecord.
        """
        limit = -1 if body_max_bytes is None else body_max_bytes
        with self._errors("read message"):
            rows = self._message_rows(
                "queue_id, arrival, sender, size, client_address, helo_name, auth_user, envelope,"
                " crc32, CASE WHEN size <= ? THEN body END, id",
                queue_ids,
                (limit,),
            )
            recipient_rows = self._recipient_rows_of(self._recipient_columns, list(rows))
            fresh = self._fresh_rows([row[10] for queue_id, row in rows.items() if queue_id not in recipient_rows])
        loaded: dict[str, tuple[StoredMessage, bytes | None] | CorruptRecord] = {}
        for queue_id, row in rows.items():
            try:
                count = fresh[row[10]][0] if row[10] in fresh else None
                message = _decode_message(row, recipient_rows.get(queue_id, []), count)
                body = None
                if body_max_bytes is not None and message.size <= body_max_bytes:
                    body = _checked_body(queue_id, row[8], row[9])
            except CorruptRecord as exc:
                loaded[queue_id] = exc
                continue
            loaded[queue_id] = (message, body)
        return loaded

    def _message_rows(
        self, columns: str, queue_ids: Sequence[str], parameters: Sequence[Any] = ()
    ) -> dict[str, Sequence[Any]]:
        """Return the message rows of ``queue_ids`` by queue ID; ``columns`` must start with ``queue_id``.

        ``parameters`` are those of ``columns``.  The message table has no
        index on queue_id, so each ID adds a search of its key range, and the
        rows of other IDs in those ranges are dropped.
        """
        found: dict[str, Sequence[Any]] = {}
        for chunk in _chunks(queue_ids):
            requested = set(chunk)
            ranges = " OR ".join(["id BETWEEN ? AND ?"] * len(chunk))
            values = [*parameters, *(key for queue_id in chunk for key in message_key_range(queue_id))]
            for row in self.connection.execute(f"SELECT {columns} FROM message WHERE {ranges}", values):
                if row[0] in requested:
                    found[row[0]] = row
        return found

    def _recipient_rows_of(self, columns: str, queue_ids: Sequence[str]) -> dict[str, list[Any]]:
        """Return ``columns`` of the recipients of ``queue_ids``, by queue ID and in index order."""
        found: dict[str, list[Any]] = {}
        for chunk in _chunks(queue_ids):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT queue_id, {columns} FROM recipient WHERE queue_id IN ({marks}) ORDER BY queue_id, idx"
            for row in self.connection.execute(query, chunk):
                found.setdefault(row[0], []).append(row[1:])
        return found

    def load_body(self, queue_id: str) -> bytes:
        """Return a message body, checked against its CRC-32.

        Raises MessageNotFound or CorruptRecord.
        """
        with self._errors("read body"):
            row = self.connection.execute(
                f"SELECT crc32, body FROM message WHERE {_BY_QUEUE_ID}", _match(queue_id)
            ).fetchone()
        if row is None:
            raise MessageNotFound(queue_id)
        return _checked_body(queue_id, *row)

    def history(self, queue_id: str) -> list[Attempt]:
        """Return a message's delivery attempts and operator actions, oldest first."""
        with self._errors("read history"):
            rows = self.connection.execute(
                "SELECT idx, time, outcome, reply, host FROM attempt WHERE queue_id = ? ORDER BY time, rowid",
                (queue_id,),
            ).fetchall()
        return [Attempt(index=i, time=t, outcome=o, reply=r, host=h) for i, t, o, r, h in rows]

    def dsn_queue_ids(self, now: float, limit: int) -> list[str]:
        """Return up to ``limit`` queue IDs, oldest first, of messages owing a DSN due by ``now``.

        A DSN is owed for ``dsn = 'pending'`` and due once ``dsn_due`` has
        passed.  The query reads only the partial index ``recipient_dsn``
        and the rows it lists, so its cost follows the number of recipients
        owing a DSN, not the size of the spool.
        """
        with self._errors("look for owed DSNs"):
            rows = self.connection.execute(_OWED_DSN_QUERY, (now, limit)).fetchall()
        return [queue_id for (queue_id,) in rows]

    def defer_dsn(self, queue_id: str, indexes: Sequence[int], until: float) -> int:
        """Count a failed attempt to queue the DSN owed for ``indexes`` and make it due at ``until``.

        Returns how many recipients changed; those that no longer owe a DSN stay as they are.
        """
        marks = ",".join("?" * len(indexes))
        with self._errors("defer a DSN"):
            cursor = self.connection.execute(
                "UPDATE recipient SET dsn_attempts = dsn_attempts + 1, dsn_due = ?"
                f" WHERE queue_id = ? AND idx IN ({marks}) AND dsn = 'pending'",
                (until, queue_id, *indexes),
            )
        return cursor.rowcount

    def queue_ids(
        self,
        *,
        sender: str | None = None,
        domain: str | None = None,
        state: RecipientState | None = None,
        dsn_pending: bool = False,
        limit: int | None = None,
    ) -> list[str]:
        """Return queue IDs in arrival order, filtered by sender, recipient domain or state.

        ``sender`` matches the reverse-path case-insensitively, also in
        non-ASCII letters ("" is the null sender).  ``domain`` and ``state``
        match if any recipient matches.  A domain matches in its Unicode form
        and in its ASCII form (IDNA, "xn--" labels) whichever one is given.
        """
        clauses, parameters = self._filter(sender, domain, state, dsn_pending)
        query = "SELECT m.queue_id FROM message m"
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        # The key sorts like the queue ID except within one microsecond.
        query += " ORDER BY m.id, m.queue_id"
        if limit is not None:
            query += " LIMIT ?"
            parameters.append(limit)
        with self._errors("list messages"):
            return [queue_id for (queue_id,) in self.connection.execute(query, parameters)]

    def queue_id_pages(
        self,
        *,
        sender: str | None = None,
        domain: str | None = None,
        state: RecipientState | None = None,
        page_size: int | None = None,
    ) -> Iterator[list[str]]:
        """Yield the queue IDs that ``queue_ids`` returns, ``page_size`` (default ``LIST_PAGE``) at a time.

        Each page is one statement, read whole before it is yielded, and each
        page starts after the last key of the one before.  So no read
        transaction stays open while the caller works on a page, and a
        message never appears twice, but messages committed or deleted
        between two pages may be in or out of the result.
        """
        size = LIST_PAGE if page_size is None else page_size
        clauses, parameters = self._filter(sender, domain, state, False)
        condition = " AND ".join(clauses) or "1"
        last_key: int | None = None
        while True:
            # The first page has no lower bound, because the lowest key is the smallest 64-bit integer.
            after = "" if last_key is None else "m.id > ? AND "
            query = f"SELECT m.id, m.queue_id FROM message m WHERE {after}{condition} ORDER BY m.id LIMIT ?"
            values = [*parameters, size] if last_key is None else [last_key, *parameters, size]
            with self._errors("list messages"):
                rows = self.connection.execute(query, values).fetchall()
            if rows:
                yield [queue_id for _, queue_id in rows]
            if len(rows) < size:
                return
            last_key = rows[-1][0]

    def _filter(
        self, sender: str | None, domain: str | None, state: RecipientState | None, dsn_pending: bool
    ) -> tuple[list[str], list[Any]]:
        """Return the conditions on ``message m`` of the filters of ``queue_ids``, and their parameters."""
        clauses: list[str] = []
        parameters: list[Any] = []
        if sender is not None:
            # SQLite's NOCASE folds ASCII letters only; UTF-8 reverse-paths (RFC 6531) need more.
            self.connection.create_function("relay_casefold", 1, _casefold, deterministic=True)
            clauses.append("relay_casefold(m.sender) = ?")
            parameters.append(sender.casefold())
        recipient_clauses = []
        fresh_clauses = []
        fresh_parameters: list[str] = []
        forms = _domain_forms(domain) if domain is not None else []
        if forms:
            recipient_clauses.append(f"r.domain IN ({','.join('?' * len(forms))})")
            parameters.extend(forms)
            at_domain, fresh_parameters = _fresh_domain_condition(forms)
            fresh_clauses.append(at_domain)
        if state is not None:
            recipient_clauses.append("r.state = ?")
            parameters.append(state.value)
        if recipient_clauses or dsn_pending:
            if dsn_pending:
                recipient_clauses.append("r.dsn = 'pending'")
            condition = (
                "EXISTS (SELECT 1 FROM recipient r WHERE r.queue_id = m.queue_id AND "
                + " AND ".join(recipient_clauses)
                + ")"
            )
            # Every recipient of a fresh message is queued and owes no DSN.
            if not dsn_pending and state in (None, RecipientState.QUEUED):
                condition += " OR EXISTS (SELECT 1 FROM fresh f WHERE f.id = m.id AND " + " AND ".join(
                    fresh_clauses or ["1"]
                ) + ")"
                parameters.extend(fresh_parameters)
            clauses.append(f"({condition})")
        return clauses, parameters

    def messages(self, queue_ids: Iterable[str]) -> Iterator[StoredMessage | CorruptRecord]:
        """Yield each message in turn, or the CorruptRecord error for one that cannot be decoded.

        Messages deleted since their ID was listed are left out.  The
        messages are read ``LOOKUP_CHUNK`` at a time, each chunk in one
        snapshot that ends before its first message is yielded.
        """
        ids = list(queue_ids)
        for chunk in _chunks(ids):
            with self.snapshot():
                loaded = self._load_claimed(chunk, None)
            for queue_id in chunk:
                item = loaded.get(queue_id)
                if isinstance(item, CorruptRecord):
                    yield item
                elif item is not None:
                    yield item[0]

    def counts(self) -> dict[str, int]:
        """Return the number of recipients in each state (states with none are left out)."""
        with self._errors("count recipients"), self.snapshot():
            rows = self.connection.execute("SELECT state, count(*) FROM recipient GROUP BY state").fetchall()
            (fresh,) = self.connection.execute("SELECT coalesce(sum(recipients), 0) FROM fresh").fetchone()
        counts = {state: count for state, count in rows}
        if fresh:
            counts[RecipientState.QUEUED.value] = counts.get(RecipientState.QUEUED.value, 0) + fresh
        return counts

    def integrity_check(self) -> list[str]:
        """Run ``PRAGMA integrity_check``; return its lines (``["ok"]`` when sound)."""
        with self._errors("integrity check"):
            return [line for (line,) in self.connection.execute("PRAGMA integrity_check")]


def _after_result(
    outcome: Outcome, state: RecipientState, notify: tuple[str, ...]
) -> tuple[RecipientState, bool]:
    """Return a recipient's state after an outcome, and whether the outcome owes a DSN.

    The RFC 3461 NOTIFY parameter decides the DSN.  A failure owes one when
    NOTIFY is absent or contains FAILURE, and a delivery only when it contains
    SUCCESS.  A held recipient stays held when its attempt is deferred.
    """
    if outcome is Outcome.DELIVERED:
        return RecipientState.DELIVERED, "SUCCESS" in notify
    if outcome is Outcome.FAILED:
        return RecipientState.BOUNCED, "NEVER" not in notify and (not notify or "FAILURE" in notify)
    if state is RecipientState.HELD:
        return RecipientState.HELD, False
    return RecipientState.DEFERRED, False


def _message_done(recipients: dict[int, _ResultRow] | None) -> bool:
    """Return whether a message read by ``_result_rows`` can go: nothing pending and no DSN owed."""
    if not recipients:
        return False
    pending = (RecipientState.QUEUED, RecipientState.DEFERRED, RecipientState.HELD)
    return all(row.state not in pending and row.dsn != DsnState.PENDING for row in recipients.values())


def _wants_delay_dsn(notify: tuple[str, ...]) -> bool:
    """Return whether NOTIFY allows a delay warning: absent (RFC 3461 section 4.1 lets the MTA choose) or DELAY."""
    return not notify or "DELAY" in notify


def _json_fallback(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    raise TypeError(f"cannot encode {type(value).__name__}")


def _fresh_domain_condition(forms: Sequence[str]) -> tuple[str, list[str]]:
    """Return the SQL condition on ``fresh f`` that a recipient is at one of ``forms``, and its parameters.

    A form with a space matches no recipient, because ``domains`` uses
    spaces as separators and no domain contains one.
    """
    parameters = [f" {form} " for form in forms if " " not in form]
    terms = ["instr(f.domains, ?)"] * len(parameters)
    return "(" + (" OR ".join(terms) or "0") + ")", parameters


def _document_recipients(document: bytes | str, count: int | None = None) -> list[tuple[str, str | None, str]]:
    """Return the recipients an envelope document lists, as (address, ORCPT, NOTIFY) tuples.

    Raises ValueError or TypeError (or orjson's JSONDecodeError, a
    ValueError) when the document does not list them properly, or lists
    other than ``count`` of them.
    """
    parsed = orjson.loads(document)
    if not isinstance(parsed, dict):
        raise TypeError("envelope document is not an object")
    return _listed_recipients(parsed.get("recipients"), count)


def _listed_recipients(value: Any, count: int | None = None) -> list[tuple[str, str | None, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError("envelope document lists no recipients")
    listed = []
    for item in value:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and (item[1] is None or isinstance(item[1], str))
            and isinstance(item[2], str)
        ):
            raise TypeError("envelope document lists a malformed recipient")
        listed.append((item[0], item[1], item[2]))
    if count is not None and len(listed) != count:
        raise ValueError(f"envelope document lists {len(listed)} recipients, not {count}")
    return listed


def _fresh_recipients(document: dict[str, Any], arrival: float, count: int) -> tuple[StoredRecipient, ...]:
    """Return a fresh message's ``count`` recipients from its envelope document: queued and due at arrival."""
    return tuple(
        StoredRecipient(
            index=index,
            address=address,
            orcpt=orcpt,
            notify=tuple(item for item in notify.split(",") if item),
            state=RecipientState.QUEUED,
            attempts=0,
            next_attempt=arrival,
            last_attempt=None,
            last_reply=None,
            last_host=None,
            dsn=DsnState.NONE,
        )
        for index, (address, orcpt, notify) in enumerate(_listed_recipients(document.get("recipients"), count))
    )


def _decode_message(
    row: Sequence[Any], recipient_rows: Sequence[Sequence[Any]], fresh_count: int | None = None
) -> StoredMessage:
    """Decode a message row (its first eight columns as ``load`` selects them) and its recipients.

    A fresh message without recipient rows (``fresh_count`` is its ``fresh``
    row's recipient count) takes its recipients from the envelope document,
    which must list that many.
    """
    queue_id = row[0]
    try:
        document = orjson.loads(row[7])
        if not isinstance(document, dict):
            raise TypeError("envelope document is not an object")
        if fresh_count is not None and not recipient_rows:
            recipients = _fresh_recipients(document, float(row[1]), fresh_count)
        else:
            recipients = tuple(_decode_recipient(values) for values in recipient_rows)
        if not recipients:
            raise ValueError(NO_RECIPIENTS)
        envelope = Envelope(
            sender=str(row[2]),
            recipients=tuple(Recipient(r.address, r.orcpt, r.notify) for r in recipients),
            size=document.get("size"),
            body_type=document.get("body_type"),
            smtputf8=bool(document.get("smtputf8", False)),
            ret=document.get("ret"),
            envid=document.get("envid"),
            client_address=row[4],
            helo_name=row[5],
            auth_user=row[6],
            protocol=document.get("protocol"),
            # Absent from the documents of SMTP mail and of spools written before these keys.
            local_submission=bool(document.get("local_submission", False)),
            original_queue_id=document.get("original_queue_id"),
            forwarded_from=document.get("forwarded_from"),
        )
        return StoredMessage(
            queue_id=queue_id,
            arrival=float(row[1]),
            size=int(row[3]),
            envelope=envelope,
            recipients=recipients,
            picked_up=bool(document.get("picked_up", False)),
        )
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError) as exc:
        raise CorruptRecord(queue_id, str(exc)) from exc


def _decode_recipient(values: Sequence[Any]) -> StoredRecipient:
    index, address, orcpt, notify, state, attempts, next_attempt, last_attempt, reply, host, dsn = values[:11]
    targets, expired, dsn_attempts, dsn_due = values[11:]
    if not isinstance(address, str):
        raise TypeError(f"recipient {index} address is not text")
    return StoredRecipient(
        index=int(index),
        address=address,
        orcpt=orcpt,
        notify=tuple(item for item in str(notify).split(",") if item),
        state=RecipientState(state),
        attempts=int(attempts),
        next_attempt=float(next_attempt),
        last_attempt=last_attempt,
        last_reply=reply,
        last_host=host,
        dsn=DsnState(dsn),
        delivered_targets=_decode_targets(index, targets),
        expired=None if expired is None else bool(expired),
        dsn_attempts=int(dsn_attempts),
        dsn_due=float(dsn_due),
    )


def _encode_targets(targets: Sequence[str]) -> str:
    return orjson.dumps(list(dict.fromkeys(targets))).decode()


def _decode_targets(index: Any, value: Any) -> tuple[str, ...]:
    """Return a recipient's ``delivered_targets`` column as a tuple; raise TypeError when it is not a list of text."""
    if value is None:
        return ()
    targets = orjson.loads(value)
    if not isinstance(targets, list) or not all(isinstance(target, str) for target in targets):
        raise TypeError(f"recipient {index} delivered_targets is not a list of text")
    return tuple(targets)
