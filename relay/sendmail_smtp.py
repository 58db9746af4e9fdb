"""``relay sendmail -bs``: SMTP on standard input and output for a local program.

PHP's Symfony Mailer and SwiftMailer run ``sendmail -bs`` by default, as
do some mail clients: they speak SMTP to the command's standard input and
read the replies from its standard output, as with Postfix's stand-alone
smtpd.  The same sans-IO ``Session`` as a network listener reads the
commands, so the replies, limits and enhanced status codes are the ones
the SMTP server gives.  The policy is that of ``relay sendmail``:

- The client is the local user, trusted like a client on
  ``policy.trusted_networks``, so it may send to any domain and pipeline
  past DATA.  Unknown local users get ``550 5.1.1`` at RCPT.  A local user
  whose Maildir folder the caller cannot look up gets 250, and delivery,
  which runs as the relay's user, decides.
- MAIL sets the reverse-path and RCPT the forward-paths, with their
  ESMTP parameters (SIZE, BODY, SMTPUTF8, RET, ENVID, NOTIFY, ORCPT), so
  ``-f``, ``-N``, ``-R``, ``-V``, ``-B`` and ``-i`` have no effect.
  ``-F NAME`` is the display name of a From field that relay adds.
  Addresses need a domain, as SMTP requires; a bare user name gets
  ``501``, not the domain that ``relay sendmail`` appends.
- ``policy.max_message_size``, ``policy.max_recipients``,
  ``policy.max_line_length``, ``server.max_errors``,
  ``server.command_timeout`` and ``server.data_timeout`` apply.
- Lines of message data may end in a bare LF, which is stored as CRLF, as
  ``relay sendmail`` stores them.  Only CRLF ``.`` CRLF ends DATA.
- EHLO offers PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES,
  CHUNKING and DSN, but neither STARTTLS nor AUTH.

Each message is stored as ``relay sendmail`` stores it.  Bcc is removed,
a bare user name in an address field gets a domain, Date, Message-ID and
From are added when missing, and a Received header
names the EHLO name and the user ID.  A message with 8-bit octets is
stored with the body type 8BITMIME.  It goes into the spool with a blocking commit, and the
``250`` after the end of data is written only once that commit is durable.
A failed commit gets ``452 4.3.1`` and the session goes on.

Exit status: 0 after QUIT, or after end of input between transactions;
``EX_TEMPFAIL`` (75) when a commit failed, the spool cannot be opened
(the greeting is then ``421 4.3.0``) or a timeout ended the session;
``EX_PROTOCOL`` (76) when input ended inside a mail transaction (that
message is not queued) or the session was closed for a protocol error;
``EX_CONFIG`` (78) for an invalid config file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
from typing import TextIO

from relay.config import Config, ListenerConfig
from relay.log import log_event
from relay.sendmail import (
    _config_file,
    _load_config,
    _require_spool,
    complete_local_message,
    local_body_type,
    separate_body,
)
from relay.sendmail_options import EX_CONFIG, EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_USAGE, Options, SendmailError
from relay.smtp import replies
from relay.smtp.envelope import spool_envelope
from relay.smtp.policy import RelayPolicy
from relay.smtp.received import local_received_header
from relay.smtp.replies import Reply
from relay.smtp.session import Session, SessionSettings
from relay.smtp.transaction import Close, MessageReady
from relay.spool import Spool, SpoolError, new_queue_id
from relay.units import format_duration

logger = logging.getLogger("relay.sendmail")

# Octets read from standard input at a time.
READ_SIZE = 65536


def local_settings(config: Config) -> SessionSettings:
    """Return the session settings for ``-bs``: the config's limits, no STARTTLS, no AUTH."""
    # The limits are those of an MX listener without TLS or AUTH.
    listener = ListenerConfig(role="mx", tls="none")
    settings = SessionSettings.from_config(config, listener, tls_ready=False, auth_ready=False)
    # relay sendmail stores LF-ended input with CRLF, and the client is
    # the local user, whom no smuggled message could deceive.
    return dataclasses.replace(settings, bare_lf="normalize")


class StdioSession:
    """One ``-bs`` session: moves bytes between the file descriptors and the ``Session``, and stores messages."""

    def __init__(
        self, config: Config, spool: Spool, input_fd: int, output_fd: int, stderr: TextIO, full_name: str | None
    ) -> None:
        self.config = config
        self.full_name = full_name
        self.stderr = stderr
        self.spool = spool
        self.input_fd = input_fd
        self.output_fd = output_fd
        # As relay sendmail without -bs, a recipient whose Maildir folder cannot be
        # looked up gets 250, and delivery decides (see relay.sendmail_addresses).
        policy = RelayPolicy(config, accept_on_lookup_error=True)
        self.session = Session(local_settings(config), policy, "local", session_id=f"uid{os.getuid()}", trusted=True)
        self.close_reason: str | None = None
        self.spool_failures = 0
        self.output_lost = False
        # Whether the client sent any input, and the config key of the timeout that ended the session.
        self.received_input = False
        self.expired_timeout: str | None = None

    def run(self) -> int:
        """Serve commands until QUIT, end of input or a closing reply; return the exit status."""
        session = self.session
        session.start()
        self._flush()
        while self.close_reason is None and not self.output_lost:
            server = self.config.server
            timeout = server.data_timeout if session.in_data else server.command_timeout
            readable, _, _ = select.select([self.input_fd], [], [], timeout)
            if not readable:
                key = "server.data_timeout" if session.in_data else "server.command_timeout"
                self.expired_timeout = f"{key} ({format_duration(timeout)})"
                session.timeout()
                self._flush()
                break
            data = os.read(self.input_fd, READ_SIZE)
            if not data:
                return self._end_of_input()
            self.received_input = True
            session.receive_data(data)
            self._flush()
        return self._status()

    def _status(self) -> int:
        if self.output_lost:
            print("sendmail: standard output closed; the SMTP client is gone", file=self.stderr)
            return EX_PROTOCOL
        reason = self.close_reason
        if reason == "quit" and not self.spool_failures:
            return EX_OK
        if self.spool_failures:
            print(f"sendmail: the spool failed to store {self.spool_failures} message(s); try again later",
                  file=self.stderr)
            return EX_TEMPFAIL
        if reason == "timeout":
            sent = "no more input" if self.received_input else "nothing"
            print(f"sendmail: timed out: the SMTP client sent {sent} within {self.expired_timeout}",
                  file=self.stderr)
            return EX_TEMPFAIL
        print(f"sendmail: the SMTP session was closed: {reason}", file=self.stderr)
        return EX_PROTOCOL

    def _end_of_input(self) -> int:
        session = self.session
        if session.transaction is not None or session.in_data:
            sender = session.transaction.sender if session.transaction is not None else ""
            print(f"sendmail: standard input ended inside the mail transaction from <{sender}>;"
                  " that message was not queued", file=self.stderr)
            return EX_PROTOCOL
        if self.spool_failures:
            return self._status()
        return EX_OK

    def _flush(self) -> None:
        """Write the queued replies, then run the queued events until none is left."""
        session = self.session
        while True:
            self._write(session.data_to_send())
            events = session.events()
            if not events:
                if session.output_full:
                    # The replies were written, so the commands that the session
                    # held back at server.max_unsent_replies can run now.
                    session.resume_input()
                    continue
                return
            for event in events:
                if isinstance(event, Close):
                    self.close_reason = event.reason
                elif isinstance(event, MessageReady):
                    # Stored before the reply is queued: the 250 means the message is durable.
                    session.message_stored(self._store(event))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.output_lost:
            try:
                written = os.write(self.output_fd, view)
            except BrokenPipeError:
                self.output_lost = True
                return
            view = view[written:]

    def _store(self, event: MessageReady) -> Reply:
        """Store one message as ``relay sendmail`` would; return the 250 with its queue ID, or a 452."""
        spool = self.spool
        transaction = event.transaction
        sender = transaction.sender
        body = event.body
        if body and not body.endswith(b"\r\n"):
            # A BDAT message may lack the final line end that relay sendmail adds.
            body += b"\r\n"
        message = complete_local_message(separate_body(body), sender, self.config, self.full_name)

        queue_id = new_queue_id()
        recipients = [info.address for info in transaction.recipients]
        trace = local_received_header(
            helo_name=event.helo_name,
            hostname=self.config.server.hostname,
            uid=os.getuid(),
            protocol=event.protocol,
            queue_id=queue_id,
            recipients=recipients,
        )
        # Local mail has no client address, and 8-bit octets decide the body type as for relay sendmail.
        envelope = dataclasses.replace(
            spool_envelope(event, None),
            body_type=local_body_type(message, transaction.body_type),
            local_submission=True,
        )

        try:
            stored_id = spool.commit_blocking(envelope, trace + message, queue_id=queue_id)
        except SpoolError as exc:
            self.spool_failures += 1
            log_event(logger, "spool_error", logging.ERROR, uid=os.getuid(), error=str(exc))
            return replies.STORAGE_FAILURE

        log_event(
            logger,
            "received",
            queue_id=stored_id,
            sender=sender,
            recipients=len(recipients),
            size=len(trace) + len(message),
            uid=os.getuid(),
            protocol=event.protocol,
        )
        return replies.queued(stored_id)


def serve_stdio(options: Options, input_fd: int, output_fd: int, stderr: TextIO) -> int:
    """Run ``-bs``: load the config, open the spool and serve one SMTP session on the descriptors."""
    if options.recipients or options.extract_recipients or options.flush:
        raise SendmailError(
            EX_USAGE, "-bs reads the recipients from RCPT commands, so it takes no recipient arguments, -t or -q"
        )
    config_file = _config_file(options)
    config = _load_config(config_file, stderr)
    if config is None:
        _refuse(output_fd)
        return EX_CONFIG
    try:
        if config_file is None:
            _require_spool(config.spool.path)
        spool = Spool.from_config(config.spool)
    except SendmailError as exc:
        print(f"sendmail: {exc}", file=stderr)
        _refuse(output_fd)
        return exc.status
    except SpoolError as exc:
        # The SpoolError text names the spool and the cause already.
        print(f"sendmail: {exc}; try again later", file=stderr)
        _refuse(output_fd)
        return EX_TEMPFAIL
    try:
        return StdioSession(config, spool, input_fd, output_fd, stderr, options.full_name).run()
    finally:
        spool.close()


def _refuse(output_fd: int) -> None:
    """Write the ``421 4.3.0`` greeting, a temporary failure, so the SMTP client tries again later."""
    try:
        os.write(output_fd, replies.LOCAL_SUBMISSION_UNAVAILABLE.encode())
    except OSError:
        pass  # the client is gone, and the error is already on stderr
