"""The admin HTTP listener: ``/metrics`` for Prometheus and ``/healthz``.

Serves ``[admin] address`` (default 127.0.0.1:9025; an empty string turns it
off) from one process.  ``GET /metrics`` returns the text exposition format
0.0.4 with this process's metrics, the snapshots the other worker processes
saved (see ``relay.metrics``) and the queue gauges read from the spool at
scrape time.  ``GET /healthz`` returns ``200 ok`` while the relay accepts
mail and ``503`` once it stops accepting.  After a rejected config reload,
or while the processes run different configs, the 200 body has more lines
saying so.  With several processes they name the processes concerned,
from the status that the supervisor saves (``relay.reload_status``).
Only ``GET`` and ``HEAD`` are served, and the request-target may be in origin
form (``/metrics``) or absolute form (``http://host/metrics``).  A request head
over ``MAX_REQUEST_HEAD`` octets gets 414 when its request line alone is that
long, else 431.  An HTTP/1.1 request without one Host field gets 400 (RFC
9112 section 3.2), and a head slower than ``REQUEST_TIMEOUT`` seconds is
dropped.  At most
``[admin] max_connections`` connections are served at once; another one
gets 503 and is closed.  Empty lines before the request line are skipped
(RFC 9112 section 2.2).

The listener binds the address it is given; keep it on loopback or a
management network, because the metrics name destinations and clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from relay import metrics
from relay.config import Config
from relay.log import RepeatCounter, log_event
from relay.reload_status import load_status
from relay.spool import SpoolError, SpoolStore
from relay.spool.store import database_path
from relay.status import STATES, summarize
from relay.units import parse_host_port

logger = logging.getLogger("relay.admin")

# A request line and a few headers fit easily; Prometheus sends about 300 octets.
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
# Reads that may return only empty lines before the request line (each read ends at two line ends).
MAX_EMPTY_LINES = 4
# Refused connections are logged at most once in this many seconds, with their count.
BUSY_LOG_INTERVAL = 60.0
# A snapshot that cannot be saved fails again every SNAPSHOT_INTERVAL, so the
# failure is logged at most once in this many seconds, with its count.
SNAPSHOT_FAILURE_LOG_INTERVAL = 60.0
# After a 431, what is read and dropped before the socket closes.
DISCARD_LIMIT = 1024 * 1024
DISCARD_TIME = 2.0


# The second /healthz line after a rejected reload of the only worker.
RELOAD_REJECTED_LINE = "the last config reload was rejected; the previous config stays in force (see reload_failed)"


def update_queue_gauges(spool_directory: Path) -> None:
    """Set the queue gauges from the spool (blocking: run it in a thread)."""
    if not database_path(spool_directory).exists():
        return
    with SpoolStore(spool_directory) as store:
        summary = summarize(store, top=0)
    now = time.time()
    for state in STATES:
        metrics.queue_recipients.set(summary.recipients.get(state, 0), state=state)
        oldest = summary.oldest_arrival.get(state)
        metrics.queue_oldest_age.set(now - oldest if oldest is not None else 0.0, state=state)


def _request_path(target: str) -> str:
    """Return the path of a request-target without its query.

    RFC 9112 section 3.2.2: a server accepts the absolute form
    (``http://host/path``) as well as the usual origin form (``/path``).
    """
    if target[:8].lower().startswith(("http://", "https://")):
        target = urlsplit(target).path
    return target.split("?", 1)[0]


class _OnlyEmptyLines(Exception):
    """The client sent more than MAX_EMPTY_LINES reads of empty lines and no request line."""


class AdminServer:
    """The HTTP endpoint of one relay process."""

    def __init__(
        self,
        spool_directory: Path,
        snapshot_directory: Path,
        own_snapshot: str,
        accepting: Callable[[], bool],
        max_connections: int = 16,
        *,
        several_processes: bool = False,
    ) -> None:
        self.spool_directory = spool_directory
        self.snapshot_directory = snapshot_directory
        self.own_snapshot = own_snapshot
        self.accepting = accepting
        self.max_connections = max_connections
        # With several processes the reload outcome is every process's, read
        # from the supervisor's status file, not this process's own.
        self.several_processes = several_processes
        self._server: asyncio.AbstractServer | None = None
        self._open = 0
        self._refused = RepeatCounter(BUSY_LOG_INTERVAL)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        log_event(logger, "admin_listening", address=f"{host}:{port}")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def reload_lines(self) -> list[str]:
        """Return the /healthz lines about the last reload, and set ``relay_config_last_reload_successful``."""
        if not self.several_processes:
            if metrics.config_reload_applied.value(default=1.0):
                return []
            return [RELOAD_REJECTED_LINE]
        status = await asyncio.get_running_loop().run_in_executor(None, load_status, self.snapshot_directory)
        # No status yet: no reload has finished, so the config of the start is in force everywhere.
        successful = status is None or status.successful
        metrics.config_reload_applied.set(1.0 if successful else 0.0)
        return [] if status is None else status.healthz_lines()

    async def render_metrics(self) -> str:
        loop = asyncio.get_running_loop()
        await self.reload_lines()
        try:
            await loop.run_in_executor(None, update_queue_gauges, self.spool_directory)
        except SpoolError as exc:
            log_event(logger, "metrics_spool_error", logging.WARNING, error=str(exc))
        others = await loop.run_in_executor(
            None, metrics.load_snapshots, self.snapshot_directory, self.own_snapshot
        )
        return metrics.REGISTRY.render(others)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.max_connections:
            self._note_refused(writer)
            # It fits the new socket's empty send buffer, so the write does not wait for the client to read.
            await self._respond(writer, 503, "text/plain", "too many admin connections; try again later\n", False)
            return
        self._open += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._open -= 1

    def _note_refused(self, writer: asyncio.StreamWriter) -> None:
        """Count a refused connection; log the count at most once in BUSY_LOG_INTERVAL seconds."""
        refused = self._refused.note()
        if refused is not None:
            peer = writer.get_extra_info("peername")
            client = peer[0] if isinstance(peer, tuple) else str(peer)
            log_event(logger, "admin_busy", logging.WARNING, limit=self.max_connections, refused=refused, client=client)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(self._read_head(reader), REQUEST_TIMEOUT)
        except asyncio.LimitOverrunError:
            # The head is still in the reader's buffer, unread.  RFC 9112 section 3
            # requires 414 when the request-target is what does not fit.
            buffered = (await reader.read(MAX_REQUEST_HEAD)).lstrip(b"\r\n")
            if b"\r\n" not in buffered:
                await self._reject(reader, writer, 414, f"request line longer than {MAX_REQUEST_HEAD} octets\n")
            else:
                await self._reject(reader, writer, 431, "request header too large\n")
            return
        except _OnlyEmptyLines:
            await self._reject(reader, writer, 400, "bad request: no request line\n")
            return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return

        request_line, *fields = head.decode("latin-1").split("\r\n")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._reject(reader, writer, 400, "bad request\n")
            return
        # RFC 9112 section 5.1 forbids a blank between a field name and its colon.
        # Section 5.2 allows rejecting a line folded onto the one before it.
        names = [field.partition(":")[0] for field in fields]
        if any(":" not in field or name != name.strip() or not name for field, name in zip(fields, names, strict=True)):
            await self._reject(reader, writer, 400, "bad request: malformed header field\n")
            return
        # RFC 9112 section 3.2: an HTTP/1.1 request needs exactly one Host field,
        # and no request may carry two.
        hosts = sum(1 for name in names if name.lower() == "host")
        if hosts > 1 or (hosts == 0 and parts[2] == "HTTP/1.1"):
            await self._reject(reader, writer, 400, "bad request: send one Host header field\n")
            return
        method, target = parts[0], _request_path(parts[1])
        if method not in ("GET", "HEAD"):
            # RFC 9110 section 15.5.6: a 405 lists the allowed methods.
            allow = "Allow: GET, HEAD\r\n"
            await self._reject(reader, writer, 405, "only GET and HEAD are served\n", allow)
            return

        head_only = method == "HEAD"
        if target == "/metrics":
            try:
                body = await self.render_metrics()
            except Exception as exc:
                # A response in every case: an unanswered request would keep its socket open.
                log_event(logger, "metrics_failed", logging.ERROR, error=repr(exc))
                await self._respond(writer, 500, "text/plain", "metrics unavailable; see the relay log\n", head_only)
                return
            await self._respond(writer, 200, "text/plain; version=0.0.4; charset=utf-8", body, head_only)
        elif target == "/healthz":
            if self.accepting():
                # Still 200: the relay accepts mail, with the config it had before or with two configs.
                body = "".join(f"{line}\n" for line in ["ok", *await self.reload_lines()])
                await self._respond(writer, 200, "text/plain", body, head_only)
            else:
                await self._respond(writer, 503, "text/plain", "not accepting mail\n", head_only)
        else:
            await self._respond(writer, 404, "text/plain", "not found: try /metrics or /healthz\n", head_only)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes:
        """Return the request head without its final empty line.

        RFC 9112 section 2.2: empty lines before the request line are skipped.
        """
        head = await reader.readuntil(b"\r\n\r\n")
        skipped = 0
        while True:
            head = head.lstrip(b"\r\n")
            if head:
                return head[:-4]
            # Nothing but empty lines so far: the request line is still to come.
            skipped += 1
            if skipped > MAX_EMPTY_LINES:
                raise _OnlyEmptyLines
            head = await reader.readuntil(b"\r\n\r\n")

    async def _reject(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, body: str, extra: str = ""
    ) -> None:
        """Send an error response, then read what the client still sends before closing.

        Closing a socket with unread data resets the connection, and the
        client may lose the response (a large header, or a request body).
        """
        await self._respond(writer, status, "text/plain", body, False, extra, close=False)
        try:
            if not writer.is_closing():
                writer.write_eof()
            await self._discard(reader)
        finally:
            writer.close()

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        """Read and drop what the client still sends, up to DISCARD_LIMIT octets and DISCARD_TIME seconds."""
        received = 0
        try:
            async with asyncio.timeout(DISCARD_TIME):
                while received < DISCARD_LIMIT:
                    data = await reader.read(65536)
                    if not data:
                        return
                    received += len(data)
        except (TimeoutError, ConnectionError):
            return

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: str,
        head_only: bool,
        extra: str = "",
        *,
        close: bool = True,
    ) -> None:
        reasons = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            414: "URI Too Long",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }
        payload = body.encode()
        head = (
            f"HTTP/1.1 {status} {reasons[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"{extra}"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(head if head_only else head + payload)
            # A client that never reads must not hold the response, and its socket, forever:
            # close() would wait for the unsent rest, so the connection is aborted.
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except TimeoutError:
            writer.transport.abort()
        except ConnectionError:
            pass
        except RuntimeError:
            # uvloop raises it instead of ConnectionError when the client reset first.
            if not writer.is_closing():
                raise
        finally:
            if close:
                writer.close()


class Monitoring:
    """Metrics upkeep of one worker: its snapshot file, and in worker 0 the admin listener."""

    def __init__(self, config: Config, index: int, accepting: Callable[[], bool], workers: int = 1) -> None:
        self.config = config
        self.name = f"worker-{index}"
        self.snapshot_directory = metrics.snapshot_directory(config.spool.path)
        self.admin: AdminServer | None = None
        if index == 0:
            self.admin = AdminServer(
                Path(config.spool.path),
                self.snapshot_directory,
                self.name,
                accepting,
                config.admin.max_connections,
                several_processes=workers > 1,
            )
        self._task: asyncio.Task[None] | None = None
        self._snapshot_failures = RepeatCounter(SNAPSHOT_FAILURE_LOG_INTERVAL)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._save_periodically())
        if self.admin is not None:
            host, port = parse_host_port(self.config.admin.address)
            try:
                await self.admin.start(host, port)
            except OSError as exc:
                # Mail keeps flowing without metrics; the operator sees why in the log.
                address = self.config.admin.address
                log_event(logger, "admin_listen_failed", logging.ERROR, address=address, error=str(exc))
                self.admin = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._save()
        if self.admin is not None:
            await self.admin.close()

    def _save(self) -> None:
        try:
            metrics.save_snapshot(metrics.REGISTRY, self.snapshot_directory, self.name)
        except OSError as exc:
            failures = self._snapshot_failures.note()
            if failures is not None:
                log_event(logger, "metrics_snapshot_failed", logging.WARNING, error=str(exc), failures=failures)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(metrics.SNAPSHOT_INTERVAL)
            self._save()
