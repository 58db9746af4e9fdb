"""The command line of ``relay sendmail``, read the way getopt(3) reads sendmail's.

Single-letter options can be grouped: ``-ti`` is ``-t -i``.  A letter that
takes a value uses the rest of its argument (``-fsender``) or, when nothing
follows it, the next argument (``-f sender``), so it may end a group
(``-tf sender``).  Long options (``--config``, ``--help``) cannot be grouped.
Arguments that do not start with ``-`` are recipients, and so is every
argument after ``--``.  As with GNU getopt, an option may also follow a
recipient.

The DSN options set the RFC 3461 parameters that an SMTP client would give
with MAIL and RCPT: ``-N`` is NOTIFY for every recipient, ``-R`` is RET and
``-V`` is ENVID.  Their values follow the same rules as the SMTP
parameters, with two differences: ``-N`` allows spaces around items and a
repeated item, and ``-V`` takes only printable ASCII.

``parse_options`` raises ``SendmailError`` with ``EX_USAGE`` for every
error.  The exit codes follow sysexits.h.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from relay._parser import xtext_encode

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_CONFIG = 78

# Option letters without a value.  -U, -v, -m, -n and -G are accepted and
# ignored, and -I is -bi.
_FLAG_LETTERS = frozenset("tiUvmnGI")
# Option letters that take a value.  The values of -A, -C, -e, -L, -O, -p
# and -X are ignored, and so are -o values other than -oi.  -q takes its value
# only from the rest of its argument (see ``_apply_queue_option``).
_VALUE_LETTERS = frozenset("fFrhbeoNRVBCOXLpA")

# NOTIFY keywords other than NEVER, which must be the only keyword (RFC 3461 section 4.1).
NOTIFY_KEYWORDS = ("SUCCESS", "DELAY", "FAILURE")
# Maximum ENVID length in xtext form (RFC 3461 section 4.4), the limit that
# the SMTP server applies to ENVID too.
MAX_ENVID = 100


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
    # -b: "m" deliver a message, "s" SMTP on standard input and output, "p" list the queue (mailq),
    # "i" check the aliases, "h" or "H" do nothing (sendmail's host status, -bh and -bH)
    mode: str | None = None
    notify: tuple[str, ...] = ()  # -N: ("NEVER",) or some of NOTIFY_KEYWORDS; () if not given
    ret: str | None = None  # -R: "FULL" or "HDRS"
    envid: str | None = None  # -V, xtext-encoded as the spool stores ENVID
    body_type: str | None = None  # -B: "7BIT" or "8BITMIME"
    flush: bool = False  # -q, -qR or -qI: make deferred mail due now instead of reading a message
    flush_domain: str | None = None  # -qRDOMAIN
    flush_id: str | None = None  # -qIQUEUEID
    queue_interval: str | None = None  # -qINTERVAL: a daemon's queue run interval, ignored
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
            if letter == "q":
                _apply_queue_option(options, arg[position:])
                break
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
    elif letter == "I":
        options.mode = "i"


def _apply_value(options: Options, letter: str, value: str) -> None:
    if letter in ("f", "r"):
        options.sender = value
    elif letter == "F":
        options.full_name = parse_full_name(value)
    elif letter == "h":
        _check_hop_count(value)
    elif letter == "b":
        if value in ("h", "H"):
            # Sendmail's host status database, which Postfix and relay do not keep.
            options.mode = value
            return
        if value not in ("m", "s", "p", "i"):
            raise SendmailError(
                EX_USAGE,
                f"mode -b{value} is not supported; use -bm (deliver a message), -bs (SMTP on standard input"
                " and output), -bp (list the queue, as mailq) or -bi (check the aliases file, as newaliases)",
            )
        options.mode = value
    elif letter == "o":
        if value == "i":
            options.ignore_dots = True
    elif letter == "N":
        options.notify = parse_notify(value)
    elif letter == "R":
        options.ret = parse_ret(value)
    elif letter == "V":
        options.envid = parse_envid(value)
    elif letter == "B":
        options.body_type = parse_body_type(value)


def _apply_queue_option(options: Options, value: str) -> None:
    """Apply ``-q`` with the rest of its argument, as Postfix's sendmail reads it.

    ``-q`` alone makes all deferred mail due now, ``-qRDOMAIN`` the mail for
    one domain and ``-qIQUEUEID`` one message; none of them reads a message.
    ``-q`` never takes the next argument, so ``-q 30m`` is a flush followed
    by a recipient, which is an error.  ``-q30m`` is the queue run interval
    of a daemon mode that relay does not have, so it is ignored and the
    command exits at once, as Postfix's does.
    """
    if value == "":
        options.flush = True
    elif value[0].isascii() and value[0].isdigit():
        options.queue_interval = value
    elif value[0] in "RI":
        if len(value) == 1:
            example = "-qRexample.com" if value[0] == "R" else "-qI0123456789ABCDE"
            raise SendmailError(EX_USAGE, f"-q{value[0]} needs its value in the same argument, such as {example}")
        options.flush = True
        if value[0] == "R":
            options.flush_domain = value[1:]
        else:
            options.flush_id = value[1:]
    else:
        raise SendmailError(
            EX_USAGE, f"-q{value[0]} is not supported; use -q, -qRDOMAIN or -qIQUEUEID to make deferred mail due now"
        )


def _check_hop_count(value: str) -> None:
    """Raise SendmailError (EX_USAGE) unless ``value`` is a hop count, a string of decimal digits.

    sendmail's ``-h N`` sets the message's initial hop count.  relay ignores
    the value, as Postfix's sendmail does.
    """
    if not (value.isascii() and value.isdigit()):
        raise SendmailError(EX_USAGE, f"invalid hop count {value!r} for -h; expected a number such as -h 10")


def parse_full_name(value: str) -> str:
    """Check ``-F``: the name goes into a From field as UTF-8, so an argument that is not UTF-8 is rejected.

    Python decodes such an argument with surrogate escapes, which cannot be encoded.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SendmailError(
            EX_USAGE, f"invalid -F value {value!r}: not UTF-8; give the full name in UTF-8"
        ) from None
    return value


def parse_notify(value: str) -> tuple[str, ...]:
    """Parse ``-N``: ``never``, or a comma-separated list of success, delay and failure, in any case.

    Spaces around the items are allowed (``-N "delay, failure"``) and a
    repeated item counts once.  Return the upper-case NOTIFY keywords.
    """
    items = [item.strip().upper() for item in value.split(",")]
    keywords = tuple(dict.fromkeys(items))
    if keywords == ("NEVER",) or (keywords and all(item in NOTIFY_KEYWORDS for item in keywords)):
        return keywords
    raise SendmailError(
        EX_USAGE,
        f"invalid -N value {value!r}; expected never, or a comma-separated list of success, delay and failure",
    )


def parse_ret(value: str) -> str:
    """Parse ``-R``: ``hdrs`` or ``full``, in any case; return the RET keyword."""
    keyword = value.strip().upper()
    if keyword not in ("FULL", "HDRS"):
        raise SendmailError(EX_USAGE, f"invalid -R value {value!r}; expected hdrs or full")
    return keyword


def parse_body_type(value: str) -> str:
    """Parse ``-B``: ``7BIT`` or ``8BITMIME``, in any case; return the RFC 6152 BODY keyword."""
    keyword = value.strip().upper()
    if keyword not in ("7BIT", "8BITMIME"):
        raise SendmailError(EX_USAGE, f"invalid -B value {value!r}; expected 7BIT or 8BITMIME")
    return keyword


def parse_envid(value: str) -> str:
    """Check ``-V``: printable US-ASCII of at most MAX_ENVID characters in xtext form; return that form."""
    if value == "" or not all(" " <= character <= "~" for character in value):
        raise SendmailError(
            EX_USAGE, f"invalid -V value {value!r}; expected an envelope ID of printable ASCII characters"
        )
    encoded = xtext_encode(value)
    if len(encoded) > MAX_ENVID:
        raise SendmailError(
            EX_USAGE,
            f"invalid -V value {value!r}: longer than {MAX_ENVID} characters once encoded as xtext;"
            " use a shorter envelope ID",
        )
    return encoded
