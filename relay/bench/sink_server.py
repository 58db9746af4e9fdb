"""Run ``relay sink``: listeners, worker processes, signals and counter reports.

With one worker the sink runs in the calling process.  With several, each
worker process binds its own socket to the same address with SO_REUSEPORT,
and the kernel spreads connections between them.  Before any socket is
bound, the sink locks its address as ``relay serve`` does
(``relay.listener_lock``), so that a second sink or relay on that address
fails with EADDRINUSE instead of sharing its connections.  Every worker copies its
counters into a shared array every ``FLUSH_INTERVAL`` seconds and once more
when it stops, and the parent adds them up.

A worker stops by itself when the parent exits, even when the parent is
killed with SIGKILL, because it watches a pipe whose write end only the
parent keeps open.

SIGUSR1 prints the counters so far (up to ``FLUSH_INTERVAL`` old with
several workers); SIGTERM or SIGINT stops the sink, closes open sessions,
prints the final counters and logs them in a ``sink_stopped`` line.
Counters are printed to standard output as one ``key=value`` line, or as
one JSON object with ``--json``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import Any

import orjson
import uvloop

from relay.bench.sink import (
    COUNTER_NAMES,
    COUNTER_SLOTS,
    FAULT_BASE,
    FAULT_NAMES,
    SinkProtocol,
    SinkSettings,
    SinkState,
)
from relay.cli import stop_output
from relay.listener_lock import ListenerLocks
from relay.log import flush_log, log_event
from relay.signals import SupervisorLink
from relay.units import format_host_port

logger = logging.getLogger("relay.sink")

# Seconds the parent waits for each worker to listen before it stops waiting.
STARTUP_TIMEOUT = 30.0
# Seconds between copies of a worker's counters into the shared array.
FLUSH_INTERVAL = 0.1
# Pending connections the kernel queues per socket; smtp-source opens its
# sessions in bursts, so this follows the usual kernel cap (somaxconn).
LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class SinkRun:
    """One sink invocation, from the command line."""

    host: str
    port: int
    workers: int
    settings: SinkSettings
    json_output: bool


def counters_report(values: list[int]) -> dict[str, Any]:
    """Return the counters as the document ``--json`` prints."""
    report: dict[str, Any] = {name: values[index] for index, name in enumerate(COUNTER_NAMES)}
    report["faults"] = {name: values[FAULT_BASE + index] for index, name in enumerate(FAULT_NAMES)}
    return report


def format_counters(values: list[int], json_output: bool) -> str:
    """Render the counters as one JSON object or one ``key=value`` line."""
    report = counters_report(values)
    if json_output:
        return orjson.dumps(report).decode()
    faults = report.pop("faults")
    parts = [f"{key}={value}" for key, value in report.items()]
    parts.extend(f"{key}={value}" for key, value in faults.items() if value)
    return "sink " + " ".join(parts)


def _print(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of standard output went away; the sink keeps running
        # and stops printing its counters.
        stop_output()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _lock_address(locks: ListenerLocks, host: str, port: int) -> None:
    """Lock the address that ``_listening_socket`` binds; raise OSError (EADDRINUSE when it is taken)."""
    if port == 0:
        return  # the kernel picks a port that no one else listens on
    family = _family(host)
    # bind() takes the first address that the name resolves to, so the lock does too.
    addresses = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    locks.acquire(family, addresses[0][4])


def _listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def _serve(
    run: SinkRun,
    state: SinkState,
    sock: socket.socket,
    on_report: Callable[[], None] | None,
    flush: Callable[[], None] | None,
    on_ready: Callable[[], None],
    parent: SupervisorLink | None = None,
    worker: int = 0,
) -> str | None:
    """Serve until SIGTERM, SIGINT or the parent's exit; return the name of the stop signal, if one came."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_signals: list[str] = []

    def on_stop(signum: int) -> None:
        stop_signals.append(signal.Signals(signum).name)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGINT, on_stop, signal.SIGINT)
    if parent is not None:

        def on_parent_gone() -> None:
            log_event(logger, "supervisor_gone", logging.ERROR, worker=worker, sessions=len(state.sessions))
            stop.set()

        # Without this a worker would go on listening after its parent was killed with SIGKILL.
        parent.watch(loop, on_parent_gone)
    if on_report is not None:
        loop.add_signal_handler(signal.SIGUSR1, on_report)
    else:
        # Workers ignore SIGUSR1 sent to the whole process group; the parent reports.
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    server = await loop.create_server(lambda: SinkProtocol(state), sock=sock, backlog=LISTEN_BACKLOG)
    # Signal handlers are in place, so a caller may send SIGTERM from here on.
    on_ready()
    flusher = None
    if flush is not None:
        flusher = asyncio.create_task(_flush_periodically(flush))
    await stop.wait()
    server.close()
    for session in list(state.sessions):
        if session.transport is not None:
            session.transport.abort()
    await server.wait_closed()
    if flusher is not None:
        flusher.cancel()
    if flush is not None:
        flush()
    return stop_signals[0] if stop_signals else None


async def _flush_periodically(flush: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        flush()


def _run_single(run: SinkRun) -> int:
    state = SinkState(run.settings)
    sock = _listening_socket(run.host, run.port, reuse_port=False)

    def report() -> None:
        _print(format_counters(state.counters, run.json_output))

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        stop_signal = runner.run(_serve(run, state, sock, report, None, lambda: _log_listening(run)))
    report()
    # Without a parent to watch, only SIGTERM or SIGINT ends _serve here.
    _log_stopped(state.counters, signal=stop_signal or "none")
    return 0


def _log_listening(run: SinkRun) -> None:
    log_event(logger, "listening", address=format_host_port(run.host, run.port), workers=run.workers)


def _log_stopped(values: list[int], **cause: str) -> None:
    """Log ``sink_stopped`` with its cause and the final counters; a fault counter appears once it is above 0."""
    report = counters_report(values)
    faults = report.pop("faults")
    report.update((name, count) for name, count in faults.items() if count)
    log_event(logger, "sink_stopped", logging.INFO, **cause, **report)


def _worker(run: SinkRun, index: int, shared: Any, sock: socket.socket, ready: Any, parent: SupervisorLink) -> None:
    parent.close_write_end()
    state = SinkState(run.settings, worker=index)
    base = index * COUNTER_SLOTS

    def flush() -> None:
        shared[base : base + COUNTER_SLOTS] = state.counters

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(run, state, sock, None, flush, ready.release, parent, index))
    finally:
        # multiprocessing ends the worker with os._exit, which skips the log's own flush at exit.
        flush_log()


def _run_workers(run: SinkRun) -> int:
    shared = RawArray("q", COUNTER_SLOTS * run.workers)
    context = multiprocessing.get_context("fork")
    ready = context.Semaphore(0)
    parent = SupervisorLink()
    processes = []
    for index in range(run.workers):
        # Each worker binds its own socket, so the kernel balances between them.
        sock = _listening_socket(run.host, run.port, reuse_port=True)
        process = context.Process(target=_worker, args=(run, index, shared, sock, ready, parent), daemon=True)
        process.start()
        sock.close()
        processes.append(process)
    parent.close_read_end()

    def totals() -> list[int]:
        values = [0] * COUNTER_SLOTS
        for index in range(run.workers):
            for slot in range(COUNTER_SLOTS):
                values[slot] += shared[index * COUNTER_SLOTS + slot]
        return values

    stopping = []

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGUSR1:
            _print(format_counters(totals(), run.json_output))
        else:
            stopping.append(signum)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in processes:
        if not ready.acquire(timeout=STARTUP_TIMEOUT) or stopping:
            break
    else:
        _log_listening(run)
    while not stopping and any(process.is_alive() for process in processes):
        for process in processes:
            process.join(timeout=0.2)
            if stopping:
                break
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in processes:
        process.join(timeout=10)
    failed = [process.exitcode for process in processes if process.exitcode not in (0, None)]
    values = totals()
    _print(format_counters(values, run.json_output))
    if stopping:
        _log_stopped(values, signal=signal.Signals(stopping[0]).name)
    else:
        _log_stopped(values, reason="every worker exited")
    if failed:
        log_event(logger, "worker_failed", logging.ERROR, exit_codes=failed)
        return 1
    return 0


def run_sink(run: SinkRun) -> int:
    """Run the sink until SIGTERM or SIGINT; return the exit status.

    Raises OSError when the address cannot be locked or bound, with errno
    EADDRINUSE when another process listens on it or holds its lock.
    """
    # The workers inherit the lock.  So after a parent killed with SIGKILL,
    # the address stays locked until its last worker has stopped too.
    with ListenerLocks() as locks:
        _lock_address(locks, run.host, run.port)
        if run.workers <= 1:
            return _run_single(run)
        return _run_workers(run)
