"""Readiness reports to systemd (the sd_notify protocol) and from workers to their supervisor.

Under a ``Type=notify`` unit, systemd passes the path of a unix datagram
socket in ``NOTIFY_SOCKET`` and waits for ``READY=1`` on it before it counts
the service as started and before it runs ``ExecReload``.  Each report is
one datagram of newline-separated ``KEY=VALUE`` lines, as sd_notify(3)
describes.  A path that starts with ``@`` names a socket in the abstract
namespace, where the ``@`` stands for a leading NUL byte.  With the default
``NotifyAccess=main``, systemd accepts reports only from the process it
started, so ``Notifier.from_environment`` removes ``NOTIFY_SOCKET`` from
the environment and the workers never see it.

Reporting is best effort: without ``NOTIFY_SOCKET`` nothing is sent, and a
failed send logs one ``notify_failed`` warning and never stops the server.
With several workers, each one reports through a ``ReadinessPipe`` once its
listeners are bound, and the supervisor sends ``READY=1`` after the last.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

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
        """Report that the service accepts connections and handles its signals."""
        self.send(f"READY=1\nSTATUS={status}")

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


class ReadinessPipe:
    """A pipe on which each worker writes one byte once its listeners are bound.

    The supervisor reads it from a thread, because its main thread waits
    for children to exit.  Each child closes the read end after fork, and a
    worker closes its write end once it has written its byte.  The read end
    reaches end of file when every process holding the write end has closed
    it or exited, so a worker that fails before it is ready never leaves the
    thread waiting after the rest have stopped.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    def close_read_end(self) -> None:
        os.close(self.read_fd)

    def close_write_end(self) -> None:
        os.close(self.write_fd)

    def report_ready(self) -> None:
        """Tell the supervisor that this worker is ready; a worker calls this once."""
        try:
            os.write(self.write_fd, b"r")
        finally:
            self.close_write_end()

    def watch(self, workers: int, on_all_ready: Callable[[], None]) -> threading.Thread:
        """Call ``on_all_ready`` from a thread once ``workers`` workers have reported ready.

        Takes over the read end, which the thread closes when it ends.
        """

        def wait() -> None:
            ready = 0
            try:
                while ready < workers:
                    data = os.read(self.read_fd, workers - ready)
                    if not data:
                        return
                    ready += len(data)
                on_all_ready()
            finally:
                os.close(self.read_fd)

        thread = threading.Thread(target=wait, name="readiness", daemon=True)
        # A thread starts with its creator's signal mask.  Blocked in this
        # thread, a SIGTERM always reaches the main thread, where it
        # interrupts the supervisor's wait for its children.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SERVE_SIGNALS)
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return thread
