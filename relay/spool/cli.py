"""``relay queue``: inspect and manage the spool, also while the relay runs.

Subcommands: ``list`` (one block per message like Postfix's ``mailq``, or one
JSON object per line with ``--json``), ``show ID``, ``flush [ID | --domain D]``,
``hold ID``, ``release ID`` and ``delete ID``.  Each works on ``--spool DIR``
or on the ``[spool] path`` of ``--config FILE`` (default: ``./relay-spool``).

``list`` and ``show`` open the spool read-only: they need read access to the
spool directory and its ``spool.db`` files, not write access, and they never
change the spool (no schema migration, no record moved aside, no
checkpoint).  They read a spool of schema version 3 as it is, and report
an older one with exit status 1 until ``relay serve`` migrates it.  The
other subcommands need write access, and without it exit with status 1 and
a line naming the path.

The text of ``list`` stays compact: beyond the state and last reply it
names only what explains a message still queued (the original message of
a DSN, an expiry, alias targets that have the message, a DSN put off).
``show`` and the ``--json`` of both print every stored fact.

Each message is read in one SQLite read transaction, so its envelope and
recipients agree even while worker processes commit.  ``list`` reads and
prints the queue a page at a time, so its memory does not grow with the
queue, and a message committed or removed while it runs may be left out.
Changes wait up to the spool's busy timeout for the write lock.  Queue IDs
are accepted in upper or lower case.  An unknown queue ID, a missing spool or a spool error prints one line
on stderr and exits with status 1.  A record that cannot be decoded is
reported on stderr and left in place; ``relay serve`` moves it to
``DIR/corrupt/`` when it next claims the message.  ``flush ID``, ``hold``
and ``release`` of such a message change nothing and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from relay.cli import add_config_option, config_from_args, escape_controls, stop_output
from relay.log import log_event
from relay.spool import DEFAULT_BUSY_TIMEOUT
from relay.spool.errors import CorruptRecord, MessageNotFound, SpoolError
from relay.spool.ids import is_queue_id
from relay.spool.store import NO_RECIPIENTS, SpoolStore, database_path, read_only_uri, wal_paths
from relay.spool.types import Attempt, DsnState, RecipientState, StoredMessage, StoredRecipient
from relay.units import format_duration

# Column widths: queue IDs are 15 characters (see relay.spool.ids) and an
# arrival time "YYYY-MM-DD HH:MM:SS" is 19.
_ID_WIDTH = 15
_TIME_WIDTH = 20

logger = logging.getLogger("relay.queue")


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 1."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``queue`` subcommand and its own subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    add_config_option(common)
    common.add_argument("--spool", metavar="DIR", help="spool directory (default: [spool] path of the config)")

    queue = subparsers.add_parser("queue", help="inspect and manage the spool")
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", parents=[common], help="list queued messages, like mailq")
    listing.add_argument("--json", action="store_true", help="print one JSON object per message")
    listing.add_argument("--sender", metavar="ADDRESS", help="only messages from this reverse-path (<> for null)")
    listing.add_argument("--domain", metavar="DOMAIN", help="only messages with a recipient at this domain")
    listing.add_argument(
        "--state",
        choices=[state.value for state in RecipientState],
        help="only messages with a recipient in this state",
    )
    listing.set_defaults(handler=_run, action=_list, read_only=True)

    show = actions.add_parser("show", parents=[common], help="show one message's envelope, history and headers")
    show.add_argument("queue_id", metavar="ID", help="queue ID, as relay queue list shows it")
    show_output = show.add_mutually_exclusive_group()
    show_output.add_argument("--body", action="store_true", help="print the whole message after the envelope")
    show_output.add_argument(
        "--json", action="store_true", help="print the envelope and history as one JSON object, as list --json does"
    )
    show.set_defaults(handler=_run, action=_show, read_only=True)

    flush = actions.add_parser(
        "flush", parents=[common], help="make queued and deferred recipients not yet due, due now"
    )
    target = flush.add_mutually_exclusive_group()
    target.add_argument("queue_id", metavar="ID", nargs="?", help="only this message (a queue ID)")
    target.add_argument("--domain", metavar="DOMAIN", help="only recipients at this domain")
    flush.set_defaults(handler=_run, action=_flush, log_changes=True)

    hold = actions.add_parser("hold", parents=[common], help="stop delivery attempts for a message")
    hold.add_argument("queue_id", metavar="ID", help="queue ID, as relay queue list shows it")
    hold.set_defaults(handler=_run, action=_hold, log_changes=True)

    release = actions.add_parser("release", parents=[common], help="resume delivery of a held message now")
    release.add_argument("queue_id", metavar="ID", help="queue ID, as relay queue list shows it")
    release.set_defaults(handler=_run, action=_release, log_changes=True)

    delete = actions.add_parser("delete", parents=[common], help="delete a message without sending a DSN")
    delete.add_argument("queue_id", metavar="ID", help="queue ID, as relay queue list shows it")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(handler=_run, action=_delete, log_changes=True)


def _run(args: argparse.Namespace) -> int:
    if not getattr(args, "log_changes", False):
        return _run_action(args)
    # Each change gets an event line on stderr in relay serve's format, as
    # Postfix 3.7's postsuper logs each queue ID that it removes or holds.
    relay_logger = logging.getLogger("relay")
    level = relay_logger.level
    relay_logger.setLevel(min(logging.INFO, relay_logger.getEffectiveLevel()))
    try:
        return _run_action(args)
    finally:
        relay_logger.setLevel(level)


def _run_action(args: argparse.Namespace) -> int:
    # mailq and sendmail -bp set their own program name as the prefix.
    prefix = getattr(args, "error_prefix", "relay queue")
    try:
        with open_store(args) as store:
            try:
                status: int = args.action(store, args)
            except CorruptRecord as exc:
                _report_corrupt([exc], prefix, unchanged=_NOT_DONE.get(args.queue_command))
                return 1
            except MessageNotFound as exc:
                # Delivered, deleted, or mistyped: the list shows what is there.
                print(f"{prefix}: queue ID {exc.queue_id} not found in the spool {store.directory};"
                      " `relay queue list` with the same --spool or --config shows the queue IDs",
                      file=sys.stderr)
                return 1
            return status
    except (UsageError, SpoolError) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return stop_output()


@contextlib.contextmanager
def open_store(args: argparse.Namespace) -> Iterator[SpoolStore]:
    """Open the spool of ``--spool`` or the config's ``[spool] path``, read-only when ``args.read_only`` is set.

    Raises UsageError when the spool is missing or cannot be read, or, for a
    command that changes it, when this user lacks write access.  A
    SpoolError from opening or from the block is raised again with the likely
    cause and what to do, for a held lock or missing write access.
    """
    read_only = getattr(args, "read_only", False)
    if args.spool is not None:
        if not args.spool:
            raise UsageError("--spool is empty; give the spool directory, or leave out --spool to use [spool] path")
        directory = Path(args.spool)
        # A --config given as well still counts: it must be valid, and it sets busy_timeout.
        busy_timeout = config_from_args(args).spool.busy_timeout if args.config else DEFAULT_BUSY_TIMEOUT
    else:
        config = config_from_args(args)
        directory = Path(config.spool.path)
        busy_timeout = config.spool.busy_timeout
    _check_spool_directory(directory)
    if read_only:
        _check_read_access(directory)
    else:
        _check_write_access(directory, args.queue_command)
    try:
        store = SpoolStore(directory, busy_timeout=busy_timeout, read_only=read_only)
    except SpoolError as exc:
        raise _with_hint(exc, directory, busy_timeout, read_only) from exc.__cause__
    try:
        yield store
    except SpoolError as exc:
        raise _with_hint(exc, directory, busy_timeout, read_only) from exc.__cause__
    finally:
        store.close()


def _check_spool_directory(directory: Path) -> None:
    """Raise UsageError unless ``directory`` is a directory that contains a spool database this user can reach.

    Opening a missing database would create an empty spool, which hides a
    mistyped path.
    """
    database = database_path(directory)
    try:
        info = directory.stat()
    except FileNotFoundError:
        raise UsageError(f"no spool in {directory} (directory not found); check --spool or [spool] path") from None
    except PermissionError as exc:
        raise UsageError(f"cannot read spool {directory}: {exc.strerror}; run as the user that owns it") from None
    except OSError as exc:
        raise UsageError(f"cannot read spool {directory}: {exc.strerror}; check --spool or [spool] path") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"spool {directory} is not a directory; give the spool directory in --spool or [spool] path")
    try:
        database_info = database.stat()
    except FileNotFoundError:
        raise UsageError(
            f"no spool in {directory} ({database.name} not found); check --spool or [spool] path"
        ) from None
    except PermissionError as exc:
        raise UsageError(
            f"cannot read spool {directory}: {exc.strerror} ({_owner_and_mode(info)});"
            " run as the user that owns it"
        ) from None
    if stat.S_ISDIR(database_info.st_mode):
        raise UsageError(f"{database} is a directory, not a database; check --spool or [spool] path")
    _check_relay_database(database)


def _spool_files(directory: Path) -> list[Path]:
    """Return ``spool.db`` and those of its ``-wal`` and ``-shm`` files that exist."""
    # os.path.exists, unlike Path.exists in Python 3.11, returns False when the directory cannot be searched.
    return [database_path(directory), *(path for path in wal_paths(directory) if os.path.exists(path))]


def _check_read_access(directory: Path) -> None:
    """Raise UsageError naming the first spool file this user cannot read, and how to grant access.

    SQLite needs to read ``-wal`` and ``-shm`` as well as ``spool.db``, and
    creates them with ``spool.db``'s permission bits, so read access given
    to ``spool.db`` carries over to the next ones.
    """
    for path in _spool_files(directory):
        if os.access(path, os.R_OK):
            continue
        owner = _owner_note(path)
        raise UsageError(
            f"cannot read spool {directory}: no read access to {path}{owner}; grant it (chmod g+r {path},"
            " with this user in the file's group), or run as the user that owns the spool"
        )


def _check_write_access(directory: Path, command: str) -> None:
    """Raise UsageError naming the spool directory or file that this user cannot write."""
    for path in (directory, *_spool_files(directory)):
        # access(2) also reports a read-only file system, which the permission bits do not show.
        if os.access(path, os.W_OK):
            continue
        owner = _owner_note(path)
        raise UsageError(
            f"{command} changes the spool, and this user has no write access to {path}{owner};"
            " run it as the user that owns the spool"
        )


def _owner_note(path: Path) -> str:
    """Return `` (owner NAME, mode NNNN)`` for ``path``, or "" when it cannot be read."""
    try:
        return f" ({_owner_and_mode(path.stat())})"
    except OSError:
        return ""


def _check_relay_database(database: Path) -> None:
    """Raise UsageError when ``database`` is an empty file or another program's SQLite database.

    Opening it as a spool would create relay's tables in it, and no command
    of ``relay queue`` should change a file that is not a spool.
    """
    try:
        connection = sqlite3.connect(read_only_uri(database.parent), uri=True)
    except sqlite3.Error:
        return  # SpoolStore reports the same error with its hints
    try:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return
    finally:
        connection.close()
    if "message" not in tables:
        problem = "an empty database" if not tables else "not a relay spool (it has no message table)"
        raise UsageError(f"{database} is {problem}; check --spool or [spool] path")


def _with_hint(error: SpoolError, directory: Path, busy_timeout: float, read_only: bool) -> SpoolError:
    """Return ``error`` with the likely cause and the next step added, when its SQLite error has a known fix."""
    hint = _spool_error_hint(error, directory, busy_timeout, read_only)
    return error if hint is None else SpoolError(f"{error}; {hint}")


def _spool_error_hint(error: SpoolError, directory: Path, busy_timeout: float, read_only: bool) -> str | None:
    """Return the likely cause of ``error`` and the next step, or None when its SQLite error has no known fix."""
    cause = error.__cause__
    if not isinstance(cause, sqlite3.Error):
        return None
    # sqlite_errorcode is the extended result code, whose low byte is the primary one.
    code = getattr(cause, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_NOTADB:
        return f"{database_path(directory)} is not an SQLite database; check --spool or [spool] path"
    if code == sqlite3.SQLITE_CANTOPEN and database_path(directory).is_dir():
        return f"{database_path(directory)} is a directory, not a database; check --spool or [spool] path"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (
            f"another process kept the spool's write lock for the {format_duration(busy_timeout)}"
            " this command waited ([spool] busy_timeout); retry, or look for a stopped relay process that holds it"
        )
    if code == sqlite3.SQLITE_READONLY and not read_only:
        # The checks before opening found write access, so something else denies it (a read-only mount).
        return f"check that {directory} and its {database_path(directory).name} files are writable"
    return None


def _owner_and_mode(info: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    return f"owner {owner}, mode {stat.S_IMODE(info.st_mode):04o}"


def parse_queue_id(argument: str) -> str:
    """Return the queue ID in ``argument`` in the spool's upper case; raise UsageError if it is malformed."""
    # Crockford base32 is case-insensitive.  Only ASCII is upper-cased, because
    # str.upper() turns some other letters into two (such as the ligature "ﬀ" into "FF").
    queue_id = argument.upper() if argument.isascii() else argument
    if not is_queue_id(queue_id):
        raise UsageError(
            f"invalid queue ID {argument!r}; expected 15 characters of Crockford base32 (0-9 and A-Z without"
            " I, L, O, U) as printed by `relay queue list`"
        )
    return queue_id


# The change that each subcommand did not make, as the error about an undecodable message names it.
_NOT_DONE = {"flush": "not flushed", "hold": "not held", "release": "not released"}


def _report_corrupt(errors: list[CorruptRecord], prefix: str = "relay queue", unchanged: str | None = None) -> None:
    # list and show do not write to the spool.  The scheduler moves such a
    # message aside when it claims it, and `relay queue delete` removes it.
    not_done = f"{unchanged} and " if unchanged else ""
    for error in errors:
        # No claim selects a message without recipients, so only the scan at scheduler start finds it.
        when = "next starts" if error.reason == NO_RECIPIENTS else "next tries to deliver it"
        print(
            f"{prefix}: {error}; {not_done}left in the spool, where relay serve moves it aside to corrupt/ when it"
            f" {when}, or `relay queue delete {error.queue_id}` removes it",
            file=sys.stderr,
        )


def parse_domain(argument: str, option: str = "--domain") -> str:
    """Return the domain given with ``option``, stripped; raise UsageError when it is empty or not one domain."""
    domain = argument.strip()
    if not domain:
        raise UsageError(f"{option} {argument!r} is empty; give one recipient domain such as example.com")
    if any(character.isspace() for character in domain):
        raise UsageError(
            f"{option} {argument!r} contains a space; give one recipient domain such as example.com"
        )
    if "@" in domain:
        raise UsageError(f"{option} {argument!r} contains @; give the domain alone, such as example.com")
    return domain


# -- list ----------------------------------------------------------------------


def _list(store: SpoolStore, args: argparse.Namespace) -> int:
    sender = args.sender
    if sender is not None and sender in ("<>", ""):
        sender = ""
    elif sender is not None:
        sender = sender.strip("<>")
    state = RecipientState(args.state) if args.state else None
    domain = parse_domain(args.domain) if args.domain is not None else None

    # Each page is read in snapshots of its own and printed after they end, so
    # memory stays at one page however long the queue is.  No snapshot stays
    # open while a reader that has stopped reading (``| less``) blocks the
    # output, because an open snapshot keeps checkpoints from restarting the
    # WAL, and the WAL would grow for as long as the relay commits.
    count = 0
    total = 0
    for page in store.queue_id_pages(sender=sender, domain=domain, state=state):
        corrupt: list[CorruptRecord] = []
        for item in store.messages(page):
            if isinstance(item, CorruptRecord):
                corrupt.append(item)
                continue
            if args.json:
                sys.stdout.write(orjson.dumps(_message_document(item)).decode() + "\n")
            else:
                if count == 0:
                    _print_heading()
                _print_entry(item)
            count += 1
            total += item.size
        _report_corrupt(corrupt, getattr(args, "error_prefix", "relay queue"))

    if args.json:
        return 0
    if count == 0:
        filtered = sender is not None or domain is not None or state is not None
        print("No message in the queue matches the filters" if filtered else "Mail queue is empty")
        return 0
    print(f"-- {(total + 1023) // 1024} Kbytes in {count} message{'s' if count != 1 else ''}.")
    return 0


def _print_heading() -> None:
    heading = f"{'-Queue ID-':<{_ID_WIDTH}} {'--Size--':>8} {'-Arrival Time (UTC)-':<{_TIME_WIDTH}}"
    print(f"{heading} -Sender/Recipient-------")


def _print_entry(message: StoredMessage) -> None:
    line = (
        f"{message.queue_id:<{_ID_WIDTH}} {message.size:>8} {_format_time(message.arrival):<{_TIME_WIDTH}}"
        f" {_format_path(message.envelope.sender)}"
    )
    if message.envelope.original_queue_id is not None:
        line += f"  (DSN for {_escape_controls(message.envelope.original_queue_id)})"
    print(line)
    for recipient in message.recipients:
        print(_recipient_line(recipient))
    print()


def _recipient_line(recipient: StoredRecipient) -> str:
    indent = " " * (_ID_WIDTH + 1 + 8 + 1 + _TIME_WIDTH + 1)
    line = f"{indent}{_format_path(recipient.address)}  {_state_text(recipient)}"
    if recipient.state in (RecipientState.QUEUED, RecipientState.DEFERRED) and recipient.attempts:
        line += f" (attempt {recipient.attempts}, next {_format_time(recipient.next_attempt)})"
    if _dsn_put_off(recipient):
        line += f" (DSN {_dsn_retry_text(recipient, precise=False)})"
    if recipient.last_reply:
        line += f"\n{indent}  ({_one_line(recipient.last_reply)}"
        # Local errors about a host (a refused connection) name it already.
        host = recipient.last_host
        if host is None or host in recipient.last_reply:
            line += ")"
        else:
            line += f" from {_escape_controls(host)})"
    # Local delivery ends the reply of a deferral with the same list, so the
    # line is left out while the reply names them already.
    if recipient.delivered_targets and not (recipient.last_reply or "").endswith(
        f"; already delivered to {', '.join(recipient.delivered_targets)}"
    ):
        line += f"\n{indent}  ({_targets_text(recipient)})"
    return line


def _state_text(recipient: StoredRecipient) -> str:
    """Return the recipient's state, with "(expired)" for a bounce because its queue lifetime ran out."""
    return f"{recipient.state.value} (expired)" if recipient.expired else recipient.state.value


def _dsn_put_off(recipient: StoredRecipient) -> bool:
    """Return whether the recipient owes a DSN that failed to be queued before."""
    # dsn_attempts keeps its count after the DSN is queued at last.
    return recipient.dsn is DsnState.PENDING and recipient.dsn_attempts > 0


def _dsn_retry_text(recipient: StoredRecipient, precise: bool) -> str:
    """Describe the failed attempts to queue the recipient's owed DSN and when it is tried again."""
    attempts = "attempt" if recipient.dsn_attempts == 1 else "attempts"
    return (
        f"not queued after {recipient.dsn_attempts} {attempts},"
        f" next try {_format_time(recipient.dsn_due, precise=precise)}"
    )


def _targets_text(recipient: StoredRecipient) -> str:
    targets = ", ".join(_format_path(target) for target in recipient.delivered_targets)
    return f"already delivered to alias targets {targets}"


def _message_document(message: StoredMessage) -> dict[str, Any]:
    envelope = message.envelope
    return {
        "queue_id": message.queue_id,
        "size": message.size,
        "arrival": _format_time(message.arrival, precise=True),
        "sender": envelope.sender,
        "client_address": envelope.client_address,
        "helo_name": envelope.helo_name,
        "auth_user": envelope.auth_user,
        "protocol": envelope.protocol,
        "local_submission": envelope.local_submission,
        "picked_up": message.picked_up,
        "original_queue_id": envelope.original_queue_id,
        "forwarded_from": envelope.forwarded_from,
        "esmtp": {
            "size": envelope.size,
            "body": envelope.body_type,
            "smtputf8": envelope.smtputf8,
            "ret": envelope.ret,
            "envid": envelope.envid,
        },
        "recipients": [
            {
                "address": recipient.address,
                "orcpt": recipient.orcpt,
                "notify": list(recipient.notify),
                "state": recipient.state.value,
                "attempts": recipient.attempts,
                "next_attempt": _format_time(recipient.next_attempt, precise=True),
                "last_attempt": _format_time(recipient.last_attempt, precise=True),
                "last_reply": recipient.last_reply,
                # The spool stores "" as the host of a local delivery or a local failure.
                "last_host": recipient.last_host or None,
                "dsn": recipient.dsn.value,
                "dsn_attempts": recipient.dsn_attempts,
                # 0 in the spool: no failed attempt to queue the DSN puts it off.
                "dsn_due": _format_time(recipient.dsn_due, precise=True) if recipient.dsn_due else None,
                "delivered_targets": list(recipient.delivered_targets),
                "expired": recipient.expired,
            }
            for recipient in message.recipients
        ],
    }


# -- show ----------------------------------------------------------------------


def _show(store: SpoolStore, args: argparse.Namespace) -> int:
    queue_id = parse_queue_id(args.queue_id)
    try:
        with store.snapshot():
            message = store.load(queue_id)
            if message is None:
                raise MessageNotFound(queue_id)
            history = store.history(queue_id)
            body = store.load_body(queue_id)
    except CorruptRecord as exc:
        _report_corrupt([exc])
        return 1

    if args.json:
        document = _message_document(message)
        document["history"] = [_attempt_document(attempt) for attempt in history]
        sys.stdout.write(orjson.dumps(document).decode() + "\n")
        return 0

    envelope = message.envelope
    fields: list[tuple[str, Any]] = [
        ("Queue ID", message.queue_id),
        ("Arrival", _format_time(message.arrival, precise=True)),
        ("Size", f"{message.size} octets"),
        ("Sender", _format_path(envelope.sender)),
        ("Client", envelope.client_address or "local"),
        ("Submitted", _submission_text(message)),
        ("DSN for", envelope.original_queue_id),
        ("Alias copy of", envelope.forwarded_from),
        ("HELO", envelope.helo_name),
        ("Protocol", envelope.protocol),
        ("Authenticated", envelope.auth_user),
        ("Declared SIZE", f"{envelope.size} octets" if envelope.size is not None else None),
        ("BODY", envelope.body_type),
        ("SMTPUTF8", "yes" if envelope.smtputf8 else None),
        ("RET", envelope.ret),
        ("ENVID", envelope.envid),
    ]
    for name, value in fields:
        if value is not None:
            print(f"{name + ':':<15}{_escape_controls(str(value))}")

    print("\nRecipients:")
    for recipient in message.recipients:
        print(
            f"  [{recipient.index}] {_format_path(recipient.address)}  {_state_text(recipient)},"
            f" {recipient.attempts} attempt(s)"
        )
        if recipient.orcpt or recipient.notify:
            orcpt = _escape_controls(recipient.orcpt or "-")
            print(f"      ORCPT={orcpt} NOTIFY={','.join(recipient.notify) or '-'}")
        if recipient.state in (RecipientState.QUEUED, RecipientState.DEFERRED):
            print(f"      next attempt {_format_time(recipient.next_attempt, precise=True)}")
        if recipient.delivered_targets:
            print(f"      {_targets_text(recipient)}")
        if recipient.dsn is not DsnState.NONE:
            retry = f", {_dsn_retry_text(recipient, precise=True)}" if _dsn_put_off(recipient) else ""
            print(f"      DSN {recipient.dsn.value}{retry}")
        for attempt in history:
            if attempt.index == recipient.index:
                print(f"      {_history_line(attempt)}")

    if args.body:
        print()
        sys.stdout.flush()
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
        return 0
    print("\nHeaders:")
    header_end = body.find(b"\r\n\r\n")
    headers = body if header_end < 0 else body[: header_end + 2]
    text = headers.decode("utf-8", "backslashreplace").replace("\r\n", "\n")
    sys.stdout.write(_escape_controls(text))
    return 0


def _submission_text(message: StoredMessage) -> str | None:
    """Describe a message that ``relay sendmail`` stored, or return None for one received over SMTP."""
    if not message.envelope.local_submission:
        return None
    if message.picked_up:
        return "by relay sendmail, picked up by the scheduler"
    return "by relay sendmail, not yet picked up by the scheduler"


def _escape_controls(text: str) -> str:
    # Header lines keep their TAB and the LF between them.
    return escape_controls(text, keep="\t\n")


def _attempt_document(attempt: Attempt) -> dict[str, Any]:
    return {
        "index": attempt.index,
        "time": _format_time(attempt.time, precise=True),
        "outcome": attempt.outcome,
        "reply": attempt.reply or None,
        "host": attempt.host or None,
    }


def _history_line(attempt: Attempt) -> str:
    # ISO 8601, as the Arrival line above the history prints it.
    line = f"{_format_time(attempt.time, precise=True)} {attempt.outcome}"
    if attempt.host:
        line += f" host={_escape_controls(attempt.host)}"
    if attempt.reply:
        line += f" reply={_one_line(attempt.reply)}"
    return line


# -- changes -------------------------------------------------------------------


def _recipients(count: int) -> str:
    return f"{count} recipient" if count == 1 else f"{count} recipients"


def _flush(store: SpoolStore, args: argparse.Namespace) -> int:
    # An empty ID is an error like in the other actions, not a flush of the whole queue.
    queue_id = parse_queue_id(args.queue_id) if args.queue_id is not None else None
    domain = parse_domain(args.domain) if args.domain is not None else None
    with store.transaction():
        if queue_id is not None:
            _require_decodable(store, queue_id)
        count = store.flush(time.time(), queue_id=queue_id, domain=domain)
    log_event(logger, "flushed", queue_id=queue_id, domain=domain, recipients=count, uid=os.getuid())
    print(f"flushed {_recipients(count)}")
    return 0


def _hold(store: SpoolStore, args: argparse.Namespace) -> int:
    queue_id = parse_queue_id(args.queue_id)
    with store.transaction():
        _require_decodable(store, queue_id)
        count = store.hold(queue_id, time.time())
    log_event(logger, "held", queue_id=queue_id, recipients=count, uid=os.getuid())
    if count == 0:
        print(f"{queue_id}: held 0 recipients, none is queued or deferred")
    else:
        print(f"{queue_id}: held {_recipients(count)}")
    return 0


def _release(store: SpoolStore, args: argparse.Namespace) -> int:
    queue_id = parse_queue_id(args.queue_id)
    with store.transaction():
        _require_decodable(store, queue_id)
        count = store.release(queue_id, time.time())
    log_event(logger, "released", queue_id=queue_id, recipients=count, uid=os.getuid())
    if count == 0:
        print(f"{queue_id}: released 0 recipients, none is held")
    else:
        print(f"{queue_id}: released {_recipients(count)}")
    return 0


def _require_decodable(store: SpoolStore, queue_id: str) -> None:
    """Raise CorruptRecord when the message cannot be decoded.

    Without this check, hold, release and flush of such a message would change
    no recipient and report that none was pending.  Only ``delete`` acts on it.
    """
    store.load(queue_id)


def _delete(store: SpoolStore, args: argparse.Namespace) -> int:
    queue_id = parse_queue_id(args.queue_id)
    if not args.yes and not _confirm_delete(store, queue_id):
        print("not deleted")
        return 1
    with store.transaction():
        store.delete(queue_id, uid=os.getuid())
    print(f"{queue_id}: deleted")
    return 0


def _confirm_delete(store: SpoolStore, queue_id: str) -> bool:
    """Ask on the terminal whether to delete ``queue_id``; return True only for an explicit yes."""
    # An unknown ID is reported as such, with or without a terminal.
    try:
        message = store.load(queue_id)
    except CorruptRecord as exc:
        # A message that cannot be decoded can still be deleted, so the question names its damage.
        question = f"Delete {queue_id}, which cannot be decoded ({exc.reason}), sending no DSN?"
    else:
        if message is None:
            raise MessageNotFound(queue_id)
        pending = sum(r.state.value in ("queued", "deferred", "held") for r in message.recipients)
        question = (
            f"Delete {queue_id} from {_format_path(message.envelope.sender)} with {pending} undelivered"
            f" {'recipient' if pending == 1 else 'recipients'}, sending no DSN?"
        )
    if not sys.stdin.isatty():
        # Piped input does not come from the operator, and a deletion sends no DSN
        # and cannot be undone, so without a terminal only --yes deletes.
        raise UsageError(
            f"cannot ask whether to delete {queue_id}: standard input is not a terminal;"
            " pass --yes to delete without confirmation"
        )
    try:
        answer = input(f"{question} [y/N] ")
    except (EOFError, KeyboardInterrupt):
        # Ctrl-D or Ctrl-C at the prompt means no.  The newline ends the prompt's line.
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


# -- formatting ----------------------------------------------------------------


def format_iso_time(timestamp: float) -> str:
    """Return a Unix time as UTC ISO 8601 with milliseconds, the form of every time in ``--json`` output."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _format_time(timestamp: float | None, precise: bool = False) -> str | None:
    if timestamp is None:
        return None
    if precise:
        return format_iso_time(timestamp)
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _format_path(address: str) -> str:
    # The parser lets C1 controls and bidirectional overrides into UTF-8
    # addresses (RFC 6531), so a remote client could send them to the terminal.
    return "<>" if address == "" else escape_controls(address)


def _one_line(text: str) -> str:
    # Replies come from remote servers, so their control characters are escaped too.
    return _escape_controls(" ".join(text.split()))
