"""``relay sendmail``: the sendmail-compatible injector for local programs.

Programs that run ``/usr/sbin/sendmail`` (cron, PHP ``mail()``, scripts) work
unchanged when that name is a symlink to ``relay``, or when they call
``relay sendmail``.  It reads the options that Postfix's sendmail(1) reads,
grouped as getopt(3) allows (``-ti``), as ``relay.sendmail_options`` parses
them:

- ``-t``: add the To, Cc and Bcc addresses of the message.  A message
  with any Resent- field is being resent, so its Resent-To, Resent-Cc and
  Resent-Bcc are read in their place.  Bcc and Resent-Bcc are removed
  from every message, with or without -t.
- ``-i`` and ``-oi``: a line with a single dot does not end the input.
- ``-f SENDER``: the reverse-path, an address or a mailbox such as
  ``"App <app@example.com>"``; ``-f ""`` or ``-f "<>"`` is the null sender.
- ``-F NAME``: the full name for a From header the message lacks.
- ``-N DSN``, ``-R RET``, ``-V ENVID``: the RFC 3461 NOTIFY (for every
  recipient), RET and ENVID parameters, stored with the message as if an
  SMTP client had given them.
- ``-B TYPE``: the RFC 6152 body type, 7BIT or 8BITMIME.  A message with
  an octet above 127 is stored as 8BITMIME whatever -B gives, so that the
  next hop gets BODY=8BITMIME with it.
- ``-bm``: the default mode, read a message and deliver it.
- ``-bs``: speak SMTP on standard input and output, as Postfix's
  ``sendmail -bs`` does; ``relay.sendmail_smtp`` describes it.
- ``-bp`` (or the program name ``mailq``): list the queue, as
  ``relay queue list`` does.
- ``-bi``, ``-I`` (or the program name ``newaliases``): check the
  ``local.aliases`` file.  relay has no alias database to build, and a
  running relay uses a changed file after a reload (SIGHUP).
- ``-h N``: the initial hop count; checked to be a number, then ignored.
- ``-q``, ``-qRDOMAIN``, ``-qIQUEUEID``: read no message, make deferred mail
  due now (all of it, one domain's, or one message's) and print nothing, as
  Postfix's ``sendmail -q`` does for cron jobs.  ``-q30m`` is ignored.
- recipients as arguments, each an address list as in a To field
  (``"a@example.com, Name <b@example.com>"``).  A user name without
  ``@`` gets the domain of ``origin_domain``, in recipients and in the
  sender alike.
- ``--help``: print the usage and queue nothing.

``-bh`` and ``-bH`` (sendmail's host status) do nothing and exit 0, as with
Postfix.  Other modes, such as ``-bv`` and ``-bd``, are usage errors.  Other
``-o`` options, and ``-A``, ``-C``, ``-e``, ``-G``, ``-L``, ``-m``, ``-n``,
``-O``, ``-p``, ``-U``, ``-v`` and ``-X``, are accepted and ignored.

The message is written straight into the spool with the same group commit
as the SMTP server, like Postfix's postdrop writing into the maildrop queue:
it works while no listener runs, needs no credentials, and the running
relay's scheduler delivers it.  The caller needs write access to the spool
directory.  The message, and a DSN queued with it, are marked as local
submissions, so the scheduler logs ``picked_up`` for them.  The config is ``--config FILE``, else the file that the
``RELAY_CONFIG`` environment variable names, else ``/etc/relay/relay.toml``
when it exists, else the built-in defaults: a program that runs
``/usr/sbin/sendmail`` passes no relay options.  With the built-in
defaults the spool is ``relay-spool`` in the caller's working directory.
sendmail writes there only when that spool exists, and otherwise refuses
the message with ``EX_TEMPFAIL``: a spool created there would strand the
message, because no running relay reads it.
Lines may end in LF (the usual case for local programs); they
are stored with CRLF, and CRs right before a CRLF are dropped.  Leading
mbox ``From `` lines are dropped, and an
empty line goes before the first line that is no header field, so bare
text becomes the body.  A
``Received`` header naming the user ID, and ``Date``, ``Message-ID`` and
``From`` when missing, are added.  A bare user name in an address field
(cron's ``From: root (Cron Daemon)``) gets the ``origin_domain``, as
Postfix completes the header addresses of local mail.

Exit codes follow sysexits.h: ``EX_USAGE`` (64) bad option or no
recipients, ``EX_DATAERR`` (65) message over ``policy.max_message_size``
(the rest of the input is read and dropped first, see ``discard_input``),
``EX_NOINPUT`` (66) standard input closed, ``EX_NOUSER`` (67) no valid
recipient, or an invalid sender.  A recipient that is invalid, that the
SMTP server would reject or that is an unknown local user does not stop
the message for the others.  It is stored as failed, and a DSN queued
with the message reports it (see ``relay.sendmail_addresses``).  A local
recipient whose Maildir folder cannot be looked up now, which the server
would defer with ``451 4.3.0``, is queued, and delivery decides.
``EX_TEMPFAIL`` (75) the spool cannot take the message now (or the caller
cannot write to it), ``EX_CONFIG`` (78) invalid config file or, for
``-bi``, invalid aliases file.  ``-bs`` also exits with ``EX_PROTOCOL``
(76), as ``relay.sendmail_smtp`` describes.  An
unexpected internal error gives ``EX_SOFTWARE`` (70) with its message,
never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.header
import email.utils
import logging
import os
import pwd
import re
import sys
import time
from collections.abc import Callable, Sequence
from email.utils import formatdate
from typing import BinaryIO, TextIO

from relay.aliases import DEFAULT_EXPANSION_LIMIT, AliasError, parse_aliases
from relay.cli import escape_controls
from relay.config import CONFIG_ENVIRONMENT, Config, ConfigError, load_config
from relay.log import log_event
from relay.sendmail_addresses import (
    RejectedRecipient,
    check_address,
    check_recipients,
    qualify_address_list,
    split_address_list,
)
from relay.sendmail_options import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOUSER,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_USAGE,
    Options,
    SendmailError,
    parse_options,
)
from relay.smtp.received import has_from_field, header_block, normalize_line_ends, submission_headers
from relay.spool import (
    DsnState,
    Envelope,
    MessageNotFound,
    Recipient,
    Spool,
    SpoolError,
    StoredMessage,
    new_queue_id,
)
from relay.spool.cli import UsageError, parse_domain, parse_queue_id
from relay.spool.store import SpoolStore, database_path

logger = logging.getLogger("relay.sendmail")

USAGE = """usage: relay sendmail [--config FILE] [-ti] [-f SENDER] [-F NAME] [-N DSN] [-R RET] [-V ENVID]
                     [-B TYPE] [-bm|-bp|-bi|-I] [-h N] [RECIPIENT ...]
       relay sendmail [--config FILE] [-F NAME] -bs
       relay sendmail [--config FILE] -q|-qRDOMAIN|-qIQUEUEID

Read a message from standard input and queue it for delivery, like sendmail(1).

  -t          add the To, Cc and Bcc addresses of the message (Resent-To,
              Resent-Cc and Resent-Bcc when it has Resent- fields); Bcc
              and Resent-Bcc are removed with or without -t
  -i, -oi     a line with a single dot does not end the message
  -f SENDER   envelope sender (reverse-path); -f "<>" is the null sender
  -F NAME     full name for the From header, when the message has none
  -N DSN      when to send a delivery status notification (DSN) to the sender:
              never, or a comma-separated list of success, delay and failure
              (default: on failure, and on delay when delivery.delay_warning_time
              is set)
  -R RET      what a DSN returns of the message: hdrs (the header only) or
              full (relay's own DSNs return the header when -R is not given)
  -V ENVID    envelope ID that DSNs quote, printable ASCII
  -B TYPE     body type: 7BIT or 8BITMIME (a message with 8-bit octets is
              always sent as 8BITMIME)
  -bm         read a message and deliver it (the default mode)
  -bs         speak SMTP on standard input and output for one local client,
              with the limits and replies of the SMTP server; each message
              gets its 250 once it is stored.  Takes no recipients, -t or -q;
              MAIL and RCPT set the envelope, so -f, -N, -R, -V, -B and -i
              have no effect
  -bp         list the queue, as mailq (and relay queue list) does
  -bi, -I     check the local.aliases file, as newaliases; reload a running
              relay (SIGHUP) to use a changed file
  -h N        initial hop count; accepted and ignored, as Postfix does
  -q          read no message; make all deferred mail due now (-qRDOMAIN:
              the mail for one domain, -qIQUEUEID: one message).  -q30m and
              other intervals are ignored: the command exits at once
  --config F  relay.toml to read (default: $RELAY_CONFIG, else
              /etc/relay/relay.toml if it exists, else built-in defaults)
  --help      print this text and exit without reading a message

Flags can be grouped (-ti is -t -i), and an option with a value can end a
group (-tf SENDER).  Other -o options, -Am, -Ac, -bh and -bH are accepted
and ignored.
A user name without @ (in recipients, -f and the default sender USER) gets
@server.hostname when policy.local_domains lists that name, else @ the first
entry of policy.local_domains, so that mail to a bare name stays local.
An invalid or unknown recipient does not stop the message for the others:
it is named on standard error and bounces (a DSN goes to the sender).
Exit status: 0 queued, 64 usage, 65 message too large, 66 no input,
67 no valid recipient (or an invalid sender), 70 internal error,
75 spool unavailable (try again later, or get write access to it),
78 invalid config (or aliases file, with -bi).  With -bs: 0 after QUIT or
when input ends between transactions, 75 when a message could not be
stored or the session timed out, 76 when input ended inside a
transaction or the session was closed after errors."""


# A leading mbox envelope line, as "From sender date" or quoted as ">From ".
_ENVELOPE_LINE = re.compile(rb">*From (?![ \t]*:)")

# The start of a header field: a field name (RFC 5322 section 3.6.8), and a
# colon after optional white space (the obsolete syntax of section 4.5).
_HEADER_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")

# A line end of two or more CRs and an LF, as from a program that writes
# CRLF through a stream that turns each LF into CRLF.  Each bare CR would
# otherwise end a line of its own, and the empty line after the first would
# end the header block.  Postfix 3.7's sendmail removes one CR before each LF.
_CR_BEFORE_CRLF = re.compile(rb"\r+\r\n")

# A Bcc or Resent-Bcc header field, which -t removes from the stored message.
_BCC_FIELD = re.compile(rb"(?:resent-)?bcc[ \t]*:", re.IGNORECASE)

# The header fields whose bare user names get a domain (RFC 5322 sections
# 3.6.2, 3.6.3 and 3.6.6).  Bcc and Resent-Bcc are removed before this runs.
_ADDRESS_FIELDS = frozenset(
    ("from", "sender", "reply-to", "to", "cc", "resent-from", "resent-sender", "resent-to", "resent-cc")
)

# The config file read without --config and $RELAY_CONFIG, when it exists.
SYSTEM_CONFIG = "/etc/relay/relay.toml"


def read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """Read the message from stream, stopping at a lone "." line unless ignore_dots.

    At most ``limit + 3`` octets are read, so an endless or huge input costs
    bounded memory, and a result longer than ``limit`` means the input was
    too large.
    """
    if ignore_dots:
        return stream.read(limit + 1)
    lines = []
    total = 0
    while total <= limit:
        # Two octets past the budget, so that a line cut at the limit is never
        # taken for a lone dot: ".\r\n" fits whole, ".signature" stays longer than ".".
        line = stream.readline(limit + 3 - total)
        if not line or line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
        total += len(line)
    return b"".join(lines)


# Octets read at a time while discarding input.
DISCARD_READ_SIZE = 65536


def discard_input(stream: BinaryIO, ignore_dots: bool, at_line_start: bool, seconds: float) -> None:
    """Read and drop the rest of a message that is too large, up to its end or for at most ``seconds``.

    A writer such as a Perl or shell script dies of SIGPIPE when sendmail
    exits before it has written everything, and then never gets the exit
    status.  Postfix's sendmail (2.11 source) reads its input to the end and
    leaves the size check to its cleanup daemon.  Without ``ignore_dots`` a
    lone dot line still ends the input.  ``at_line_start`` is True when the octets
    read so far ended a line.  The time limit stops an endless
    writer.  A writer that stalls blocks this read, as it blocks the first.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ignore_dots:
            if not stream.read(DISCARD_READ_SIZE):
                return
            continue
        line = stream.readline(DISCARD_READ_SIZE)
        if not line or (at_line_start and line.rstrip(b"\r\n") == b"."):
            return
        at_line_start = line.endswith(b"\n")


def _too_large(limit: int) -> SendmailError:
    return SendmailError(
        EX_DATAERR,
        f"message exceeds policy.max_message_size ({limit} octets once its lines end in CRLF);"
        " send a smaller message or raise policy.max_message_size",
    )


def origin_domain(config: Config) -> str:
    """Return the domain appended to a bare user name in a sender or recipient.

    It is ``server.hostname`` when ``policy.local_domains`` lists it, else
    the first local domain, so that mail to a bare name such as ``root``
    stays local.  Postfix appends ``myorigin``, which defaults to
    ``$myhostname``, a name that its default ``mydestination`` lists as
    local.  With no local domains at all, as on a host that only forwards
    mail, the host name is used.
    """
    hostname = config.server.hostname
    local_domains = config.policy.local_domains
    if not local_domains or hostname.lower().rstrip(".") in local_domains:
        return hostname
    return local_domains[0]


def _strip_envelope_lines(message: bytes) -> bytes:
    """Drop the mbox ``From `` lines (also ``>From ``) that start the input.

    Such a line (from ``git format-patch`` or a saved mailbox) is no header
    field, so kept it would end the header block for the next hop and turn
    the real header fields into body text.  Postfix's sendmail drops them too.
    """
    # Find where the envelope lines end, then copy the rest once.
    start = 0
    while _ENVELOPE_LINE.match(message, start):
        end = message.find(b"\r\n", start)
        if end < 0:
            return b""
        start = end + 2
    return message[start:]


def separate_body(message: bytes) -> bytes:
    """Insert the empty line that ends the header block before the first line that is no header field.

    Scripts often pipe bare text (``echo "disk full" | sendmail root``).
    Without the empty line that text would be stored after the added Date,
    Message-ID and From fields as if it were more header fields.  Postfix's
    cleanup ends the header block at such a line in the same way.
    ``message`` ends with CRLF unless it is empty.
    """
    position = 0
    while position < len(message):
        end = message.find(b"\r\n", position)
        line = message[position:end]
        if not line:
            return message
        continuation = position > 0 and line[:1] in (b" ", b"\t")
        if not continuation and not _HEADER_FIELD.match(line):
            return message[:position] + b"\r\n" + message[position:]
        position = end + 2
    return message


def _remove_bcc(message: bytes) -> bytes:
    """Drop every Bcc and Resent-Bcc field (with its continuation lines) from the header block."""
    headers = header_block(message)
    kept: list[bytes] = []
    skipping = False
    for line in headers.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = _BCC_FIELD.match(line) is not None
        if not skipping:
            kept.append(line)
    return b"".join(kept) + message[len(headers) :]


def _qualify_header_addresses(message: bytes, domain: str) -> bytes:
    """Append ``@domain`` to each bare user name in the address fields of the header block.

    Octets that are not UTF-8 pass through unchanged as surrogate escapes,
    and an address that contains one is left as it is.
    """
    headers = header_block(message)
    lines = headers.decode("utf-8", "surrogateescape").split("\r\n")
    # Each field as its lines, so that its folding is kept.
    fields: list[list[str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    rewritten: list[str] = []
    for field in fields:
        text = "\r\n".join(field)
        name, colon, value = text.partition(":")
        if colon and name.rstrip(" \t").lower() in _ADDRESS_FIELDS:
            text = name + colon + qualify_address_list(value, domain)
        rewritten.append(text)
    return "\r\n".join(rewritten).encode("utf-8", "surrogateescape") + message[len(headers) :]


def _header_fields(headers: str) -> list[tuple[str, str]]:
    """Return the name and unfolded value of each field in a header block that ``separate_body`` has delimited.

    A name may be followed by white space before its colon (``To : a@example.com``),
    as ``_HEADER_FIELD`` allows.  The standard library's parser ends the header
    block at such a field, so -t would miss it and every field after it.
    """
    # Each field as its name and the parts of its value, joined at the end so
    # that a field with many continuation lines costs linear time.
    fields: list[tuple[str, list[str]]] = []
    for line in headers.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1].append(line)
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.append((name.rstrip(" \t"), [value]))
    return [(name, "".join(parts)) for name, parts in fields]


def _recipient_field_names(header_names: list[str]) -> tuple[str, ...]:
    """Return the fields that -t reads: Resent-To, Resent-Cc and Resent-Bcc when any Resent- field is present.

    A message that carries Resent- fields is being sent on again (RFC 5322
    section 3.6.6), and its To, Cc and Bcc name the first recipients, who
    must not get it a second time.  Postfix's cleanup makes the same choice.
    """
    if any(name.lower().startswith("resent-") for name in header_names):
        return ("Resent-To", "Resent-Cc", "Resent-Bcc")
    return ("To", "Cc", "Bcc")


def prepare(options: Options, raw: bytes, config: Config) -> tuple[Envelope, bytes, list[RejectedRecipient]]:
    """Build the envelope and the stored message from the options and the input.

    Also return the rejected recipients, which are the last ones of the
    envelope: the caller stores them as failed so that the sender gets a DSN.
    Raises SendmailError when no recipient is valid.
    """
    default_domain = origin_domain(config)
    login = _login_name()

    message = _strip_envelope_lines(normalize_line_ends(_CR_BEFORE_CRLF.sub(b"\r\n", raw)))
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    message = separate_body(message)
    # The limit applies to the message as stored and sent, with CRLF line
    # ends, as the SMTP server counts DATA.  LF input grows by one octet a line.
    if len(message) > config.policy.max_message_size:
        raise _too_large(config.policy.max_message_size)

    # Each argument is an address list, as Postfix's sendmail reads it: some
    # programs pass "a@example.com, b@example.com" or "Name <a@example.com>".
    candidates = [
        (address, "on the command line") for item in options.recipients for address in split_address_list(item)
    ]
    fields: list[str] = []
    names: tuple[str, ...] = ("To", "Cc", "Bcc")
    if options.extract_recipients:
        # RFC 6532: header fields may hold UTF-8.  Octets that are not UTF-8
        # become U+FFFD, and check_recipients rejects an address with one
        # instead of queuing it mangled.
        header_fields = _header_fields(header_block(message).decode("utf-8", "replace"))
        names = _recipient_field_names([name for name, _ in header_fields])
        for wanted in names:
            for name, value in header_fields:
                if name.lower() == wanted.lower():
                    fields.append(value)
                    candidates += [(address, f"in the {wanted} field") for address in split_address_list(value)]
    # The checks of an SMTP client on a trusted network, which a local user is.
    recipients, rejected = check_recipients(candidates, config, default_domain)
    if not recipients and rejected:
        # Nothing is queued, so the caller learns of each address here.
        raise SendmailError(EX_NOUSER, "\n".join(rejection.error for rejection in rejected))
    to_field, cc_field, bcc_field = names
    if not recipients and fields:
        raise SendmailError(
            EX_USAGE, f"no recipients: the {to_field}, {cc_field} and {bcc_field} fields hold no valid address"
        )
    if not recipients and options.extract_recipients:
        raise SendmailError(
            EX_USAGE,
            f"no recipients: the message has no {to_field}, {cc_field} or {bcc_field} address and none was given",
        )
    if not recipients:
        raise SendmailError(EX_USAGE, "no recipients given; name them as arguments or use -t")

    if options.sender is None:
        sender = f"{login}@{default_domain}"
    elif options.sender in ("", "<>"):
        sender = ""
    else:
        # Read as a mailbox, as Postfix reads -f: "App <app@example.com>" is app@example.com.
        addresses = split_address_list(options.sender)
        if len(addresses) != 1:
            raise SendmailError(
                EX_NOUSER, f"invalid sender address {options.sender!r}; give one address, such as -f app@example.com"
            )
        sender = check_address(addresses[0], "sender", default_domain)

    message = complete_local_message(message, sender, config, options.full_name)
    body_type = local_body_type(message, options.body_type)
    envelope = Envelope(
        sender=sender,
        body_type=body_type,
        recipients=tuple(
            Recipient(address=address, notify=options.notify)
            for address in [*recipients, *(rejection.address for rejection in rejected)]
        ),
        # Only addresses that the message goes to: a rejected one is never sent.
        smtputf8=any(not address.isascii() for address in [sender, *recipients]),
        ret=options.ret,
        envid=options.envid,
        client_address=None,
        helo_name=None,
        protocol="local",
        local_submission=True,
    )
    return envelope, message, rejected


def complete_local_message(message: bytes, sender: str, config: Config, full_name: str | None) -> bytes:
    """Return a locally submitted message as relay stores it.

    Bcc and Resent-Bcc are removed, a bare user name in an address field
    gets the domain of ``origin_domain``, and Date, Message-ID and From are
    added when the header block lacks them, so both ``relay sendmail`` and
    ``relay sendmail -bs`` store the same message.  ``message`` has CRLF
    line ends, and an empty line after its header fields (see
    ``separate_body``).  ``sender`` is the reverse-path, and ``full_name``
    is the display name that ``-F`` gives an added From field.
    """
    # Without -t too: a program that names the recipients itself (mutt with
    # write_bcc, scripts) may leave Bcc in the message, and every recipient
    # would read it.  Postfix 3.7 drops Bcc and Resent-Bcc from all mail
    # (its default message_drop_headers).
    message = _qualify_header_addresses(_remove_bcc(message), origin_domain(config))
    headers = header_block(message)
    added = submission_headers(headers, config.server.hostname)
    if not has_from_field(headers):
        origin = sender or f"{_login_name()}@{origin_domain(config)}"
        added += f"From: {_from_field(full_name, origin)}\r\n".encode()
    if not headers:
        # A message without headers gets the empty line that starts its body.
        added += b"\r\n" if message and not message.startswith(b"\r\n") else b""
    return added + message


def local_body_type(message: bytes, declared: str | None) -> str | None:
    """Return the body type to store: 8BITMIME for a message with 8-bit octets, else ``declared``.

    RFC 6152: 8-bit octets go only with BODY=8BITMIME, which the delivery
    client sends when the stored body type says so.  Cron gives -B8BITMIME,
    but PHP and most scripts give no -B at all.
    """
    return "8BITMIME" if not message.isascii() else declared


def _login_name() -> str:
    """Return the name of the user ID that runs sendmail, the local part of the default sender.

    The password database decides, not ``$LOGNAME`` or ``$USER`` (which
    ``getpass.getuser`` reads first), so the default sender and the user ID
    in the Received header name the same account, as with Postfix.
    """
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def _config_file(options: Options) -> str | None:
    """Return the config file to read: --config, $RELAY_CONFIG, the system file, or None for defaults."""
    if options.config:
        return options.config
    named = os.environ.get(CONFIG_ENVIRONMENT)
    if named:
        return named
    return SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None


def _require_spool(directory: str) -> None:
    """Raise SendmailError (EX_TEMPFAIL) unless ``directory`` contains a spool that a relay created.

    The error is not a SpoolError, so the message names the missing spool and
    the config to give without the advice about write access.
    """
    try:
        found = database_path(directory).exists()
    except OSError as exc:
        raise SendmailError(EX_TEMPFAIL, f"cannot read spool {directory}: {exc.strerror}") from exc
    if not found:
        raise SendmailError(
            EX_TEMPFAIL,
            f"no spool in {directory} (spool.db not found) and no config file;"
            f" name the relay's config with --config or {CONFIG_ENVIRONMENT}",
        )


def _load_config(config_file: str | None, stderr: TextIO, program: str = "sendmail") -> Config | None:
    """Load ``config_file`` (None: the defaults); print each error after ``program:`` and return None if invalid."""
    try:
        return load_config(config_file)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{program}: {line}", file=stderr)
        return None


def inject(options: Options, stdin: BinaryIO, stderr: TextIO) -> int:
    """Read, check and spool one message; return the sendmail exit code."""
    config_file = _config_file(options)
    config = _load_config(config_file, stderr)
    if config is None:
        return EX_CONFIG

    try:
        limit = config.policy.max_message_size
        raw = read_message(stdin, options.ignore_dots, limit)
        if len(raw) > limit:
            discard_input(stdin, options.ignore_dots, raw.endswith(b"\n"), config.server.data_timeout)
            raise _too_large(limit)
        if config_file is None:
            # Before the recipients are checked against the default ./mail, which
            # is as much a guess as the default spool.
            _require_spool(config.spool.path)
        envelope, body, rejected = prepare(options, raw, config)
        queue_id = new_queue_id()
        trace = (
            f"Received: by {config.server.hostname} (relay, from userid {os.getuid()})\r\n"
            f"\tid {queue_id}; {formatdate(time.time(), localtime=True)}\r\n"
        ).encode()
        # The rejected recipients come last in the envelope.
        first_rejected = len(envelope.recipients) - len(rejected)
        failed = {first_rejected + offset: rejection.reply for offset, rejection in enumerate(rejected)}
        spool = Spool.from_config(config.spool)
        try:
            if failed:
                report = _failure_report(trace + body, config)
                stored_id = spool.commit_with_failures_blocking(
                    envelope, trace + body, failed, queue_id=queue_id, report=report
                )
            else:
                stored_id = spool.commit_blocking(envelope, trace + body, queue_id=queue_id)
        finally:
            spool.close()
    except SendmailError as exc:
        for line in str(exc).splitlines():
            print(f"sendmail: {line}", file=stderr)
        return exc.status
    except SpoolError as exc:
        if not os.access(config.spool.path, os.W_OK):
            # Still EX_TEMPFAIL, as Postfix's sendmail exits when it cannot write its
            # queue, but the message explains that waiting alone will not help.
            print(f"sendmail: cannot write to the spool {config.spool.path} ({exc}); run as a user with write"
                  " access to it", file=stderr)
            return EX_TEMPFAIL
        print(f"sendmail: the spool cannot take the message now ({exc}); try again later", file=stderr)
        return EX_TEMPFAIL

    log_event(
        logger,
        "received",
        queue_id=stored_id,
        sender=envelope.sender,
        recipients=len(envelope.recipients) - len(rejected),
        rejected=len(rejected),
        size=len(body) + len(trace),
        uid=os.getuid(),
    )
    if rejected:
        _report_rejected(rejected, stored_id, envelope, stderr)
    return EX_OK


def _failure_report(
    body: bytes, config: Config
) -> Callable[[StoredMessage], tuple[Envelope, bytes, tuple[int, ...]] | None]:
    """Return the builder of the DSN for the rejected recipients that owe one, as the scheduler builds it."""
    from relay.delivery.dsn import build_report

    def report(message: StoredMessage) -> tuple[Envelope, bytes, tuple[int, ...]] | None:
        owed = [recipient for recipient in message.recipients if recipient.dsn is DsnState.PENDING]
        if not owed:
            return None
        retry_until = message.arrival + config.delivery.maximal_queue_lifetime
        built = build_report(message, body, owed, config.server.hostname, time.time(), retry_until=retry_until)
        # Its dsn_queued line reaches only the command's standard error, so the
        # scheduler's picked_up line is what links it to the message in the log.
        envelope = dataclasses.replace(built.envelope, local_submission=True)
        return envelope, built.body, built.indexes

    return report


def _report_rejected(rejected: list[RejectedRecipient], queue_id: str, envelope: Envelope, stderr: TextIO) -> None:
    """Print each rejected recipient of a queued message, and whether a DSN will report it to the sender.

    The exit status stays EX_OK, because the message was queued for the
    other recipients, as with Postfix's sendmail.
    """
    for rejection in rejected:
        print(f"sendmail: {rejection.error}", file=stderr)
    notify = envelope.recipients[-1].notify
    count = "the rejected recipient" if len(rejected) == 1 else f"the {len(rejected)} rejected recipients"
    if not envelope.sender:
        outcome = f"no DSN reports {count}, because the sender is null"
    elif notify and "FAILURE" not in notify:
        outcome = f"no DSN reports {count}, because -N does not include failure"
    else:
        # The -f address may contain bidirectional formatting or line separator characters.
        outcome = f"a DSN to {escape_controls(envelope.sender)} reports {count}"
    print(f"sendmail: queued as {queue_id} for the valid recipients; {outcome}", file=stderr)


def flush_queue(options: Options, stderr: TextIO) -> int:
    """Make deferred mail due now for ``-q``, ``-qRDOMAIN`` or ``-qIQUEUEID``, as ``relay queue flush`` does.

    Prints nothing on success, like Postfix's ``sendmail -q``, because cron
    mails any output of a job to its owner.
    """
    config = _load_config(_config_file(options), stderr)
    if config is None:
        return EX_CONFIG
    try:
        if options.recipients or options.extract_recipients:
            raise SendmailError(EX_USAGE, "-q reads no message, so it takes no recipient and no -t")
        try:
            domain = parse_domain(options.flush_domain, "-qR") if options.flush_domain is not None else None
            queue_id = parse_queue_id(options.flush_id) if options.flush_id is not None else None
        except UsageError as exc:
            raise SendmailError(EX_USAGE, str(exc)) from None
        _require_spool(config.spool.path)
        store = SpoolStore(config.spool.path, busy_timeout=config.spool.busy_timeout)
        try:
            with store.transaction():
                store.flush(time.time(), queue_id=queue_id, domain=domain)
        finally:
            store.close()
    except SendmailError as exc:
        print(f"sendmail: {exc}", file=stderr)
        return exc.status
    except MessageNotFound as exc:
        print(f"sendmail: queue ID {exc.queue_id} not found in the spool {config.spool.path};"
              " `relay queue list` shows the queue IDs", file=stderr)
        return EX_NOINPUT
    except SpoolError as exc:
        print(f"sendmail: cannot flush the spool {config.spool.path}: {exc}", file=stderr)
        return EX_TEMPFAIL
    return EX_OK


# The mode that each program name of sendmail(1) selects, as a link to relay.
PROGRAM_MODES = {"sendmail": "m", "mailq": "p", "newaliases": "i"}

# --help of the mailq and newaliases links; sendmail prints USAGE.
PROGRAM_USAGES = {
    "mailq": """usage: mailq [--config FILE]

List the queue, as relay queue list and sendmail -bp do: each message with
its queue ID, size, arrival time, sender, and each recipient with its state
and last reply.  Exit status: 0, or 1 when the spool cannot be read.""",
    "newaliases": """usage: newaliases [--config FILE]

Check the local.aliases file, as sendmail -bi does, and print each error.
relay reads the file itself, so there is no database to build; reload a
running relay (SIGHUP) to use a changed file.  Exit status: 0 when the
file is valid or none is configured, 78 when it has errors.""",
}


def run(argv: Sequence[str], program: str = "sendmail") -> int:
    """Run sendmail with its own argument list, in the mode that ``program`` (a PROGRAM_MODES name) selects.

    Errors of the ``-bp`` and ``-bi`` modes and of the options start with
    ``program``, the name the user typed, so mailq and newaliases name
    themselves.
    """
    try:
        options = parse_options(argv)
    except SendmailError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.status
    if options.show_help:
        print(PROGRAM_USAGES.get(program, USAGE))
        return EX_OK
    if options.mode is None:
        # As with Postfix, a -b option overrides the mode that the program name selects.
        options.mode = PROGRAM_MODES.get(program, "m")
    if options.mode == "s":
        return _smtp_mode(options)
    if options.mode != "m":
        return _other_mode(options, program)
    if options.queue_interval is not None:
        # -qINTERVAL sets a daemon's queue runs, which relay's scheduler makes itself.
        return EX_OK
    if options.flush:
        return flush_queue(options, sys.stderr)
    if sys.stdin is None:
        print("sendmail: standard input is closed; pipe the message into sendmail", file=sys.stderr)
        return EX_NOINPUT
    try:
        return inject(options, sys.stdin.buffer, sys.stderr)
    except KeyboardInterrupt:
        # Ctrl-C while a user types a message.  A commit already under way
        # may still finish, so the message says nothing about the queue.
        print("sendmail: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a sendmail caller needs an exit code, not a traceback
        print(f"sendmail: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_SOFTWARE


def _smtp_mode(options: Options) -> int:
    """Run ``-bs``: an SMTP session on standard input and output (see ``relay.sendmail_smtp``)."""
    from relay.sendmail_smtp import serve_stdio

    if sys.stdin is None or sys.stdout is None:
        print("sendmail: -bs needs standard input and output; connect both to the SMTP client", file=sys.stderr)
        return EX_NOINPUT
    sys.stdout.flush()
    try:
        return serve_stdio(options, sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr)
    except SendmailError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return exc.status
    except Exception as exc:  # noqa: BLE001 - a sendmail caller needs an exit code, not a traceback
        print(f"sendmail: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_SOFTWARE


def _other_mode(options: Options, program: str) -> int:
    """Run ``-bp`` (list the queue, as ``relay queue list``), ``-bi`` (check the aliases file), ``-bh`` or ``-bH``."""
    if options.recipients or options.extract_recipients or options.flush:
        print(f"{program}: -b{options.mode} reads no message, so it takes no recipient, -t or -q", file=sys.stderr)
        return EX_USAGE
    if options.mode in ("h", "H"):
        # -bh and -bH show and clear sendmail's host status.  Postfix's sendmail ignores them and exits 0.
        return EX_OK
    config_file = _config_file(options)
    if options.mode == "p":
        from relay.cli import build_parser

        # Checked here so that each config error starts with the program name,
        # which relay queue list would not print.  The exit status stays 1.
        if _load_config(config_file, sys.stderr, program) is None:
            return 1
        args = build_parser().parse_args(["queue", "list", *(["--config", config_file] if config_file else [])])
        args.error_prefix = program
        try:
            status: int = args.handler(args)
        except KeyboardInterrupt:
            return 130
        return status
    config = _load_config(config_file, sys.stderr, program)
    if config is None:
        return EX_CONFIG
    return check_aliases(config.local.aliases, sys.stderr, program, config.local.alias_expansion_limit)


def check_aliases(
    path: str, stderr: TextIO, program: str = "sendmail", expansion_limit: int = DEFAULT_EXPANSION_LIMIT
) -> int:
    """Check the aliases file for ``newaliases``; return EX_OK, or EX_CONFIG after printing each error.

    relay reads the file itself and has no alias database to build, so this
    only reports what ``relay serve`` would reject.  A running relay uses
    the changed file after a reload (SIGHUP), which the success line says.
    """
    if not path:
        print(f"{program}: no aliases file is configured (local.aliases is not set); there is nothing to check",
              file=stderr)
        return EX_OK
    try:
        with open(path, encoding="utf-8") as handle:
            parse_aliases(handle.read(), expansion_limit)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{program}: cannot read local.aliases {path}: {getattr(exc, 'strerror', None) or exc}", file=stderr)
        return EX_CONFIG
    except AliasError as exc:
        for error in exc.errors:
            print(f"{program}: local.aliases: {path}: {error}", file=stderr)
        return EX_CONFIG
    print(f"{program}: {path} is valid; reload relay serve (SIGHUP) to use it", file=stderr)
    return EX_OK


def _handle(args: argparse.Namespace) -> int:
    argv = list(args.sendmail_args)
    if args.config:
        argv = ["--config", args.config, *argv]
    return run(argv)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``relay sendmail``."""
    parser = subparsers.add_parser(
        "sendmail",
        help="sendmail-compatible injection for local programs",
        description="Read a message from standard input and queue it, like sendmail(1). "
        "Options: -t, -i/-oi, -f SENDER, -F NAME, -N DSN, -R RET, -V ENVID, -B TYPE, -bm, -bs, -bp, -bi/-I, -q,"
        " -h N, recipients;"
        " `relay sendmail --help` describes them.",
        prefix_chars="+",
        add_help=False,
    )
    parser.add_argument("sendmail_args", nargs=argparse.REMAINDER, help="sendmail options and recipients")
    parser.set_defaults(handler=_handle, config=None)


def _from_field(name: str | None, address: str) -> str:
    """Return a From field body for ``address`` with the display name given by -F.

    The name is a quoted string (RFC 5322 section 3.2.4), or an RFC 2047
    encoded word when it is not ASCII.  Line ends in it become spaces, so it
    cannot start another header field.
    """
    if not name:
        return address
    name = " ".join(name.splitlines())
    if name.isascii():
        display = '"' + email.utils.quote(name) + '"'
    else:
        # A long name is folded, and the message is stored with CRLF line ends.
        display = email.header.Header(name, "utf-8").encode(linesep="\r\n")
    return f"{display} <{address}>"
