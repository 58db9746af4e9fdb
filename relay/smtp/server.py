"""Listeners, worker processes and graceful shutdown for ``relay serve`` and ``relay sink``.

Each ``[[listener]]`` becomes one listening socket per worker process, bound
with SO_REUSEPORT so the kernel spreads connections over the workers.
Before the workers start, the supervisor locks each listener's address
(``relay.listener_lock``), so that a second relay started on one of them
exits with an error instead of taking a share of the connections.
``server.workers`` processes run (default: one per CPU); with one worker the
server runs in the calling process.  The delivery scheduler runs in worker 0
when there is one worker, and otherwise in a delivery process of its own
(``relay.delivery.process``) that the workers wake after their commits.  Every worker has its own event loop
(uvloop unless ``asyncio`` is chosen), its own spool writer and its own
connection counters, so ``server.max_connections`` and
``server.max_connections_per_client`` are divided evenly between workers
(rounded up): a per-process count cannot see the other workers' clients.

Roles: ``mx`` and ``submission`` store each message with ``Spool.commit`` and
reply ``250`` only once it is durable; a ``SpoolError`` becomes
``452 4.3.1``.  ``sink`` accepts every recipient and discards every message,
counting messages, recipients and octets; it opens no spool.

Signals: the first SIGTERM or SIGINT stops accepting, sends ``421 4.3.2`` to
idle sessions, lets messages already in DATA or BDAT finish for up to
``server.shutdown_grace`` seconds, then ends the rest with ``421 4.3.2``,
waits for commits in flight and closes the spool.  A connection whose session
has ended but whose client has not read the last replies does not hold up
the stop: it is aborted, as is one whose STARTTLS handshake still runs.  A
second signal exits at once; committed messages are safe because the spool
is durable at each 250.
Unhandled event-loop exceptions are logged as ``loop_exception`` errors,
except a plain listener's failed accept for lack of resources under the
``asyncio`` loop, which is logged as ``accept_failed`` and rate-limited as
``relay.smtp.implicit`` describes.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay import metrics
from relay.admin import Monitoring
from relay.config import Config, ListenerConfig
from relay.delivery import Scheduler
from relay.delivery.process import DeliveryProcess, WakeChannel, WakeSender
from relay.entry import SERVE_SIGNALS
from relay.listener_lock import ListenerLocks
from relay.log import RepeatCounter, flush_log, log_event
from relay.notify import DirectReports, Notifier, Reports, SupervisorReports
from relay.reload import ReloadResult, check_files, log_reload, reload_config
from relay.reload_status import ReloadTracker, config_fingerprint
from relay.signals import StopRequests, SupervisorLink, hold_signals, install_loop_handlers
from relay.smtp import replies
from relay.smtp.auth import CredentialsError, CredentialStore
from relay.smtp.envelope import spool_envelope
from relay.smtp.implicit import ACCEPT_FAILURE_LOG_INTERVAL, ImplicitTLSListener, log_accept_failure
from relay.smtp.policy import RelayPolicy
from relay.smtp.protocol import SMTPProtocol
from relay.smtp.received import received_header
from relay.smtp.replies import Reply
from relay.smtp.session import Session, SessionSettings
from relay.smtp.tls import TLSSetupError, server_context
from relay.smtp.transaction import CheckCredentials, MessageReady
from relay.spool import Spool, SpoolError, new_queue_id
from relay.spool.store import SpoolStore
from relay.units import format_host_port

logger = logging.getLogger("relay.smtp")

# Postfix: the default listen backlog of its master for smtpd is 100; a busy
# MX sees bursts larger than that, so this follows the kernel's usual cap.
LISTEN_BACKLOG = 4096
# Characters of the attempted user name that an auth_failed line keeps, as
# Postfix 3.7's smtpd logs at most 100 of sasl_username for a failed login.
# The name is kept because it shows which accounts are being guessed, though
# a password typed into the user-name field is logged with it.
MAX_LOGGED_USER_LENGTH = 100


@dataclass
class SinkCounters:
    """What a sink listener swallowed in this worker."""

    messages: int = 0
    recipients: int = 0
    octets: int = 0


@dataclass
class ConnectionCounts:
    """Open connections of one worker, in total and per client address."""

    total: int = 0
    per_client: dict[str, int] = field(default_factory=dict)
    # Connections of implicit-TLS listeners whose handshake is still running
    # (see relay.smtp.implicit): not yet sessions, but open connections too.
    handshakes: int = 0
    handshakes_per_client: dict[str, int] = field(default_factory=dict)


def _add_for_client(counts: dict[str, int], client: str, change: int) -> None:
    """Add ``change`` to the count of ``client``, dropping the entry when it reaches zero."""
    count = counts.get(client, 0) + change
    if count > 0:
        counts[client] = count
    else:
        counts.pop(client, None)


class ListenerRuntime:
    """What the sessions of one listener share inside one worker."""

    def __init__(
        self,
        config: Config,
        listener: ListenerConfig,
        *,
        policy: RelayPolicy,
        spool: Spool | None,
        credentials: CredentialStore | None,
        ssl_context: ssl.SSLContext | None,
        counts: ConnectionCounts,
        auth_failures: dict[str, int],
        workers: int,
        sessions: set[SMTPProtocol],
        prefix: str,
    ) -> None:
        self.config = config
        self.listener = listener
        self.name = listener.address_text
        self.policy = policy
        self.spool = spool
        self.credentials = credentials
        self.ssl_context = ssl_context
        self.settings = SessionSettings.from_config(
            config, listener, tls_ready=ssl_context is not None, auth_ready=credentials is not None
        )
        self.counts = counts
        self.auth_failures = auth_failures
        self.max_connections = math.ceil(config.server.max_connections / workers)
        self.max_per_client = math.ceil(config.server.max_connections_per_client / workers)
        self.sessions = sessions
        self.sink = SinkCounters()
        self.accepting = True
        # Called after each stored message to wake the scheduler, in-process or through the delivery pipe.
        self.on_stored: Callable[[], None] | None = None
        self._ids = itertools.count(1)
        self._prefix = prefix
        # The worker's loop, kept because asyncio.get_running_loop makes a getpid
        # system call on each call in Python 3.11.
        self.loop = asyncio.get_running_loop()

    def next_session_id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    def apply(self, config: Config, policy: RelayPolicy, credentials: CredentialStore | None, workers: int) -> None:
        """Use a reloaded config for sessions that start from now on."""
        self.config = config
        self.policy = policy
        self.credentials = credentials
        self.settings = SessionSettings.from_config(
            config, self.listener, tls_ready=self.ssl_context is not None, auth_ready=credentials is not None
        )
        self.max_connections = math.ceil(config.server.max_connections / workers)
        self.max_per_client = math.ceil(config.server.max_connections_per_client / workers)

    # -- connection accounting ----------------------------------------------

    def admit(self, protocol: SMTPProtocol) -> Reply | None:
        """Count a new connection, or return the 421 that refuses it."""
        if not self.accepting:
            return replies.SERVICE_UNAVAILABLE
        counts = self.counts
        client = protocol.client_address
        if counts.total >= self.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        # Trusted networks are exempt, as Postfix exempts $mynetworks
        # (smtpd_client_event_limit_exceptions): application servers that
        # hand their mail to this relay open many connections on purpose.
        if counts.per_client.get(client, 0) >= self.max_per_client and not self.policy.is_trusted(client):
            return replies.TOO_MANY_FROM_CLIENT
        counts.total += 1
        _add_for_client(counts.per_client, client, 1)
        self.sessions.add(protocol)
        return None

    def admit_handshake(self, client: str) -> Reply | None:
        """Count a connection that starts its TLS handshake, or return the 421 that refuses it.

        Connections in their handshake are limited by the same numbers as
        sessions, but counted apart from them.  A client over the limits of
        ``admit`` still completes its handshake and reads the 421 there.
        Clients that stall their handshakes cannot hold more connections
        than the limits allow.
        """
        if not self.accepting:
            return replies.SERVICE_UNAVAILABLE
        counts = self.counts
        if counts.handshakes >= self.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        in_handshake = counts.handshakes_per_client.get(client, 0)
        if in_handshake >= self.max_per_client and not self.policy.is_trusted(client):
            return replies.TOO_MANY_FROM_CLIENT
        counts.handshakes += 1
        _add_for_client(counts.handshakes_per_client, client, 1)
        return None

    def release_handshake(self, client: str) -> None:
        counts = self.counts
        counts.handshakes -= 1
        _add_for_client(counts.handshakes_per_client, client, -1)

    def release(self, protocol: SMTPProtocol) -> None:
        counts = self.counts
        counts.total -= 1
        _add_for_client(counts.per_client, protocol.client_address, -1)
        self.sessions.discard(protocol)

    # -- messages --------------------------------------------------------------

    def store_inline(self, session: Session, event: MessageReady, client: str, session_id: str) -> bool:
        """Finish a message without waiting when the listener is a sink; return whether it did."""
        if self.spool is not None:
            return False
        self.sink.messages += 1
        self.sink.recipients += len(event.transaction.recipients)
        self.sink.octets += len(event.body)
        session.message_stored(replies.queued("sink"))
        return True

    def start_store(
        self, event: MessageReady, client: str, session_id: str
    ) -> tuple[asyncio.Future[str], int] | Reply:
        """Prepend the Received header and queue the message for the spool.

        Returns the future of its queue ID and the stored size, for
        ``finish_store``, or the ``452`` reply when the spool rejects the
        message at once.
        """
        spool = self.spool
        assert spool is not None
        transaction = event.transaction
        queue_id = new_queue_id()
        header = received_header(
            helo_name=event.helo_name,
            client_address=client,
            hostname=self.config.server.hostname,
            protocol=event.protocol,
            queue_id=queue_id,
            recipients=[r.address for r in transaction.recipients],
        )
        envelope = spool_envelope(event, client)
        # With other clients connected, their messages may join this commit's transaction.
        may_wait = self.counts.total > 1
        try:
            future = spool.submit_commit(
                envelope, header + event.body, loop=self.loop, queue_id=queue_id, may_wait=may_wait
            )
        except SpoolError as exc:
            return self._storage_failure(exc, client, session_id)
        return future, len(header) + len(event.body)

    def finish_store(
        self, event: MessageReady, client: str, session_id: str, commit: asyncio.Future[str], size: int
    ) -> Reply:
        """Log the outcome of a finished commit and return the reply for it.

        Raises the commit's exception when it is not a SpoolError.
        """
        try:
            stored_id = commit.result()
        except SpoolError as exc:
            return self._storage_failure(exc, client, session_id)
        if self.on_stored is not None:
            self.on_stored()
        transaction = event.transaction
        log_event(
            logger,
            "queued",
            queue_id=stored_id,
            session=session_id,
            sender=transaction.sender,
            recipients=len(transaction.recipients),
            size=size,
            client=client,
            protocol=event.protocol,
        )
        return replies.queued(stored_id)

    def _storage_failure(self, exc: SpoolError, client: str, session_id: str) -> Reply:
        log_event(logger, "spool_error", logging.ERROR, session=session_id, client=client, error=str(exc))
        return replies.STORAGE_FAILURE

    # -- AUTH --------------------------------------------------------------------

    def note_auth_failure(self, client: str) -> None:
        self.auth_failures[client] = self.auth_failures.get(client, 0) + 1

    async def check_credentials(
        self, event: CheckCredentials, client: str, session_id: str
    ) -> tuple[str | None, Reply | None]:
        """Verify credentials off the loop; delay the answer after repeated failures."""
        store = self.credentials
        assert store is not None
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(None, store.verify, event.user, event.password)
        except CredentialsError as exc:
            log_event(logger, "auth_error", logging.ERROR, session=session_id, client=client, error=str(exc))
            return None, replies.AUTH_TEMPORARY_FAILURE
        if ok:
            # The failure count stays: a success proves only that the client knows
            # one password, and clearing it would let a client with an account of
            # its own guess other users' passwords without the delay.
            log_event(
                logger, "auth", session=session_id, client=client, mechanism=event.mechanism, user=event.user
            )
            return event.user, None
        log_event(
            logger,
            "auth_failed",
            logging.WARNING,
            session=session_id,
            client=client,
            mechanism=event.mechanism,
            user=_shortened(event.user, MAX_LOGGED_USER_LENGTH),
        )
        auth = self.config.auth
        if self.auth_failures.get(client, 0) + 1 > auth.failures_before_delay:
            await asyncio.sleep(auth.failure_delay)
        return None, replies.AUTH_FAILED


def _shortened(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters, with "..." appended when cut; log_event escapes it."""
    return text if len(text) <= limit else text[:limit] + "..."


def install_event_loop(kind: str) -> None:
    """Make new event loops uvloop ones, unless ``kind`` is ``asyncio``."""
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())


# The errors for which asyncio's accept loop (Python 3.11, selector_events)
# calls the exception handler with the listening ``socket`` and tries again a
# second later.
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Failed accepts of the plain listeners in this process, by listening address.
# NOTE: uvloop (0.23) calls no handler for them: libuv accepts and
# closes the waiting connections itself while out of file descriptors, so
# under uvloop a plain listener's clients are dropped without a log line.
# And asyncio schedules one retry per failed accept, so a worker that stops
# within a second of a failure logs a ``loop_exception`` for each retry that
# finds the listening socket closed.
_accept_failures: dict[str, RepeatCounter] = {}


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exception = context.get("exception")
    listening = context.get("socket")
    if isinstance(exception, OSError) and exception.errno in _ACCEPT_RESOURCE_ERRORS and listening is not None:
        address = _socket_address(listening)
        failures = _accept_failures.setdefault(address, RepeatCounter(ACCEPT_FAILURE_LOG_INTERVAL))
        log_accept_failure(failures, address, exception)
        return
    log_event(
        logger,
        "loop_exception",
        logging.ERROR,
        message=context.get("message", ""),
        error=repr(exception) if exception is not None else None,
    )


def _socket_address(sock: Any) -> str:
    """Return a listening socket's address as the listener's name, ``HOST:PORT``."""
    try:
        host, port = sock.getsockname()[:2]
    except (OSError, ValueError, TypeError):
        return "unknown"
    return format_host_port(str(host), int(port))


class Worker:
    """One worker process: its listeners, sessions and shutdown sequence."""

    def __init__(
        self,
        config: Config,
        *,
        workers: int,
        index: int,
        wake: WakeChannel | None = None,
        supervisor: SupervisorLink | None = None,
        reports: Reports | None = None,
    ) -> None:
        self.config = config
        self.workers = workers
        self.index = index
        self._supervisor = supervisor
        # Readiness and reload reports: to systemd when this worker is the main process, else to the supervisor.
        self._reports = reports or Reports()
        # Set when the scheduler runs in a delivery process: commits wake it through this pipe.
        self.wake = wake
        self._wake_sender: WakeSender | None = None
        self.sessions: set[SMTPProtocol] = set()
        self.runtimes: list[ListenerRuntime] = []
        self.servers: list[asyncio.AbstractServer | ImplicitTLSListener] = []
        self.spool: Spool | None = None
        self._stop = asyncio.Event()
        self._stop_requests = StopRequests()
        self.scheduler: Scheduler | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_loop_exception)
        config = self.config
        if uses_spool(config):
            try:
                self.spool = Spool.from_config(config.spool)
            except SpoolError as exc:
                log_event(logger, "spool_error", logging.ERROR, error=str(exc))
                return 1
        try:
            await self._listen()
        except OSError as exc:
            log_event(logger, "listen_failed", logging.ERROR, error=str(exc))
            await self._close_spool()
            return 1
        if self.index == 0:
            # No reload yet: the config of the start is in force.
            metrics.config_reload_applied.set(1.0)
        # Started before READY=1, so that a monitoring check sent as soon as
        # systemd counts the relay as up finds the admin listener.
        monitoring = await self._start_admin()
        # The listeners accept connections, and since run_worker called
        # hold_signals a SIGHUP or SIGTERM waits, blocked, instead of ending
        # the worker.  Reporting here, before install_loop_handlers releases
        # a held stop or reload, keeps READY=1 ahead of STOPPING=1 and RELOADING=1.
        self._reports.ready()
        install_loop_handlers(
            loop,
            on_stop=self._on_signal,
            on_reload=self._on_reload,
            on_supervisor_gone=self._on_supervisor_gone,
            supervisor=self._supervisor,
        )
        log_event(
            logger,
            "started",
            worker=self.index,
            pid=os.getpid(),
            listeners=[f"{r.name}/{r.listener.role}/{r.listener.tls}" for r in self.runtimes],
        )
        delivering = self._start_delivery(loop)
        await self._stop.wait()
        if self.scheduler is not None and delivering is not None:
            await self.scheduler.stop()
            await delivering
        await self._shutdown()
        if monitoring is not None:
            await monitoring.stop()
        return 0

    def _start_delivery(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None] | None:
        """Wire the listeners to the scheduler; start it when it runs here, and return its task."""
        config = self.config
        # One scheduler per relay: in the delivery process when there is one
        # (several workers), else in worker 0.
        if self.wake is not None:
            sender = self.wake.sender(loop)
            self._wake_sender = sender
            for runtime in self.runtimes:
                runtime.on_stored = sender
        delivering_here = (
            self.spool is not None and self.wake is None and self.index == 0 and config.delivery.enabled
        )
        scheduler = Scheduler(config, self.spool) if delivering_here and self.spool is not None else None
        self.scheduler = scheduler
        delivering = loop.create_task(scheduler.run()) if scheduler is not None else None
        if scheduler is not None:
            for runtime in self.runtimes:
                runtime.on_stored = scheduler.wake
        return delivering

    async def _start_admin(self) -> Monitoring | None:
        """Start metrics snapshots in every worker and the admin listener in worker 0."""
        if not self.config.admin.address:
            return None
        monitoring = Monitoring(
            self.config,
            self.index,
            accepting=lambda: not self._stop.is_set() and any(r.accepting for r in self.runtimes),
            workers=self.workers,
        )
        await monitoring.start()
        return monitoring

    def _on_reload(self) -> None:
        if self._stop.is_set():
            # A config applied now would reach only listeners that no longer accept and a stopped scheduler.
            log_event(logger, "reload_ignored", logging.DEBUG, worker=self.index, reason="stopping")
            return
        applied = False
        try:
            applied = self._reports.run_reload(self._reload, lambda: config_fingerprint(self.config))
        finally:
            # Also after an unexpected error, which leaves the old config in force.  With
            # several processes the admin listener sets it from every process's outcome.
            if self.workers == 1:
                metrics.config_reload_applied.set(1.0 if applied else 0.0)

    def _reload(self) -> bool:
        """Re-read the config file and apply it; return whether it was applied.

        A config that the listeners or the scheduler cannot use is rejected
        as a whole, with one ``reload_failed`` line, and the old config stays
        in force in both.
        """
        result = reload_config(self.config)
        if result.config is not None:
            error = self._apply_config(result.config)
            if error is not None:
                # The file passed its checks, so each process logs its own error at error level.
                result = ReloadResult(None, [error], file_errors=False)
        log_reload(result, self.config.source, self.index, summarized=self._supervisor is not None)
        if result.config is None:
            return False
        self.config = result.config
        return True

    def _apply_config(self, config: Config) -> str | None:
        """Hand a reloaded config to the scheduler, then to the listeners; return why it was rejected, or None."""
        policy = RelayPolicy(config)
        try:
            credentials = CredentialStore(config.auth.password_file) if config.auth.password_file else None
        except CredentialsError as exc:
            return str(exc)
        context = self.runtimes[0].ssl_context if self.runtimes else None
        if context is not None and config.tls.cert:
            # Certificate rotation, also of files replaced under the same names,
            # builds a new context.  OpenSSL keeps one certificate per key type in
            # a context, so loading an RSA chain into a running ECDSA one would go
            # on serving the old ECDSA certificate.  Each STARTTLS and implicit-TLS
            # handshake reads runtime.ssl_context as it starts.
            try:
                context = server_context(config.tls)
            except TLSSetupError as exc:
                return f"TLS: {exc}"
        if self.scheduler is not None:
            # apply_config builds everything before it changes anything, so
            # after a failure the scheduler, like the listeners, keeps the old config.
            try:
                self.scheduler.apply_config(config)
            except Exception as exc:
                return f"the scheduler cannot use it: {type(exc).__name__}: {exc}"
        for runtime in self.runtimes:
            runtime.ssl_context = context
            runtime.apply(config, policy, credentials, self.workers)
        return None

    async def _listen(self) -> None:
        config = self.config
        policy = RelayPolicy(config)
        credentials = CredentialStore(config.auth.password_file) if config.auth.password_file else None
        context = server_context(config.tls)
        counts = ConnectionCounts()
        # Failed AUTH attempts per client address, shared by the listeners.
        # NOTE: entries are never removed, so a client that fails from very many
        # addresses (an IPv6 prefix) grows this until the worker stops.
        auth_failures: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        for number, listener in enumerate(config.listeners):
            runtime = ListenerRuntime(
                config,
                listener,
                policy=policy,
                spool=None if listener.role == "sink" else self.spool,
                credentials=credentials,
                ssl_context=context,
                counts=counts,
                auth_failures=auth_failures,
                workers=self.workers,
                sessions=self.sessions,
                prefix=f"{os.getpid():x}.{number}.",
            )
            server: asyncio.AbstractServer | ImplicitTLSListener
            if listener.tls == "implicit":
                # Not create_server(ssl=...), which drops failed handshakes without a word.
                server = ImplicitTLSListener(runtime, LISTEN_BACKLOG)
            else:
                host, port = listener.address
                server = await loop.create_server(
                    _factory(runtime),
                    host=host,
                    port=port,
                    reuse_port=True,
                    backlog=LISTEN_BACKLOG,
                )
                for sock in server.sockets:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.runtimes.append(runtime)
            self.servers.append(server)

    def _on_signal(self, signum: int) -> None:
        if self._stop_requests.receive(signum, logger, worker=self.index, sessions=len(self.sessions)):
            self._reports.stopping()
            self._stop.set()

    def _on_supervisor_gone(self) -> None:
        log_event(logger, "supervisor_gone", logging.ERROR, worker=self.index, sessions=len(self.sessions))
        self._stop.set()

    async def _shutdown(self) -> None:
        if self._wake_sender is not None:
            self._wake_sender.stop()
        for runtime in self.runtimes:
            runtime.accepting = False
        for server in self.servers:
            server.close()
        for protocol in list(self.sessions):
            protocol.shutdown()
        deadline = time.monotonic() + self.config.server.shutdown_grace
        # A session that has ended carries no message, so the grace does not
        # wait for a client that does not read its last replies.
        while any(not protocol.closing for protocol in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for protocol in list(self.sessions):
            protocol.abort()
        # Commits already handed to the spool finish, so their 250 is still sent.
        while any(protocol.busy for protocol in self.sessions):
            await asyncio.sleep(0.05)
        for protocol in list(self.sessions):
            protocol.abort()
        await asyncio.sleep(0)
        await self._close_spool()
        for runtime in self.runtimes:
            if runtime.listener.role == "sink":
                sink = runtime.sink
                log_event(
                    logger,
                    "sink_totals",
                    listener=runtime.name,
                    messages=sink.messages,
                    recipients=sink.recipients,
                    octets=sink.octets,
                )
        log_event(logger, "stopped", worker=self.index, pid=os.getpid())

    async def _close_spool(self) -> None:
        if self.spool is not None:
            await self.spool.aclose()
            self.spool = None


# The signals the supervisor passes on to its children: stop (TERM, INT) and reload (HUP).
FORWARDED_SIGNALS = SERVE_SIGNALS


def _factory(runtime: ListenerRuntime) -> Callable[[], SMTPProtocol]:
    def create() -> SMTPProtocol:
        return SMTPProtocol(runtime)

    return create


def run_worker(
    config: Config,
    *,
    event_loop: str,
    workers: int,
    index: int,
    wake: WakeChannel | None = None,
    supervisor: SupervisorLink | None = None,
    reports: Reports | None = None,
) -> int:
    """Run one worker's event loop until it has shut down; return its exit status."""
    hold_signals()
    install_event_loop(event_loop)
    worker = Worker(
        config,
        workers=workers,
        index=index,
        wake=wake,
        supervisor=supervisor,
        reports=reports,
    )
    try:
        return asyncio.run(worker.run())
    finally:
        _hold_late_signals()


def run_delivery(
    config: Config,
    *,
    event_loop: str,
    index: int,
    wake: WakeChannel,
    supervisor: SupervisorLink | None = None,
    reports: Reports | None = None,
) -> int:
    """Run the delivery process's event loop until it has shut down; return its exit status."""
    hold_signals()
    install_event_loop(event_loop)

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(_loop_exception)
        process = DeliveryProcess(config, index=index, wake_fd=wake.read_fd, supervisor=supervisor, reports=reports)
        return await process.run()

    try:
        return asyncio.run(main())
    finally:
        _hold_late_signals()


def _hold_late_signals() -> None:
    """Block stop and reload signals that arrive after the event loop has closed.

    Closing an asyncio loop (Python 3.11) restores the default actions, so a
    late copy of a stop signal, such as the supervisor's forward of a group
    kill, would end the process with that signal or raise KeyboardInterrupt.
    Blocked, it is discarded when the process exits.  uvloop 0.23 leaves its
    own handlers in place, so there this changes nothing.
    """
    hold_signals()


def _separate_delivery(config: Config) -> bool:
    """Return whether the scheduler gets a process of its own: several workers that spool and deliver."""
    spooling = any(listener.role != "sink" for listener in config.listeners)
    return config.server.workers > 1 and spooling and config.delivery.enabled


class StartupError(Exception):
    """A setting that would stop every worker at start; the message describes the problem and the fix.

    ``key`` is the config key whose value is at fault ("spool.path",
    "listener[1].address"), or None when the cause lies outside the config,
    such as another process listening on the address.
    """

    def __init__(self, problem: str, key: str | None = None) -> None:
        super().__init__(problem)
        self.key = key


class ListenerError(StartupError):
    """A listener's address cannot be used; the message names it and what to do."""


class ListenerInUse(ListenerError):
    """A listener's address is already bound by another process."""


def check_startup(config: Config) -> ListenerLocks:
    """Check before any worker starts what would stop every worker; raise with the reason.

    Returns the locks of the listeners' addresses, which the caller holds
    until the last worker has stopped (``relay.listener_lock``).
    The TLS certificate, the credentials file and the aliases file are
    loaded once, so that a bad one is reported in the same words for one
    worker as for several.
    Each listener's address is locked, so that a second relay started on it,
    even at the same moment, stops here instead of joining the workers'
    SO_REUSEPORT sockets and splitting connections between two relays with
    different configs and spools.  Each address is then bound once without
    SO_REUSEPORT, which fails while any other process listens there.
    The spool is opened once last, creating it when missing, so that a spool
    that cannot be opened is one error here instead of one per worker.
    """
    check_files(config)
    locks = ListenerLocks()
    try:
        bound: dict[tuple[int, Any], int] = {}
        for index, listener in enumerate(config.listeners):
            for family, address in _check_address_free(listener, index, locks):
                # Two names of one address (localhost and 127.0.0.1, say) pass the
                # config's check of the text, and SO_REUSEPORT would share the socket.
                other = bound.setdefault((family, address), index)
                if other != index:
                    raise ListenerError(
                        f"{listener.address_text} is the same address as listener[{other}]"
                        f" ({config.listeners[other].address_text}); remove one of them",
                        f"listener[{index}].address",
                    )
        if uses_spool(config):
            # After the listener checks, so that a relay refused for its address creates no spool.
            try:
                SpoolStore(config.spool.path, busy_timeout=config.spool.busy_timeout).close()
            except SpoolError as exc:
                raise StartupError(str(exc), "spool.path") from None
    except BaseException:
        locks.release()
        raise
    return locks


def _check_address_free(listener: ListenerConfig, index: int, locks: ListenerLocks) -> list[tuple[int, Any]]:
    """Lock and bind each address of ``listener``, the config's listener[index], once; return them.

    Raises ListenerError naming what is wrong.
    """
    host, port = listener.address
    if port == 0:
        return []
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerError(
            f"{listener.address_text}: cannot resolve {host} ({exc.strerror});"
            " give an IP address of this machine, or a name that resolves to one",
            f"listener[{index}].address",
        ) from None
    checked: list[tuple[int, Any]] = []
    for family, kind, proto, _name, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks (IPv6 turned off): the workers skip it too
        with probe:
            try:
                locks.acquire(family, address)
            except OSError as exc:
                raise _bind_error(listener, index, exc) from None
            # SO_REUSEADDR ignores connections of an earlier run in TIME_WAIT.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Set as on the workers' sockets, so that [::] does not also claim the IPv4 port.
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise _bind_error(listener, index, exc) from None
        checked.append((family, address))
    return checked


def _bind_error(listener: ListenerConfig, index: int, exc: OSError) -> ListenerError:
    """Return the error that names why a listener's address cannot be bound and what to do."""
    address = listener.address_text
    key = f"listener[{index}].address"
    if exc.errno == errno.EADDRINUSE:
        # Another process causes this, not the config value, so the error names no key.
        return ListenerInUse(
            f"listener {address} is already in use by another process; stop that process or choose another address"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenerError(
            f"{address}: the address is not one of this machine's; use one of them, or 0.0.0.0 for all", key
        )
    if exc.errno == errno.EACCES:
        return ListenerError(
            f"{address}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE, or choose a port above",
            key,
        )
    return ListenerError(f"{address}: cannot bind: {exc.strerror}", key)


def uses_spool(config: Config) -> bool:
    """Return whether ``config`` has a listener that stores mail, so that it needs ``[spool] path``."""
    return any(listener.role != "sink" for listener in config.listeners)


def serve(config: Config, *, event_loop: str = "uvloop") -> int:
    """Run ``config.server.workers`` workers until a signal stops them; return the exit status.

    Raises FileCheckError or StartupError before any worker starts.
    """
    # Taken before any fork, so that only this process, the one systemd started, can report.
    notifier = Notifier.from_environment()
    # Held by this process and inherited by every child, so the addresses
    # stay locked until the last process that could listen on them has exited.
    locks = check_startup(config)
    workers = config.server.workers
    # Set before the workers fork, so each of them inherits it.
    metrics.destination_label.limit = config.admin.max_destination_labels
    private_snapshots: Path | None = None
    if config.admin.address and not uses_spool(config):
        # With only sink listeners no file belongs in [spool] path, so the
        # metrics snapshots go to a private temporary folder, removed on exit.
        # An earlier run killed with SIGKILL could not remove its folder, so
        # that folder goes now.
        for folder, pid in metrics.remove_stale_private_folders():
            log_event(logger, "metrics_folder_removed", folder=str(folder), pid=pid)
        private_snapshots = metrics.create_private_folder()
        metrics.snapshot_override = private_snapshots
    metrics.clear_snapshots(metrics.snapshot_directory(config.spool.path))
    status = _status_text(config)
    try:
        if workers == 1:
            reports = DirectReports(notifier, status) if notifier.enabled else None
            return run_worker(config, event_loop=event_loop, workers=1, index=0, reports=reports)
        return _supervise(config, event_loop, workers, notifier)
    finally:
        locks.release()
        # Forked children leave through os._exit, so only the process that created the folder removes it.
        if private_snapshots is not None:
            shutil.rmtree(private_snapshots, ignore_errors=True)


def _status_text(config: Config) -> str:
    """Return the STATUS= text of READY=1: each listener with its role, and the worker count."""
    listeners = ", ".join(f"{listener.address_text} ({listener.role})" for listener in config.listeners)
    workers = config.server.workers
    return f"listening on {listeners} with {workers} worker{'s' if workers != 1 else ''}"


def _unblock_signals() -> None:
    """Deliver to the supervisor the stop and reload signals that ``_supervise`` blocked while it forked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)


def _log_child_failure(index: int, error: BaseException) -> None:
    """Log the exception that ends a forked worker, which os._exit would otherwise end silently."""
    if isinstance(error, SystemExit):
        return
    # The end of the traceback, which names the error, survives the log's value limit.
    log_event(logger, "worker_failed", logging.ERROR, worker=index, error=f"{type(error).__name__}: {error}",
              exception=traceback.format_exc()[-400:])


def _supervise(config: Config, event_loop: str, workers: int, notifier: Notifier) -> int:
    """Fork the workers (and the delivery process, numbered after them), pass signals on, wait for all.

    The children write their readiness and reload outcomes to the report
    pipe (``SupervisorReports``).  From it the supervisor alone reports to
    systemd, with NOTIFY_SOCKET set, and keeps the reload status of every
    process (``ReloadTracker``).
    From the first line of ``relay.entry`` on, a SIGHUP to the supervisor is
    blocked or forwarded, and each child blocks it until its event loop
    handles it, so the listeners are what READY=1 waits for.
    """
    # Until the handlers are in place, a SIGHUP would end the supervisor or a
    # new child with the default action.  A blocked signal waits instead.  Each
    # child unblocks it once its event loop handles it, the supervisor after forking.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    wake = WakeChannel() if _separate_delivery(config) else None
    supervisor = SupervisorLink()
    # Workers and the delivery process all re-read the config, so all of them report reloads.
    children_count = workers + (1 if wake is not None else 0)
    # Also without systemd, because only the supervisor receives every process's reload outcome.
    status_directory = metrics.snapshot_directory(config.spool.path) if config.admin.address else None
    tracker = ReloadTracker(workers, children_count, config, status_directory)
    reports = SupervisorReports(notifier, _status_text(config), workers, children_count, tracker.update)
    children: dict[int, int] = {}
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                supervisor.close_write_end()
                if wake is not None:
                    wake.close_read_end()
                status = run_worker(
                    config,
                    event_loop=event_loop,
                    workers=workers,
                    index=index,
                    wake=wake,
                    supervisor=supervisor,
                    reports=reports.child(index),
                )
            except BaseException as exc:
                _log_child_failure(index, exc)
            finally:
                flush_log()
                os._exit(status)
        children[pid] = index
    if wake is not None:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                supervisor.close_write_end()
                wake.close_write_end()
                status = run_delivery(
                    config,
                    event_loop=event_loop,
                    index=workers,
                    wake=wake,
                    supervisor=supervisor,
                    reports=reports.child(workers),
                )
            except BaseException as exc:
                _log_child_failure(workers, exc)
            finally:
                flush_log()
                os._exit(status)
        children[pid] = workers
        # The children hold their ends; the supervisor needs neither.
        wake.close_read_end()
        wake.close_write_end()
    # The write end stays open until the supervisor exits.
    supervisor.close_read_end()
    # Only the children hold the report pipe's write end from here on.
    reports.start()

    stopping = False
    # The cause of the stop (the first stop signal or the first child that exited) and its time.
    stop_cause: dict[str, str] = {}
    stop_began: float | None = None

    def begin_stop(**cause: str) -> None:
        nonlocal stop_began
        if stop_began is None:
            stop_began = time.monotonic()
            stop_cause.update(cause)

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum == signal.SIGHUP:
            # Recorded before the children get the signal, so that a reload
            # they begin afterwards counts as its answer.
            reports.request_reload()
        else:
            begin_stop(signal=signal.Signals(signum).name)
            if not stopping:
                stopping = True
                reports.request_stop()
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    _unblock_signals()
    status = 0
    try:
        while children:
            try:
                pid, raw = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, -1)
            code = os.waitstatus_to_exitcode(raw)
            begin_stop(reason=f"worker {index} exited with status {code}")
            # A child that exits before any stop began, with status 0 too (a
            # SIGTERM sent to its PID alone), would leave the others running a
            # partial relay, for example one that accepts mail but has no
            # delivery process.  So all of them stop, and relay serve exits 1
            # so that systemd's Restart=on-failure starts it again.
            unexpected = not stopping
            if code != 0 or unexpected:
                status = 1
                log_event(logger, "worker_exit", logging.ERROR, worker=index, pid=pid, status=code)
            if unexpected:
                # Sent only once, because a second SIGTERM half a second later
                # would make the others exit at once, cutting short their shutdown_grace.
                forward(signal.SIGTERM, None)
    finally:
        # Blocked first, because a SIGHUP or SIGINT can arrive after the last
        # child has exited (a systemctl reload during the stop, say).  With
        # the restored default action it would end the supervisor by that
        # signal, or with a KeyboardInterrupt, instead of with its status.
        # Still blocked when the process exits, such a signal is discarded.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    seconds = time.monotonic() - stop_began if stop_began is not None else 0.0
    log_event(
        logger,
        "supervisor_stopped",
        logging.INFO if status == 0 else logging.ERROR,
        pid=os.getpid(),
        **(stop_cause or {"reason": "no worker process left"}),
        seconds=round(seconds, 3),
        processes=children_count,
        status=status,
    )
    return status
