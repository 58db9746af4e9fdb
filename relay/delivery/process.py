"""The delivery process: the scheduler in a process of its own, woken by the receiving workers.

With ``server.workers`` above 1, ``relay serve`` forks one more process
that opens the spool and runs the ``Scheduler`` and nothing else: no
listener, no admin listener.  The kernel then shares the CPUs between
receiving and delivering, where a scheduler inside worker 0 made that
worker do both while the others had spare time.  With one worker the
scheduler stays in that worker and is woken in-process.

Wake-up: a ``WakeChannel`` is a non-blocking pipe created before the fork.
A receiving worker writes one byte after its commits (at most one write per
event-loop iteration), and the delivery process reads the pipe with
``loop.add_reader`` and wakes the scheduler, which then claims at once
instead of at the next ``queue_scan_interval``.  A full pipe already holds
unread wake-ups, so a write that would block is dropped.  When every
receiving worker has exited (each stopped by a signal of its own, say), the
pipe reads end of file: the process stops watching it and finds new mail,
such as ``relay sendmail``'s, at the next ``queue_scan_interval``.

Signals: SIGTERM or SIGINT stops the scheduler and closes the spool.
Running transactions get ``STOP_GRACE`` seconds, then the scheduler releases
its leases.  A second SIGTERM or SIGINT exits at once.  SIGHUP re-reads the config like the workers,
except once a stop has begun.
The process saves a metrics snapshot like every worker, under the name
``worker-N`` where N is ``server.workers``.
"""

from __future__ import annotations

import asyncio
import logging
import os

from relay.admin import Monitoring
from relay.config import Config
from relay.delivery.scheduler import Scheduler
from relay.log import log_event
from relay.notify import Reports
from relay.reload import ReloadResult, log_reload, reload_config
from relay.reload_status import config_fingerprint
from relay.signals import StopRequests, SupervisorLink, install_loop_handlers
from relay.spool import Spool, SpoolError

logger = logging.getLogger("relay.delivery")

# The octet of one wake-up write.  Only its arrival counts, never its value.
WAKE_BYTE = b"\x01"
# Maximum wake-ups that one read takes out of the pipe.  Any number of them means the same.
WAKE_READ_SIZE = 4096


class WakeChannel:
    """A pipe from the receiving workers to the delivery process, created before ``fork``."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def sender(self, loop: asyncio.AbstractEventLoop) -> WakeSender:
        """Return the callable a receiving worker runs on ``loop`` after each stored message."""
        return WakeSender(self.write_fd, loop)

    def close_read_end(self) -> None:
        os.close(self.read_fd)

    def close_write_end(self) -> None:
        os.close(self.write_fd)


class WakeSender:
    """Write one wake-up per event-loop iteration however many messages were stored in it."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop
        self._scheduled = False
        self._broken = False

    def __call__(self) -> None:
        if self._scheduled or self._broken:
            return
        self._scheduled = True
        # The spool settles a whole group commit in one callback, so its 250s
        # resume in the same iteration and share this one write.
        self._loop.call_soon(self._send)

    def stop(self) -> None:
        """Send no more wake-ups: the worker is shutting down, and so is the delivery process.

        A wake-up then could only fail with EPIPE and log a false warning.
        Messages stored from now on wait in the spool for the next start.
        """
        self._broken = True

    def _send(self) -> None:
        self._scheduled = False
        if self._broken:
            return
        try:
            os.write(self._fd, WAKE_BYTE)
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the scheduler has not read yet
        except OSError as exc:
            # The delivery process has exited (EPIPE).  Stored messages stay in the
            # spool for the next scheduler, which scans the queue when it starts.
            self._broken = True
            log_event(logger, "wake_failed", logging.WARNING, error=str(exc))


class DeliveryProcess:
    """The process that runs the scheduler for every receiving worker."""

    def __init__(
        self,
        config: Config,
        *,
        index: int,
        wake_fd: int,
        supervisor: SupervisorLink | None = None,
        reports: Reports | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.wake_fd = wake_fd
        self._supervisor = supervisor
        # Each reload is reported to the supervisor, which tells systemd once every process is done.
        self._reports = reports or Reports()
        self.scheduler: Scheduler | None = None
        self._stop = asyncio.Event()
        self._stop_requests = StopRequests()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            spool = Spool.from_config(self.config.spool)
        except SpoolError as exc:
            log_event(logger, "spool_error", logging.ERROR, error=str(exc))
            return 1
        scheduler = Scheduler(self.config, spool)
        self.scheduler = scheduler
        loop.add_reader(self.wake_fd, self._on_wake)
        install_loop_handlers(
            loop,
            on_stop=self._on_signal,
            on_reload=self._on_reload,
            on_supervisor_gone=self._on_supervisor_gone,
            supervisor=self._supervisor,
        )
        log_event(logger, "started", worker=self.index, pid=os.getpid(), role="delivery")
        delivering = loop.create_task(scheduler.run())
        monitoring: Monitoring | None = None
        if self.config.admin.address:
            # Not worker 0, so this saves snapshots for the admin listener and serves nothing.
            monitoring = Monitoring(self.config, self.index, accepting=lambda: not self._stop.is_set())
            await monitoring.start()
        await self._stop.wait()
        loop.remove_reader(self.wake_fd)
        await scheduler.stop()
        await delivering
        await spool.aclose()
        if monitoring is not None:
            await monitoring.stop()
        log_event(logger, "stopped", worker=self.index, pid=os.getpid())
        return 0

    def _on_wake(self) -> None:
        try:
            data = os.read(self.wake_fd, WAKE_READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            # End of file: every receiving worker has exited.  The pipe would stay
            # readable and the loop would call this again at once, spinning a CPU.
            asyncio.get_running_loop().remove_reader(self.wake_fd)
            log_event(logger, "wake_pipe_closed", logging.WARNING, worker=self.index,
                      action="scanning the queue every queue_scan_interval")
            return
        if self.scheduler is not None:
            self.scheduler.wake()

    def _on_signal(self, signum: int) -> None:
        if self._stop_requests.receive(signum, logger, worker=self.index):
            self._stop.set()

    def _on_supervisor_gone(self) -> None:
        log_event(logger, "supervisor_gone", logging.ERROR, worker=self.index)
        self._stop.set()

    def _on_reload(self) -> None:
        if self._stop.is_set():
            # The scheduler is stopping or stopped, so a reloaded config would never be used.
            log_event(logger, "reload_ignored", logging.DEBUG, worker=self.index, reason="stopping")
            return
        self._reports.run_reload(self._reload, lambda: config_fingerprint(self.config))

    def _reload(self) -> bool:
        """Re-read the config file and hand it to the scheduler; return whether it was applied."""
        result = reload_config(self.config)
        if result.config is not None and self.scheduler is not None:
            try:
                self.scheduler.apply_config(result.config)
            except Exception as exc:
                # Logged as reload_failed, not reloaded: the scheduler keeps its settings.
                # Every process checked the same build (reload_config), so this
                # fails only when a file it reads changed since the workers read it.
                # TODO: the workers may then run the new config and this process
                # the old one; reload_summary and /healthz show it, but a
                # two-phase reload (all check, then all apply) would prevent it.
                error = f"the scheduler cannot use it: {type(exc).__name__}: {exc}"
                result = ReloadResult(None, [error], file_errors=False)
        log_reload(result, self.config.source, self.index, summarized=True)
        if result.config is None:
            return False
        self.config = result.config
        return True
