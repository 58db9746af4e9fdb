"""relay bench against Postfix's smtp-sink: a server that closes in the middle of a pipelined batch."""

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
