"""``relay mailbox USER [N]``: list a local Maildir, or print message N of it.

The list has one line per message, oldest first: number, date, sender,
subject (RFC 2047 encoded words decoded) and size in octets.  Messages are
read from ``[local] maildir_root/USER``, in both ``new/`` and ``cur/``,
ordered by delivery time (the file's modification time, then its name), and
parsed as ``mailbox.MaildirMessage``.  The date is the ``Date`` header, or
the delivery time when that is missing or invalid.
"""

from __future__ import annotations

import argparse
import email.errors
import email.header
import email.utils
import mailbox
import sys
import time
from pathlib import Path
from typing import Any

from relay.cli import add_config_option, config_from_args


def register(subparsers: Any) -> None:
    """Add the ``mailbox`` subcommand."""
    parser = subparsers.add_parser("mailbox", help="list a local mailbox, or print one message of it")
    parser.add_argument("user", metavar="USER", help="local user whose Maildir to read")
    parser.add_argument("number", metavar="N", type=int, nargs="?", help="print message N (1 is the oldest)")
    add_config_option(parser)
    parser.set_defaults(handler=run)


def _decode(value: str | None) -> str:
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(value))).replace("\n", " ")
    except (UnicodeDecodeError, LookupError, email.errors.HeaderParseError):
        return value


def _message_files(root: Path) -> list[Path]:
    files = [path for folder in ("new", "cur") if (root / folder).is_dir() for path in (root / folder).iterdir()]
    return sorted((path for path in files if path.is_file()), key=lambda path: (path.stat().st_mtime, path.name))


def run(args: argparse.Namespace) -> int:
    """List the mailbox or print one message; return the exit status."""
    config = config_from_args(args)
    root = Path(config.local.maildir_root) / args.user.lower()
    if not (root / "new").is_dir() and not (root / "cur").is_dir():
        print(f"mailbox {root} not found; check the user name and [local] maildir_root", file=sys.stderr)
        return 1
    files = _message_files(root)
    if args.number is not None:
        if not 1 <= args.number <= len(files):
            count = f"{len(files)} message" + ("" if len(files) == 1 else "s")
            print(f"message {args.number} not found; {root} contains {count}", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(files[args.number - 1].read_bytes())
        return 0
    for number, path in enumerate(files, start=1):
        data = path.read_bytes()
        message = mailbox.MaildirMessage(data)
        date = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        if message["Date"]:
            try:
                date = email.utils.parsedate_to_datetime(message["Date"]).strftime("%Y-%m-%d %H:%M")
            except (TypeError, ValueError):
                pass
        sender = _decode(message["From"]) or (message["Return-Path"] or "").strip("<>")
        subject = _decode(message["Subject"])
        print(f"{number:4d}  {date}  {sender[:40]:40s}  {subject[:60]:60s}  {len(data)}")
    return 0
