"""Tests of ``relay queue`` and ``relay status`` run by a user with read access to the spool only.

Each test runs the real command line in a child process.  As root the child
runs as nobody through setpriv, because root passes every permission check;
as any other user the test's chmod limits the owner too.  The spool files'
modification times, sizes and contents, and the schema version, are compared
before and after, to show that reading commands leave the spool unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from spool_helpers import make_envelope, run

from conftest import REPO_ROOT
from relay.spool import DeliveryResult, Outcome, Spool
from relay.spool.store import SCHEMA_VERSION, database_path

SETPRIV = shutil.which("setpriv")
# User and group ID of nobody, which the child runs as when the test runs as root.
NOBODY = "65534"

READ_COMMANDS = [
    ["queue", "list"],
    ["queue", "list", "--json"],
    ["queue", "show", "ID"],
    ["queue", "show", "ID", "--body"],
    ["queue", "show", "ID", "--json"],
    ["status"],
    ["status", "--json"],
]
WRITE_COMMANDS = [
    ["queue", "flush"],
    ["queue", "hold", "ID"],
    ["queue", "release", "ID"],
    ["queue", "delete", "ID", "--yes"],
]


def _relay(*args: str, directory: Path, owner: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``relay ARGS --spool DIRECTORY`` in a child process, as nobody when the test runs as root.

    ``owner`` runs it as the test's own user instead.
    """
    command = [sys.executable, "-m", "relay", *args, "--spool", str(directory)]
    if os.geteuid() == 0 and not owner:
        if SETPRIV is None:
            pytest.skip("setpriv (util-linux) is needed to run a command without root's rights")
        command = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=directory.parent,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
    )


def _files(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Return each file under ``directory`` with its modification time, size and SHA-256."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            info = path.stat()
            found[str(path.relative_to(directory))] = (
                info.st_mtime_ns,
                info.st_size,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return found


def _schema_version(directory: Path) -> int:
    # Opening creates -wal and -shm files when they are missing, so compare the files first.
    uri = database_path(directory).resolve().as_uri() + "?mode=ro"
    connection = sqlite3.connect(uri, uri=True)
    try:
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    finally:
        connection.close()
    return version


def _make_read_only(directory: Path) -> None:
    """Leave read and search access to everyone and write access to no one (root still writes)."""
    for path in directory.iterdir():
        path.chmod(0o444)
    directory.chmod(0o555)


@pytest.fixture
def spool_dir() -> Iterator[Path]:
    """Yield a spool directory whose parent every user can search, so a child running as nobody reaches it."""
    base = Path(tempfile.mkdtemp(prefix="relay-queue-ro-"))
    directory = base / "spool"
    try:
        base.chmod(0o755)
        yield directory
    finally:
        # The test took write access away, and rmtree needs it back.
        if directory.exists():
            directory.chmod(0o700)
            for path in directory.iterdir():
                path.chmod(0o600)
        shutil.rmtree(base)


def _fill(spool: Spool) -> str:
    """Commit two messages, defer one recipient of the first, and return the first one's queue ID."""
    queue_id = spool.commit_blocking(make_envelope(), b"Subject: read-only\r\n\r\nbody\r\n")
    spool.commit_blocking(make_envelope(recipients=1), b"Subject: second\r\n\r\nbody\r\n")
    result = DeliveryResult(queue_id, 1, Outcome.DEFERRED, "451 4.3.0 try later", "mx.two.example.test",
                            time.time() + 3600)
    run(spool.record_results([result]))
    return queue_id


def _arguments(command: list[str], queue_id: str) -> list[str]:
    return [queue_id if argument == "ID" else argument for argument in command]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_read_while_relay_runs(spool_dir: Path, command: list[str]) -> None:
    spool = Spool.open(spool_dir)
    try:
        queue_id = _fill(spool)
        _make_read_only(spool_dir)
        before = _files(spool_dir)

        result = _relay(*_arguments(command, queue_id), directory=spool_dir)

        assert result.stderr == ""
        assert result.returncode == 0
        assert queue_id in result.stdout or "one.example.test" in result.stdout
        assert _files(spool_dir) == before
        assert _schema_version(spool_dir) == SCHEMA_VERSION
    finally:
        spool.close()


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_read_while_relay_stopped(spool_dir: Path, command: list[str]) -> None:
    spool = Spool.open(spool_dir)
    try:
        queue_id = _fill(spool)
    finally:
        spool.close()
    # The last connection to close removed the WAL and the shared-memory file.
    assert not (spool_dir / "spool.db-wal").exists()
    _make_read_only(spool_dir)
    before = _files(spool_dir)

    result = _relay(*_arguments(command, queue_id), directory=spool_dir)

    assert result.stderr == ""
    assert result.returncode == 0
    assert queue_id in result.stdout or "one.example.test" in result.stdout
    assert _files(spool_dir) == before


def test_owner_read_creates_no_files(spool_dir: Path) -> None:
    spool = Spool.open(spool_dir)
    try:
        queue_id = _fill(spool)
    finally:
        spool.close()
    before = _files(spool_dir)

    result = _relay("queue", "list", directory=spool_dir, owner=True)

    assert result.returncode == 0, result.stderr
    assert queue_id in result.stdout
    # No -wal or -shm file left behind by a read of a stopped relay's spool.
    assert _files(spool_dir) == before


@pytest.mark.parametrize("command", [["queue", "list"], ["queue", "show", "ID"], ["status"]], ids=" ".join)
def test_older_schema_not_migrated(spool_dir: Path, command: list[str]) -> None:
    spool = Spool.open(spool_dir)
    try:
        queue_id = _fill(spool)
    finally:
        spool.close()
    # Schema version 2 had no fresh table.
    with sqlite3.connect(database_path(spool_dir)) as connection:
        connection.execute("DROP TABLE fresh")
        connection.execute("PRAGMA user_version = 2")
    connection.close()
    before = _files(spool_dir)

    result = _relay(*_arguments(command, queue_id), directory=spool_dir, owner=True)

    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert (
        f"spool {spool_dir} has schema version 2, and this relay reads versions 3 to {SCHEMA_VERSION}"
        " without changing the spool" in result.stderr
    )
    assert "start `relay serve` on it once, as the user that owns it, to migrate it" in result.stderr
    assert _files(spool_dir) == before
    assert _schema_version(spool_dir) == 2


def _make_version_3(directory: Path) -> None:
    """Give the stopped spool in ``directory`` the layout of schema version 3, without version 4's columns."""
    with sqlite3.connect(database_path(directory)) as connection:
        for column in ("delivered_targets", "expired", "dsn_attempts", "dsn_due"):
            connection.execute(f"ALTER TABLE recipient DROP COLUMN {column}")
        connection.execute("PRAGMA user_version = 3")
    connection.close()


def _fill_version_3(directory: Path) -> str:
    """Fill a spool as ``_fill`` does, bounce recipient 0 of the first message, and convert it to version 3."""
    spool = Spool.open(directory)
    try:
        queue_id = _fill(spool)
        result = DeliveryResult(queue_id, 0, Outcome.FAILED, "550 5.1.1 no such user", "mx.one.example.test")
        run(spool.record_results([result]))
    finally:
        spool.close()
    _make_version_3(directory)
    return queue_id


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_version_3_read_unchanged(spool_dir: Path, command: list[str]) -> None:
    queue_id = _fill_version_3(spool_dir)
    _make_read_only(spool_dir)
    before = _files(spool_dir)

    result = _relay(*_arguments(command, queue_id), directory=spool_dir)

    assert result.stderr == ""
    assert result.returncode == 0
    assert queue_id in result.stdout or "one.example.test" in result.stdout
    assert _files(spool_dir) == before
    assert _schema_version(spool_dir) == 3


def test_version_3_listed_with_defaults(spool_dir: Path) -> None:
    queue_id = _fill_version_3(spool_dir)
    _make_read_only(spool_dir)

    json_listing = _relay("queue", "list", "--json", directory=spool_dir)
    text_listing = _relay("queue", "list", directory=spool_dir)
    show_output = _relay("queue", "show", queue_id, directory=spool_dir)

    assert json_listing.returncode == 0, json_listing.stderr
    documents = {document["queue_id"]: document for document in map(orjson.loads, json_listing.stdout.splitlines())}
    bounced, deferred = documents[queue_id]["recipients"]
    assert bounced["state"] == "bounced"
    assert bounced["dsn"] == "pending"
    assert deferred["state"] == "deferred"
    assert deferred["last_reply"] == "451 4.3.0 try later"
    # Version 3 stored none of these, so each reads as the conversion would fill it.
    for recipient in (bounced, deferred):
        assert recipient["expired"] is None
        assert recipient["delivered_targets"] == []
        assert recipient["dsn_attempts"] == 0
        assert recipient["dsn_due"] is None
    assert text_listing.returncode == 0, text_listing.stderr
    assert "user0@one.example.test  bounced\n" in text_listing.stdout
    assert "(451 4.3.0 try later from mx.two.example.test)" in text_listing.stdout
    assert show_output.returncode == 0, show_output.stderr
    assert "[0] user0@one.example.test  bounced, 1 attempt(s)" in show_output.stdout
    assert "      DSN pending\n" in show_output.stdout


@pytest.mark.parametrize("name", ["spool.db-shm", "spool.db-wal", "spool.db"])
def test_unreadable_file_named(spool_dir: Path, name: str) -> None:
    spool = Spool.open(spool_dir)
    try:
        _fill(spool)
        _make_read_only(spool_dir)
        (spool_dir / name).chmod(0o400)
        before = _files(spool_dir)

        result = _relay("queue", "list", directory=spool_dir)

        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith(
            f"relay queue: cannot read spool {spool_dir}: no read access to {spool_dir / name} (owner "
        )
        assert result.stderr.endswith(
            f", mode 0400); grant it (chmod g+r {spool_dir / name}, with this user in the file's group),"
            " or run as the user that owns the spool\n"
        )
        assert _files(spool_dir) == before
    finally:
        spool.close()


@pytest.mark.parametrize("command", WRITE_COMMANDS, ids=" ".join)
def test_write_without_access_exits_1(spool_dir: Path, command: list[str]) -> None:
    spool = Spool.open(spool_dir)
    try:
        queue_id = _fill(spool)
        _make_read_only(spool_dir)
        before = _files(spool_dir)

        result = _relay(*_arguments(command, queue_id), directory=spool_dir)

        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith(
            f"relay queue: {command[1]} changes the spool, and this user has no write access to {spool_dir} (owner "
        )
        assert result.stderr.endswith(", mode 0555); run it as the user that owns the spool\n")
        assert _files(spool_dir) == before
    finally:
        spool.close()


def test_corrupt_record_left_in_place(spool_dir: Path) -> None:
    spool = Spool.open(spool_dir)
    try:
        queue_id = _fill(spool)
        with sqlite3.connect(database_path(spool_dir)) as connection:
            connection.execute("UPDATE message SET envelope = x'00' WHERE queue_id = ?", (queue_id,))
        connection.close()
        _make_read_only(spool_dir)
        before = _files(spool_dir)

        result = _relay("queue", "list", directory=spool_dir)

        assert result.returncode == 0
        assert "Traceback" not in result.stderr
        assert f"relay queue: message {queue_id} is corrupt: " in result.stderr
        assert f"`relay queue delete {queue_id}` removes it" in result.stderr
        assert "-- 1 Kbytes in 1 message." in result.stdout
        assert _files(spool_dir) == before
        assert not (spool_dir / "corrupt").exists()
    finally:
        spool.close()
