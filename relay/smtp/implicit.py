"""Listeners for implicit TLS (RFC 8314 section 3.3, the SMTPS port 465).

The event loop's own TLS server, ``create_server(ssl=...)``, closes a
connection whose handshake fails without telling the protocol or, outside
asyncio's debug mode, the loop's exception handler.  Such a client would
leave no log line.  So an implicit-TLS listener accepts connections in a
task of its own, and runs each connection's handshake in a further task
through ``loop.connect_accepted_socket``, which raises the handshake's
error.  A failure is logged as ``tls_failed`` with the client address and
the reason (see ``relay.smtp.tls.handshake_failure_reason``), and the
connection is closed.  A completed handshake hands the connection to
``SMTPProtocol``, which logs ``connect`` and counts it against the
connection limits from then on, as for the other listeners.  Connections
in their handshake are limited by the same numbers, counted apart from the
sessions: when the handshakes running for all clients, or for this one,
already reach ``server.max_connections`` or
``server.max_connections_per_client``, the new connection is closed before
its handshake, since no reply could be read before it, and logged as
``reject``.

``start_tls`` from ``SMTPProtocol.connection_made`` would also report the
failure, but uvloop (0.23) starts reading as ``connection_made`` returns,
whether or not it called ``pause_reading``.  So the ClientHello could reach
the SMTP session before ``start_tls`` takes over the transport.

The handshake gives up after ``server.tls_handshake_timeout`` seconds, read
when each connection is accepted.  When accepting fails for lack of
resources (file descriptors, memory), the listener waits
``ACCEPT_RETRY_DELAY`` seconds before it accepts again, and logs
``accept_failed`` for the first failure and then at most once in
``ACCEPT_FAILURE_LOG_INTERVAL`` seconds, with the number of failures since
the last line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import TYPE_CHECKING, Any

from relay.log import RepeatCounter, log_event
from relay.smtp.protocol import SMTPProtocol
from relay.smtp.tls import handshake_failure_reason

if TYPE_CHECKING:
    from relay.smtp.server import ListenerRuntime

logger = logging.getLogger("relay.smtp")

# Seconds between attempts to accept while the process is out of file
# descriptors or memory; asyncio's own accept loop waits one second too.
ACCEPT_RETRY_DELAY = 1.0
# The cause of a failed accept (no file descriptors left) usually lasts, and
# each retry fails again, so a line per failure would flood the log.
ACCEPT_FAILURE_LOG_INTERVAL = 60.0


def log_accept_failure(failures: RepeatCounter, listener: str, error: OSError) -> None:
    """Count one failed accept on ``listener``; log ``accept_failed`` when ``failures`` has a line due."""
    count = failures.note()
    if count is not None:
        log_event(logger, "accept_failed", logging.ERROR, listener=listener, error=str(error), failures=count)


class ImplicitTLSListener:
    """The listening sockets of one implicit-TLS listener in one worker, and their accept tasks."""

    def __init__(self, runtime: ListenerRuntime, backlog: int) -> None:
        """Bind the listener's address and start accepting; raise OSError when an address cannot be bound."""
        self.runtime = runtime
        host, port = runtime.listener.address
        self.sockets = bind_sockets(host, port, backlog)
        self._accepting: list[asyncio.Task[None]] = []
        self._accept_failures = RepeatCounter(ACCEPT_FAILURE_LOG_INTERVAL)
        for sock in self.sockets:
            task = runtime.loop.create_task(self._accept(sock))
            # A callback, not a finally clause in _accept: a task cancelled
            # before its first step never enters the coroutine's body.
            task.add_done_callback(functools.partial(_close_socket, sock))
            self._accepting.append(task)
        self._handshakes: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        """Stop accepting; each listening socket closes as its accept task ends.

        Handshakes in progress go on while the worker waits for its sessions,
        and a client that completes one gets ``421 4.3.2``.  Those still
        running when the worker's event loop ends are cancelled without a
        log line.
        """
        for task in self._accepting:
            task.cancel()

    async def _accept(self, listening: socket.socket) -> None:
        loop = self.runtime.loop
        while True:
            try:
                connection, address = await loop.sock_accept(listening)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # a spurious wake-up, or a client that left before the accept
            except OSError as exc:
                log_accept_failure(self._accept_failures, self.runtime.name, exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            client = str(address[0])
            refusal = self.runtime.admit_handshake(client)
            if refusal is not None:
                # No reply can be read before the handshake, so the connection just closes.
                connection.close()
                log_event(logger, "reject", client=client, listener=self.runtime.name, command="CONNECT",
                          reply=f"{refusal.code} {refusal.status} {refusal.text}; closed before the TLS handshake")
                continue
            task = loop.create_task(self._handshake(connection, address))
            # The loop keeps only a weak reference to a task.
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, connection: socket.socket, address: Any) -> None:
        runtime = self.runtime
        protocol = SMTPProtocol(runtime)
        error: OSError | None = None
        transport: asyncio.Transport | None = None
        try:
            transport, _ = await runtime.loop.connect_accepted_socket(
                lambda: protocol,
                connection,
                ssl=runtime.ssl_context,
                ssl_handshake_timeout=runtime.config.server.tls_handshake_timeout,
            )
        except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError among them
            error = exc
        finally:
            # A completed handshake was admitted as a session by SMTPProtocol.connection_made.
            runtime.release_handshake(str(address[0]))
        if transport is not None:
            if transport.get_extra_info("ssl_object") is not None:
                return  # SMTPProtocol has the connection
            # uvloop 0.23 returns a transport, without an ssl_object, when the
            # connection closed without an error during the handshake.
            transport.abort()
        log_event(
            logger,
            "tls_failed",
            logging.WARNING,
            session=protocol.session_id,
            client=str(address[0]),
            listener=runtime.name,
            error=handshake_failure_reason(error),
        )


def _close_socket(sock: socket.socket, _task: asyncio.Task[None]) -> None:
    sock.close()


def bind_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Return non-blocking listening sockets for each address of ``host``, set up as ``create_server`` sets them.

    SO_REUSEPORT lets the workers share the port, IPV6_V6ONLY keeps an IPv6
    socket off the IPv4 port, and TCP_NODELAY is set as on the other
    listeners' sockets.  Raises OSError naming the address that failed.
    """
    addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in addresses:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this machine lacks (IPv6 turned off), skipped as asyncio's create_server skips it
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind {address!r}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
