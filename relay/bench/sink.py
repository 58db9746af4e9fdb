"""The SMTP session of ``relay sink``: accept every message, count it, keep nothing.

The protocol feeds the compiled input buffer and command parser and sends
the replies to a pipelined batch in one write (RFC 2920).  It offers PIPELINING, SIZE,
8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING (RFC 3030), AUTH PLAIN and
LOGIN (any credentials are accepted, because the sink only measures), and
STARTTLS (RFC 3207) when a certificate is configured.  Message bodies are
counted but never stored: DATA runs with a storage limit of zero octets, so
the buffer only scans for end of data, and BDAT chunks are read unstored.
There is no size limit, and bare LF or CR in a message is not rejected.

Fault injection (``relay.bench.faults``) can replace the greeting and the
replies to MAIL, RCPT and end of data with a 4xx or 5xx reply, or close the
connection instead of replying.  After an injected greeting failure the sink
closes the connection.  ``delay`` postpones every reply by that many seconds,
keeping their order.

A connection that sends nothing for ``timeout`` seconds (default
``DEFAULT_TIMEOUT``), between commands or in the middle of DATA or a BDAT
chunk, gets ``421 4.4.2`` and is closed, and the ``timeouts`` counter
counts it.  The idle clock restarts on every read and stops while a reply
postponed by ``delay`` is pending, so only the client's silence counts.
A STARTTLS handshake must finish within one timeout (plus ``delay``); one
that does not is aborted without a reply, because the client expects TLS
records by then, and counted as a timeout too.

Replies are paced: a connection stops being read while its unsent replies
(in the transport's write buffer, or postponed by ``delay``) exceed
``max_unsent_replies`` octets (default ``DEFAULT_MAX_UNSENT_REPLIES``), and
the commands already read wait in the input buffer.  So a client that
pipelines commands but never reads its replies uses a bounded amount of
the sink's memory, and the idle timeout closes it in the end, because
nothing is read from it meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
from dataclasses import dataclass
from typing import cast

from relay._buffer import BareLineEnd, BdatChunk, DataEnd, Line, LineTooLong, SMTPBuffer
from relay._errors import SMTPError
from relay._parser import Command, parse_command
from relay.bench.faults import REPLIES, STAGES, FaultChooser, FaultPlan
from relay.smtp import replies

# Counter slots, so that several worker processes can add theirs in one array.
CONNECTIONS, MESSAGES, BYTES, RECIPIENTS, COMMANDS, REJECTED, TIMEOUTS = range(7)
COUNTER_NAMES: tuple[str, ...] = (
    "connections",
    "messages",
    "bytes",
    "recipients",
    "commands",
    "rejected",
    "timeouts",
)
FAULT_NAMES: tuple[str, ...] = tuple(f"{stage}_{kind}" for stage in STAGES for kind in ("4xx", "5xx", "drop"))
FAULT_BASE = len(COUNTER_NAMES)
COUNTER_SLOTS = FAULT_BASE + len(FAULT_NAMES)
_FAULT_INDEX = {name: FAULT_BASE + index for index, name in enumerate(FAULT_NAMES)}

# AUTH needs longer lines than commands: RFC 4954 section 4 allows 12288
# octets for a response line.
AUTH_LINE_LIMIT = 12288

# Seconds a connection may stay silent before the sink closes it.  Postfix's
# smtp-sink uses the same default for its -t option (Postfix 3.7 manual).
DEFAULT_TIMEOUT = 100.0
# Octets of unsent replies above which a connection is no longer read: the
# default high-water mark of the write buffer in asyncio (3.11) and uvloop (0.23).
DEFAULT_MAX_UNSENT_REPLIES = 64 * 1024
# Replies produced from buffered input before the unsent total is checked.
# An EHLO reply, the longest, is 137 octets with the default host name and
# under 400 with any, so a batch adds at most about 25 KiB beyond the limit.
REPLY_BATCH = 64
# Seconds added to a re-armed idle timer, because uvloop (0.23) rounds timer
# delays to whole milliseconds and so may fire one just before its deadline.
TIMER_SLACK = 0.01

_OK = b"250 2.0.0 Ok\r\n"
_MAIL_OK = b"250 2.1.0 Sender ok\r\n"
_RCPT_OK = b"250 2.1.5 Recipient ok\r\n"
_DATA_GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_QUEUED = b"250 2.0.0 Ok: message discarded by sink\r\n"
_CHUNK_OK = b"250 2.0.0 Chunk received\r\n"
_BYE = b"221 2.0.0 Bye\r\n"
_BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
_NESTED_MAIL = b"503 5.5.1 Sender already given\r\n"
_NEED_MAIL = b"503 5.5.1 MAIL first\r\n"
_NO_RECIPIENT = b"554 5.5.1 No valid recipients\r\n"
_LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
_TLS_GO = b"220 2.0.0 Ready to start TLS\r\n"
_TLS_UNAVAILABLE = b"454 4.7.0 TLS not available\r\n"
_AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
_AUTH_CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
_AUTH_BAD_BASE64 = b"501 5.5.2 Invalid base64 data\r\n"
_AUTH_UNKNOWN = b"504 5.5.4 Unrecognized authentication mechanism\r\n"
_AUTH_USERNAME = b"334 VXNlcm5hbWU6\r\n"
_AUTH_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"
_AUTH_EMPTY_CHALLENGE = b"334 \r\n"
_VRFY = b"252 2.0.0 Cannot verify the user\r\n"
_EXPN = b"502 5.5.1 EXPN not supported\r\n"
_HELP = b"214 2.0.0 relay sink accepts and discards every message\r\n"
_TIMEOUT = replies.TIMEOUT.wire


@dataclass(frozen=True)
class SinkSettings:
    """Settings shared by every session of one sink."""

    hostname: str
    faults: FaultPlan
    delay: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    tls_context: ssl.SSLContext | None = None
    max_unsent_replies: int = DEFAULT_MAX_UNSENT_REPLIES

    def greeting(self) -> bytes:
        return f"220 {self.hostname} ESMTP relay sink\r\n".encode()

    def ehlo_reply(self, tls_offered: bool) -> bytes:
        keywords = ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"]
        if tls_offered:
            keywords.append("STARTTLS")
        keywords.append("AUTH PLAIN LOGIN")
        lines = [self.hostname, *keywords]
        return b"".join(f"250-{line}\r\n".encode() for line in lines[:-1]) + f"250 {lines[-1]}\r\n".encode()


class SinkState:
    """State shared by the sessions of one process: settings, counters, fault draws."""

    def __init__(self, settings: SinkSettings, worker: int = 0) -> None:
        self.settings = settings
        self.counters = [0] * COUNTER_SLOTS
        self.chooser: FaultChooser = settings.faults.chooser(worker)
        self.greeting = settings.greeting()
        self.ehlo_plain = settings.ehlo_reply(settings.tls_context is not None)
        self.ehlo_secure = settings.ehlo_reply(False)
        self.helo = f"250 {settings.hostname}\r\n".encode()
        self.sessions: set[SinkProtocol] = set()


class SinkProtocol(asyncio.Protocol):
    """One client connection to the sink."""

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.counters = state.counters
        self.chooser = state.chooser
        self.delay = state.settings.delay
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = SMTPBuffer()
        self.has_sender = False
        self.recipients = 0
        self.chunk_octets = 0
        self.chunk_last = False
        # Reply owed for a BDAT chunk that is read but rejected.
        self.chunk_error_reply: bytes | None = None
        self.auth_step = ""
        self.authenticated = False
        self.secure = False
        self.closing = False
        self.upgrading = False
        self.timeout = state.settings.timeout
        # Event loop time of the last read, or of the last postponed reply
        # sent; the idle timer compares against it when it fires.
        self.last_activity = 0.0
        # Replies postponed by ``delay`` and not yet written, and their octets.
        self.pending_writes = 0
        self.postponed_octets = 0
        self.max_unsent = state.settings.max_unsent_replies
        # Why reading is paused: "write" (the write buffer is over its
        # high-water mark) and "delay" (postponed replies over the limit).
        self.pause_reasons: set[str] = set()
        self.idle_timer: asyncio.TimerHandle | None = None

    # Connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.max_unsent)
        self.state.sessions.add(self)
        self.counters[CONNECTIONS] += 1
        self.last_activity = self.loop.time()
        self.idle_timer = self.loop.call_later(self.timeout, self._check_idle)
        fault = self.chooser.choose("connect")
        if fault is not None:
            self._inject("connect", fault, [])
            return
        self._send([self.state.greeting])

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.sessions.discard(self)
        self.closing = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def data_received(self, data: bytes) -> None:
        # This clock read is all that the idle timeout costs per read.
        self.last_activity = self.loop.time()
        if self.closing:
            return
        self.buffer.feed(data)
        self._process()

    def _process(self) -> None:
        """Handle the buffered input and send the replies, stopping early while reading is paused."""
        buffer = self.buffer
        out: list[bytes] = []
        while not self.closing:
            if len(out) >= REPLY_BATCH:
                self._send(out)
                out = []
                if self.pause_reasons:
                    # The rest stays buffered until the client reads its replies.
                    return
            event = buffer.next_event()
            if event is None:
                break
            kind = type(event)
            if kind is Line:
                assert isinstance(event, Line)
                self._line(event.line, out)
            elif kind is DataEnd:
                assert isinstance(event, DataEnd)
                self._message_end(event.octets, out)
            elif kind is BdatChunk:
                assert isinstance(event, BdatChunk)
                self._chunk_end(event.octets, out)
            elif kind is LineTooLong:
                out.append(_LINE_TOO_LONG)
            else:
                # BareLineEnd: the sink accepts bare line ends in DATA.
                assert isinstance(event, BareLineEnd)
        if out and not self.closing:
            self._send(out)

    # Replies

    def _send(self, out: list[bytes], close: bool = False) -> None:
        payload = out[0] if len(out) == 1 else b"".join(out)
        if self.delay > 0:
            self.pending_writes += 1
            self.postponed_octets += len(payload)
            if self.postponed_octets > self.max_unsent:
                self._pause("delay")
            self.loop.call_later(self.delay, self._write_postponed, payload, close)
        else:
            self._write(payload, close)

    def _write_postponed(self, payload: bytes, close: bool) -> None:
        # The client waited for this reply, so its idle time starts now.
        self.pending_writes -= 1
        self.postponed_octets -= len(payload)
        self.last_activity = self.loop.time()
        self._write(payload, close)
        if self.postponed_octets <= self.max_unsent:
            self._resume("delay")

    def _write(self, payload: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(payload)
        if close:
            transport.close()

    # Pacing

    def pause_writing(self) -> None:
        self._pause("write")

    def resume_writing(self) -> None:
        self._resume("write")

    def _pause(self, reason: str) -> None:
        if not self.pause_reasons and self.transport is not None and not self.upgrading:
            self.transport.pause_reading()
        self.pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self.pause_reasons:
            return
        self.pause_reasons.discard(reason)
        transport = self.transport
        if self.pause_reasons or transport is None or transport.is_closing() or self.upgrading:
            return
        transport.resume_reading()
        # Called from the transport's write path, so the buffered commands are handled after it returns.
        self.loop.call_soon(self._process_buffered)

    def _process_buffered(self) -> None:
        if not self.pause_reasons and not self.closing:
            self._process()

    # Idle timeout

    def _check_idle(self) -> None:
        """Close the connection if it sent nothing for ``timeout`` seconds, else re-arm.

        Reads only store their time, so the timer runs once per timeout
        period instead of being rescheduled on every read.
        """
        self.idle_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        if self.pending_writes or self.upgrading:
            # The client is not idle while a postponed reply is due.  During
            # STARTTLS, start_tls enforces its own handshake timeout instead.
            self.last_activity = now
        idle = now - self.last_activity
        if idle < self.timeout:
            self.idle_timer = self.loop.call_later(self.timeout - idle + TIMER_SLACK, self._check_idle)
            return
        self.counters[TIMEOUTS] += 1
        self.closing = True
        transport.write(_TIMEOUT)
        if transport.get_write_buffer_size():
            # The client does not read its replies, so closing gracefully
            # would wait for it forever.
            transport.abort()
        else:
            transport.close()

    def _inject(self, stage: str, fault: str, out: list[bytes]) -> None:
        """Reply with an injected fault.  A drop or a greeting failure closes the connection."""
        self.counters[_FAULT_INDEX[f"{stage}_{fault}"]] += 1
        self.closing = fault == "drop" or stage == "connect"
        if fault != "drop":
            out.append(REPLIES[stage, fault])
            self.counters[REJECTED] += 1
        if self.closing:
            if out:
                self._send(out, close=True)
            else:
                assert self.transport is not None
                self.transport.close()
            out.clear()

    # Commands

    def _line(self, line: bytes, out: list[bytes]) -> None:
        self.counters[COMMANDS] += 1
        if self.auth_step:
            self._auth_response(line, out)
            return
        try:
            command = parse_command(line)
        except SMTPError as error:
            out.append(error.reply())
            return
        handler = _HANDLERS[command.verb]
        handler(self, command, out)

    def _reset(self) -> None:
        self.has_sender = False
        self.recipients = 0
        self.chunk_octets = 0

    def _ehlo(self, command: Command, out: list[bytes]) -> None:
        self._reset()
        out.append(self.state.ehlo_secure if self.secure else self.state.ehlo_plain)

    def _helo(self, command: Command, out: list[bytes]) -> None:
        self._reset()
        out.append(self.state.helo)

    def _mail(self, command: Command, out: list[bytes]) -> None:
        if self.has_sender:
            out.append(_NESTED_MAIL)
            return
        fault = self.chooser.choose("mail")
        if fault is not None:
            self._inject("mail", fault, out)
            return
        self.has_sender = True
        out.append(_MAIL_OK)

    def _rcpt(self, command: Command, out: list[bytes]) -> None:
        if not self.has_sender:
            out.append(_NEED_MAIL)
            return
        fault = self.chooser.choose("rcpt")
        if fault is not None:
            self._inject("rcpt", fault, out)
            return
        self.recipients += 1
        out.append(_RCPT_OK)

    def _data(self, command: Command, out: list[bytes]) -> None:
        if not self.has_sender:
            out.append(_NEED_MAIL)
        elif not self.recipients:
            out.append(_NO_RECIPIENT)
        else:
            out.append(_DATA_GO)
            # A storage limit of zero: the buffer counts octets but keeps none.
            self.buffer.start_data(0)

    def _bdat(self, command: Command, out: list[bytes]) -> None:
        size = command.chunk_size or 0
        if not self.has_sender:
            self.chunk_error_reply = _NEED_MAIL
        elif not self.recipients:
            self.chunk_error_reply = _NO_RECIPIENT
        else:
            self.chunk_error_reply = None
        self.chunk_last = command.last
        # RFC 3030 section 2: a refused chunk is still read to its end.
        self.buffer.start_bdat(size, store=False)

    def _message_end(self, octets: int, out: list[bytes]) -> None:
        fault = self.chooser.choose("data")
        recipients = self.recipients
        self._reset()
        if fault is not None:
            self._inject("data", fault, out)
            return
        counters = self.counters
        counters[MESSAGES] += 1
        counters[BYTES] += octets
        counters[RECIPIENTS] += recipients
        out.append(_QUEUED)

    def _chunk_end(self, octets: int, out: list[bytes]) -> None:
        if self.chunk_error_reply is not None:
            out.append(self.chunk_error_reply)
            self.chunk_octets = 0
            if self.chunk_last:
                self._reset()
            return
        self.chunk_octets += octets
        if not self.chunk_last:
            out.append(_CHUNK_OK)
            return
        total = self.chunk_octets
        self.chunk_octets = 0
        self._message_end(total, out)

    def _rset(self, command: Command, out: list[bytes]) -> None:
        self._reset()
        out.append(_OK)

    def _noop(self, command: Command, out: list[bytes]) -> None:
        out.append(_OK)

    def _quit(self, command: Command, out: list[bytes]) -> None:
        out.append(_BYE)
        self.closing = True
        self._send(out, close=True)
        out.clear()

    def _vrfy(self, command: Command, out: list[bytes]) -> None:
        out.append(_VRFY)

    def _expn(self, command: Command, out: list[bytes]) -> None:
        out.append(_EXPN)

    def _help(self, command: Command, out: list[bytes]) -> None:
        out.append(_HELP)

    def _starttls(self, command: Command, out: list[bytes]) -> None:
        context = self.state.settings.tls_context
        if context is None or self.secure:
            out.append(_TLS_UNAVAILABLE if context is None else _BAD_SEQUENCE)
            return
        out.append(_TLS_GO)
        self._send(out)
        out.clear()
        # RFC 3207 section 4.2: bytes pipelined after STARTTLS are discarded.
        self.buffer.discard()
        self.closing = True
        self.upgrading = True
        self.loop.create_task(self._upgrade(context))

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        # With --delay the client sees the 220 reply that late, so it starts
        # the handshake that much later.
        handshake_timeout = self.timeout + self.delay
        try:
            upgraded = await self.loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=handshake_timeout
            )
        except ConnectionAbortedError:
            # What start_tls raises when the handshake outlasts its timeout.
            self.counters[TIMEOUTS] += 1
            upgraded = None
        except (OSError, ssl.SSLError, ConnectionError):
            upgraded = None
        self.upgrading = False
        if upgraded is None:
            transport.abort()
            return
        self.transport = upgraded
        upgraded.set_write_buffer_limits(high=self.max_unsent)
        # The write buffer of the new transport starts empty.
        self.pause_reasons.discard("write")
        if self.pause_reasons:
            upgraded.pause_reading()
        self.last_activity = self.loop.time()
        self.secure = True
        self.authenticated = False
        self._reset()
        self.closing = False

    def _auth(self, command: Command, out: list[bytes]) -> None:
        if self.authenticated or self.has_sender:
            out.append(_BAD_SEQUENCE)
            return
        mechanism = command.mechanism
        response = command.initial_response
        if mechanism == "PLAIN":
            if response is None:
                self.auth_step = "plain"
                self.buffer.line_limit = AUTH_LINE_LIMIT
                out.append(_AUTH_EMPTY_CHALLENGE)
            else:
                self._auth_response(response.encode(), out, "plain")
        elif mechanism == "LOGIN":
            if response is None:
                self.auth_step = "login-user"
                self.buffer.line_limit = AUTH_LINE_LIMIT
                out.append(_AUTH_USERNAME)
            else:
                self._auth_response(response.encode(), out, "login-user")
        else:
            out.append(_AUTH_UNKNOWN)

    def _auth_response(self, line: bytes, out: list[bytes], step: str | None = None) -> None:
        """Take one AUTH response line; every well-formed credential is accepted."""
        step = step or self.auth_step
        self.auth_step = ""
        self.buffer.line_limit = 512
        if line == b"*":
            out.append(_AUTH_CANCELLED)
            return
        if line != b"=":
            try:
                base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                out.append(_AUTH_BAD_BASE64)
                return
        if step == "login-user":
            self.auth_step = "login-password"
            self.buffer.line_limit = AUTH_LINE_LIMIT
            out.append(_AUTH_PASSWORD)
            return
        self.authenticated = True
        out.append(_AUTH_OK)


_HANDLERS = {
    "EHLO": SinkProtocol._ehlo,
    "HELO": SinkProtocol._helo,
    "MAIL": SinkProtocol._mail,
    "RCPT": SinkProtocol._rcpt,
    "DATA": SinkProtocol._data,
    "BDAT": SinkProtocol._bdat,
    "RSET": SinkProtocol._rset,
    "NOOP": SinkProtocol._noop,
    "QUIT": SinkProtocol._quit,
    "VRFY": SinkProtocol._vrfy,
    "EXPN": SinkProtocol._expn,
    "HELP": SinkProtocol._help,
    "STARTTLS": SinkProtocol._starttls,
    "AUTH": SinkProtocol._auth,
}
