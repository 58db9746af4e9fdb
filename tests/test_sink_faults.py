"""relay sink fault injection: seeded draws, configured rates, counters and signals."""

from __future__ import annotations

import math
import os
import signal
import smtplib
import socket
import subprocess
import time

import orjson
import pytest
from bench_helpers import child_pids, process_running, relay_command, run_bench, running_sink, wait_for_listening

from conftest import REPO_ROOT, free_port


def _within(observed: int, trials: int, probability: float) -> bool:
    """Return True when observed successes are within 4 standard deviations of the rate."""
    spread = 4 * math.sqrt(trials * probability * (1 - probability))
    return abs(observed - trials * probability) <= spread


def test_fault_rates_follow_probabilities() -> None:
    faults = ("--fault", "mail:4xx=0.05", "--fault", "rcpt:5xx=0.2", "--fault", "data:4xx=0.1")
    with running_sink("--seed", "11", *faults) as sink:
        status, report = run_bench(sink.target, "-n", "1500", "-c", "4", "-m", "0", "--allow-errors")
    assert status == 0
    counters = sink.counters
    injected = counters["faults"]

    assert _within(injected["mail_4xx"], 1500, 0.05)
    mail_accepted = 1500 - injected["mail_4xx"]
    assert _within(injected["rcpt_5xx"], mail_accepted, 0.2)
    reached_data = mail_accepted - injected["rcpt_5xx"]
    assert _within(injected["data_4xx"], reached_data, 0.1)

    assert report["errors"]["mail_4xx"] == injected["mail_4xx"]
    assert report["errors"]["rcpt_5xx"] == injected["rcpt_5xx"]
    assert report["errors"]["data_4xx"] == injected["data_4xx"]
    assert report["messages_sent"] == counters["messages"] == reached_data - injected["data_4xx"]
    assert report["messages_failed"] == 1500 - counters["messages"]
    assert counters["rejected"] == injected["mail_4xx"] + injected["rcpt_5xx"] + injected["data_4xx"]


def test_same_seed_same_replies() -> None:
    results = []
    for _ in range(2):
        with running_sink("--seed", "5", "--fault", "rcpt:4xx=0.3", "--fault", "data:5xx=0.2") as sink:
            status, report = run_bench(sink.target, "-n", "200", "-c", "1", "-m", "0", "--allow-errors")
        assert status == 0
        results.append((sink.counters, report["reply_codes"]))
    assert results[0] == results[1]
    assert results[0][0]["faults"]["rcpt_4xx"] > 0


def test_connect_rejects_and_drops_counted() -> None:
    faults = ("--fault", "connect:5xx=0.25", "--fault", "connect:drop=0.1", "--fault", "data:drop=0.1")
    with running_sink("--seed", "3", *faults) as sink:
        status, report = run_bench(sink.target, "-n", "600", "-c", "4", "--allow-errors")
    assert status == 0
    injected = sink.counters["faults"]
    assert report["errors"]["greeting_5xx"] == injected["connect_5xx"]
    assert report["errors"]["connection_lost"] == injected["connect_drop"] + injected["data_drop"]
    assert report["messages_sent"] == sink.counters["messages"]
    assert report["messages_sent"] + report["messages_failed"] == 600
    assert _within(injected["connect_5xx"], 600, 0.25)
    assert _within(injected["connect_drop"], 600, 0.1)


def test_reply_delay_shows_in_latency() -> None:
    with running_sink("--delay", "40") as sink:
        status, report = run_bench(sink.target, "-n", "6", "-c", "2")
    assert status == 0
    latencies = report["latencies_ms"]
    # The histogram reports a value within 1/64 of the sample.
    assert latencies["greeting"]["p50"] >= 40 * (1 - 1 / 64)
    assert latencies["end_of_data"]["p50"] >= 40 * (1 - 1 / 64)


def test_sigusr1_prints_counters() -> None:
    with running_sink() as sink:
        status, _ = run_bench(sink.target, "-n", "25", "-c", "1", "-m", "0")
        assert status == 0
        sink.process.send_signal(signal.SIGUSR1)
        assert sink.process.stdout is not None
        line = sink.process.stdout.readline()
        counters = orjson.loads(line)
        assert counters["messages"] == 25
        assert counters["bytes"] == 25 * 1024
    assert sink.counters["messages"] == 25


def test_text_counters_at_exit() -> None:
    process = subprocess.Popen(
        relay_command("sink", "--listen", f"127.0.0.1:{free_port()}"),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_listening(process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert stdout.decode().startswith("sink connections=0 messages=0 bytes=0")
    assert " sink_stopped signal=SIGTERM connections=0 messages=0 bytes=0 " in stderr.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_logged_with_counters(signum: int) -> None:
    port = free_port()
    process = subprocess.Popen(
        relay_command("sink", "--listen", f"127.0.0.1:{port}", "--workers", "2", "--fault", "rcpt:4xx=1"),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_listening(process)
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@example.test", ["b@example.test"], b"Subject: x\r\n\r\nbody\r\n")
        # Each worker copies its counters once more as it stops, so the last line has this session.
        process.send_signal(signum)
        _stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    lines = [line for line in stderr.decode().splitlines() if " sink_stopped " in line]
    assert len(lines) == 1, stderr
    assert f" sink_stopped signal={signal.Signals(signum).name} connections=1 messages=0 " in lines[0]
    assert lines[0].endswith(" rcpt_4xx=1")


def test_invalid_fault_is_usage_error() -> None:
    for spec in ("rcpt:4xx", "helo:4xx=0.1", "rcpt:4xx=1.5"):
        completed = subprocess.run(
            relay_command("sink", "--fault", spec), cwd=REPO_ROOT, capture_output=True, timeout=30, check=False
        )
        assert completed.returncode == 2, spec
        assert b"invalid fault" in completed.stderr, completed.stderr
    completed = subprocess.run(
        relay_command("sink", "--fault", "rcpt:4xx=0.6", "--fault", "rcpt:5xx=0.6"),
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 2
    assert b"add up to 1.2" in completed.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("sink", "--delay", "inf"), b"--delay: inf is not between 0 and 3600000 milliseconds"),
        (("sink", "--delay", "nan"), b"--delay: nan is not between 0 and 3600000 milliseconds"),
        (("sink", "--hostname", "bad name"), b"--hostname 'bad name': not a host name"),
        (("bench", "127.0.0.1:9", "-n", "1", "--to", "{"), b"--to: invalid address pattern '{'"),
        (("bench", "127.0.0.1:9", "-n", "1", "--helo", ""), b"--helo '': not a host name"),
        (("bench", "127.0.0.1:9", "-n", "1", "--timeout", "nan"), b"--timeout: nan must be a finite number"),
        (("bench", "127.0.0.1:9", "-n", "1", "--rate", "nan"), b"--rate: nan must be a finite number"),
        (("bench", "127.0.0.1:9", "-d", "nan"), b"--duration: nan must be a finite number"),
        (("bench", "127.0.0.1:9", "-n", "1", "-s", "10G"), b"--size: 10G is above the maximum 1G"),
        (("bench", "127.0.0.1:9", "-n", "1", "-s", "1073741825"), b"--size: 1073741825 is above the maximum 1G"),
        (("bench", "127.0.0.1:9", "-d", "inf"), b"--duration: inf must be a finite number"),
        (("bench", "127.0.0.1:9", "-c", "300", "-P", "300"), b"--processes: 300 is above the maximum 256"),
        (("sink", "--workers", "300"), b"--workers: 300 is above the maximum 256"),
        (("bench", "127.0.0.1:9", "-n", "1", "--message-dir", "no-such-folder"),
         b"--message-dir no-such-folder: cannot read no-such-folder: No such file or directory"),
        (("serve", "--workers", "300"), b"--workers: 300 is above the maximum 256"),
    ],
)
def test_bad_option_values_are_usage_errors(args: tuple[str, ...], fragment: bytes) -> None:
    # Nothing listens on port 9: a usage error must come before any connection.
    completed = subprocess.run(relay_command(*args), cwd=REPO_ROOT, capture_output=True, timeout=30, check=False)
    assert completed.returncode == 2
    assert fragment in completed.stderr, completed.stderr
    assert b"Traceback" not in completed.stderr


def test_workers_stop_when_parent_killed() -> None:
    port = free_port()
    process = subprocess.Popen(
        relay_command("sink", "--listen", f"127.0.0.1:{port}", "--workers", "2"),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: list[int] = []
    try:
        wait_for_listening(process)
        workers = child_pids(process.pid)
        assert len(workers) == 2
        process.kill()
        process.wait(timeout=10)

        deadline = time.monotonic() + 10
        while any(process_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in workers if process_running(pid)] == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        for pid in workers:
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        process.stderr.close()
    assert stderr.count("supervisor_gone") == 2
