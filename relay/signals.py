"""Stop and reload requests: copies of one signal, signals during startup, and a dead supervisor.

``relay serve`` stops gracefully on the first SIGTERM or SIGINT and exits at
once on a second.  A terminal's Ctrl-C and systemd's default
``KillMode=control-group`` send the signal to every process of the relay,
and the supervisor forwards it to its children as well, so one request can
reach a worker two or three times within milliseconds.  Copies that arrive
within ``DUPLICATE_WINDOW`` seconds of the first count as that first request.
A worker and the delivery process keep these signals blocked while they
start (``hold_signals``), so that each one sent meanwhile is handled once,
by the event loop, when they are up.
The supervisor's children also stop gracefully when the supervisor exits
without them, even by SIGKILL: a pipe reaches end of file (``SupervisorLink``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from asyncio import AbstractEventLoop
from collections.abc import Callable
from typing import Any

from relay.entry import SERVE_SIGNALS
from relay.log import flush_log, log_event

# Far longer than the few milliseconds between copies of one signal, and
# shorter than an operator takes to press Ctrl-C a second time on purpose.
DUPLICATE_WINDOW = 0.5


class StopRequests:
    """Classify each stop signal as the first, a copy of it, or a second request."""

    def __init__(self) -> None:
        self._first: float | None = None

    def classify(self) -> str:
        """Return "first", "copy" or "second" for a signal arriving now."""
        now = time.monotonic()
        if self._first is None:
            self._first = now
            return "first"
        if now - self._first < DUPLICATE_WINDOW:
            return "copy"
        return "second"

    def receive(self, signum: int, logger: logging.Logger, **fields: Any) -> bool:
        """Handle one stop signal; return True when the caller should start a graceful stop.

        A copy of the first request returns False.  A second request logs
        ``exit_now`` and ends the process at once with status 1.
        """
        request = self.classify()
        name = signal.Signals(signum).name
        if request == "copy":
            return False
        if request == "second":
            log_event(logger, "exit_now", logging.WARNING, signal=name)
            flush_log()
            os._exit(1)
        log_event(logger, "stopping", signal=name, **fields)
        return True


def hold_signals() -> None:
    """Block SIGTERM, SIGINT and SIGHUP in this thread until ``install_loop_handlers`` releases them.

    A worker needs a moment to open the spool and its sockets.  In that
    window the default action of each signal would end it.  A blocked
    signal stays pending instead, and the kernel delivers it once, when
    ``install_loop_handlers`` unblocks it with the loop's handlers in place.
    Copies of one signal that arrive while it is blocked merge into one.
    The supervisor and ``relay.entry`` have usually blocked these signals
    already, and blocking them again changes nothing.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SERVE_SIGNALS)


class SupervisorLink:
    """A pipe whose end of file signals to the supervisor's children that the supervisor is gone.

    Only the supervisor keeps the write end open and nothing is written to
    it, so the read end reaches end of file when the supervisor exits, even
    by SIGKILL.  Each child closes its copy of the write end right after
    fork, and watches the read end from its event loop so that it stops
    instead of running on without a parent to forward signals.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    def close_write_end(self) -> None:
        """Close the write end; every child does this first."""
        os.close(self.write_fd)

    def close_read_end(self) -> None:
        """Close the read end; the supervisor does this after forking."""
        os.close(self.read_fd)

    def watch(self, loop: AbstractEventLoop, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone`` once, from ``loop``, when the supervisor has exited."""

        def readable() -> None:
            try:
                data = os.read(self.read_fd, 1)
            except BlockingIOError:
                return
            if data:
                return  # the supervisor writes nothing; ignore it if anything arrives
            loop.remove_reader(self.read_fd)
            on_gone()

        os.set_blocking(self.read_fd, False)
        loop.add_reader(self.read_fd, readable)


def install_loop_handlers(
    loop: AbstractEventLoop,
    *,
    on_stop: Callable[[int], None],
    on_reload: Callable[[], None],
    on_supervisor_gone: Callable[[], None],
    supervisor: SupervisorLink | None,
) -> None:
    """Hand stop and reload signals to ``loop``, then release those held since ``hold_signals``.

    A worker and the delivery process both call this once their own setup
    is done.  With a ``supervisor``, its exit also reaches ``on_supervisor_gone``.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    # Unblocked only now, so that a signal sent during setup reaches the
    # loop's handler once, through the wakeup fd.  uvloop 0.23 sets that fd
    # as soon as the loop runs, so a Python handler that recorded signals
    # during setup would see some that the loop also dispatches later.
    # The stop signals go first because the loop calls the handlers in the
    # order the signals arrive.  A reload held together with a stop then
    # finds the stop begun and is ignored, instead of re-reading the config
    # of a process about to exit.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SERVE_SIGNALS)
    if supervisor is not None:
        supervisor.watch(loop, on_supervisor_gone)
