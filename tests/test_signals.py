"""Signal bookkeeping: copies of one stop request, and stop and reload signals before the loop handles them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import pytest
import uvloop

from relay.delivery.process import WAKE_BYTE, WakeChannel
from relay.signals import DUPLICATE_WINDOW, StopRequests, hold_signals, install_loop_handlers


def test_copies_within_window_are_one_request() -> None:
    requests = StopRequests()

    assert requests.classify() == "first"
    assert requests.classify() == "copy"
    time.sleep(DUPLICATE_WINDOW + 0.05)
    assert requests.classify() == "second"


SERVE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def handle_setup_signals(loop_kind: str, signums: list[int], moment: str) -> list[str]:
    """Send ``signums`` while a loop runs setup; return the handlers that ran, in order.

    ``moment`` is "while_awaiting" (setup still has to await) or
    "before_install" (install_loop_handlers follows without an await).
    """
    handled: list[str] = []
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    previous_handlers = {number: signal.getsignal(number) for number in SERVE_SIGNALS}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def send() -> None:
        # Sent to this thread: pytest may run other threads, which do not block them.
        for signum in signums:
            signal.pthread_kill(threading.get_ident(), signum)

    async def set_up_then_install() -> None:
        if moment == "while_awaiting":
            send()
        await asyncio.sleep(0.05)
        if moment == "before_install":
            send()
        assert handled == [], "a held signal was handled before install_loop_handlers"
        install_loop_handlers(
            loop,
            on_stop=lambda number: handled.append(signal.Signals(number).name),
            on_reload=lambda: handled.append("SIGHUP"),
            on_supervisor_gone=lambda: handled.append("supervisor_gone"),
            supervisor=None,
        )
        await asyncio.sleep(0.2)

    try:
        hold_signals()
        loop.run_until_complete(set_up_then_install())
    finally:
        loop.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    return handled


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("signum", SERVE_SIGNALS, ids=lambda signum: signal.Signals(signum).name)
@pytest.mark.parametrize("moment", ["while_awaiting", "before_install"])
def test_setup_signal_handled_once(loop_kind: str, signum: int, moment: str) -> None:
    # uvloop sets the signal wakeup fd as soon as the loop runs.  A signal
    # sent while setup awaits reaches a loop with no handler for it yet.  One
    # sent just before install_loop_handlers is still unread in the wakeup fd
    # when the handlers arrive.  Neither may be lost or handled twice.
    handled = handle_setup_signals(loop_kind, [signum], moment)

    assert handled == [signal.Signals(signum).name]


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_held_stop_handled_before_reload(loop_kind: str) -> None:
    # POSIX leaves open the order in which several pending signals are
    # delivered, and a process that is stopping has no use for a reload.
    handled = handle_setup_signals(loop_kind, [signal.SIGTERM, signal.SIGHUP], "while_awaiting")

    assert handled == ["SIGTERM", "SIGHUP"]


def test_wake_sender_quiet_after_stop(caplog: pytest.LogCaptureFixture) -> None:
    channel = WakeChannel()
    loop = asyncio.new_event_loop()
    try:
        sender = channel.sender(loop)
        sender()
        loop.run_until_complete(asyncio.sleep(0))
        assert os.read(channel.read_fd, 16) == WAKE_BYTE

        # A worker stops waking the delivery process when it shuts down, so a
        # delivery process that has already exited (EPIPE) logs no warning.
        sender.stop()
        channel.close_read_end()
        with caplog.at_level(logging.WARNING, logger="relay.delivery"):
            sender()
            loop.run_until_complete(asyncio.sleep(0))
        assert not [record for record in caplog.records if getattr(record, "event", None) == "wake_failed"]
    finally:
        loop.close()
        channel.close_write_end()
