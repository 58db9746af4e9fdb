"""The SMTP client side of ``relay bench``: one connection and its transactions.

``Connection`` is an ``asyncio.Protocol`` that feeds the compiled reply
parser and wakes the session coroutine when the replies it waits for are
complete.  ``open_session`` connects, reads the greeting, sends EHLO and,
when asked, STARTTLS (RFC 3207) and AUTH PLAIN or LOGIN (RFC 4954).
``send_message`` runs one transaction with DATA or with a single
``BDAT n LAST`` chunk (RFC 3030).  With PIPELINING (RFC 2920), MAIL, every
RCPT and DATA go out in one write, and a BDAT chunk follows in that write.

Failures never raise out of this module: each one is counted in the
``RunStats`` by kind (``connect_refused``, ``greeting_timeout``, ``mail_4xx``, ...)
and the caller learns whether the connection can carry another message.
A 421 reply or a lost connection ends the connection; other rejections are
followed by RSET.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

from relay._errors import SMTPError
from relay._reply import Reply, ReplyParser, parse_ehlo
from relay.bench.messages import AddressPattern, EncodedMessage
from relay.bench.stats import RunStats


class SessionFailed(Exception):
    """The connection cannot be used any more; ``kind`` is the error counted.

    ``counted`` is True when the replies that explain the failure, such as
    a 421 before the server closed, are already counted as errors.
    """

    def __init__(self, kind: str, counted: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.counted = counted


@dataclass(frozen=True)
class ClientSettings:
    """Settings shared by every connection of a run, from the command line."""

    host: str
    """The target as given, also the server name that TLS verifies."""
    port: int
    address: str
    """The IP address that ``host`` resolved to once before the run."""
    helo: str
    sender: AddressPattern
    recipient: AddressPattern
    recipients: int
    pipelining: bool
    bdat: bool
    starttls: bool
    tls_context: ssl.SSLContext | None
    auth_user: str | None
    auth_password: str | None
    timeout: float


class Connection(asyncio.Protocol):
    """Bytes to and from one SMTP server, split into replies."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.wanted = 0
        self.failure: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        try:
            while (reply := self.parser.next_reply()) is not None:
                self.replies.append(reply)
        except SMTPError:
            self.failure = "malformed_reply"
            if self.transport is not None:
                self.transport.abort()
            self._wake()
            return
        if self.waiter is not None and len(self.replies) >= self.wanted:
            self._wake()

    def eof_received(self) -> bool:
        # Wake the reader at once: after a peer closes a TLS connection without
        # close_notify, connection_lost may come late or not at all.
        if self.failure is None:
            self.failure = "connection_lost"
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            self.failure = "connection_lost"
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write(self, data: bytes) -> None:
        """Send bytes; a closed connection fails at the next ``read``."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def read(self, count: int, timeout: float, stage: str) -> list[Reply]:
        """Return the next ``count`` replies; raise SessionFailed on timeout or loss.

        A timeout is counted as ``STAGE_timeout``, so the report shows where the server stalled.
        """
        while len(self.replies) < count:
            if self.failure is not None:
                raise SessionFailed(self.failure)
            waiter: asyncio.Future[None] = self.loop.create_future()
            self.waiter = waiter
            self.wanted = count
            timer = self.loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
            if waiter.result() is None and len(self.replies) < count and self.failure is None:
                raise SessionFailed(f"{stage}_timeout")
        replies = self.replies
        return [replies.popleft() for _ in range(count)]

    def close(self) -> None:
        """Close the connection without waiting."""
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _micros(start: float, end: float) -> int:
    return int((end - start) * 1_000_000)


def _classify(code: int) -> str:
    return "4xx" if code < 500 else "5xx"


class Session:
    """One open, greeted and (when asked) secured and authenticated connection."""

    def __init__(self, connection: Connection, settings: ClientSettings, stats: RunStats) -> None:
        self.connection = connection
        self.settings = settings
        self.stats = stats
        self.pipelining = False
        self.alive = True

    def record_reply(self, stage: str, reply: Reply) -> Reply:
        """Count a reply by stage and code; a 421 marks the connection as closing."""
        self.stats.count_reply(stage, reply.code)
        if reply.code == 421:
            self.alive = False
        return reply

    async def command(self, stage: str, line: bytes) -> Reply:
        """Send one command line (CRLF added) and return its counted reply."""
        self.connection.write(line + b"\r\n")
        (reply,) = await self.connection.read(1, self.settings.timeout, stage)
        return self.record_reply(stage, reply)

    async def ehlo(self) -> dict[str, list[str]]:
        reply = await self.command("ehlo", b"EHLO " + self.settings.helo.encode())
        if reply.code != 250:
            raise SessionFailed(f"ehlo_{_classify(reply.code)}")
        return parse_ehlo(reply)

    async def start_tls(self) -> None:
        reply = await self.command("starttls", b"STARTTLS")
        if reply.code != 220:
            raise SessionFailed(f"starttls_{_classify(reply.code)}")
        connection = self.connection
        assert connection.transport is not None and self.settings.tls_context is not None
        try:
            transport = await asyncio.wait_for(
                connection.loop.start_tls(
                    connection.transport, connection, self.settings.tls_context, server_hostname=self.settings.host
                ),
                self.settings.timeout,
            )
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            raise SessionFailed("tls_handshake") from exc
        if transport is None:
            raise SessionFailed("tls_handshake")
        connection.transport = transport

    async def authenticate(self, mechanisms: list[str]) -> None:
        user = (self.settings.auth_user or "").encode()
        password = (self.settings.auth_password or "").encode()
        offered = {mechanism.upper() for mechanism in mechanisms}
        if "PLAIN" in offered:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await self.command("auth", b"AUTH PLAIN " + token)
        elif "LOGIN" in offered:
            reply = await self.command("auth", b"AUTH LOGIN")
            if reply.code == 334:
                reply = await self.command("auth", base64.b64encode(user))
            if reply.code == 334:
                reply = await self.command("auth", base64.b64encode(password))
        else:
            raise SessionFailed("auth_not_offered")
        if reply.code != 235:
            raise SessionFailed(f"auth_{_classify(reply.code)}")

    async def rset(self) -> None:
        """Reset after a rejected transaction; a failed RSET ends the connection."""
        if not self.alive:
            return
        try:
            reply = await self.command("rset", b"RSET")
        except SessionFailed as failure:
            self.stats.count_error(failure.kind)
            self.alive = False
            return
        if reply.code != 250:
            self.alive = False

    async def quit(self, sent_already: bool = False) -> None:
        """Send QUIT (unless pipelined already), wait briefly for 221 and close."""
        connection = self.connection
        if self.alive:
            if not sent_already:
                connection.write(b"QUIT\r\n")
            try:
                (reply,) = await connection.read(1, self.settings.timeout, "quit")
                self.record_reply("quit", reply)
            except SessionFailed:
                # A server may close right after QUIT without 221; not a failure of any message.
                pass
        self.alive = False
        connection.close()


async def open_session(settings: ClientSettings, stats: RunStats) -> Session:
    """Connect, read the greeting, EHLO, and secure and authenticate when asked.

    Records the connect and greeting latencies; raises SessionFailed (already
    counted as an error) when any step fails.
    """
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        _, connection = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(loop), settings.address, settings.port), settings.timeout
        )
    except ConnectionRefusedError:
        stats.count_error("connect_refused")
        raise SessionFailed("connect_refused") from None
    except TimeoutError:
        stats.count_error("connect_timeout")
        raise SessionFailed("connect_timeout") from None
    except OSError as exc:
        kind = _connect_error_kind(exc)
        stats.count_error(kind)
        raise SessionFailed(kind) from None
    connected = time.perf_counter()
    stats.connections += 1
    stats.latency["connect"].record(_micros(started, connected))

    session = Session(connection, settings, stats)
    try:
        (greeting,) = await connection.read(1, settings.timeout, "greeting")
        stats.latency["greeting"].record(_micros(connected, time.perf_counter()))
        session.record_reply("greeting", greeting)
        if greeting.code != 220:
            raise SessionFailed(f"greeting_{_classify(greeting.code)}")
        capabilities = await session.ehlo()
        if settings.starttls:
            if "STARTTLS" not in capabilities:
                raise SessionFailed("starttls_not_offered")
            await session.start_tls()
            capabilities = await session.ehlo()
        if settings.auth_user is not None:
            await session.authenticate(capabilities.get("AUTH", []))
        if settings.bdat and "CHUNKING" not in capabilities:
            raise SessionFailed("chunking_not_offered")
        session.pipelining = settings.pipelining and "PIPELINING" in capabilities
    except SessionFailed as failure:
        stats.count_error(failure.kind)
        session.alive = False
        connection.close()
        raise
    return session


def _connect_error_kind(exc: OSError) -> str:
    """Name a failed connect by its errno symbol, such as ``connect_emfile`` for too many open files."""
    if isinstance(exc, socket.gaierror):
        # getaddrinfo's EAI_* codes are not errno values.
        return "connect_name_not_resolved"
    # errno.errorcode has no entry for 0, which is used here for a missing errno.
    name = errno.errorcode.get(exc.errno or 0)
    if name is None:
        return "connect_error"
    return f"connect_{name.lower()}"


def _envelope(settings: ClientSettings, number: int) -> tuple[bytes, list[bytes]]:
    sender = settings.sender.format(number)
    mail = f"MAIL FROM:<{sender}>".encode()
    rcpts = [f"RCPT TO:<{settings.recipient.format(number, index)}>".encode() for index in range(settings.recipients)]
    return mail, rcpts


async def send_message(session: Session, message: EncodedMessage, number: int, started: float, last: bool) -> bool:
    """Run one transaction; return True when the server accepted the message.

    ``started`` is when the transaction was due (the scheduled arrival in an
    open-loop run), so the transaction latency includes any time spent
    waiting for a connection.  ``last`` marks the connection's final
    message, and with PIPELINING the QUIT goes out in the same write.  Every
    failure is counted, and ``session.alive`` is False when the connection
    must close.
    """
    settings = session.settings
    stats = session.stats
    connection = session.connection
    mail, rcpts = _envelope(settings, number)
    try:
        if session.pipelining:
            outcome = await _pipelined_envelope(session, mail, rcpts, message, last)
        else:
            outcome = await _stepwise_envelope(session, mail, rcpts, message, last)
        if outcome is None:
            return False
        eod_started, reply, accepted = outcome
    except SessionFailed as failure:
        if not failure.counted:
            stats.count_error(failure.kind)
        session.alive = False
        connection.close()
        return False

    finished = time.perf_counter()
    stats.latency["end_of_data"].record(_micros(eod_started, finished))
    if reply.code == 250:
        stats.latency["transaction"].record(_micros(started, finished))
        stats.messages_sent += 1
        stats.recipients_sent += accepted
        stats.bytes_sent += message.octets
        return True
    stats.count_error(f"data_{_classify(reply.code)}")
    if last:
        session.alive = False
        connection.close()
    else:
        await session.rset()
    return False


async def _pipelined_envelope(
    session: Session, mail: bytes, rcpts: list[bytes], message: EncodedMessage, last: bool
) -> tuple[float, Reply, int] | None:
    settings = session.settings
    connection = session.connection
    quit_line = b"QUIT\r\n" if last else b""
    pieces = [mail, *rcpts]
    eod_started = 0.0
    if settings.bdat:
        pieces.append(b"BDAT %d LAST" % message.octets)
        connection.write(b"\r\n".join(pieces) + b"\r\n" + message.chunk + quit_line)
        eod_started = time.perf_counter()
    else:
        pieces.append(b"DATA")
        connection.write(b"\r\n".join(pieces) + b"\r\n")
    try:
        replies = await connection.read(len(pieces), settings.timeout, "mail")
    except SessionFailed as failure:
        _count_partial_replies(session, list(connection.replies), len(rcpts), failure)
        raise

    mail_reply = session.record_reply("mail", replies[0])
    for reply in replies[1:-1]:
        session.record_reply("rcpt", reply)
    accepted = _count_rcpts(session, replies[1:-1], mail_reply.code == 250)
    final = session.record_reply("end_of_data" if settings.bdat else "data", replies[-1])
    if mail_reply.code != 250:
        session.stats.count_error(f"mail_{_classify(mail_reply.code)}")
    elif accepted == 0:
        session.stats.count_error("no_recipient_accepted")

    if settings.bdat:
        if mail_reply.code == 250 and accepted:
            return eod_started, final, accepted
        await _abandon(session, last, quit_sent=True)
        return None
    if final.code != 354:
        if mail_reply.code == 250 and accepted:
            session.stats.count_error(f"data_command_{_classify(final.code)}")
        await _abandon(session, last, quit_sent=False)
        return None
    if mail_reply.code != 250 or accepted == 0:
        # RFC 2920: after a 354 with no valid recipient the client sends only the dot.
        connection.write(b".\r\n")
        (reply,) = await connection.read(1, settings.timeout, "end_of_data")
        session.record_reply("end_of_data", reply)
        await _abandon(session, last, quit_sent=False)
        return None
    connection.write(message.data + quit_line)
    eod_started = time.perf_counter()
    (reply,) = await connection.read(1, settings.timeout, "end_of_data")
    return eod_started, session.record_reply("end_of_data", reply), accepted


async def _stepwise_envelope(
    session: Session, mail: bytes, rcpts: list[bytes], message: EncodedMessage, last: bool
) -> tuple[float, Reply, int] | None:
    settings = session.settings
    connection = session.connection
    reply = await session.command("mail", mail)
    if reply.code != 250:
        session.stats.count_error(f"mail_{_classify(reply.code)}")
        await _abandon(session, last, quit_sent=False)
        return None
    accepted = 0
    for rcpt in rcpts:
        accepted += _count_rcpts(session, [await session.command("rcpt", rcpt)], True)
        if not session.alive:
            break
    if accepted == 0:
        session.stats.count_error("no_recipient_accepted")
        await _abandon(session, last, quit_sent=False)
        return None
    if settings.bdat:
        connection.write(b"BDAT %d LAST\r\n" % message.octets + message.chunk)
        eod_started = time.perf_counter()
        (reply,) = await connection.read(1, settings.timeout, "end_of_data")
        return eod_started, session.record_reply("end_of_data", reply), accepted
    reply = await session.command("data", b"DATA")
    if reply.code != 354:
        session.stats.count_error(f"data_command_{_classify(reply.code)}")
        await _abandon(session, last, quit_sent=False)
        return None
    connection.write(message.data)
    eod_started = time.perf_counter()
    (reply,) = await connection.read(1, settings.timeout, "end_of_data")
    return eod_started, session.record_reply("end_of_data", reply), accepted


def _count_partial_replies(session: Session, replies: list[Reply], rcpt_count: int, failure: SessionFailed) -> None:
    """Count the replies to a pipelined batch that arrived before the connection failed.

    A server may reply 421 to any command of the batch and close (RFC 5321
    section 3.8).  That reply then counts as the error of its stage, and
    the lost connection that follows it is not counted again.
    """
    # The same stage and error names as a complete batch.  The reply to
    # BDAT LAST is the end-of-data reply, and the reply to DATA is 354 or a
    # rejection of the command.
    if session.settings.bdat:
        last_stage, last_error = "end_of_data", "data"
    else:
        last_stage, last_error = "data", "data_command"
    mail_accepted = True
    for position, reply in enumerate(replies):
        if position == 0:
            session.record_reply("mail", reply)
            mail_accepted = reply.code == 250
            if not mail_accepted:
                session.stats.count_error(f"mail_{_classify(reply.code)}")
        elif position <= rcpt_count:
            session.record_reply("rcpt", reply)
            _count_rcpts(session, [reply], mail_accepted)
        else:
            session.record_reply(last_stage, reply)
            # After a rejected MAIL, a rejected DATA is only a sequence error.
            if reply.code >= 400 and mail_accepted:
                session.stats.count_error(f"{last_error}_{_classify(reply.code)}")
    if replies and replies[-1].code == 421 and failure.kind == "connection_lost":
        failure.counted = True
    if failure.kind.endswith("_timeout"):
        # Name the stage of the first reply that did not come.
        if not replies:
            stage = "mail"
        elif len(replies) <= rcpt_count:
            stage = "rcpt"
        else:
            stage = last_stage
        failure.kind = f"{stage}_timeout"


def _count_rcpts(session: Session, replies: list[Reply], mail_accepted: bool) -> int:
    """Tally RCPT replies already counted by code; return how many were accepted."""
    # After a rejected MAIL the RCPT replies are sequence errors (503), not
    # recipient rejections, so only the MAIL error is counted.
    accepted = 0
    stats = session.stats
    for reply in replies:
        if reply.code == 250 or reply.code == 251:
            accepted += 1
            stats.recipients_accepted += 1
        elif mail_accepted:
            stats.recipients_rejected += 1
            stats.count_error(f"rcpt_{_classify(reply.code)}")
    return accepted


async def _abandon(session: Session, last: bool, quit_sent: bool) -> None:
    """Finish a failed transaction: RSET to go on, or close when it was the last."""
    if last:
        await session.quit(sent_already=quit_sent)
    else:
        await session.rset()
