"""relay bench against Postfix's smtp-sink: a server that closes or stalls in the middle of a transaction."""

from __future__ import annotations

import pytest
from bench_helpers import run_bench
from delivery_peers import run_smtp_sink

from conftest import free_port


@pytest.mark.parametrize(
    ("sink_option", "bench_options", "stage", "errors"),
    [
        # -Q: reply 421 to the command and close.
        (("-Q", "rcpt"), (), "rcpt", {"rcpt_4xx": 6}),
        (("-Q", "data"), (), "data", {"data_command_4xx": 6}),
        (("-Q", "mail"), ("--no-pipelining",), "mail", {"mail_4xx": 6}),
    ],
)
def test_421_and_close_counted_by_stage(
    sink_option: tuple[str, ...], bench_options: tuple[str, ...], stage: str, errors: dict[str, int]
) -> None:
    port = free_port()
    with run_smtp_sink("127.0.0.1", port, *sink_option):
        status, report = run_bench(f"127.0.0.1:{port}", "-n", "6", "-c", "2", "-m", "3", *bench_options)

    assert status == 1
    assert report["messages_sent"] == 0
    assert report["messages_failed"] == 6
    assert report["replies_by_stage"][stage] == {"421": 6}
    assert report["errors"] == errors


def test_close_without_reply_keeps_earlier_replies() -> None:
    port = free_port()
    # -q data: close without replying to DATA, after the replies to MAIL and RCPT.
    with run_smtp_sink("127.0.0.1", port, "-q", "data"):
        status, report = run_bench(f"127.0.0.1:{port}", "-n", "4", "-c", "2", "-r", "2")

    assert status == 1
    assert report["messages_failed"] == 4
    assert report["replies_by_stage"]["mail"] == {"250": 4}
    assert report["replies_by_stage"]["rcpt"] == {"250": 8}
    assert report["recipients_accepted"] == 8
    assert report["errors"] == {"connection_lost": 4}


def test_stalled_reply_timeout_names_stage() -> None:
    port = free_port()
    # -W data:5: wait 5 seconds before the reply to DATA.  smtp-sink sends
    # the replies to a pipelined batch together, so none would arrive, and
    # here each command waits for its reply instead.
    with run_smtp_sink("127.0.0.1", port, "-W", "data:5"):
        status, report = run_bench(f"127.0.0.1:{port}", "-n", "2", "-c", "2", "--timeout", "1", "--no-pipelining")

    assert status == 1
    assert report["messages_failed"] == 2
    assert report["replies_by_stage"]["rcpt"] == {"250": 2}
    assert report["errors"] == {"data_timeout": 2}
    assert report["elapsed_s"] < 4
