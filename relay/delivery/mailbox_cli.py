"""``relay mailbox USER [N]``: list a local Maildir, or print message N of it.

The list has one line per message, oldest first: number, date, sender,
subject and size in octets.  Messages are read from
``[local] maildir_root/USER``, in both ``new/`` and ``cur/``, ordered by
delivery time (the file's modification time, then its name).  The date is
the ``Date`` header, or the delivery time when that is missing or invalid.

Sender and subject come from remote senders, so they are cleaned for the
terminal.  Folded header lines are joined, raw 8-bit header bytes are
decoded as UTF-8 (RFC 6532) with U+FFFD in place of bytes that are not
valid UTF-8, and RFC 2047 encoded words are decoded.  Every C0 control character,
DEL and C1 control character is then shown as a ``\\xNN`` escape (ESC as
``\\x1b``), so none of them reaches the terminal, except that a tab becomes a
space.  A backslash in the header itself is shown unchanged, so ``\\x1b`` in
a line may also be those four characters.  Columns are padded by terminal
cells: wide East Asian characters count two, combining marks none.

``relay mailbox USER N`` writes message N byte for byte, without escaping,
because it is the message itself.  Page an untrusted message with ``less``
rather than printing it to the terminal.

A user that local delivery accepts (see ``relay.delivery.maildir``) but whose
Maildir has no messages, or does not exist yet, prints "mailbox USER is
empty" on stderr and exits with status 0.  An alias without a Maildir of its
own and a name the config does not know print "not found" and exit 1.  A user
name that local delivery would not use as a folder name (only letters,
digits and ``. _ + = -``, no leading dot, no ``..`` and at most 255
characters) is rejected, so that the lookup stays inside ``maildir_root``.
A message that a mail client moves between ``new/`` and ``cur/`` while the
command runs is read under its new name, and a message deleted meanwhile is
left out.  When the reader of the output goes away (``| head``), the command
stops quietly with status 1.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import email.utils
import errno
import os
import re
import stat
import sys
import time
import unicodedata
from email.headerregistry import HeaderRegistry
from pathlib import Path
from typing import Any, BinaryIO

from relay.aliases import AliasError
from relay.cli import add_config_option, config_from_args, escape_controls, stop_output
from relay.config import LocalConfig
from relay.delivery.maildir import LocalDelivery
from relay.units import is_safe_user_name

MAILDIR_FOLDERS = ("new", "cur")

# The default policy decodes RFC 6532 raw UTF-8 and RFC 2047 encoded words and
# unfolds lines.  Treating every header as unstructured text keeps a malformed
# From line from being rewritten or rejected by the address parser.
_HEADER_POLICY = email.policy.default.clone(header_factory=HeaderRegistry(use_default_map=False))

_SENDER_WIDTH = 40
_SUBJECT_WIDTH = 60

# The list reads each message only up to the blank line that ends its header
# section, and at most this many octets of it, so a large message costs no more
# memory than a small one.  RFC 5322 sets no limit on the header section, and 1 MiB
# is room for thousands of Received lines.
HEADER_READ_LIMIT = 1024 * 1024
_READ_CHUNK = 64 * 1024
# The end of the header section: an empty line, with LF or CRLF line ends.
_HEADER_END = re.compile(rb"\n\r?\n")


def register(subparsers: Any) -> None:
    """Add the ``mailbox`` subcommand."""
    parser = subparsers.add_parser("mailbox", help="list a local mailbox, or print one message of it")
    parser.add_argument("user", metavar="USER", help="local user whose Maildir to read")
    parser.add_argument(
        "number", metavar="N", type=_message_number, nargs="?", help="print message N (1 is the oldest)"
    )
    add_config_option(parser)
    parser.set_defaults(handler=run)


def _message_number(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"expected a message number of at least 1, as relay mailbox USER lists them, got {value!r}"
        )
    return number


def run(args: argparse.Namespace) -> int:
    """List the mailbox or print one message; return the exit status."""
    config = config_from_args(args)
    if not is_safe_user_name(args.user):
        _error(
            f"invalid user name {args.user!r}: a local user name is one folder under [local] maildir_root,"
            " of at most 255 letters, digits and . _ + = - and not starting with '.', such as alice."
        )
        return 1
    user = args.user.lower()
    root = Path(config.local.maildir_root) / user
    try:
        if not any((root / folder).is_dir() for folder in MAILDIR_FOLDERS):
            problem = _missing_maildir_problem(config.local, user, root)
            if problem:
                _error(problem)
                return 1
            if args.number is None:
                _error(f"mailbox {user} is empty (delivery creates its Maildir {root})")
                return 0
        if args.number is not None:
            status = _print_message(root, args.number)
        else:
            status = _list_messages(user, root)
        sys.stdout.flush()
        return status
    except PermissionError as exc:
        _report_permission_error(user, root, exc)
        return 1
    except BrokenPipeError:
        return stop_output()


def _error(text: str) -> None:
    """Print one line on stderr, named for the command like the errors of relay queue."""
    print(f"relay mailbox: {text}", file=sys.stderr)


def _report_permission_error(user: str, root: Path, exc: PermissionError) -> None:
    path = Path(exc.filename) if exc.filename else root
    try:
        owner_hint = f" ({path.owner()}, the owner of {path})"
    except (OSError, KeyError):
        owner_hint = ""
    _error(
        f"cannot read mailbox {user}: permission denied on {path}. "
        f"Run relay mailbox as the relay's user{owner_hint}, or make {path} readable for this user."
    )


def _print_message(root: Path, number: int) -> int:
    messages = _message_files(root)
    if not 1 <= number <= len(messages):
        count = f"{len(messages)} message" + ("" if len(messages) == 1 else "s")
        _error(f"message {number} not found; {root} contains {count}")
        return 1
    path, _ = messages[number - 1]
    found = _read_message(root, path)
    if found is None:
        _error(
            f"message {number} ({path.name}) was deleted from {root} while it was being read. "
            "Run relay mailbox without N to list the current messages."
        )
        return 1
    data, _ = found
    # When the reader closes a pipe mid-write, Linux returns the bytes written so far and the
    # buffered writer (CPython 3.11) returns that short count without raising.  Writing the rest
    # raises BrokenPipeError, and a short count from a signal is completed the same way.
    remaining = memoryview(data)
    while remaining:
        remaining = remaining[sys.stdout.buffer.write(remaining) :]
    return 0


def _list_messages(user: str, root: Path) -> int:
    number = 0
    for path, mtime in _message_files(root):
        found = _read_message(root, path, header_only=True)
        if found is None:
            continue
        header, size = found
        number += 1
        print(_summary_line(number, header, size, mtime))
    if number == 0:
        _error(f"mailbox {user} is empty")
    return 0


def _missing_maildir_problem(local: LocalConfig, user: str, root: Path) -> str | None:
    """Return the error for a user without a Maildir, or None when local delivery accepts mail for the user."""
    try:
        delivery = LocalDelivery.from_config(local)
    except AliasError as exc:
        return f"invalid [local] aliases {local.aliases}: {exc}; run relay check-config to see each error"
    except (OSError, ValueError) as exc:
        return f"cannot read [local] aliases {local.aliases}: {exc}"
    # Delivery looks up aliases before mailboxes, so an alias's mail is in its targets' Maildirs.
    targets = delivery.table().get(user)
    if targets is not None:
        if user in (target.lower() for target in targets):
            return None  # "carol: carol, ...": carol's own mailbox, made at the first delivery
        return (
            f"mailbox {root} not found: {user} is an alias for {', '.join(targets)}, "
            "so its mail is delivered to those addresses"
        )
    try:
        if delivery.user_exists(user):
            return None
    except OSError as exc:
        return f"{exc}; check [local] maildir_root and its permissions"
    return f"mailbox {root} not found; check the user name and [local] maildir_root"


def _message_files(root: Path) -> list[tuple[Path, float]]:
    """Return each message's path and modification time, oldest first.

    A message listed in both ``new/`` and ``cur/`` (moved while the folders
    were read) counts once, under its ``cur/`` name.
    """
    found: dict[str, tuple[float, str, Path]] = {}
    for folder in MAILDIR_FOLDERS:
        directory = root / folder
        # A folder that is a symbolic link is skipped like a linked message file.
        if directory.is_symlink() or not directory.is_dir():
            continue
        for path in directory.iterdir():
            try:
                # lstat: a symbolic link is not a message, wherever it points.
                status = path.lstat()
            except FileNotFoundError:
                continue  # moved or deleted since the folder was read
            if stat.S_ISREG(status.st_mode):
                found[_unique_part(path.name)] = (status.st_mtime, path.name, path)
    return [(path, mtime) for mtime, _, path in sorted(found.values())]


def _unique_part(name: str) -> str:
    # A Maildir file name is a unique part, then ":2," and flags once the file is in cur/.
    return name.partition(":")[0]


def _read_message(root: Path, path: Path, *, header_only: bool = False) -> tuple[bytes, int] | None:
    """Read a listed message, following it to its new name if it moved; return None if it is gone.

    Returns the bytes read and the file's size in octets.  With ``header_only``
    the bytes are the header section (see ``HEADER_READ_LIMIT``), else the whole file.
    """
    try:
        return _read_regular_file(path, header_only)
    except FileNotFoundError:
        pass
    unique = _unique_part(path.name)
    for folder in MAILDIR_FOLDERS:
        try:
            if (root / folder).is_symlink():
                continue
            candidates = [entry for entry in (root / folder).iterdir() if _unique_part(entry.name) == unique]
        except FileNotFoundError:
            continue
        for candidate in candidates:
            try:
                return _read_regular_file(candidate, header_only)
            except FileNotFoundError:
                continue
    return None


def _read_regular_file(path: Path, header_only: bool) -> tuple[bytes, int] | None:
    """Return the contents of ``path`` and its size, or None when it is not a regular file (a link put in its place)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symbolic link
        raise
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            return None
        if header_only:
            return _read_header_section(handle), status.st_size
        data = handle.read()
        return data, len(data)


def _read_header_section(handle: BinaryIO) -> bytes:
    """Read up to and including the empty line after the headers, at most ``HEADER_READ_LIMIT`` octets."""
    data = b""
    while len(data) < HEADER_READ_LIMIT:
        chunk = handle.read(min(_READ_CHUNK, HEADER_READ_LIMIT - len(data)))
        if not chunk:
            break
        # An empty line may straddle two chunks, so the search starts a few octets back.
        search_from = max(len(data) - 2, 0)
        data += chunk
        if _HEADER_END.search(data, search_from):
            break
    return data


def _summary_line(number: int, header: bytes, size: int, mtime: float) -> str:
    headers = email.parser.BytesHeaderParser(policy=_HEADER_POLICY).parsebytes(header)
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))
    if headers["Date"]:
        try:
            date = email.utils.parsedate_to_datetime(str(headers["Date"])).strftime("%Y-%m-%d %H:%M")
        except (TypeError, ValueError, OverflowError):
            # OverflowError: a number too large for a C integer, such as year 10**20.
            pass
    sender = str(headers["From"] or "") or str(headers["Return-Path"] or "").strip("<>")
    subject = str(headers["Subject"] or "")
    sender_column = _fit(_escape_controls(sender), _SENDER_WIDTH)
    subject_column = _fit(_escape_controls(subject), _SUBJECT_WIDTH)
    return f"{number:4d}  {date}  {sender_column}  {subject_column}  {size}"


def _escape_controls(text: str) -> str:
    """Replace a tab with a space and escape every other control character, for one summary line."""
    return escape_controls(text.replace("\t", " "))


def _fit(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` terminal cells and pad it with spaces to exactly that width."""
    kept = []
    used = 0
    for character in text:
        cells = _cell_width(character)
        if used + cells > width:
            break
        kept.append(character)
        used += cells
    return "".join(kept) + " " * (width - used)


def _cell_width(character: str) -> int:
    # NOTE: an estimate of what terminals do.  Emoji sequences and ambiguous-width
    # characters are drawn differently by different terminals and fonts.
    if unicodedata.combining(character) or unicodedata.category(character) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(character) in ("W", "F") else 1
