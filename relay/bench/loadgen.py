"""The load loop of ``relay bench``: connections, arrival schedule, processes.

Closed loop (the default): each of ``concurrency`` connections sends its next
message as soon as the server replies to the previous one, so the rate is the highest
the server sustains at that concurrency.  Open loop (``rate`` set): messages
are due at fixed intervals whatever the server does, and each transaction's
latency runs from its due time, not from when a connection got to it.  A
slow server therefore shows up as latency instead of being hidden by the
client sending less (coordinated omission).

Every run is bounded: by a message count, by a duration, or by both, and a
reply that takes longer than ``timeout`` fails its message.  In an open-loop
run, messages still waiting for a connection fail as ``not_started``
instead of extending the run: at the end of the duration when one is
given, since no message starts after it, otherwise when the schedule plus
one timeout is over.

With several processes each one drives its share of the connections, the
messages and the rate on its own uvloop event loop; message numbers ``{n}``
are interleaved so they stay unique, and the histograms are merged exactly.

The first SIGINT (Ctrl-C) stops the run early: every connection is closed at
once, the transactions in flight count neither as sent nor as failed, and the
stats measured so far come back marked ``interrupted``.  With several
processes the parent turns its SIGINT into ``STOP_SIGNAL`` for each child,
and children ignore SIGINT, so a Ctrl-C that reaches the whole process group
stops each child exactly once.  A second SIGINT ends the run without stats.
A child also stops when the parent exits, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import Any, TextIO

import uvloop

from relay.bench.client import ClientSettings, Session, SessionFailed, open_session, send_message
from relay.bench.messages import EncodedMessage
from relay.bench.stats import RunStats
from relay.signals import SupervisorLink

# Seconds between two updates of the progress line.
PROGRESS_INTERVAL = 0.5
# Sent by the parent to a child process to stop its share of the run early.
STOP_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class LoadPlan:
    """One process's share of a run: connections, messages and rate."""

    settings: ClientSettings
    messages: tuple[EncodedMessage, ...]
    concurrency: int
    count: int | None
    """Messages to send, or None for a run bounded by duration only."""
    duration: float | None
    """Seconds after which no new message starts, or None."""
    per_connection: int
    """Messages per connection before QUIT; 0 keeps each connection for the whole run."""
    rate: float | None
    """Messages per second for an open-loop run, or None to send as fast as possible."""
    first_number: int = 0
    number_step: int = 1


def split_plan(plan: LoadPlan, processes: int) -> list[LoadPlan]:
    """Divide connections, messages and rate between processes, dropping empty shares."""
    plans = []
    for index in range(processes):
        concurrency = plan.concurrency // processes + (1 if index < plan.concurrency % processes else 0)
        count = None
        if plan.count is not None:
            count = plan.count // processes + (1 if index < plan.count % processes else 0)
        if concurrency == 0 or count == 0:
            continue
        rate = None if plan.rate is None else plan.rate * concurrency / plan.concurrency
        plans.append(
            LoadPlan(
                settings=plan.settings,
                messages=plan.messages,
                concurrency=concurrency,
                count=count,
                duration=plan.duration,
                per_connection=plan.per_connection,
                rate=rate,
                first_number=index,
                number_step=processes,
            )
        )
    return plans


class _Run:
    """State shared by the connection loops of one process."""

    def __init__(self, plan: LoadPlan, stats: RunStats, on_message: Callable[[RunStats], None]) -> None:
        self.plan = plan
        self.stats = stats
        self.on_message = on_message
        self.started = time.perf_counter()
        self.deadline = None if plan.duration is None else self.started + plan.duration
        self.issued = 0
        # Open loop only: messages due in the whole run, and the time after
        # which a message not yet started fails as not_started.
        self.planned: int | None = None
        self.expires: float | None = None
        if plan.rate is not None:
            self.planned = planned_messages(plan)
            if plan.duration is not None:
                # --duration is when the last message may start, so an overloaded
                # run ends then instead of catching up for another timeout.
                self.expires = self.started + plan.duration
            else:
                self.expires = self.started + (plan.count or 0) / plan.rate + plan.settings.timeout

    def take(self) -> tuple[int, float] | None:
        """Return the next closed-loop job (message number, start time) or None when done."""
        plan = self.plan
        if plan.count is not None and self.issued >= plan.count:
            return None
        now = time.perf_counter()
        if self.deadline is not None and now >= self.deadline:
            return None
        number = plan.first_number + self.issued * plan.number_step
        self.issued += 1
        return number, now

    async def take_due(self) -> tuple[int, float] | None:
        """Wait until the next open-loop job is due; return it, or None when the schedule is over.

        Each job's due time follows from its index, so jobs waiting for a
        free connection take no memory, however high the rate.
        """
        plan = self.plan
        assert self.planned is not None
        assert self.expires is not None
        assert plan.rate is not None
        if self.issued >= self.planned:
            return None
        index = self.issued
        self.issued += 1
        due = self.started + index / plan.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif time.perf_counter() > self.expires:
            # This job and every later one fail at once, which keeps the end
            # of an overloaded run from looping over each of them.
            self.issued = self.planned
            self.fail("not_started", self.planned - index)
            return None
        return plan.first_number + index * plan.number_step, due

    def fail(self, kind: str | None = None, messages: int = 1) -> None:
        if kind is not None:
            self.stats.count_error(kind, messages)
        self.stats.messages_failed += messages
        self.on_message(self.stats)


def planned_messages(plan: LoadPlan) -> int:
    """Return how many messages an open-loop plan makes due: those due before the duration ends, up to the count."""
    assert plan.rate is not None
    planned = plan.count
    if plan.duration is not None:
        # Message i is due i / rate seconds after the start, and none is due at the end of the duration or later.
        by_duration = math.ceil(plan.duration * plan.rate)
        planned = by_duration if planned is None else min(planned, by_duration)
    assert planned is not None
    return planned


async def _connection_loop(run: _Run) -> None:
    plan = run.plan
    stats = run.stats
    messages = plan.messages
    session: Session | None = None
    used = 0
    try:
        while True:
            job = run.take() if run.planned is None else await run.take_due()
            if job is None:
                break
            number, due = job

            if session is None:
                try:
                    session = await open_session(plan.settings, stats)
                except SessionFailed:
                    run.fail()
                    continue
                used = 0
            used += 1
            last = plan.per_connection > 0 and used >= plan.per_connection
            message = messages[number % len(messages)]
            if not await send_message(session, message, number, due, last):
                stats.messages_failed += 1
            run.on_message(stats)

            if last and session.alive:
                await session.quit(sent_already=session.pipelining)
            if last or not session.alive:
                session.connection.close()
                session = None
    except asyncio.CancelledError:
        # Stopped by SIGINT: close at once instead of waiting for the reply to QUIT.
        if session is not None:
            session.connection.close()
        raise
    if session is not None:
        await session.quit()


async def run_plan(
    plan: LoadPlan,
    on_message: Callable[[RunStats], None],
    stop_signal: int | None = None,
    parent: SupervisorLink | None = None,
) -> RunStats:
    """Send one process's share of the load and return what it measured.

    The run stops early, with ``interrupted`` set, when its task is cancelled
    (asyncio.Runner does that on SIGINT), when ``stop_signal`` arrives, or
    when the ``parent`` process has exited.
    """
    stats = RunStats()
    run = _Run(plan, stats, on_message)
    main_task = asyncio.current_task()
    assert main_task is not None
    if stop_signal is not None:
        asyncio.get_running_loop().add_signal_handler(stop_signal, main_task.cancel)
        # The parent forks its children with stop_signal blocked, so a stop sent
        # before this handler existed is pending, and arrives here now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {stop_signal})
    if parent is not None:

        def on_parent_gone() -> None:
            main_task.cancel()

        parent.watch(asyncio.get_running_loop(), on_parent_gone)
    # More connections than messages would only open connections that send nothing.
    connections = plan.concurrency if plan.count is None else min(plan.concurrency, plan.count)
    tasks = [asyncio.create_task(_connection_loop(run)) for _ in range(connections)]
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        # Cancelling gather cancelled every task; wait until each has closed its connection.
        await asyncio.gather(*tasks, return_exceptions=True)
        stats.interrupted = True
    if stop_signal is not None:
        # Closing the loop restores the signal's default action, which would end
        # the process before it reports its stats, so a late stop stays pending.
        signal.pthread_sigmask(signal.SIG_BLOCK, {stop_signal})
    stats.elapsed = time.perf_counter() - run.started
    return stats


def _run_in_loop(
    plan: LoadPlan,
    on_message: Callable[[RunStats], None],
    stop_signal: int | None = None,
    parent: SupervisorLink | None = None,
) -> RunStats:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_plan(plan, on_message, stop_signal, parent))


def _child(
    plan: LoadPlan, slot: int, progress: Any, pipe: multiprocessing.connection.Connection, parent: SupervisorLink
) -> None:
    parent.close_write_end()

    def publish(stats: RunStats) -> None:
        progress[2 * slot] = stats.messages_sent
        progress[2 * slot + 1] = stats.messages_failed

    # Only the parent handles SIGINT: it sends STOP_SIGNAL once, so a Ctrl-C that reaches the
    # whole process group does not stop a child twice.  STOP_SIGNAL is blocked from the
    # fork until run_plan handles it, because its default action would kill the child
    # and lose its stats, and an ignored stop would be lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # A parent killed with SIGKILL would otherwise leave the children
        # loading the server until their share of the run is done.
        stats = _run_in_loop(plan, publish, STOP_SIGNAL, parent)
        pipe.send(stats.to_state())
    except KeyboardInterrupt:
        pipe.send(None)
    except BrokenPipeError:
        # The parent is gone, so the stats have no reader.
        pass
    finally:
        pipe.close()


class ProgressLine:
    """One self-overwriting status line on a terminal; nothing elsewhere."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.started = time.perf_counter()
        self.visible = False

    def update(self, sent: int, failed: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        rate = sent / elapsed if elapsed > 0 else 0.0
        self.stream.write(f"\r\x1b[Ksent {sent}  rate {rate:,.0f}/s  errors {failed}  elapsed {elapsed:.1f}s")
        self.stream.flush()
        self.visible = True

    def clear(self) -> None:
        if self.visible:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.visible = False


def run_load(plan: LoadPlan, processes: int, progress: ProgressLine) -> RunStats:
    """Run the whole load in this process or in several, and return the merged stats."""
    if processes <= 1:
        last_update = [0.0]

        def show(stats: RunStats) -> None:
            now = time.perf_counter()
            if now - last_update[0] >= PROGRESS_INTERVAL:
                last_update[0] = now
                progress.update(stats.messages_sent, stats.messages_failed)

        try:
            return _run_in_loop(plan, show if progress.enabled else _ignore)
        finally:
            progress.clear()

    plans = split_plan(plan, processes)
    # Fork keeps the encoded messages and the TLS context without pickling them.
    context = multiprocessing.get_context("fork")
    counters = RawArray("q", 2 * len(plans))
    parent = SupervisorLink()
    children: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
    stop_requested = False

    def stop_children() -> None:
        for process, _ in children:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, STOP_SIGNAL)

    def on_interrupt(signum: int, frame: object) -> None:
        # A handler, not KeyboardInterrupt, so that a Ctrl-C at any point of the
        # loops below stops the children, not only one during the wait.
        nonlocal stop_requested
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested = True
        stop_children()

    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        # Each child inherits the blocked STOP_SIGNAL (see _child).
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
        try:
            for slot, share in enumerate(plans):
                receiver, sender = context.Pipe(duplex=False)
                child = context.Process(target=_child, args=(share, slot, counters, sender, parent), daemon=True)
                child.start()
                sender.close()
                children.append((child, receiver))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        parent.close_read_end()
        if stop_requested:
            # Children forked after the Ctrl-C have not been stopped yet.
            stop_children()

        merged = RunStats()
        pending = [receiver for _, receiver in children]
        while pending:
            ready = multiprocessing.connection.wait(pending, timeout=PROGRESS_INTERVAL)
            for item in ready:
                assert isinstance(item, multiprocessing.connection.Connection)
                try:
                    state = item.recv()
                except EOFError:
                    state = None
                if state is None:
                    merged.count_error("worker_process_failed")
                else:
                    merged.merge(RunStats.from_state(state))
                pending.remove(item)
            sent = sum(counters[2 * slot] for slot in range(len(plans)))
            failed = sum(counters[2 * slot + 1] for slot in range(len(plans)))
            progress.update(sent, failed)
        merged.interrupted = merged.interrupted or stop_requested
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        progress.clear()
        for process, _ in children:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
    return merged


def _ignore(stats: RunStats) -> None:
    del stats
