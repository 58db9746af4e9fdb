"""Readiness reports to systemd (the sd_notify protocol) and from workers to their supervisor.

Under a ``Type=notify`` or ``Type=notify-reload`` unit, systemd passes the
path of a unix datagram socket in ``NOTIFY_SOCKET`` and waits for
``READY=1`` on it before it counts the service as started and before it
runs ``ExecReload``.  Each report is one datagram of newline-separated
``KEY=VALUE`` lines, as sd_notify(3) describes.  A path that starts with
``@`` names a socket in the abstract namespace, where the ``@`` stands for
a leading NUL byte.  With the default
``NotifyAccess=main``, systemd accepts reports only from the process it
started, so ``Notifier.from_environment`` removes ``NOTIFY_SOCKET`` from
the environment and the workers never see it.

The reports, in order: ``READY=1`` once every worker's SMTP listeners and
the admin listener (when configured) accept connections.  On each SIGHUP,
``RELOADING=1`` with ``MONOTONIC_USEC=`` (the CLOCK_MONOTONIC time of the
request, in microseconds), then ``READY=1`` once every process has applied
or rejected the file.  Under ``Type=notify-reload`` (systemd 253 and
later), systemd matches that time against the moment it sent the signal,
so ``systemctl reload`` returns only after the new config is in use.
``STOPPING=1`` when a stop begins; nothing else is sent after it.

Reporting is best effort: without ``NOTIFY_SOCKET`` nothing is sent, and a
failed send logs one ``notify_failed`` warning and never stops the server.
With one worker, the worker reports itself (``DirectReports``).  With
several, each child writes records to a pipe, and one thread of the
supervisor turns them into the reports above (``SupervisorReports``).
That thread also passes each child's reload outcome on to
``relay.reload_status``, with or without systemd.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.entry import SERVE_SIGNALS
from relay.log import log_event

logger = logging.getLogger("relay.notify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"


class Notifier:
    """Send state reports to the service manager's notification socket, if there is one."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._failed = False

    @classmethod
    def from_environment(cls) -> Notifier:
        """Take ``NOTIFY_SOCKET`` out of the environment, so that child processes cannot report."""
        return cls(os.environ.pop(NOTIFY_SOCKET, None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        """Report that the service accepts connections, handles its signals, and has finished any reload."""
        self.send(f"READY=1\nSTATUS={status}")

    def reloading(self, requested_ns: int) -> None:
        """Report that a reload requested at ``requested_ns`` (``time.monotonic_ns``) has begun."""
        self.send(f"RELOADING=1\nMONOTONIC_USEC={requested_ns // 1000}\nSTATUS=reloading the config file")

    def stopping(self) -> None:
        """Report that a graceful stop has begun."""
        self.send("STOPPING=1\nSTATUS=stopping")

    def send(self, state: str) -> bool:
        """Send one report; return whether it reached the socket.

        Only the first failure is logged, so a socket that is gone costs
        one warning, not one for each report.
        """
        if self.address is None:
            return False
        try:
            target = _socket_address(self.address)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode("utf-8"), target)
        except (OSError, ValueError) as exc:
            if not self._failed:
                self._failed = True
                log_event(logger, "notify_failed", logging.WARNING, socket=self.address, error=str(exc))
            return False
        return True


def _socket_address(address: str) -> str | bytes:
    """Convert ``NOTIFY_SOCKET`` text to a socket address; raise ValueError for an unsupported form."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode("utf-8")
    if address.startswith("/"):
        return address
    # NOTE: only the two forms of sd_notify(3) that a local systemd sets are
    # supported; any other text is reported as a failed send.
    raise ValueError(f"unsupported {NOTIFY_SOCKET} {address!r}: expected an absolute path or @ and an abstract name")


class Reports:
    """The reports of one worker or of the delivery process; this base class sends nothing.

    ``reload_started`` returns the CLOCK_MONOTONIC time, in nanoseconds, at
    which the process began to re-read the file, and ``reload_finished``
    takes it back, so that a reload is matched to the requests made before it.
    """

    def ready(self) -> None:
        """Report that this process's listeners, and the admin listener if it runs here, accept connections."""

    def reload_started(self) -> int:
        return time.monotonic_ns()

    def reload_finished(self, started_ns: int, applied: bool, fingerprint: int = 0) -> None:
        """Report that the reload begun at ``started_ns`` was applied, or rejected with the old config kept.

        ``fingerprint`` identifies the config that the process runs afterwards.
        """

    def stopping(self) -> None:
        """Report that a graceful stop has begun."""

    def run_reload(self, reload: Callable[[], bool], fingerprint: Callable[[], int] | None = None) -> bool:
        """Run ``reload`` between the reports of its start and its end; return whether it applied the file.

        An exception from ``reload`` still ends the reload, as rejected, so that systemd's reload job ends.
        ``fingerprint`` returns that of the config in force once ``reload`` has returned.
        """
        started = self.reload_started()
        applied = False
        try:
            applied = reload()
        finally:
            self.reload_finished(started, applied, fingerprint() if fingerprint is not None else 0)
        return applied


def status_after_reload(status: str, applied: bool) -> str:
    """Return the STATUS= text of the READY=1 that ends a reload."""
    if applied:
        return status
    return f"{status}; the last reload was rejected and the previous config stays in force (see reload_failed)"


class DirectReports(Reports):
    """The reports of a relay that runs as one process: sent straight to systemd."""

    def __init__(self, notifier: Notifier, status: str) -> None:
        self.notifier = notifier
        self.status = status
        self._ready_sent = False
        self._stopping = False

    def ready(self) -> None:
        if not self._stopping:
            self._ready_sent = True
            self.notifier.ready(self.status)

    def reload_started(self) -> int:
        started = time.monotonic_ns()
        # A reload recorded during startup runs after READY=1, so it gets its own pair of reports.
        if self._ready_sent and not self._stopping:
            self.notifier.reloading(started)
        return started

    def reload_finished(self, started_ns: int, applied: bool, fingerprint: int = 0) -> None:
        if self._ready_sent and not self._stopping:
            self.notifier.ready(status_after_reload(self.status, applied))

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.notifier.stopping()


# A child's record on the report pipe: its kind, the child's index, and for
# a reload the CLOCK_MONOTONIC nanoseconds at which the child began it and
# the fingerprint of the config it runs afterwards.
# 21 octets, far below PIPE_BUF, so concurrent writes never interleave.
_RECORD = struct.Struct("<ciqQ")
_READY = b"r"
_APPLIED = b"a"
_REJECTED = b"x"
# Records from the supervisor's signal handler to its reporting thread.
_RELOAD_REQUEST = b"h"
_STOP_REQUEST = b"s"


class ChildReports(Reports):
    """The reports of one child of the supervisor, written to the report pipe."""

    def __init__(self, write_fd: int, index: int) -> None:
        self.write_fd = write_fd
        self.index = index

    def ready(self) -> None:
        self._write(_READY, 0)

    def reload_finished(self, started_ns: int, applied: bool, fingerprint: int = 0) -> None:
        self._write(_APPLIED if applied else _REJECTED, started_ns, fingerprint)

    def _write(self, kind: bytes, value: int, fingerprint: int = 0) -> None:
        try:
            os.write(self.write_fd, _RECORD.pack(kind, self.index, value, fingerprint))
        except OSError as exc:
            # The supervisor is gone (EPIPE); SupervisorLink stops this process.
            log_event(logger, "report_failed", logging.WARNING, worker=self.index, error=str(exc))


@dataclass
class _ReportState:
    """The state of the supervisor's reporting thread; only that thread reads or changes it."""

    ready_workers: int = 0
    ready_sent: bool = False
    stopping: bool = False
    # The time of the latest SIGHUP, and whether its RELOADING=1 still waits for its READY=1.
    requested_ns: int = 0
    reload_reported: bool = False
    # Whether the latest SIGHUP still waits for a child's reload report, with or without systemd.
    reload_pending: bool = False
    # Per child: the start of its latest finished reload, whether that reload
    # was applied, and the fingerprint of the config it runs since.
    finished: dict[int, tuple[int, bool, int]] = field(default_factory=dict)
    # The children whose results ``on_reload`` has not been given yet.
    changed: set[int] = field(default_factory=set)


class SupervisorReports:
    """The supervisor's side of the reports: one pipe from every child, and one from its signal handler.

    One thread reads both and is the only sender of reports, so they reach
    systemd in the order they were decided.  ``READY=1`` ends a reload once
    every child has finished a reload that began at or after the latest
    SIGHUP.  The kernel merges a signal that arrives while the same one is
    still pending, so a child may reload once for several SIGHUPs.  That
    reload began after the last of them, so it counts for all.

    ``on_reload``, when given, is called from that thread with the changed
    children's results (index: applied, fingerprint), and with True once
    every child has finished a reload for the latest SIGHUP.
    """

    def __init__(
        self,
        notifier: Notifier,
        status: str,
        workers: int,
        children: int,
        on_reload: Callable[[dict[int, tuple[bool, int]], bool], None] | None = None,
    ) -> None:
        self.notifier = notifier
        self.status = status
        self.workers = workers
        self.children = children
        self.on_reload = on_reload
        self.read_fd, self.write_fd = os.pipe()
        self._control_read, self._control_write = os.pipe()
        # Written from a signal handler, which must never block.
        os.set_blocking(self._control_write, False)
        self._state = _ReportState()

    def child(self, index: int) -> ChildReports:
        """Return the reports of child ``index``; call it in the child, right after fork."""
        os.close(self.read_fd)
        os.close(self._control_read)
        os.close(self._control_write)
        return ChildReports(self.write_fd, index)

    def request_reload(self) -> None:
        """Record a SIGHUP; call it from the signal handler before passing the signal on."""
        self._control(_RELOAD_REQUEST, time.monotonic_ns())

    def request_stop(self) -> None:
        self._control(_STOP_REQUEST, 0)

    def _control(self, kind: bytes, value: int) -> None:
        try:
            os.write(self._control_write, _RECORD.pack(kind, -1, value, 0))
        except BlockingIOError:
            # NOTE: only a flood of thousands of unread signals fills the pipe; that request goes unreported.
            pass
        except BrokenPipeError:
            # The reporting thread has ended because every child has exited,
            # so no process is left to reload or stop, and nothing to report.
            pass

    def start(self) -> threading.Thread:
        """Start the reporting thread; call it after the last fork, once only the children hold the write end."""
        os.close(self.write_fd)
        thread = threading.Thread(target=self._run, name="reports", daemon=True)
        # A thread starts with its creator's signal mask.  Blocked in this
        # thread, a SIGTERM always reaches the main thread, where it
        # interrupts the supervisor's wait for its children.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SERVE_SIGNALS)
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return thread

    def _run(self) -> None:
        buffers = {self._control_read: b"", self.read_fd: b""}
        try:
            while True:
                readable, _, _ = select.select(list(buffers), [], [])
                # The signal handler writes its request before it signals the children,
                # so a request is always handled before the children's reports of that reload.
                for fd in sorted(readable, key=lambda fd: fd != self._control_read):
                    if not self._read_records(fd, buffers):
                        # Every child has exited.
                        return
                self._report()
        finally:
            os.close(self.read_fd)
            os.close(self._control_read)

    def _read_records(self, fd: int, buffers: dict[int, bytes]) -> bool:
        """Read ``fd`` once and handle its whole records; return False at the end of the children's pipe."""
        data = os.read(fd, 4096)
        if not data and fd == self.read_fd:
            return False
        buffers[fd] += data
        whole = len(buffers[fd]) - len(buffers[fd]) % _RECORD.size
        for offset in range(0, whole, _RECORD.size):
            self._handle(*_RECORD.unpack_from(buffers[fd], offset))
        buffers[fd] = buffers[fd][whole:]
        return True

    def _handle(self, kind: bytes, index: int, value: int, fingerprint: int) -> None:
        state = self._state
        if kind == _STOP_REQUEST and not state.stopping:
            state.stopping = True
            self.notifier.stopping()
        elif kind == _RELOAD_REQUEST:
            state.requested_ns = value
            state.reload_pending = True
            # Before READY=1, systemd waits for the start and sends no reload; the
            # first READY=1 then waits for this reload too.
            if state.ready_sent and not state.stopping:
                state.reload_reported = True
                self.notifier.reloading(value)
        elif kind == _READY:
            state.ready_workers += 1
        elif kind in (_APPLIED, _REJECTED):
            previous = state.finished.get(index)
            if previous is None or value >= previous[0]:
                state.finished[index] = (value, kind == _APPLIED, fingerprint)
                state.changed.add(index)

    def _report(self) -> None:
        state = self._state
        if state.stopping:
            return
        finished = [state.finished.get(index) for index in range(self.children)]
        reloaded = state.requested_ns == 0 or all(
            entry is not None and entry[0] >= state.requested_ns for entry in finished
        )
        round_finished = reloaded and state.reload_pending
        if state.changed or round_finished:
            state.reload_pending = state.reload_pending and not round_finished
            results = {index: state.finished[index][1:] for index in sorted(state.changed)}
            state.changed.clear()
            if self.on_reload is not None:
                self.on_reload(results, round_finished)
        if not reloaded:
            return
        applied = all(entry is None or entry[1] for entry in finished)
        if not state.ready_sent and state.ready_workers >= self.workers:
            state.ready_sent = True
            self.notifier.ready(status_after_reload(self.status, applied))
        elif state.reload_reported:
            state.reload_reported = False
            self.notifier.ready(status_after_reload(self.status, applied))
