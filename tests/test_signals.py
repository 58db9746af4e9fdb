"""Signal bookkeeping: copies of one stop request, and stop and reload signals before the loop is up."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest

from relay.delivery.process import WAKE_BYTE, WakeChannel
from relay.signals import DUPLICATE_WINDOW, EarlySignals, StopRequests


def test_copies_within_window_are_one_request() -> None:
    requests = StopRequests()

    assert requests.classify() == "first"
    assert requests.classify() == "copy"
    time.sleep(DUPLICATE_WINDOW + 0.05)
    assert requests.classify() == "second"


def test_early_signals_recorded_instead_of_dying() -> None:
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        early = EarlySignals().install()

        os.kill(os.getpid(), signal.SIGHUP)
        assert early.reload_requested
        assert early.stop_signum is None

        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert early.stop_signum == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
