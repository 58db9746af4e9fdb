"""The sans-IO SMTP server session: bytes in, reply bytes and events out.

Theory of operation.  The owner (``relay.smtp.protocol`` over a socket, or a
test) calls ``receive_data`` with whatever arrived, then collects
``data_to_send()`` and ``events()``.  Bytes go into the compiled
``SMTPBuffer``, which yields command lines, DATA end-of-data and BDAT chunks;
each command line goes through the compiled parser and then to the handler
its verb's row in ``VERBS`` names.  Three events make the session wait for
its owner before it reads further input: ``MessageReady`` (store, then
``message_stored``), ``CheckCredentials`` (verify, then
``credentials_checked``) and ``StartTLS`` (handshake, then ``tls_started``).
Input that arrives meanwhile stays buffered, so replies always go out in
command order (RFC 2920 section 3.2).

Policy decisions, with their sources:

- Command lines: at most ``policy.max_line_length`` octets with CRLF (512,
  RFC 5321 section 4.5.3.1.4), ``500 5.5.2`` beyond, the session continues.
  AUTH lines may reach ``policy.max_auth_line_length`` (12288, RFC 4954
  section 4).  A bare LF ends a command line, as in Postfix, so each
  LF-ended command gets its own reply.  Smuggling (CVE-2023-51764) needs a
  message's end to be read differently; that is ruled out by the strict
  end of DATA below, and by a refused DATA never running the message text
  behind it as commands (``554 5.5.0``, and the connection closes).
- DATA: only CRLF ``.`` CRLF ends it.  A bare LF or CR in the data gets
  ``521 5.5.2`` and the connection closes at once.  A message sent with BDAT
  is checked when its LAST chunk has arrived and gets the same reply.  With
  ``policy.bare_lf`` set to ``normalize``, a trusted or authenticated
  client's message is stored with CRLF line ends instead, and a DATA line
  after a bare line end that starts with ``..`` loses one dot.  The size
  limit is checked at MAIL (SIZE, RFC 1870) and at end of data, where a
  bare line end that normalization turns into CRLF counts as two octets;
  nothing is answered before the final dot.
- BDAT: a chunk is read to its declared end even when it is rejected, as
  RFC 3030 section 2 requires, and the buffer drops a rejected chunk as it
  arrives.  A chunk that takes the message past the size limit gets
  ``552 5.3.4`` and ends the transaction, so later chunks get ``503``
  until a new MAIL.  A declared size above 1 TiB gets ``552 5.3.4`` and
  the connection closes.  The data timeout runs while a chunk is read.
  A BDAT line without a valid chunk size gets ``501 5.5.4`` and the
  connection closes, because the end of its chunk is unknown (Postfix 3.7
  also closes, with ``521 5.5.4``).
- Pipelining: DATA must end a pipelined group (RFC 2920 section 3.1).  An
  untrusted, unauthenticated client that sends bytes after DATA without
  waiting for ``354`` gets ``554 5.5.0`` and is disconnected; trusted or
  authenticated clients are served in order.  In a transaction, a line
  that arrives in the same read as the end of a dropped overlong line gets
  ``554 5.5.0`` from any client, because the dropped line may have been a
  DATA padded past the limit.
- STARTTLS: bytes pipelined after the command are dropped unread, and EHLO,
  AUTH and the transaction are forgotten after the handshake (RFC 3207
  section 4.2).
- Replies: once more than ``server.max_unsent_replies`` octets of replies
  are unsent, the session runs no further buffered command until its owner
  has sent some and calls ``resume_input`` (see ``output_full``).  Unsent
  are the replies queued here plus those the owner took but has not sent,
  which it reports through ``count_unsent``.  So one read of short commands
  with long replies cannot queue many times its size, and the replies held
  end at most one reply past the limit.
- A new EHLO/HELO or RSET clears the transaction only; TLS and AUTH stay.
- A HELO reply offers no extensions, and a client may use only offered ones
  (RFC 5321 sections 2.2.1 and 4.1.1.3).  So after HELO, MAIL and RCPT
  parameters get ``555 5.5.4`` and BDAT gets ``503 5.5.1`` after its chunk
  is read, as AUTH gets ``503``.  Postfix 3.7 accepts both after HELO, but
  clients such as Python's smtplib send parameters only after EHLO.
- After ``server.max_errors`` 4xx/5xx replies the session ends with
  ``421 4.7.0`` (Postfix's ``smtpd_hard_error_limit`` is 20).  Past
  ``server.max_junk_commands`` HELO, EHLO, NOOP, RSET and VRFY commands
  and ``BDAT 0`` chunks without LAST, each one counts as an error too
  (Postfix's ``smtpd_junk_command_limit`` is 100).
  A message accepted with ``250`` clears both counts, as in Postfix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from relay._buffer import BareLineEnd, BdatChunk, DataEnd, Line, LineTooLong, SMTPBuffer
from relay._errors import SMTPError
from relay._parser import Command, parse_command
from relay.config import MAX_MESSAGE_SIZE_CEILING, Config, ListenerConfig
from relay.log import log_event
from relay.smtp import replies
from relay.smtp.auth import Challenge, Credentials, Failure, SaslExchange
from relay.smtp.policy import RelayPolicy, dot_string_form
from relay.smtp.received import (
    count_received,
    header_block,
    normalize_data_line_ends,
    normalize_line_ends,
    submission_headers,
)
from relay.smtp.replies import Reply
from relay.smtp.transaction import (
    CheckCredentials,
    Close,
    Event,
    MessageReady,
    RecipientInfo,
    Rejected,
    SessionState,
    StartTLS,
    Transaction,
)

logger = logging.getLogger("relay.smtp")


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What one listener's sessions need from the config, flattened for speed."""

    hostname: str
    role: str
    # STARTTLS can be offered: the listener is "starttls" and a TLS context exists.
    starttls: bool
    # The connection starts in TLS (listener "implicit").
    implicit_tls: bool
    # A credentials file is configured and the role is not "sink".
    auth_available: bool
    auth_plaintext: bool
    max_message_size: int
    max_recipients: int
    max_line_length: int
    max_auth_line_length: int
    max_received_headers: int
    max_errors: int
    max_junk_commands: int
    max_unsent_replies: int
    bare_lf: str

    @classmethod
    def from_config(
        cls, config: Config, listener: ListenerConfig, *, tls_ready: bool, auth_ready: bool
    ) -> SessionSettings:
        policy = config.policy
        return cls(
            hostname=config.server.hostname,
            role=listener.role,
            starttls=listener.tls == "starttls" and tls_ready,
            implicit_tls=listener.tls == "implicit",
            auth_available=auth_ready and listener.role != "sink",
            auth_plaintext=listener.auth_plaintext,
            max_message_size=policy.max_message_size,
            max_recipients=policy.max_recipients,
            max_line_length=policy.max_line_length,
            max_auth_line_length=policy.max_auth_line_length,
            max_received_headers=policy.max_received_headers,
            max_errors=config.server.max_errors,
            max_junk_commands=config.server.max_junk_commands,
            max_unsent_replies=config.server.max_unsent_replies,
            bare_lf=policy.bare_lf,
        )


@dataclass(frozen=True, slots=True)
class VerbRule:
    """One row of the command table."""

    handler: Callable[[Session, Command], None]
    # Refused with 503 before EHLO or HELO (RFC 5321 section 4.1.4).
    needs_greeting: bool


class Session:
    """One SMTP server session, fed bytes by its owner; no I/O of its own."""

    def __init__(
        self,
        settings: SessionSettings,
        policy: RelayPolicy,
        client_address: str,
        *,
        session_id: str = "-",
        trusted: bool | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.client_address = client_address
        self.session_id = session_id
        self.trusted = policy.is_trusted(client_address) if trusted is None else trusted
        self.state = SessionState(tls_active=settings.implicit_tls)
        self.transaction: Transaction | None = None
        self.buffer = SMTPBuffer(settings.max_line_length)
        self.counters: dict[str, int] = {}
        self.errors = 0
        self.messages = 0
        self.closed = False
        self._out: list[bytes] = []
        # Octets in _out, plus those the owner reported unsent through count_unsent.
        self._out_octets = 0
        # _process stopped because _out_octets passed max_unsent_replies (see resume_input).
        self._output_full = False
        self._events: list[Event] = []
        self._waiting: type[Event] | None = None
        self._sasl: SaslExchange | None = None
        self._greeting_held = False
        self._shutting_down = False
        # An overlong line was dropped in a transaction, and the read holding
        # its end is not yet processed (see _line_too_long).
        self._after_long_line = False
        self._hidden_lines = 0  # lines after a refused AUTH whose text is not logged
        self._junk_commands = 0  # commands counted by _count_junk since the start or the last message
        # The reply owed for the BDAT chunk being read (None: accept it), and
        # whether that chunk carried LAST.
        self._bdat_refusal: Reply | None = None
        self._bdat_last = False
        self._sync_line_limit()

    # -- interface for the owner ------------------------------------------

    def start(self, delay_greeting: bool = False) -> None:
        """Queue the 220 greeting (RFC 5321 section 4.3.1), or hold it until ``greet``.

        While the greeting is held, any input from an untrusted client gets
        ``554 5.5.0`` and closes the session: a client must wait for the 220
        (RFC 5321 section 4.3.1), and spam engines that talk first give
        themselves away (Postfix postscreen's pregreet test).
        """
        if delay_greeting and not self.privileged:
            self._greeting_held = True
            return
        self._send(replies.greeting(self.settings.hostname))

    def greet(self) -> None:
        """Send the greeting held by ``start(delay_greeting=True)``."""
        if self._greeting_held and not self.closed:
            self._greeting_held = False
            self._send(replies.greeting(self.settings.hostname))

    def refuse(self, reply: Reply) -> None:
        """Queue a greeting-time refusal (a 421 for a connection limit) and close."""
        self._send(reply)
        # Logged and counted like every other 4xx or 5xx reply.
        self._events.append(Rejected("CONNECT", reply))
        self._close("refused")

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the client and run every command they complete."""
        if self.closed:
            return
        if self._greeting_held:
            self._greeting_held = False
            self._reject("-", replies.PIPELINING_VIOLATION)
            return
        self.buffer.feed(data)
        self._process()

    def data_to_send(self) -> bytes:
        """Return and clear the reply bytes queued since the last call."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._out_octets = 0
        return data

    def count_unsent(self, octets: int) -> None:
        """Count ``octets`` of replies taken by ``data_to_send`` but not yet sent toward ``max_unsent_replies``.

        The owner reports this after each write, so the octets held by its
        transport and the ones queued here share one limit.
        """
        self._out_octets = octets + sum(len(data) for data in self._out)

    def events(self) -> list[Event]:
        """Return and clear the events queued since the last call."""
        events = self._events
        self._events = []
        return events

    @property
    def output_full(self) -> bool:
        """Whether buffered commands wait because the queued replies reached ``max_unsent_replies``."""
        return self._output_full and not self.closed

    def resume_input(self) -> None:
        """Run the buffered commands held back by ``output_full``, once the owner took the replies."""
        if self.output_full:
            self._process()

    @property
    def waiting(self) -> bool:
        """Whether the session waits for its owner to finish handling an event."""
        return self._waiting is not None

    @property
    def in_data(self) -> bool:
        """Whether message data is being received, for the data timeout."""
        return self.buffer.mode != "command"

    @property
    def privileged(self) -> bool:
        """Trusted network or authenticated: may relay and pipeline past DATA."""
        return self.trusted or self.state.auth_user is not None

    def message_stored(self, reply: Reply) -> None:
        """Finish end of data with the spool's verdict: a 250 with the queue ID or a 4xx."""
        self._resume(MessageReady)
        if reply.code == 250:
            self.messages += 1
            # An accepted message clears the error counts, as in Postfix, so a long
            # session of good mail with a few rejected recipients is not cut off.
            self.errors = 0
            self._junk_commands = 0
        self.transaction = None
        self._send(reply)
        self._after_transaction()

    def credentials_checked(self, user: str | None, reply: Reply | None = None) -> None:
        """Finish AUTH: ``user`` on success, None with an optional reply on failure."""
        self._resume(CheckCredentials)
        if user is not None:
            self.state.auth_user = user
            self._send(replies.AUTH_OK)
        else:
            self._reject("AUTH", reply or replies.AUTH_FAILED)
        self._process()

    def tls_started(self) -> None:
        """Forget everything learned in plaintext, after the TLS handshake completed."""
        self._resume(StartTLS)
        self.state = SessionState(tls_active=True)
        self.transaction = None
        self._sasl = None
        self._sync_line_limit()
        self._process()

    def timeout(self) -> None:
        """Send ``421 4.4.2`` and close, after the command or data timeout passed."""
        if not self.closed:
            self._send(replies.TIMEOUT)
            self._close("timeout")

    def shutdown(self) -> None:
        """End the session because the server is stopping, unless a message is in flight.

        A session in DATA, BDAT or waiting for the spool finishes that message
        and gets ``421 4.3.2`` afterwards.  Any other session gets it now.
        """
        self._shutting_down = True
        if self.closed:
            return
        if self.waiting or self.in_data or (self.transaction is not None and self.transaction.bdat_started):
            return
        self._send(replies.SERVICE_UNAVAILABLE)
        self._close("shutdown")

    def abort(self) -> None:
        """Send ``421 4.3.2`` and close, dropping any transaction, after the grace period ran out."""
        if not self.closed:
            self.transaction = None
            self._waiting = None
            self._send(replies.SERVICE_UNAVAILABLE)
            self._close("shutdown")

    # -- input loop ----------------------------------------------------------

    def _process(self) -> None:
        self._output_full = False
        buffer = self.buffer
        while not self.closed and self._waiting is None:
            if self._out_octets > self.settings.max_unsent_replies:
                # One read of short commands with long replies (HELP) could
                # otherwise queue twenty times its size in replies.  The test
                # is ">" as in the transports' high-water mark, so output_full
                # after a write means the transport paused writing, or it
                # sent some and the owner's resume_input runs a command.
                self._output_full = True
                return
            event = buffer.next_event()
            if event is None:
                # Lines that arrive in the same read as the end of a dropped
                # line were sent with it too, wherever the limit was passed.
                if not buffer.discarding:
                    self._after_long_line = False
                return
            if isinstance(event, Line):
                if self._after_long_line:
                    # Sent with a dropped overlong line, without waiting for its reply.
                    self._after_long_line = False
                    self._send(replies.PIPELINING_VIOLATION)
                    self._events.append(Rejected("-", replies.PIPELINING_VIOLATION))
                    self.transaction = None
                    self.buffer.discard()
                    self._close("text_after_refused_data")
                    return
                self._line(event.line)
            elif isinstance(event, DataEnd):
                self._data_end(event)
            elif isinstance(event, BdatChunk):
                self._bdat_chunk(event)
            elif isinstance(event, BareLineEnd):
                self._bare_line_end()
            elif isinstance(event, LineTooLong):
                self._line_too_long()

    def _line(self, line: bytes) -> None:
        # A line sent right after a refused AUTH may be a credential (see _reject).
        hidden = self._hidden_lines > 0
        if hidden:
            self._hidden_lines -= 1
        if self._sasl is not None:
            self._sasl_response(line)
            return
        if self._shutting_down:
            self._send(replies.SERVICE_UNAVAILABLE)
            self._close("shutdown")
            return
        try:
            command = parse_command(line)
        except SMTPError as error:
            self._count("unknown" if error.code == 500 else "invalid")
            verb = _verb_of(line)
            if verb.upper() == "BDAT":
                # Without a valid chunk size the session cannot tell where the
                # chunk behind this line ends, so nothing after it can be trusted.
                self.transaction = None
                self._reject("BDAT", replies.BAD_BDAT_SYNTAX)
                return
            logged = "(hidden: sent after a refused AUTH)" if hidden else verb
            # RFC 5321 section 4.5.3.1.10: a line over the limit gets "500 Line
            # too long", whatever else is wrong with it.
            if self._over_line_limit(line, verb.upper()):
                self._reject(logged, replies.LINE_TOO_LONG)
            else:
                self._reject(logged, Reply(error.code, error.enhanced, (error.text,)))
            if verb.upper() == "DATA":
                self._drop_text_after_refused_data()
            return
        verb = command.verb
        self._count(verb.lower())
        if self._over_line_limit(line, verb):
            if verb == "BDAT":
                # The chunk size is known, so the chunk is still read and dropped.
                self._bdat(command, replies.LINE_TOO_LONG)
                return
            self._reject(verb, replies.LINE_TOO_LONG)
            if verb == "DATA":
                self._drop_text_after_refused_data()
            return
        rule = VERBS[verb]
        if rule.needs_greeting and self.state.helo_name is None:
            self._reject(verb, replies.GREET_FIRST)
            if verb == "DATA":
                self._drop_text_after_refused_data()
            return
        rule.handler(self, command)

    def _over_line_limit(self, line: bytes, verb: str) -> bool:
        """Return whether ``line`` with its CRLF is longer than the limit for ``verb`` (upper case)."""
        # The buffer admits AUTH-length lines once AUTH is offered, and MAIL and RCPT
        # get room for their parameters; other commands keep the RFC 5321 limit.
        if verb == "AUTH":
            return False
        limit = self.settings.max_line_length
        if verb in ("MAIL", "RCPT"):
            limit += PARAMETER_ALLOWANCE
        return len(line) + 2 > limit

    def _line_too_long(self) -> None:
        if self._sasl is not None:
            self._sasl = None
            self._sync_line_limit()
            self._reject("AUTH", replies.AUTH_LINE_TOO_LONG)
            return
        self._count("too_long")
        self._reject("-", replies.LINE_TOO_LONG)
        # The dropped line may have been a DATA padded past the limit, so a line
        # that arrived with it, in a transaction, may be message text (see _process).
        self._after_long_line = self.transaction is not None

    # -- output helpers ------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        encoded = reply.encode()
        self._out.append(encoded)
        self._out_octets += len(encoded)

    def _reject(self, command: str, reply: Reply) -> None:
        """Send an error reply, log it, and end the session after too many."""
        # Verbs are case-insensitive (RFC 5321 section 2.4), and a line the
        # parser rejected is logged with the verb as the client wrote it.
        if command[:4].upper() == "AUTH":
            # A client that does not wait for the 334 prompt has sent its
            # credentials (AUTH LOGIN: user name, then password) behind the
            # refused AUTH.  Those lines fail as unknown commands, and their
            # text must not reach the log.
            self._hidden_lines = 2
        self._send(reply)
        self._events.append(Rejected(command, reply))
        self.errors += 1
        if reply.closes:
            self._close(reply.text)
            return
        self._check_error_limit(command)

    def _check_error_limit(self, command: str) -> None:
        """Send ``421 4.7.0`` and close once ``max_errors`` is reached; ``command`` is the one that reached it."""
        if self.errors >= self.settings.max_errors:
            self._send(replies.TOO_MANY_ERRORS)
            # Logged like every other 4xx reply, so the log shows why the session ended.
            self._events.append(Rejected(command, replies.TOO_MANY_ERRORS))
            self._close("too many errors")

    def _count_junk(self, verb: str) -> None:
        """Count a command that sends no mail; past ``max_junk_commands`` each one counts as an error too.

        These are HELO, EHLO, NOOP, RSET and VRFY, which Postfix's smtpd also
        counts against smtpd_junk_command_limit, and an empty BDAT chunk
        without LAST.  A client that loops on them without sending mail then
        reaches the error limit.
        """
        self._junk_commands += 1
        if self._junk_commands > self.settings.max_junk_commands:
            self.errors += 1
            self._check_error_limit(verb)

    def _close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._events.append(Close(reason))

    def _wait_for(self, event: MessageReady | CheckCredentials | StartTLS) -> None:
        self._waiting = type(event)
        self._events.append(event)

    def _resume(self, kind: type[Event]) -> None:
        if self._waiting is not kind:
            raise RuntimeError(f"session is not waiting for {kind.__name__}")
        self._waiting = None

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _after_transaction(self) -> None:
        if self._shutting_down:
            self._send(replies.SERVICE_UNAVAILABLE)
            self._close("shutdown")
            return
        self._process()

    def _auth_offered(self) -> bool:
        settings = self.settings
        return settings.auth_available and (self.state.tls_active or settings.auth_plaintext)

    def _sync_line_limit(self) -> None:
        offered = self._auth_offered()
        limit = self.settings.max_auth_line_length if offered else self.settings.max_line_length
        self.buffer.line_limit = max(limit, self.settings.max_line_length + PARAMETER_ALLOWANCE)

    # -- greeting and session commands ---------------------------------------

    def _ehlo(self, command: Command) -> None:
        self._greet(command, esmtp=True)

    def _helo(self, command: Command) -> None:
        self._greet(command, esmtp=False)

    def _greet(self, command: Command, *, esmtp: bool) -> None:
        name = command.argument
        verb = "EHLO" if esmtp else "HELO"
        if not name:
            self._reject(verb, replies.HELO_REQUIRES_DOMAIN)
            return
        if " " in name or "\t" in name:
            self._reject(verb, replies.INVALID_HELO)
            return
        # RFC 5321 section 4.1.4: a new greeting resets the transaction like RSET.
        self.transaction = None
        self.state.helo_name = _printable_helo(name)
        self.state.esmtp = esmtp
        if esmtp:
            self._send(replies.ehlo(self.settings.hostname, self.state.helo_name, self._extensions()))
        else:
            self._send(replies.helo(self.settings.hostname, self.state.helo_name))
        self._count_junk(verb)

    def _extensions(self) -> list[str]:
        settings = self.settings
        keywords = [
            "PIPELINING",
            f"SIZE {settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ]
        if settings.starttls and not self.state.tls_active:
            keywords.append("STARTTLS")
        if self._auth_offered() and self.state.auth_user is None:
            keywords.append("AUTH PLAIN LOGIN")
        return keywords

    def _rset(self, command: Command) -> None:
        if command.argument:
            self._reject("RSET", replies.NO_ARGUMENTS_ALLOWED)
            return
        self.transaction = None
        self._send(replies.RESET_OK)
        self._count_junk("RSET")

    def _noop(self, command: Command) -> None:
        # RFC 5321 section 4.1.1.9: an argument is allowed and ignored.
        self._send(replies.OK)
        self._count_junk("NOOP")

    def _quit(self, command: Command) -> None:
        if command.argument:
            self._reject("QUIT", replies.NO_ARGUMENTS_ALLOWED)
            return
        self._send(replies.BYE)
        self._close("quit")

    def _vrfy(self, command: Command) -> None:
        if not command.argument:
            self._reject("VRFY", replies.SYNTAX_ERROR)
            return
        self._send(replies.CANNOT_VERIFY)
        self._count_junk("VRFY")

    def _expn(self, command: Command) -> None:
        self._reject("EXPN", replies.NOT_IMPLEMENTED)

    def _help(self, command: Command) -> None:
        # The same offers as the EHLO reply makes, so HELP lists nothing EHLO would not.
        extra: tuple[str, ...] = ()
        if self.settings.starttls and not self.state.tls_active:
            extra += ("STARTTLS",)
        if self._auth_offered() and self.state.auth_user is None:
            extra += ("AUTH",)
        self._send(replies.help_reply(extra))

    def _starttls(self, command: Command) -> None:
        if self.state.tls_active:
            self._reject("STARTTLS", replies.TLS_ALREADY_ACTIVE)
            return
        if not self.settings.starttls:
            self._reject("STARTTLS", replies.NOT_IMPLEMENTED)
            return
        if command.argument:
            self._reject("STARTTLS", replies.NO_ARGUMENTS_ALLOWED)
            return
        self._send(replies.READY_TLS)
        dropped = self.buffer.discard()
        if dropped:
            log_event(logger, "starttls_discard", session=self.session_id, client=self.client_address, octets=dropped)
        self._wait_for(StartTLS())

    # -- AUTH ----------------------------------------------------------------

    def _auth(self, command: Command) -> None:
        if not self.settings.auth_available:
            self._reject("AUTH", replies.AUTH_NOT_AVAILABLE)
            return
        if not self.state.esmtp:
            # AUTH is an ESMTP extension: HELO clients never saw it offered.
            self._reject("AUTH", replies.BAD_SEQUENCE)
            return
        if not self._auth_offered():
            # RFC 4954 section 4: credentials are never read before TLS here.  A
            # listener that cannot start TLS never offers AUTH at all.
            can_start_tls = self.settings.starttls and not self.state.tls_active
            self._reject("AUTH", replies.TLS_REQUIRED if can_start_tls else replies.AUTH_NOT_AVAILABLE)
            return
        if self.state.auth_user is not None:
            self._reject("AUTH", replies.ALREADY_AUTHENTICATED)
            return
        if self.transaction is not None:
            self._reject("AUTH", replies.AUTH_IN_TRANSACTION)
            return
        mechanism = command.mechanism or ""
        try:
            exchange = SaslExchange(mechanism)
        except ValueError:
            self._reject("AUTH", replies.AUTH_UNKNOWN_MECHANISM)
            return
        self._sasl_step(exchange, exchange.start(command.initial_response))

    def _sasl_response(self, line: bytes) -> None:
        exchange = self._sasl
        assert exchange is not None
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            self._sasl = None
            self._reject("AUTH", replies.AUTH_BAD_BASE64)
            return
        self._sasl_step(exchange, exchange.respond(text))

    def _sasl_step(self, exchange: SaslExchange, step: Challenge | Credentials | Failure) -> None:
        if isinstance(step, Challenge):
            self._sasl = exchange
            self._send(replies.challenge(step.text))
            return
        self._sasl = None
        if isinstance(step, Failure):
            self._reject("AUTH " + exchange.mechanism, step.reply)
            return
        self._wait_for(CheckCredentials(exchange.mechanism, step.user, step.password))

    # -- mail transaction ----------------------------------------------------

    def _mail(self, command: Command) -> None:
        if self.transaction is not None:
            self._reject("MAIL", replies.NESTED_MAIL)
            return
        if command.params and not self.state.esmtp:
            self._reject("MAIL", replies.PARAMETERS_NEED_EHLO)
            return
        if self.settings.role == "submission" and self.state.auth_user is None:
            self._reject("MAIL", replies.AUTH_REQUIRED)
            return
        if command.size is not None and command.size > self.settings.max_message_size:
            self._reject("MAIL", replies.MESSAGE_TOO_BIG)
            return
        if command.body == "BINARYMIME":
            # BINARYMIME is not advertised (RFC 3030 section 3).
            self._reject("MAIL", replies.BODY_NOT_SUPPORTED)
            return
        sender = command.path or ""
        auth = command.auth if self.state.auth_user is not None else None
        self.transaction = Transaction(
            sender=sender,
            size=command.size,
            body_type=command.body,
            smtputf8=command.smtputf8,
            ret=command.ret,
            envid=command.envid,
            auth=auth,
        )
        self._send(replies.SENDER_OK)

    def _rcpt(self, command: Command) -> None:
        transaction = self.transaction
        if transaction is None:
            self._reject("RCPT", replies.NEED_MAIL)
            return
        if command.params and not self.state.esmtp:
            self._reject("RCPT", replies.PARAMETERS_NEED_EHLO)
            return
        if transaction.bdat_started:
            # The envelope is fixed once part of the message has arrived.
            self._reject("RCPT", replies.RCPT_AFTER_BDAT)
            return
        sent_path = command.path or ""
        if not transaction.smtputf8 and not sent_path.isascii():
            self._reject("RCPT", replies.NON_ASCII_ADDRESS)
            return
        domain = command.domain or ""
        # "rcpt"@example.net is the mailbox rcpt@example.net (RFC 5321 section
        # 4.1.2), so checks, the spool and delivery all see the unquoted form.
        local_part = dot_string_form(command.local_part or "")
        path = sent_path
        if local_part != command.local_part:
            path = f"{local_part}@{domain}" if domain else local_part
        if domain == "" and local_part.lower() != "postmaster":
            self._reject("RCPT", replies.BAD_RECIPIENT_SYNTAX)
            return
        if self.settings.role != "sink":
            refusal = self.policy.check_recipient(local_part, domain, self.privileged)
            if refusal is not None:
                self._reject(f"RCPT TO:<{sent_path}>", refusal)
                return
        # A repeated forward-path (also in another letter case) gets 250 but is
        # stored once, so the recipient gets one copy, as with Postfix.
        key = path.lower()
        if key not in transaction.recipient_keys:
            # Only a new recipient counts against the limit, so a repeat gets 250 at the limit too.
            if len(transaction.recipients) >= self.settings.max_recipients:
                self._reject("RCPT", replies.TOO_MANY_RECIPIENTS)
                return
            transaction.recipient_keys.add(key)
            transaction.recipients.append(RecipientInfo(path, command.notify or (), command.orcpt))
        self._send(replies.RECIPIENT_OK)

    def _data(self, command: Command) -> None:
        transaction = self.transaction
        refusal: Reply | None = None
        if command.argument:
            refusal = replies.NO_ARGUMENTS_ALLOWED
        elif transaction is None:
            refusal = replies.NEED_MAIL
        elif transaction.bdat_started:
            refusal = replies.BDAT_AFTER_DATA_MIXED
        elif not transaction.recipients:
            refusal = replies.NEED_RCPT
        if refusal is not None:
            self._reject("DATA", refusal)
            self._drop_text_after_refused_data()
            return
        assert transaction is not None
        if self.buffer.buffered and not self.privileged:
            # Message text before the 354: the shape of the published smuggling attacks.
            self.transaction = None
            self._reject("DATA", replies.PIPELINING_VIOLATION)
            return
        self._send(replies.START_DATA)
        self.buffer.start_data(self.settings.max_message_size)

    def _drop_text_after_refused_data(self) -> None:
        """Close the session when input follows a refused DATA, without running it.

        DATA ends a pipelined group (RFC 2920 section 3.1), so what follows
        a refused DATA is message text.  Run as commands, it could queue a
        message whose envelope comes from the text.
        """
        if self.closed or not self.buffer.buffered:
            return
        self.transaction = None
        self.buffer.discard()
        self._send(replies.PIPELINING_VIOLATION)
        self._events.append(Rejected("DATA", replies.PIPELINING_VIOLATION))
        self._close("text_after_refused_data")

    def _bare_line_end(self, verb: str = "DATA") -> None:
        if self.settings.bare_lf == "normalize" and self.privileged:
            return
        self.transaction = None
        self._reject(verb, replies.BARE_LINE_END)

    def _data_end(self, event: DataEnd) -> None:
        transaction = self.transaction
        assert transaction is not None
        if event.oversized:
            self.transaction = None
            self._reject("DATA", replies.MESSAGE_TOO_BIG)
            self._after_transaction()
            return
        body = event.body
        if event.bare_lf >= 0 or event.bare_cr >= 0:
            body = normalize_data_line_ends(body)
            if self._oversized_after_normalizing(body, "DATA"):
                return
        self._finish_message(transaction, body, "DATA")

    def _bdat(self, command: Command, refusal: Reply | None = None) -> None:
        """Start reading a BDAT chunk, to store it or, with a ``refusal``, to drop it."""
        size = command.chunk_size
        assert size is not None
        # A rejected chunk must still be read to keep the framing (RFC 3030
        # section 2), however far it passes the size limit.  A size that no
        # configuration could accept ends the session instead.
        if size > MAX_DISCARDED_CHUNK:
            self.transaction = None
            self._reject("BDAT", replies.BDAT_TOO_BIG)
            return
        if refusal is not None:
            # The chunks pipelined after a failed one must not complete the
            # message, so the transaction ends here (RFC 3030 section 2).
            self.transaction = None
        transaction = self.transaction
        if refusal is None:
            if transaction is None:
                refusal = replies.NEED_MAIL
            elif not self.state.esmtp:
                refusal = replies.BDAT_NEEDS_EHLO
            elif not transaction.recipients:
                refusal = replies.NEED_RCPT
        if refusal is not None:
            # RFC 3030 section 2: the chunk is read and dropped even when BDAT fails,
            # because its length is the only framing.
            self.buffer.start_bdat(size, store=False)
            self._bdat_refusal = refusal
            return
        assert transaction is not None
        transaction.bdat_started = True
        # A chunk that takes the message past the limit is read and dropped
        # without storing it, and its 552 ends the transaction (_bdat_chunk).
        oversized = transaction.chunk_octets + size > self.settings.max_message_size
        self._bdat_last = command.last
        self._bdat_refusal = replies.MESSAGE_TOO_BIG if oversized else None
        self.buffer.start_bdat(size, store=not oversized)

    def _bdat_chunk(self, event: BdatChunk) -> None:
        refusal = self._bdat_refusal
        self._bdat_refusal = None
        if refusal is not None:
            if refusal is replies.MESSAGE_TOO_BIG:
                self.transaction = None
            self._reject("BDAT", refusal)
            if refusal is replies.MESSAGE_TOO_BIG:
                self._after_transaction()
            elif self._shutting_down and not self.closed:
                # No message is in flight after a rejected chunk, so a shutdown
                # that waited for the end of the chunk ends the session now.
                self._send(replies.SERVICE_UNAVAILABLE)
                self._close("shutdown")
            return
        transaction = self.transaction
        assert transaction is not None
        transaction.chunk_octets += event.octets
        if not self._bdat_last:
            transaction.bdat_body += event.data
            self._send(replies.Reply(250, "2.0.0", (f"{event.octets} octets received",)))
            if event.octets == 0:
                # An empty chunk moves the message no further, like NOOP.
                self._count_junk("BDAT")
            return
        if transaction.bdat_body:
            transaction.bdat_body += event.data
            body = bytes(transaction.bdat_body)
            transaction.bdat_body.clear()
        else:
            # A message sent as one LAST chunk is used as it is, without a copy.
            body = event.data
        if _BARE_LINE_END.search(body) is not None:
            # BDAT's length framing rules out smuggling, but the policy on bare
            # line ends is the same as for DATA, which lone CR or LF never passes.
            self._bare_line_end("BDAT")
            if self.transaction is None:
                return
            body = normalize_line_ends(body)
            if self._oversized_after_normalizing(body, "BDAT"):
                return
        self._finish_message(transaction, body, "BDAT")

    def _oversized_after_normalizing(self, body: bytes, verb: str) -> bool:
        """Reject a message that bare_lf = "normalize" took past the size limit; return whether it did.

        Each bare LF or CR becomes two octets, so the stored message can be up
        to twice the size the buffer counted.
        """
        if len(body) <= self.settings.max_message_size:
            return False
        self.transaction = None
        self._reject(verb, replies.MESSAGE_TOO_BIG)
        self._after_transaction()
        return True

    def _finish_message(self, transaction: Transaction, body: bytes, verb: str) -> None:
        headers = header_block(body)
        if count_received(headers) > self.settings.max_received_headers:
            self.transaction = None
            self._reject(verb, replies.MAIL_LOOP)
            self._after_transaction()
            return
        if self.settings.role == "submission":
            body = submission_headers(headers, self.settings.hostname) + body
        self._wait_for(
            MessageReady(
                transaction=transaction,
                body=body,
                helo_name=self.state.helo_name or "unknown",
                protocol=self._protocol(transaction),
                auth_user=self.state.auth_user,
            )
        )

    def _protocol(self, transaction: Transaction) -> str:
        protocol = self.state.protocol
        if transaction.smtputf8:
            # RFC 6531 section 3.7.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA.
            return "UTF8" + protocol.removeprefix("E")
        return protocol


# A CR not followed by LF, or an LF not preceded by CR.
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


# Largest BDAT chunk, in octets, that relay reads and drops after rejecting
# it.  It equals the ceiling on policy.max_message_size, so no configuration
# could accept a larger chunk.  A larger size, or one of more than 20 digits,
# gets BDAT_TOO_BIG and the connection closes, because dropping 1 TiB
# already takes over two hours at 1 Gbit/s.
MAX_DISCARDED_CHUNK = MAX_MESSAGE_SIZE_CEILING

# Octets MAIL and RCPT lines may have beyond policy.max_line_length.  RFC 5321
# section 4.5.3.1.4 lets extensions lengthen command lines, and the ones
# offered here do: SIZE (RFC 1870), SMTPUTF8 (RFC 6531), ENVID up to 100
# and ORCPT up to 500 characters (RFC 3461), AUTH= (RFC 4954).
PARAMETER_ALLOWANCE = 1024

# Maximum length of the greeting name relay keeps: a domain name has at most
# 255 octets (RFC 1035 section 2.3.4).
MAX_HELO_NAME = 255


def _printable_helo(name: str) -> str:
    """Return the greeting name as relay echoes and records it: printable ASCII, at most 255 characters.

    Reply text and the Received header of a message without SMTPUTF8 allow
    only ASCII, and a reply line has at most 512 octets (RFC 5321 sections
    4.2 and 4.5.3.1.5), so other characters become ``?`` as in Postfix.
    """
    if len(name) <= MAX_HELO_NAME and name.isascii() and name.isprintable():
        return name
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in name[:MAX_HELO_NAME])


def _verb_of(line: bytes) -> str:
    """Return the first word of a line the parser rejected, for logging and for choosing its reply.

    A tab or any other control character also ends the word.  RFC 5321
    allows only a space after the verb, but a client that puts a tab there
    still means that verb, and so does one whose text-mode stream turned
    CRLF into CR CR LF.  So ``BDAT<TAB>5`` is handled as a broken BDAT,
    and the text behind ``DATA<CR>`` is dropped as after any refused DATA.
    """
    return _VERB_END.split(line[:16], maxsplit=1)[0].decode("ascii", "replace") or "-"


# Space, the C0 controls and DEL end the first word of a rejected line.
_VERB_END = re.compile(rb"[\x00-\x20\x7f]")


VERBS: Final[dict[str, VerbRule]] = {
    "EHLO": VerbRule(Session._ehlo, needs_greeting=False),
    "HELO": VerbRule(Session._helo, needs_greeting=False),
    "MAIL": VerbRule(Session._mail, needs_greeting=True),
    "RCPT": VerbRule(Session._rcpt, needs_greeting=True),
    "DATA": VerbRule(Session._data, needs_greeting=True),
    "BDAT": VerbRule(Session._bdat, needs_greeting=False),
    "RSET": VerbRule(Session._rset, needs_greeting=False),
    "NOOP": VerbRule(Session._noop, needs_greeting=False),
    "QUIT": VerbRule(Session._quit, needs_greeting=False),
    "VRFY": VerbRule(Session._vrfy, needs_greeting=False),
    "EXPN": VerbRule(Session._expn, needs_greeting=False),
    "HELP": VerbRule(Session._help, needs_greeting=False),
    "STARTTLS": VerbRule(Session._starttls, needs_greeting=False),
    "AUTH": VerbRule(Session._auth, needs_greeting=True),
}
