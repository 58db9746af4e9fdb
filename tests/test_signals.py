"""Stop-signal bookkeeping: copies of one request, and signals before the loop is up."""

from __future__ import annotations

import os
import signal
import time

from relay.signals import DUPLICATE_WINDOW, EarlyStop, StopRequests


def test_copies_within_window_are_one_request() -> None:
    requests = StopRequests()

    assert requests.classify() == "first"
    assert requests.classify() == "copy"
    time.sleep(DUPLICATE_WINDOW + 0.05)
    assert requests.classify() == "second"


def test_early_stop_records_signal_instead_of_dying() -> None:
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        early = EarlyStop().install()

        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)

        assert early.signum == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
