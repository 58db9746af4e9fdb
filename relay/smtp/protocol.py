"""The asyncio Protocol that connects one socket to one sans-IO ``Session``.

It only moves bytes and runs what the session asks for: ``data_received``
feeds the session, and everything the session queued in response goes out in
one ``write`` (so replies to a pipelined group share one packet).  Events
that need waiting (storing a message, checking a password, the TLS
handshake) run as tasks, with reading paused until they finish so a client
cannot pile up input meanwhile.  Reading also pauses while more than
``server.max_unsent_replies`` octets of replies are unsent (the transport's
high-water mark, set on the plain transport, on the implicit-TLS one and on
the one STARTTLS returns), so a client that never reads its replies cannot
grow memory.  Reading resumes once the unsent replies drop to a quarter of
the limit, the transport's low-water mark.  After each write the session
learns how many octets the transport has not sent, so buffered commands
stop too: at most the limit plus one reply is unsent, and the reply sent
on closing.
NOTE: a TLS transport's buffer size leaves out the encrypted replies
buffered in the TCP transport beneath it, so the limit does not count them.
With asyncio (Python 3.11) that measured up to about twice the limit more.

Timeouts: ``server.command_timeout`` between commands and
``server.data_timeout`` between reads inside DATA or BDAT (defaults from
RFC 5321 section 4.5.3.2), ``421 4.4.2`` when one runs out.  The clock
starts when the relay has handled a read, not when the read arrived, and
does not run while the session waits for the spool or the password check.  When
the session closes, the transport first sends the replies still unsent, so
a client that does not read them could hold the connection open for as
long as it stays connected.  ``server.close_timeout`` bounds that wait:
the transport is then aborted and ``close_timeout`` logged.  A connection
keeps the values in force when it opened, through any reload.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from relay.log import log_event
from relay.smtp import replies
from relay.smtp.replies import Reply
from relay.smtp.session import Session
from relay.smtp.tls import handshake_failure_reason
from relay.smtp.transaction import CheckCredentials, Close, MessageReady, Rejected, StartTLS

if TYPE_CHECKING:
    from relay.smtp.server import ListenerRuntime

logger = logging.getLogger("relay.smtp")


def connection_error_reason(error: Exception) -> str:
    """Return the error that ended a session, in a few words for the log.

    For a TLS error that is OpenSSL's reason code, such as
    ``SSLV3_ALERT_HANDSHAKE_FAILURE`` when the client sent that alert, which
    OpenSSL 3.0 clients send after the server rejects their renegotiation.
    """
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return str(error) or type(error).__name__


class SMTPProtocol(asyncio.Protocol):
    """One client connection; created by the listener for each accept."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.client_address = "-"
        self.session_id = runtime.next_session_id()
        # The pending spool commit, AUTH check or TLS handshake, if any.
        self._task: asyncio.Future[Any] | None = None
        self._pause_reasons: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._started = 0.0
        self._tls = False
        self._counted = False
        self._lost = False  # connection_lost has run
        self._timer_in_data = False  # whether the timer runs on data_timeout
        self._greeting_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._handshaking = False  # a STARTTLS handshake runs
        self._loss_deferred = False  # connection_lost came during that handshake
        # The [server] settings when the connection opened: a reload applies
        # its timeouts and limits to connections accepted after it.
        self._server_config = runtime.config.server
        self._max_unsent_replies = self._server_config.max_unsent_replies

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._limit_unsent_replies(self.transport)
        peer = self.transport.get_extra_info("peername")
        self.client_address = str(peer[0]) if peer else "-"
        self._tls = self.transport.get_extra_info("sslcontext") is not None
        self._started = time.monotonic()
        runtime = self.runtime
        session = Session(
            runtime.settings, runtime.policy, self.client_address, session_id=self.session_id
        )
        self.session = session
        refusal = runtime.admit(self)
        if refusal is None:
            self._counted = True
        log_event(
            logger,
            "connect",
            session=self.session_id,
            client=self.client_address,
            listener=runtime.name,
            tls=self._tls,
        )
        if self._tls:
            # An implicit-TLS connection: the handshake has completed.
            self._log_tls(self.transport)
        if refusal is not None:
            session.refuse(refusal)
        else:
            delay = self._server_config.greeting_delay
            session.start(delay_greeting=delay > 0)
            if delay > 0 and not session.privileged:
                self._greeting_timer = runtime.loop.call_later(delay, self._greet)
        self._last_activity = time.monotonic()
        self._schedule_timer()
        self._flush()

    def _greet(self) -> None:
        self._greeting_timer = None
        # The client's command timeout starts with the greeting, not with the connection.
        self._last_activity = time.monotonic()
        if self.session is not None:
            self.session.greet()
            self._flush()

    def data_received(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        session.receive_data(data)
        self._flush()
        # The idle clock starts once the read is handled, because running a
        # read of pipelined commands can take longer than a short
        # command_timeout, and that time is the relay's, not the client's.
        self._last_activity = time.monotonic()

    def eof_received(self) -> bool:
        # The client half-closed: nothing more can arrive, so end the session.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshaking:
            # The event loop may report the loss before start_tls returns, as
            # uvloop does on a handshake timeout.  _start_tls calls this method
            # once start_tls has returned, so disconnect follows tls_failed.
            self._loss_deferred = True
            return
        if self._lost:
            return
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
        if self._greeting_timer is not None:
            self._greeting_timer.cancel()
        if self._close_timer is not None:
            self._close_timer.cancel()
        session = self.session
        if self._counted:
            self._counted = False
            self.runtime.release(self)
        if session is not None:
            # A spool commit still in flight finishes on its own task: the message
            # stays queued although this client never sees the 250.
            fields: dict[str, Any] = {
                "session": self.session_id,
                "client": self.client_address,
                "messages": session.messages,
                "errors": session.errors,
                "seconds": round(time.monotonic() - self._started, 3),
                "commands": _format_counters(session.counters),
            }
            if exc is not None:
                fields["error"] = connection_error_reason(exc)
            log_event(logger, "disconnect", **fields)
        self.transport = None

    def pause_writing(self) -> None:
        self._pause("write")

    def resume_writing(self) -> None:
        self._resume("write")
        session = self.session
        transport = self.transport
        if session is not None and transport is not None and session.output_full:
            session.count_unsent(transport.get_write_buffer_size())
            session.resume_input()
            self._flush()

    # -- shutdown hooks used by the server -----------------------------------

    def shutdown(self) -> None:
        """Ask the session to end: now if idle, after its current message otherwise."""
        if self.session is not None and self.transport is not None:
            self.session.shutdown()
            self._flush()

    def abort(self) -> None:
        """End the session now unless a message is being stored.

        A session that has already ended, but whose replies are still
        unsent, loses its connection at once instead of after close_timeout.
        So does one in a STARTTLS handshake, which carries no message and
        cannot take a plaintext 421: _start_tls then logs ``tls_failed``.
        """
        session = self.session
        transport = self.transport
        if session is None or transport is None:
            return
        if session.closed or self._handshaking:
            transport.abort()
            return
        if session.waiting and self._task is not None and not self._task.done():
            return
        session.abort()
        self._flush()

    @property
    def closing(self) -> bool:
        """Whether the session has ended and the connection stays open only to send the last replies."""
        return self.session is not None and self.session.closed

    @property
    def busy(self) -> bool:
        """Whether a spool commit, a password check or a TLS handshake runs (the server waits for these)."""
        return self._task is not None and not self._task.done()

    # -- internals -----------------------------------------------------------

    def _flush(self) -> None:
        """Write queued replies in one write and run the queued events."""
        session = self.session
        transport = self.transport
        if session is None or transport is None:
            return
        while True:
            out = session.data_to_send()
            events = session.events()
            if out:
                transport.write(out)
            unsent = transport.get_write_buffer_size()
            session.count_unsent(unsent)
            if not events:
                if session.output_full and self._can_take_replies(unsent):
                    session.resume_input()
                    continue
                if self._timer is not None and session.in_data != self._timer_in_data:
                    # Entering or leaving DATA: the other timeout applies from now on.
                    self._timer.cancel()
                    self._schedule_timer()
                return
            for event in events:
                if isinstance(event, Rejected):
                    self._log_reject(event)
                elif isinstance(event, Close):
                    self._close(transport)
                    return
                elif isinstance(event, MessageReady):
                    if not self.runtime.store_inline(session, event, self.client_address, self.session_id):
                        self._start_store(event)
                elif isinstance(event, CheckCredentials):
                    self._start_task(self._check_credentials(event))
                elif isinstance(event, StartTLS):
                    # Read nothing more as plaintext: the next bytes are the ClientHello.
                    self._pause("tls")
                    self._start_task(self._start_tls())

    def _close(self, transport: asyncio.Transport) -> None:
        # close() waits until the unsent replies are written, which for a
        # client that reads nothing is never.  The timer runs on every close
        # because a TLS transport's buffer size leaves out what its TCP
        # transport holds.
        transport.close()
        if self._close_timer is None:
            timeout = self._server_config.close_timeout
            self._close_timer = self.runtime.loop.call_later(timeout, self._abort_unsent, transport, timeout)

    def _abort_unsent(self, transport: asyncio.Transport, timeout: float) -> None:
        self._close_timer = None
        if self._lost:
            return
        log_event(
            logger,
            "close_timeout",
            logging.WARNING,
            session=self.session_id,
            client=self.client_address,
            unsent=transport.get_write_buffer_size(),
            seconds=timeout,
        )
        transport.abort()

    def _start_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self._pause("wait")
        self._task = self.runtime.loop.create_task(coroutine)

    def _start_store(self, event: MessageReady) -> None:
        # The reply waits in a done callback of the commit's future.  A task per
        # message would cost its creation and two steps on the loop.
        session = self.session
        assert session is not None
        started = self.runtime.start_store(event, self.client_address, self.session_id)
        if isinstance(started, Reply):
            session.message_stored(started)
            return
        commit, size = started
        self._pause("wait")
        self._task = commit
        commit.add_done_callback(lambda future: self._stored(event, future, size))

    def _stored(self, event: MessageReady, commit: asyncio.Future[str], size: int) -> None:
        if commit.cancelled():
            return
        reply = self.runtime.finish_store(event, self.client_address, self.session_id, commit, size)
        self._resume("wait")
        session = self.session
        if self.transport is not None and session is not None:
            session.message_stored(reply)
            self._flush()

    async def _check_credentials(self, event: CheckCredentials) -> None:
        session = self.session
        assert session is not None
        user, reply = await self.runtime.check_credentials(event, self.client_address, self.session_id)
        self._resume("wait")
        if self.transport is not None:
            session.credentials_checked(user, reply)
            self._flush()

    async def _start_tls(self) -> None:
        session = self.session
        transport = self.transport
        context = self.runtime.ssl_context
        assert session is not None and context is not None
        if transport is None:
            return  # the client was gone before the upgrade started
        loop = asyncio.get_running_loop()
        error: OSError | None = None
        new_transport: asyncio.Transport | None = None
        self._handshaking = True
        try:
            new_transport = await loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._server_config.tls_handshake_timeout,
            )
        except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError among them
            error = exc
        finally:
            self._handshaking = False
        # When the connection closes without an error during the handshake,
        # asyncio's start_tls returns None but uvloop 0.23 returns a transport.
        # Only a completed handshake gives that transport an ssl_object.
        if new_transport is None or new_transport.get_extra_info("ssl_object") is None:
            log_event(
                logger,
                "tls_failed",
                logging.WARNING,
                session=self.session_id,
                client=self.client_address,
                error=handshake_failure_reason(error),
            )
            transport.abort()
            # tls_failed has named the error, so the disconnect line leaves it out.
            self.connection_lost(None)
            return
        self.transport = new_transport
        self._limit_unsent_replies(new_transport)
        self._tls = True
        self._log_tls(new_transport)
        if self._loss_deferred:
            # The connection closed between the end of the handshake and now.
            self.connection_lost(None)
            return
        self._pause_reasons.discard("tls")
        self._resume("wait")
        self._last_activity = time.monotonic()
        session.tls_started()
        self._flush()

    def _can_take_replies(self, unsent: int) -> bool:
        # Over the limit the transport calls pause_writing, and resume_writing
        # runs the held-back commands once it has drained.
        return "write" not in self._pause_reasons and unsent <= self._max_unsent_replies

    def _limit_unsent_replies(self, transport: asyncio.Transport) -> None:
        # The TLS transport that STARTTLS returns has limits of its own (512 KiB
        # in asyncio and uvloop 0.23), so each new transport gets the limit.
        transport.set_write_buffer_limits(high=self._max_unsent_replies)

    def _log_tls(self, transport: asyncio.Transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        log_event(
            logger,
            "tls",
            session=self.session_id,
            client=self.client_address,
            version=ssl_object.version() if ssl_object else None,
            cipher=ssl_object.cipher()[0] if ssl_object and ssl_object.cipher() else None,
        )

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons and self.transport is not None:
            self.transport.pause_reading()
        self._pause_reasons.add(reason)

    def _resume(self, reason: str) -> None:
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _schedule_timer(self) -> None:
        session = self.session
        assert session is not None
        server = self._server_config
        self._timer_in_data = session.in_data
        timeout = server.data_timeout if session.in_data else server.command_timeout
        delay = max(0.0, self._last_activity + timeout - time.monotonic())
        self._timer = self.runtime.loop.call_later(delay + 0.01, self._on_timer)

    def _on_timer(self) -> None:
        # Rather than re-arming a timer on every read, the timer checks the time
        # of the last read and re-arms itself for the remainder.
        self._timer = None
        session = self.session
        if session is None or self.transport is None or session.closed:
            return
        server = self._server_config
        timeout = server.data_timeout if session.in_data else server.command_timeout
        waiting = session.waiting or self._greeting_timer is not None
        if waiting or time.monotonic() - self._last_activity < timeout:
            if waiting:
                self._last_activity = time.monotonic()
            self._schedule_timer()
            return
        log_event(logger, "timeout", session=self.session_id, client=self.client_address, in_data=session.in_data)
        session.timeout()
        self._flush()

    def _log_reject(self, event: Rejected) -> None:
        reply = event.reply
        log_event(
            logger,
            "reject",
            session=self.session_id,
            client=self.client_address,
            command=event.command,
            reply=f"{reply.code} {reply.status} {reply.text}",
        )
        if reply is replies.AUTH_FAILED:
            self.runtime.note_auth_failure(self.client_address)


def _format_counters(counters: dict[str, int]) -> str:
    return " ".join(f"{name}={count}" for name, count in counters.items())
