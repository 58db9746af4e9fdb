"""Outbound SMTP session: connect, greet, EHLO, STARTTLS, AUTH, then send messages.

Standards: RFC 5321 (session, replies, section 4.5.3.2 timeouts), RFC 3207
STARTTLS, RFC 4954 AUTH with RFC 4616 PLAIN or LOGIN, RFC 2920 PIPELINING,
RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 3461 DSN parameters
(NOTIFY, ORCPT, RET, ENVID, passed on only when the server offers DSN), RFC
3030 CHUNKING and BINARYMIME, and RFC 8314 implicit TLS when the next hop's
port is 465.

Replies are parsed by the compiled ``ReplyParser``; a malformed reply ends the
session as a temporary failure (``451 4.5.0``).  When the next hop offers
CHUNKING, the body goes in one ``BDAT <size> LAST`` chunk, and when it offers
PIPELINING too, MAIL, RCPT, BDAT and the body share one write.  Otherwise DATA
sends the body dot-stuffed by the compiled encoder,
and with PIPELINING the MAIL, RCPT and DATA commands of the session's next
message go in the write that ends the body (RFC 2920 section 3.1 lets message
content start a group), so a reused connection costs one write and one read
per message.
A message with 8-bit octets goes to a next hop without 8BITMIME converted
to 7 bit by ``relay.delivery.downgrade`` (RFC 6152 section 3), or fails with
``5.6.3`` when ``mime_downgrade`` is off or the conversion is impossible.
Lines longer than ``line_length_limit`` octets (998 by default, RFC 5321
section 4.5.3.1.6) are broken before either is sent, except in a BINARYMIME
body, and SIZE counts the octets as sent.
No command is written with CR, LF or NUL inside an argument: such a recipient
fails with ``5.1.3`` (``5.1.7`` for the sender), and xtext values are decoded
and encoded again.

The connection is an ``asyncio.Protocol`` that feeds received bytes straight
to the parser.  Each wait for a reply or for the send buffer to drain has its
own deadline (RFC 5321 section 4.5.3.2), and one timer per session, moved only
when a deadline comes earlier than the time it is set for, enforces it.

Session-level problems (connection refused or dropped, a non-220 greeting,
``421`` at any point, a timeout, a TLS failure) raise ``SessionError``; its
``temporary`` flag says whether the scheduler defers or fails the recipients
in flight.  Per-recipient results come back from ``SMTPSession.send``:
a ``4xx`` to RCPT defers that recipient, ``5xx`` fails it, and the reply to
DATA, to the end of data or to ``BDAT LAST`` decides every recipient RCPT
accepted.  Any ``2xx`` to MAIL, RCPT, the end of data or ``BDAT LAST`` is a
success, as RFC 5321 section 4.2.1 has a client read an unexpected code by
its first digit.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

from relay._errors import SMTPError
from relay._reply import Reply, ReplyParser, parse_ehlo
from relay._stuffing import dot_stuff, fold_long_lines
from relay.config import DeliveryConfig
from relay.delivery.downgrade import DowngradeError, body_is_8bit, downgrade_to_7bit
from relay.log import log_event
from relay.smtp.tls import set_minimum_version
from relay.spool import Outcome

logger = logging.getLogger("relay.delivery")

# Bytes per write while sending DATA; each write must drain within the data
# block timeout (RFC 5321 section 4.5.3.2.5).
DATA_CHUNK = 64 * 1024
# RFC 5321 section 4.5.3.1.6: 1000 octets with the CRLF; Postfix's smtp_line_length_limit.
DEFAULT_LINE_LENGTH_LIMIT = 998
# Longest reply line read from a next hop, CRLF included (see DeliveryConfig.reply_line_limit).
DEFAULT_REPLY_LINE_LIMIT = 2048
# Octets of replies that may wait unread before the client stops reading from
# the socket.  It reads again once it has taken replies below half of this.
# The pipelined replies to 1000 recipients can pass the limit, and then wait
# in the socket buffers for a while.  A next hop that keeps sending cannot
# grow the client's memory past it.
UNREAD_LIMIT = 256 * 1024
# RFC 8314 section 3.3: port 465 speaks TLS from the first byte.
IMPLICIT_TLS_PORT = 465


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait for each step of a session (RFC 5321 section 4.5.3.2)."""

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0
    rset: float = 20.0

    @classmethod
    def from_config(cls, delivery: DeliveryConfig) -> Timeouts:
        """Take every timeout from the ``[delivery]`` section."""
        return cls(
            connect=delivery.connect_timeout,
            greeting=delivery.greeting_timeout,
            helo=delivery.helo_timeout,
            mail=delivery.mail_timeout,
            rcpt=delivery.rcpt_timeout,
            data_init=delivery.data_init_timeout,
            data_block=delivery.data_block_timeout,
            data_done=delivery.data_done_timeout,
            rset=delivery.rset_timeout,
        )


@dataclass(frozen=True, slots=True)
class OutboundRecipient:
    """One recipient of a transaction; ``index`` is its position in the spooled envelope."""

    index: int
    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What one transaction sends: envelope, DSN parameters and the body as spooled."""

    queue_id: str
    sender: str
    recipients: tuple[OutboundRecipient, ...]
    body: bytes
    body_type: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome for one recipient and the reply that decided it."""

    index: int
    outcome: Outcome
    reply: str
    # True when the transaction sent the message converted to 7 bit (see relay.delivery.downgrade).
    downgraded: bool = False
    # True when ``reply`` is relay's own, written before the recipient was sent (a
    # SIZE limit, a missing extension, an unsafe address), and not the next hop's.
    local: bool = False


class SessionError(Exception):
    """The session failed as a whole; ``reply`` is the SMTP reply (received or local) that says why."""

    def __init__(
        self, reply: str, *, temporary: bool = True, tls_failed: bool = False, peer: str = "", loop: bool = False
    ) -> None:
        super().__init__(reply)
        self.reply = reply
        self.temporary = temporary
        self.tls_failed = tls_failed
        # True when the MX host greeted with this relay's own name.  The pool
        # then tries no MX host after it, because those are no more preferred.
        self.loop = loop
        # The next hop (``name[address]:port``) whose session failed while it was
        # opened; empty when no connection was made.  Recorded like a reply's host.
        self.peer = peer
        # Recipients whose outcome a reply decided before the session failed, by
        # index (a 5xx to RCPT is final, RFC 5321 section 3.3); set by ``send``.
        self.decided: dict[int, RecipientResult] = {}


def reply_text(reply: Reply) -> str:
    """Format a parsed reply as one line: code, enhanced code when present, text."""
    if reply.enhanced:
        return f"{reply.code} {reply.enhanced} {reply.text}".rstrip()
    return f"{reply.code} {reply.text}".rstrip()


def _as_temporary(reply: Reply) -> str:
    """Return a 5xx reply's text as a 4xx one (554 5.3.2 becomes 454 4.3.2), for a refusal taken as temporary.

    A deferral must not carry a permanent status (RFC 3463 section 3.1):
    the delay DSN and the logs would contradict themselves.
    """
    if reply.code < 500:
        return reply_text(reply)
    enhanced = f" 4{reply.enhanced[1:]}" if reply.enhanced else ""
    return f"{reply.code - 100}{enhanced} {reply.text}".rstrip()


def _connect_error_text(error: OSError) -> str:
    """Return the system's text for a failed connect, such as "Connection refused".

    The standard asyncio loop puts "Connect call failed ('ADDR', PORT)" in
    ``strerror``, and uvloop puts the system's text there, so the text comes
    from the error number when there is one.
    """
    if error.errno:
        return os.strerror(error.errno)
    return error.strerror or str(error) or type(error).__name__


def _greeting_name(reply: Reply) -> str:
    """Return the first word of an EHLO or HELO reply, the server's name, or "" when there is none."""
    words = reply.lines[0].split(None, 1) if reply.lines else []
    return words[0] if words else ""


# Client TLS contexts by mode, CA file, TLS floor and the CA file's change
# stamp.  Building one costs about 15 ms of CPU (the system CA store is read),
# far more than the handshake it serves, and one context serves any number of
# connections.  The stamp makes a CA file replaced under the same name take
# effect at the next session.
_contexts: dict[tuple[str, str, str, tuple[int, int] | None], ssl.SSLContext] = {}
# Contexts kept at most; past it the cache starts again, since only CA file changes add keys.
_MAX_CONTEXTS = 16


def tls_context(mode: str, ca_file: str = "", min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """Return the client TLS context for ``required`` (verified) or ``opportunistic`` (unverified) mode.

    Only ``required`` reads ``ca_file``: an unverified context has no use for
    it, so a damaged CA file cannot stop opportunistic TLS.  ``min_version``
    is the oldest TLS version offered, a name from config.TLS_VERSIONS.
    Contexts are built once and shared.  Raises OSError or ssl.SSLError
    when ``ca_file`` cannot be read or loaded.
    """
    verified = mode == "required"
    stamp = None
    if verified and ca_file:
        info = os.stat(ca_file)
        stamp = (info.st_mtime_ns, info.st_size)
    key = (mode, ca_file if verified else "", min_version, stamp)
    context = _contexts.get(key)
    if context is not None:
        return context

    if verified:
        context = ssl.create_default_context(cafile=ca_file or None)
    else:
        # Opportunistic TLS guards against passive eavesdropping only; an MX
        # host's certificate is rarely valid for the name we looked up, so
        # no CA store is loaded.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    set_minimum_version(context, min_version)

    if len(_contexts) >= _MAX_CONTEXTS:
        _contexts.clear()
    _contexts[key] = context
    return context


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How to open a session with one host."""

    helo_name: str
    tls: str = "opportunistic"  # required | opportunistic | none
    ca_file: str = ""
    # Oldest TLS version offered (a name from config.TLS_VERSIONS), chosen by the
    # pool from delivery.tls_min_version or tls_mandatory_min_version.
    tls_min_version: str = "TLSv1.2"
    username: str = ""
    password: str = ""
    timeouts: Timeouts = Timeouts()
    # Send with BDAT when the next hop offers CHUNKING; False keeps DATA for every hop.
    chunking: bool = True
    # Longer lines are broken before sending (see ``relay._stuffing.fold_long_lines``).
    line_length_limit: int = DEFAULT_LINE_LENGTH_LIMIT
    # The rest of a longer reply line is dropped (see relay._reply.ReplyParser).
    reply_line_limit: int = DEFAULT_REPLY_LINE_LIMIT
    # The mail domain of an MX route: the session fails when the server greets
    # with helo_name (the MX is this relay).  "" for fixed next hops, which are not checked.
    mx_domain: str = ""
    # True for an MX host less preferred than the best one with an address.  A
    # loop there defers with 4.4.6, because a better MX host may take the mail
    # later.  At the best MX host it fails with 5.4.6, as in Postfix 3.x.
    backup_mx: bool = False
    # Convert 8-bit mail to 7 bit for a next hop without 8BITMIME; False fails it with 5.6.3.
    mime_downgrade: bool = True


class _Connection(asyncio.Protocol):
    """The transport's protocol: feeds received bytes to the reply parser and wakes the waiting session."""

    def __init__(self, reply_line_limit: int = DEFAULT_REPLY_LINE_LIMIT) -> None:
        self.transport: asyncio.Transport | None = None
        self.reply_line_limit = reply_line_limit
        self.parser = ReplyParser(max_line=reply_line_limit)
        self.eof = False  # True once the server closed its side or the connection was lost
        self.lost = False  # True once connection_lost was called
        self.error: Exception | None = None  # the error that ended the connection, if any
        self.paused = False  # True while the send buffer is over its high-water mark
        self.reading_paused = False  # True while UNREAD_LIMIT octets of replies wait (see data_received)
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if not self.reading_paused and self.parser.buffered > UNREAD_LIMIT and self.transport is not None:
            # The session takes no replies while it sends a body or is parked, so
            # reading on would let a next hop that keeps sending grow the buffer.
            self.transport.pause_reading()
            self.reading_paused = True
        self.wake()

    def resume_reading_when_taken(self) -> None:
        """Read from the socket again once the replies waiting are below half of UNREAD_LIMIT."""
        if self.reading_paused and self.parser.buffered <= UNREAD_LIMIT // 2 and not self.lost:
            assert self.transport is not None
            self.transport.resume_reading()
            self.reading_paused = False

    def eof_received(self) -> bool:
        self.eof = True
        self.wake()
        # Keep a plain TCP connection half-open so what is already written still
        # goes out, as asyncio streams do.  TLS transports cannot stay half-open.
        assert self.transport is not None
        return self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = True
        self.error = exc
        self.paused = False
        self.wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(slots=True)
class _Transaction:
    """A message ready to send: its commands, the recipients to send, and results decided before MAIL."""

    message: OutboundMessage
    body: bytes  # the message's body as sent: converted to 7 bit when needed, with long lines broken
    mail_command: str
    rcpt_commands: list[str]
    sendable: list[OutboundRecipient]
    results: dict[int, RecipientResult]
    downgraded: bool  # True when ``body`` is the message converted to 7 bit


class SMTPSession:
    """One open connection to a next hop, ready for transactions after ``open``."""

    def __init__(self, connection: _Connection, host: str, address: str, port: int) -> None:
        self.host = host
        self.address = address
        self.port = port
        self.capabilities: dict[str, list[str]] = {}
        self.server_name = ""  # the first word of the EHLO (or HELO) reply: the name the server greets as
        self.tls_active = False
        self.usable = True
        self.transactions = 0
        self._connection = connection
        assert connection.transport is not None
        self._transport = connection.transport
        self._loop = asyncio.get_running_loop()
        self._timeouts = Timeouts()
        self._chunking = True
        self._line_length_limit = DEFAULT_LINE_LENGTH_LIMIT
        self._mime_downgrade = True
        # The reply to a pipelined DATA, read with the RCPT replies.
        self._data_reply: Reply | None = None
        # The current transaction's MAIL and RCPT replies so far (see _decided_before_failure).
        self._mail_seen: Reply | None = None
        self._rcpt_seen: list[Reply] = []
        # The next message, whose MAIL, RCPT and DATA went out after the last body.
        self._pipelined: _Transaction | None = None
        # Results that replies decided, by recipient index, in the last transaction
        # that ``send`` left by an exception or a cancellation (see _decided_before_failure).
        self.decided: dict[int, RecipientResult] = {}
        # The deadline of the current wait, and the one timer that enforces it.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    @property
    def peer(self) -> str:
        """The peer as logged and put into DSNs: ``name[address]:port``."""
        return f"{self.host}[{self.address}]:{self.port}"

    @classmethod
    async def open(
        cls, host: str, address: str, port: int, options: SessionOptions, *, starttls: bool = True
    ) -> SMTPSession:
        """Connect, read the greeting, say EHLO (or HELO), then STARTTLS and AUTH as the options ask.

        ``starttls=False`` skips STARTTLS even when offered: the plaintext retry
        after an opportunistic handshake failed.  Raises SessionError.
        """
        implicit = port == IMPLICIT_TLS_PORT and options.tls != "none"
        try:
            context = tls_context(options.tls, options.ca_file, options.tls_min_version) if implicit else None
        except (OSError, ssl.SSLError) as exc:
            raise SessionError(f"451 4.7.5 cannot use the CA file {options.ca_file}: {exc}") from None
        loop = asyncio.get_running_loop()
        reply_line_limit = options.reply_line_limit
        # No reply comes from a host that failed to connect, so no peer is set:
        # a DSN then gives this text as relay's own diagnostic, without a
        # Remote-MTA.  The text names the host in Postfix's form instead:
        # "connect to HOST[ADDR]:PORT: Connection refused".
        peer = f"{host}[{address}]:{port}"
        try:
            async with asyncio.timeout(options.timeouts.connect):
                _, connection = await loop.create_connection(
                    lambda: _Connection(reply_line_limit),
                    address,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                )
        except TimeoutError:
            raise SessionError(f"451 4.4.1 connect to {peer}: Connection timed out") from None
        except ssl.SSLError as exc:
            raise SessionError(f"451 4.7.5 TLS handshake with {peer} failed: {exc.reason}") from None
        except OSError as exc:
            raise SessionError(f"451 4.4.1 connect to {peer}: {_connect_error_text(exc)}") from None

        session = cls(connection, host, address, port)
        session._timeouts = options.timeouts
        session._chunking = options.chunking
        session._line_length_limit = options.line_length_limit
        session._mime_downgrade = options.mime_downgrade
        session.tls_active = implicit
        try:
            await session._handshake(options, starttls)
        except SessionError as exc:
            session.abort()
            exc.peer = exc.peer or session.peer
            raise
        except BaseException:
            session.abort()
            raise
        return session

    async def _handshake(self, options: SessionOptions, starttls: bool) -> None:
        greeting = await self._read_reply(self._timeouts.greeting)
        if greeting.code != 220:
            # RFC 5321 section 3.1: after a refusing greeting only QUIT may follow.
            # A 5xx greeting counts as temporary, as with Postfix's default
            # smtp_skip_5xx_greeting: servers send 554 while overloaded too, so
            # the next MX host is tried and the mail is deferred, not bounced.
            await self._quit_quietly()
            raise SessionError(_as_temporary(greeting), temporary=True)

        await self._ehlo(options.helo_name)
        if options.mx_domain and self.server_name.lower() == options.helo_name.lower():
            # The MX is this relay itself: sending would only queue the mail here
            # again, until the Received limit stops it (Postfix: "loops back to myself").
            await self._quit_quietly()
            status = "451 4.4.6" if options.backup_mx else "554 5.4.6"
            where = "backup MX host" if options.backup_mx else "best MX host"
            raise SessionError(
                f"{status} {self.peer} greets as {self.server_name}, this relay's own name:"
                f" mail for {options.mx_domain} loops back to myself at its {where}",
                temporary=options.backup_mx,
                loop=True,
            )
        if starttls and options.tls != "none" and not self.tls_active:
            if "STARTTLS" in self.capabilities:
                await self._starttls(options)
            elif options.tls == "required":
                await self._quit_quietly()
                raise SessionError(f"451 4.7.4 TLS is required but {self.peer} does not offer STARTTLS")
        if options.username:
            if not self.tls_active and options.tls != "none":
                # PLAIN and LOGIN send the password itself (RFC 4616 section 5), and
                # anyone on the path can strip STARTTLS or break its handshake.  Only
                # relayhost_tls = "none" means the operator accepts a plaintext AUTH.
                await self._quit_quietly()
                raise SessionError(
                    f"451 4.7.10 {self.peer} offered no working TLS, and AUTH would send the password in"
                    " plaintext; fix TLS there, or set relayhost_tls = \"none\" to allow it"
                )
            await self._authenticate(options.username, options.password)

    async def _ehlo(self, helo_name: str) -> None:
        reply = await self._command(f"EHLO {helo_name}", self._timeouts.helo)
        if reply.code == 250:
            self.capabilities = parse_ehlo(reply)
            self.server_name = _greeting_name(reply)
            return
        if reply.code == 421:
            raise SessionError(reply_text(reply))
        reply = await self._command(f"HELO {helo_name}", self._timeouts.helo)
        if reply.code != 250:
            await self._quit_quietly()
            raise SessionError(reply_text(reply), temporary=reply.code < 500)
        self.capabilities = {}
        self.server_name = _greeting_name(reply)

    async def _starttls(self, options: SessionOptions) -> None:
        reply = await self._command("STARTTLS", self._timeouts.helo)
        if reply.code != 220:
            if options.tls == "required" or reply.code == 421:
                raise SessionError(f"451 4.7.4 STARTTLS rejected by {self.peer}: {reply_text(reply)}")
            # Opportunistic: the session goes on in plaintext on this connection.
            log_event(logger, "tls_skipped", logging.WARNING, relay=self.peer, reply=reply_text(reply))
            return
        if self._connection.parser.buffered:
            # Bytes after the 220 were sent before the handshake; honouring them
            # would let a man in the middle inject replies (CVE-2011-0411's kind).
            raise SessionError(f"451 4.7.0 {self.peer} sent data after its STARTTLS reply", tls_failed=True)
        try:
            context = tls_context(options.tls, options.ca_file, options.tls_min_version)
        except (OSError, ssl.SSLError) as exc:
            # A CA bundle damaged after the start-up check: this session cannot
            # verify the host, so it fails like a TLS error instead of crashing the worker.
            raise SessionError(f"451 4.7.5 cannot use the CA file {options.ca_file}: {exc}") from None
        try:
            async with asyncio.timeout(self._timeouts.helo):
                transport = await self._loop.start_tls(
                    self._transport, self._connection, context, server_hostname=self.host
                )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise SessionError(f"451 4.7.5 TLS handshake with {self.peer} failed: {reason}", tls_failed=True) from None
        if transport is None:
            raise SessionError(f"451 4.7.5 TLS handshake with {self.peer} failed: connection closed", tls_failed=True)
        self._transport = transport
        self._connection.transport = transport
        self.tls_active = True
        self._connection.parser = ReplyParser(max_line=self._connection.reply_line_limit)
        await self._ehlo(options.helo_name)

    async def _authenticate(self, username: str, password: str) -> None:
        mechanisms = [name.upper() for name in self.capabilities.get("AUTH", [])]
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            reply = await self._command(f"AUTH PLAIN {token}", self._timeouts.helo, secret=True)
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", self._timeouts.helo)
            if reply.code == 334:
                reply = await self._command(base64.b64encode(username.encode()).decode(), self._timeouts.helo, True)
            if reply.code == 334:
                reply = await self._command(base64.b64encode(password.encode()).decode(), self._timeouts.helo, True)
        else:
            await self._quit_quietly()
            raise SessionError(f"451 4.7.0 {self.peer} offers no AUTH mechanism this relay supports (PLAIN, LOGIN)")
        if reply.code != 235:
            # Like Postfix's smtp_sasl_auth_soft_bounce: a rejected login is
            # usually a configuration error, so the mail waits for its fix.
            await self._quit_quietly()
            raise SessionError(f"451 4.7.8 AUTH with {self.peer} failed: {reply_text(reply)}")

    async def send(
        self, message: OutboundMessage, following: OutboundMessage | None = None
    ) -> list[RecipientResult]:
        """Run one transaction and return a result for every recipient of ``message``.

        ``following`` is the message this session sends next, if the caller
        has one.  When the message goes with DATA and the next hop offers
        PIPELINING, the MAIL, RCPT and DATA commands of ``following`` are
        written together with the end of this message's body, and the next
        call must then send ``following`` (``pipelined`` names it).  No part
        of its body is sent before that call.

        Raises SessionError when the session fails.  No recipient of
        ``message`` is then delivered, the session is unusable, and
        ``following`` was not delivered either, so it can go over another
        session.  The results that replies decided before a failure or a
        cancellation are then in ``decided`` (and in the error's
        ``decided``).  Raises ValueError when another message's commands
        were pipelined.
        """
        if not self.usable:
            raise SessionError("451 4.4.2 session already closed")
        self.transactions += 1
        transaction = self._pipelined
        pipelined = transaction is not None
        if transaction is not None:
            if transaction.message is not message:
                pipelined_id = transaction.message.queue_id
                raise ValueError(f"the commands of {pipelined_id} were pipelined, not those of {message.queue_id}")
            self._pipelined = None
        else:
            prepared = self._prepare(message)
            if isinstance(prepared, list):
                return prepared
            transaction = prepared
            if self._connection.parser.buffered:
                # A reply before any command of this transaction: the server sent one reply
                # too many, so each later reply would be taken for the wrong command's.
                self.abort()
                raise SessionError(f"451 4.5.0 {self.peer} sent a reply that no command asked for")

        results = transaction.results
        # The replies of this transaction's MAIL and RCPT commands, as they arrive.
        self._mail_seen = None
        self._rcpt_seen = []
        self.decided = {}
        try:
            if self.uses_chunking:
                await self._send_with_bdat(
                    transaction.body, transaction.mail_command, transaction.rcpt_commands, transaction.sendable, results
                )
            else:
                accepted = await self._envelope(transaction, written=pipelined)
                if accepted:
                    await self._data(transaction.body, accepted, results, following)
                else:
                    await self._reset()
        except SessionError as exc:
            self.abort()
            exc.decided = self.decided = self._decided_before_failure(transaction)
            raise
        except asyncio.CancelledError:
            # The caller cut the transaction off (its lease was lost, say).  The
            # replies read before that still decided their recipients.
            self.decided = self._decided_before_failure(transaction)
            raise
        if transaction.downgraded:
            return [replace(results[r.index], downgraded=True) for r in message.recipients]
        return [results[r.index] for r in message.recipients]

    @property
    def idle_intact(self) -> bool:
        """Whether a session that waited between transactions can take another one.

        False when it is unusable, or when the server closed the connection
        or sent a reply while it waited (an idle timeout's 421, say).
        """
        connection = self._connection
        return self.usable and not connection.eof and not connection.parser.buffered

    @property
    def pipelined(self) -> OutboundMessage | None:
        """The message whose MAIL, RCPT and DATA commands went out with the last body, or None."""
        return self._pipelined.message if self._pipelined is not None else None

    def _prepare(self, message: OutboundMessage) -> _Transaction | list[RecipientResult]:
        """Build the commands of a transaction, or return the results when no recipient can be sent."""
        refused = self._check_message(message)
        body, downgraded = message.body, False
        if refused is None:
            body, downgraded, refused = self._body_as_sent(message)
        if refused is None:
            refused = self._check_size(len(body))
        if refused is not None:
            # A message refused for its size as converted is logged with converted=7bit too.
            return [
                RecipientResult(r.index, Outcome.FAILED, refused, downgraded, local=True) for r in message.recipients
            ]

        results: dict[int, RecipientResult] = {}
        sendable: list[OutboundRecipient] = []
        for recipient in message.recipients:
            if _unsafe(recipient.address):
                reply = "553 5.1.3 recipient address contains CR, LF or NUL"
                results[recipient.index] = RecipientResult(recipient.index, Outcome.FAILED, reply, local=True)
            else:
                sendable.append(recipient)
        if not sendable:
            return [results[r.index] for r in message.recipients]

        mail_command = self._mail_command(message, body)
        rcpt_commands = [self._rcpt_command(recipient) for recipient in sendable]
        return _Transaction(message, body, mail_command, rcpt_commands, sendable, results, downgraded)

    @property
    def pipelines_transactions(self) -> bool:
        """Whether ``send`` can write the next message's commands with the end of a body."""
        return "PIPELINING" in self.capabilities and not self.uses_chunking

    @property
    def uses_chunking(self) -> bool:
        """Whether transactions on this session send the body with BDAT instead of DATA."""
        return self._chunking and "CHUNKING" in self.capabilities

    def _check_message(self, message: OutboundMessage) -> str | None:
        """Return the reply that fails the whole message before MAIL for its envelope or body type, or None."""
        if _unsafe(message.sender):
            return "553 5.1.7 sender address contains CR, LF or NUL"
        if _needs_smtputf8(message) and "SMTPUTF8" not in self.capabilities:
            return f"554 5.6.7 {self.peer} does not support SMTPUTF8, which this message needs"
        if message.body_type == "BINARYMIME" and not (self.uses_chunking and "BINARYMIME" in self.capabilities):
            # RFC 3030: a BINARYMIME body goes only to a next hop that offers
            # BINARYMIME, and this relay does not convert it to 7bit or 8bit MIME.
            return f"554 5.6.3 {self.peer} does not support BINARYMIME with CHUNKING, which this message needs"
        return None

    def _body_as_sent(self, message: OutboundMessage) -> tuple[bytes, bool, str | None]:
        """Return the body to send, whether it was converted to 7 bit, and the reply that fails it or None.

        RFC 6152 section 3: 8-bit data goes only to a next hop that offers
        8BITMIME; for any other the message is converted or returned.  The
        octets decide, not the BODY parameter it came with, since 8-bit mail
        often arrives without one.  A message sent with SMTPUTF8 may have
        UTF-8 header fields (RFC 6532), so only its bodies are converted.
        """
        body = message.body
        if message.body_type == "BINARYMIME":
            # _check_message let it through to a next hop that offers BINARYMIME, and
            # RFC 3030 section 3 lifts the line limit for BINARYMIME only.
            return body, False, None
        downgraded = False
        if "8BITMIME" not in self.capabilities and body_is_8bit(body):
            if not self._mime_downgrade:
                return b"", False, (
                    f"554 5.6.3 {self.peer} does not support 8BITMIME, which this message needs,"
                    " and conversion to 7 bit is off (delivery.mime_downgrade)"
                )
            try:
                body = downgrade_to_7bit(body, allow_8bit_headers=_needs_smtputf8(message))
            except DowngradeError as exc:
                return b"", False, (
                    f"554 5.6.3 {self.peer} does not support 8BITMIME, and this message cannot be"
                    f" converted to 7 bit: {exc}"
                )
            downgraded = True
        return fold_long_lines(body, self._line_length_limit), downgraded, None

    def _check_size(self, size: int) -> str | None:
        """Return the reply that fails a message of ``size`` octets as sent, or None when the next hop takes it."""
        limit = _size_limit(self.capabilities)
        if limit and size > limit:
            return f"552 5.3.4 message size {size} exceeds the limit {limit} of {self.peer}"
        return None

    def _mail_command(self, message: OutboundMessage, body: bytes) -> str:
        """Build the MAIL command for ``message`` with ``body`` as sent."""
        parts = [f"MAIL FROM:<{message.sender}>"]
        if "SIZE" in self.capabilities:
            parts.append(f"SIZE={len(body)}")
        if "8BITMIME" in self.capabilities and (message.body_type == "8BITMIME" or body_is_8bit(body)):
            # RFC 6152 section 3: without BODY=8BITMIME the next hop may take the
            # body as 7 bit, and 8-bit mail often arrives without the parameter.
            parts.append("BODY=8BITMIME")
        elif message.body_type == "BINARYMIME":
            # _check_message passes such a message only when the next hop offers CHUNKING and BINARYMIME.
            parts.append("BODY=BINARYMIME")
        if _needs_smtputf8(message):
            parts.append("SMTPUTF8")
        if "DSN" in self.capabilities:
            if message.ret in ("FULL", "HDRS"):
                parts.append(f"RET={message.ret}")
            if message.envid:
                parts.append(f"ENVID={xtext_encode(xtext_decode(message.envid))}")
        return " ".join(parts)

    def _rcpt_command(self, recipient: OutboundRecipient) -> str:
        parts = [f"RCPT TO:<{recipient.address}>"]
        if "DSN" in self.capabilities:
            notify = [item for item in recipient.notify if item in ("NEVER", "SUCCESS", "FAILURE", "DELAY")]
            if notify:
                parts.append("NOTIFY=" + ",".join(notify))
            orcpt = _orcpt_parameter(recipient.orcpt)
            if orcpt:
                parts.append(f"ORCPT={orcpt}")
        return " ".join(parts)

    async def _envelope(self, transaction: _Transaction, written: bool) -> list[OutboundRecipient]:
        """Send MAIL and RCPT (and DATA when pipelining); return the recipients RCPT accepted.

        With PIPELINING the DATA command goes in the same write (RFC 2920
        section 3.1 lets DATA end a group); ``self._data_reply`` then holds
        its reply.  ``written`` means those commands already went out with
        the previous message's body, so only their replies are read.
        """
        rcpt_commands = transaction.rcpt_commands
        self._data_reply = None
        if written or "PIPELINING" in self.capabilities:
            if not written:
                self._write_lines([transaction.mail_command, *rcpt_commands, "DATA"])
            mail_reply = self._mail_seen = await self._read_checked(self._timeouts.mail)
            rcpt_replies = [await self._read_rcpt_reply() for _ in rcpt_commands]
            self._data_reply = await self._read_checked(self._timeouts.data_init)
        else:
            mail_reply, rcpt_replies = await self._envelope_in_turn(transaction.mail_command, rcpt_commands)

        accepted = self._record_envelope(mail_reply, rcpt_replies, transaction.sendable, transaction.results)
        if not accepted and self._data_reply is not None and self._data_reply.code == 354:
            await self._finish_empty_data()
        return accepted

    async def _envelope_in_turn(self, mail_command: str, rcpt_commands: list[str]) -> tuple[Reply, list[Reply]]:
        """Send MAIL and then each RCPT, waiting for each reply; no RCPT is sent after a rejected MAIL."""
        mail_reply = await self._command(mail_command, self._timeouts.mail)
        _raise_on_421(mail_reply)
        self._mail_seen = mail_reply
        rcpt_replies: list[Reply] = []
        if _completed(mail_reply):
            for command in rcpt_commands:
                reply = await self._command(command, self._timeouts.rcpt)
                _raise_on_421(reply)
                self._rcpt_seen.append(reply)
                rcpt_replies.append(reply)
        return mail_reply, rcpt_replies

    async def _read_rcpt_reply(self) -> Reply:
        """Read the reply to a pipelined RCPT, and keep it for ``_decided_before_failure``."""
        reply = await self._read_checked(self._timeouts.rcpt)
        self._rcpt_seen.append(reply)
        return reply

    def _decided_before_failure(self, transaction: _Transaction) -> dict[int, RecipientResult]:
        """Return the results that replies decided in ``transaction`` before the session failed.

        RFC 5321 section 3.3: a 5xx to RCPT is final for that recipient, and a
        4xx carries its own reason, whatever happens to the session afterwards.
        A rejected MAIL decides every recipient of the transaction in the same
        way, also when the session fails while the replies to the pipelined
        RCPT commands are read.  A 250 to RCPT decides nothing, because only
        the reply to the end of data delivers, and ``transaction.results``
        already contains what that reply decided.
        """
        decided = dict(transaction.results)
        mail_reply = self._mail_seen
        if mail_reply is None:
            return decided
        if not _completed(mail_reply):
            _reject_all(mail_reply, [r for r in transaction.sendable if r.index not in decided], decided)
            return decided
        for recipient, reply in zip(transaction.sendable, self._rcpt_seen, strict=False):
            if not _completed(reply) and recipient.index not in decided:
                outcome = Outcome.DEFERRED if reply.code < 500 else Outcome.FAILED
                decided[recipient.index] = RecipientResult(recipient.index, outcome, reply_text(reply))
        return decided

    async def _finish_empty_data(self) -> None:
        # RFC 2920 section 3.1: a server that answered the pipelined DATA with
        # 354 although no recipient was accepted still expects end of data.
        self._write_lines(["."])
        await self._read_checked(self._timeouts.data_done)
        self._data_reply = None

    async def _data(
        self,
        body: bytes,
        accepted: list[OutboundRecipient],
        results: dict[int, RecipientResult],
        following: OutboundMessage | None,
    ) -> None:
        data_reply = self._data_reply
        if data_reply is None:
            data_reply = await self._command("DATA", self._timeouts.data_init)
            _raise_on_421(data_reply)
        if data_reply.code != 354:
            if data_reply.code < 400:
                # RFC 5321 section 4.3.2: only 354 lets the body go, and only the reply
                # to the end of data can deliver.  Another 2xx or 3xx here means the
                # replies are out of step with the commands.
                self.usable = False
                raise SessionError(f"451 4.5.0 {self.peer} answered DATA with {data_reply.code}, not 354")
            self._decide(accepted, data_reply, results)
            await self._reset()
            return

        encoded = dot_stuff(body)
        next_commands = self._pipeline_next(following)
        for start in range(0, len(encoded), DATA_CHUNK):
            chunk = encoded[start : start + DATA_CHUNK]
            if start + DATA_CHUNK >= len(encoded):
                chunk += next_commands
            self._write(chunk)
            await self._drain(self._timeouts.data_block)
        final = await self._read_checked(self._timeouts.data_done)
        self._decide(accepted, final, results)

    def _pipeline_next(self, following: OutboundMessage | None) -> bytes:
        """Return the MAIL, RCPT and DATA lines of ``following`` to send after the end of data, or b"".

        RFC 2920 section 3.1 allows message content as the first command of a
        group, so the next transaction's envelope may follow the end of data
        before its reply.  The server replies to that end of data first, and
        whatever that reply is, the next MAIL starts a new transaction.
        """
        if following is None or "PIPELINING" not in self.capabilities:
            return b""
        prepared = self._prepare(following)
        if isinstance(prepared, list):
            # Nothing of it can be sent; its ``send`` returns these results without a command.
            return b""
        self._pipelined = prepared
        lines = [prepared.mail_command, *prepared.rcpt_commands, "DATA"]
        return "".join(f"{line}\r\n" for line in lines).encode("utf-8")

    async def _send_with_bdat(
        self,
        body: bytes,
        mail_command: str,
        rcpt_commands: list[str],
        recipients: list[OutboundRecipient],
        results: dict[int, RecipientResult],
    ) -> None:
        """Send the envelope and the body as one ``BDAT <size> LAST`` chunk and record every outcome.

        With PIPELINING, MAIL, RCPT, BDAT and the first part of the body go in
        one write, so the chunk is sent before any RCPT reply is read.  The
        server reads a chunk even when it rejects the BDAT command, because the
        size is the only framing (RFC 3030 section 2), so the BDAT reply is
        always read.  When MAIL or every RCPT was rejected, that reply is
        ignored, no recipient is delivered, and RSET ends the transaction.
        """
        bdat_command = f"BDAT {len(body)} LAST\r\n".encode("ascii")
        if "PIPELINING" in self.capabilities:
            envelope = "".join(f"{line}\r\n" for line in (mail_command, *rcpt_commands)).encode("utf-8")
            await self._write_chunk(envelope + bdat_command, body)
            mail_reply = self._mail_seen = await self._read_checked(self._timeouts.mail)
            rcpt_replies = [await self._read_rcpt_reply() for _ in rcpt_commands]
            bdat_reply: Reply | None = await self._read_checked(self._timeouts.data_done)
        else:
            mail_reply, rcpt_replies = await self._envelope_in_turn(mail_command, rcpt_commands)
            bdat_reply = None

        accepted = self._record_envelope(mail_reply, rcpt_replies, recipients, results)
        if accepted and bdat_reply is None:
            await self._write_chunk(bdat_command, body)
            bdat_reply = await self._read_checked(self._timeouts.data_done)
        if not accepted or bdat_reply is None:
            await self._reset()
            return
        self._decide(accepted, bdat_reply, results)
        if not _completed(bdat_reply):
            # The transaction failed with the chunk, and RSET clears whatever
            # state the server kept before the next MAIL.
            await self._reset()

    def _record_envelope(
        self,
        mail_reply: Reply,
        rcpt_replies: list[Reply],
        recipients: list[OutboundRecipient],
        results: dict[int, RecipientResult],
    ) -> list[OutboundRecipient]:
        """Record the outcome of every recipient that MAIL or RCPT rejected, and return those RCPT accepted."""
        if not _completed(mail_reply):
            _reject_all(mail_reply, recipients, results)
            return []
        accepted: list[OutboundRecipient] = []
        for recipient, reply in zip(recipients, rcpt_replies, strict=True):
            if _completed(reply):
                accepted.append(recipient)
                continue
            outcome = Outcome.DEFERRED if reply.code < 500 else Outcome.FAILED
            results[recipient.index] = RecipientResult(recipient.index, outcome, reply_text(reply))
        return accepted

    async def _write_chunk(self, command: bytes, body: bytes) -> None:
        """Write ``command`` and then ``body`` unchanged, draining after every DATA_CHUNK bytes of body."""
        view = memoryview(body)
        # The command and the first part of the body share one write (and so
        # usually one send on the socket).
        self._write(command + view[:DATA_CHUNK])
        await self._drain(self._timeouts.data_block)
        for start in range(DATA_CHUNK, len(body), DATA_CHUNK):
            self._write(view[start : start + DATA_CHUNK])
            await self._drain(self._timeouts.data_block)

    def _decide(
        self, accepted: list[OutboundRecipient], reply: Reply, results: dict[int, RecipientResult]
    ) -> None:
        if _completed(reply):
            outcome = Outcome.DELIVERED
        elif reply.code < 500:
            outcome = Outcome.DEFERRED
        else:
            outcome = Outcome.FAILED
        for recipient in accepted:
            results[recipient.index] = RecipientResult(recipient.index, outcome, reply_text(reply))

    async def _reset(self) -> None:
        reply = await self._command("RSET", self._timeouts.rset)
        if not _completed(reply):
            self.abort()

    async def close(self) -> None:
        """Send QUIT and close; errors on the way out are ignored."""
        if self.usable and self._pipelined is None:
            await self._quit_quietly()
        # A pipelined DATA may have put the server into the message text, where QUIT is not a command.
        self.abort()

    def abort(self) -> None:
        """Close the connection at once, without QUIT."""
        self.usable = False
        self._pipelined = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()

    async def _quit_quietly(self) -> None:
        try:
            await self._command("QUIT", self._timeouts.rset)
        except SessionError:
            pass
        self.usable = False

    async def _command(self, line: str, timeout: float, secret: bool = False) -> Reply:
        del secret  # AUTH lines are never logged; the flag documents the call sites
        self._write_lines([line])
        return await self._read_reply(timeout)

    def _write_lines(self, lines: Sequence[str]) -> None:
        self._write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))

    def _write(self, data: bytes | memoryview) -> None:
        if self._connection.lost or self._transport.is_closing():
            self.usable = False
            raise SessionError(f"451 4.4.2 connection to {self.peer} lost while sending")
        self._transport.write(data)

    async def _drain(self, timeout: float) -> None:
        """Wait until the send buffer is below its high-water mark, at most ``timeout`` seconds."""
        connection = self._connection
        if not connection.paused and not connection.lost:
            return
        deadline = self._loop.time() + timeout
        while connection.paused:
            if self._loop.time() >= deadline:
                raise SessionError(f"451 4.4.2 timed out sending to {self.peer}")
            await self._wait(deadline)
        if connection.lost:
            raise SessionError(f"451 4.4.2 connection to {self.peer} lost while sending")

    async def _read_checked(self, timeout: float) -> Reply:
        reply = await self._read_reply(timeout)
        _raise_on_421(reply)
        return reply

    async def _read_reply(self, timeout: float) -> Reply:
        """Return the next reply, waiting at most ``timeout`` seconds for the rest of it to arrive."""
        connection = self._connection
        deadline: float | None = None
        while True:
            try:
                reply = connection.parser.next_reply()
            except SMTPError as error:
                self.usable = False
                raise SessionError(f"451 4.5.0 malformed reply from {self.peer}: {error.text}") from None
            # Without a reply the buffer contains at most a partial one (64 KiB), so a
            # paused socket is always read again before the wait below.
            connection.resume_reading_when_taken()
            if reply is not None:
                return reply
            if connection.eof:
                self.usable = False
                if connection.error is not None:
                    raise SessionError(f"451 4.4.2 connection to {self.peer} lost: {connection.error}")
                raise SessionError(f"451 4.4.2 connection closed by {self.peer}")
            if deadline is None:
                deadline = self._loop.time() + timeout
            elif self._loop.time() >= deadline:
                self.usable = False
                raise SessionError(f"451 4.4.2 timed out waiting for a reply from {self.peer}")
            await self._wait(deadline)

    async def _wait(self, deadline: float) -> None:
        """Wait until the connection receives bytes, closes or drains, or until ``deadline`` (loop time)."""
        self._deadline = deadline
        timer = self._timer
        if timer is None or self._timer_when > deadline:
            # A timer set for later would fire late; a timer set for earlier
            # moves itself on to the deadline when it fires.
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_when = deadline
        waiter = self._loop.create_future()
        self._connection.waiter = waiter
        try:
            await waiter
        finally:
            self._connection.waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._connection.waiter
        if waiter is None or waiter.done():
            return  # nothing waits; the next wait sets the timer again
        if self._loop.time() >= self._deadline:
            waiter.set_result(None)
            return
        self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self._timer_when = self._deadline


def _reject_all(
    mail_reply: Reply, recipients: Sequence[OutboundRecipient], results: dict[int, RecipientResult]
) -> None:
    """Record the reply that rejected MAIL for ``recipients``: a 5xx fails them and any other reply defers them."""
    outcome = Outcome.DEFERRED if mail_reply.code < 500 else Outcome.FAILED
    for recipient in recipients:
        results[recipient.index] = RecipientResult(recipient.index, outcome, reply_text(mail_reply))


def _completed(reply: Reply) -> bool:
    """Return whether ``reply`` is a 2xx, which RFC 5321 section 4.2.1 reads as success by its first digit.

    A client acts on the first digit of a code it does not expect, so a 251
    or 252 to RCPT accepts the recipient and a 251 to the end of data
    delivers.  Taking such a reply as a failure would send the message again.
    """
    return 200 <= reply.code < 300


def _raise_on_421(reply: Reply) -> None:
    # RFC 5321 section 3.8: 421 means the server is closing the session.
    if reply.code == 421:
        raise SessionError(reply_text(reply))


def _unsafe(text: str) -> bool:
    return "\r" in text or "\n" in text or "\0" in text


def _needs_smtputf8(message: OutboundMessage) -> bool:
    if message.smtputf8:
        return True
    return not message.sender.isascii() or any(not r.address.isascii() for r in message.recipients)


def _size_limit(capabilities: dict[str, list[str]]) -> int:
    values = capabilities.get("SIZE", [])
    if values and values[0].isdigit():
        return int(values[0])
    return 0


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 section 4 xtext (``+HH`` hex escapes); invalid escapes stay as they are."""
    out: list[str] = []
    position = 0
    while position < len(text):
        char = text[position]
        hex_digits = text[position + 1 : position + 3]
        if char == "+" and len(hex_digits) == 2 and all(c in "0123456789ABCDEFabcdef" for c in hex_digits):
            out.append(chr(int(hex_digits, 16)))
            position += 3
        else:
            out.append(char)
            position += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """Encode text as xtext: every octet outside ``!``..``~``, and ``+`` and ``=``, as ``+HH``."""
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def _orcpt_parameter(orcpt: str | None) -> str:
    """Return a safe ORCPT value ``addr-type;xtext`` re-encoded, or "" to leave it out."""
    if not orcpt or ";" not in orcpt:
        return ""
    address_type, _, value = orcpt.partition(";")
    if not address_type or not all(c.isascii() and (c.isalnum() or c == "-") for c in address_type):
        return ""
    return f"{address_type};{xtext_encode(xtext_decode(value))}"
