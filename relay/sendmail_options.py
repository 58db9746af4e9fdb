"""The command line of ``relay sendmail``, read the way getopt(3) reads sendmail's.

Single-letter options can be grouped: ``-ti`` is ``-t -i``.  A letter that
takes a value uses the rest of its argument (``-fsender``) or, when nothing
follows it, the next argument (``-f sender``), so it may end a group
(``-tf sender``).  Long options (``--config``, ``--help``) cannot be grouped.
Arguments that do not start with ``-`` are recipients, and so is every
argument after ``--``.  As with GNU getopt, an option may also follow a
recipient.

Every error raises ``SendmailError`` with ``EX_USAGE``.  Exit codes follow
sysexits.h.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

# Option letters without a value.  -U, -v, -m and -n are accepted and ignored.
_FLAG_LETTERS = frozenset("tiUvmn")
# Option letters that take a value.  The values of -B, -C, -e, -L, -N, -O,
# -p, -q, -R, -V and -X are ignored, and so are -o values other than -oi.
_VALUE_LETTERS = frozenset("fFrhbeoNRVBCOXLpq")


class SendmailError(Exception):
    """A failure reported on stderr with a sendmail exit code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Options:
    """The sendmail command line, parsed."""

    config: str | None = None
    extract_recipients: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f; "" is the null sender
    full_name: str | None = None  # -F
    show_help: bool = False  # --help
    recipients: list[str] = field(default_factory=list)


def parse_options(argv: Sequence[str]) -> Options:
    """Parse sendmail's traditional command line; raise SendmailError (EX_USAGE)."""
    options = Options()
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            options.recipients.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            options.recipients.append(arg)
            continue
        if arg.startswith("--"):
            index = _parse_long_option(options, arg, args, index)
            continue

        position = 1
        while position < len(arg):
            letter = arg[position]
            position += 1
            if letter in _FLAG_LETTERS:
                _apply_flag(options, letter)
                continue
            if letter not in _VALUE_LETTERS:
                where = "" if arg == f"-{letter}" else f" in {arg}"
                raise SendmailError(EX_USAGE, f"unknown option -{letter}{where}; see `relay sendmail --help`")
            # The rest of the argument is the value; a value letter always ends its group.
            value = arg[position:]
            if value == "":
                if index >= len(args):
                    raise SendmailError(EX_USAGE, f"option -{letter} needs a value")
                value = args[index]
                index += 1
            _apply_value(options, letter, value)
            break
    return options


def _parse_long_option(options: Options, arg: str, args: list[str], index: int) -> int:
    """Apply one ``--`` option; return the index of the next argument."""
    if arg == "--config":
        if index >= len(args):
            raise SendmailError(EX_USAGE, "option --config needs a file name")
        options.config = args[index]
        return index + 1
    if arg.startswith("--config="):
        options.config = arg.partition("=")[2]
    elif arg == "--help":
        options.show_help = True
    else:
        raise SendmailError(EX_USAGE, f"unknown option {arg}; see `relay sendmail --help`")
    return index


def _apply_flag(options: Options, letter: str) -> None:
    if letter == "t":
        options.extract_recipients = True
    elif letter == "i":
        options.ignore_dots = True


def _apply_value(options: Options, letter: str, value: str) -> None:
    if letter in ("f", "r"):
        options.sender = value
    elif letter == "F":
        options.full_name = value
    elif letter == "h":
        _check_hop_count(value)
    elif letter == "b":
        if value != "m":
            raise SendmailError(EX_USAGE, f"mode -b{value} is not supported; only -bm (deliver a message) is")
    elif letter == "o":
        if value == "i":
            options.ignore_dots = True


def _check_hop_count(value: str) -> None:
    """Raise SendmailError (EX_USAGE) unless ``value`` is a hop count, a string of decimal digits.

    sendmail's ``-h N`` sets the message's initial hop count.  relay ignores
    the value, as Postfix's sendmail does.
    """
    if not (value.isascii() and value.isdigit()):
        raise SendmailError(EX_USAGE, f"invalid hop count {value!r} for -h; expected a number such as -h 10")
