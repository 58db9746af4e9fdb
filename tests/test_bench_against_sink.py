"""relay bench against relay sink: the counts both report agree, in every mode."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from bench_helpers import (
    SinkProcess,
    child_pids,
    make_certificate,
    process_running,
    relay_command,
    run_bench,
    running_sink,
)

from conftest import REPO_ROOT, require_corpus

LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max")


def _assert_monotonic(summary: dict[str, Any]) -> None:
    values = [summary[key] for key in LATENCY_KEYS]
    assert values == sorted(values), summary


def test_counts_match_sink() -> None:
    with running_sink() as sink:
        status, report = run_bench(sink.target, "-n", "600", "-c", "8", "-r", "2")
    assert status == 0
    assert report["messages_sent"] == 600
    assert report["messages_failed"] == 0
    assert sink.counters["messages"] == 600
    assert sink.counters["recipients"] == 1200
    assert sink.counters["connections"] == report["connections"] == 600
    assert sink.counters["bytes"] == report["bytes_sent"] == 600 * 1024
    assert report["reply_codes"]["354"] == 600
    assert report["messages_per_s"] > 0
    assert report["bytes_per_s"] > 0


def test_recipients_sent_match_sink() -> None:
    # Rejected recipients and rejected messages: only the recipients of the
    # messages the sink accepted count on both sides.
    with running_sink("--seed", "7", "--fault", "rcpt:4xx=0.2", "--fault", "data:5xx=0.2") as sink:
        status, report = run_bench(sink.target, "-n", "200", "-c", "4", "-r", "3", "-m", "5")
    assert status == 1
    assert report["messages_sent"] == sink.counters["messages"]
    assert report["recipients_sent"] == sink.counters["recipients"]
    assert report["recipients_accepted"] > report["recipients_sent"]


def test_json_report_names_settings() -> None:
    with running_sink() as sink:
        status, report = run_bench(sink.target, "-n", "5", "-c", "2", "-r", "2", "-s", "2K", "--bdat")
    assert status == 0
    assert report["settings"] == {
        "target": sink.target,
        "concurrency": 2,
        "processes": 1,
        "messages": 5,
        "duration_s": None,
        "per_connection": 1,
        "rate": None,
        "timeout_s": 30.0,
        "message_octets": 2048,
        "message_dir": None,
        "message_files": 1,
        "recipients": 2,
        "pipelining": True,
        "bdat": True,
        "starttls": False,
        "auth": False,
    }


@pytest.mark.parametrize("size", [225, 307])
def test_odd_sizes_arrive_exact(size: int) -> None:
    with running_sink() as sink:
        status, report = run_bench(sink.target, "-n", "2", "-c", "1", "-s", str(size))
    assert status == 0
    assert report["bytes_sent"] == 2 * size
    assert sink.counters["bytes"] == 2 * size


def test_percentiles_monotonic_for_every_phase() -> None:
    with running_sink() as sink:
        status, report = run_bench(sink.target, "-n", "400", "-c", "4", "-m", "10")
    assert status == 0
    # Connections take messages as they come free, so one may start an 11th batch of 10.
    assert 40 <= report["connections"] <= 44
    _assert_monotonic(report["latency_ms"])
    for phase in ("connect", "greeting", "end_of_data", "transaction"):
        _assert_monotonic(report["latencies_ms"][phase])
    assert report["latencies_ms"]["end_of_data"]["count"] == 400
    assert report["latencies_ms"]["connect"]["count"] == report["connections"]


def test_bdat_without_pipelining_counts() -> None:
    with running_sink() as sink:
        status, report = run_bench(
            sink.target, "-n", "200", "-c", "4", "-m", "0", "--bdat", "--no-pipelining", "-s", "20K"
        )
    assert status == 0
    assert report["messages_sent"] == 200
    assert sink.counters["messages"] == 200
    assert sink.counters["bytes"] == 200 * 20 * 1024
    assert "data" not in report["replies_by_stage"]


def test_corpus_folder_sends_every_file() -> None:
    corpus = require_corpus("cpython-email")
    files = sorted(path for path in corpus.iterdir() if path.is_file() and path.stat().st_size)
    expected_octets = 0
    for path in files:
        crlf = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        expected_octets += len(crlf) if crlf.endswith(b"\r\n") else len(crlf) + 2
    with running_sink() as sink:
        status, report = run_bench(sink.target, "-n", str(len(files) * 2), "-c", "3", "--message-dir", str(corpus))
    assert status == 0
    assert report["messages_sent"] == len(files) * 2
    assert sink.counters["bytes"] == report["bytes_sent"] == 2 * expected_octets


def test_processes_share_the_load() -> None:
    with running_sink("--workers", "2") as sink:
        status, report = run_bench(sink.target, "-n", "801", "-c", "6", "-P", "3", "--to", "user{n}.{r}@example.test")
    assert status == 0
    assert report["messages_sent"] == 801
    assert sink.counters["messages"] == 801
    assert report["latencies_ms"]["transaction"]["count"] == 801


def test_open_loop_rate_and_duration() -> None:
    with running_sink() as sink:
        status, report = run_bench(sink.target, "--rate", "200", "-d", "1.0", "-c", "4", "-m", "0")
    assert status == 0
    assert 190 <= report["messages_sent"] <= 201
    assert sink.counters["messages"] == report["messages_sent"]
    assert report["elapsed_s"] >= 0.99


def test_open_loop_latency_includes_waiting() -> None:
    # One connection and replies delayed 20 ms cap the server at about 25
    # messages/s (two delayed replies: to MAIL+RCPT+DATA, then to the body).
    # Offered 40/s for 0.5 s, the last message waits about 0.35 s for the
    # connection: the backlog shows in the transaction latency only.
    with running_sink("--delay", "20") as sink:
        status, report = run_bench(sink.target, "--rate", "40", "-n", "20", "-c", "1", "-m", "0")
    assert status == 0
    latencies = report["latencies_ms"]
    assert latencies["end_of_data"]["p50"] < 100
    assert latencies["transaction"]["max"] > 250


def test_open_loop_overload_ends_in_time() -> None:
    # A billion messages due within one second: far more than two connections
    # can send, so nearly all of them are still waiting when the duration is
    # over.  With the default --timeout of 30 s, a run that kept starting
    # overdue messages for one more timeout would last 31 s.
    started = time.monotonic()
    with running_sink() as sink:
        status, report = run_bench(sink.target, "--rate", "1e9", "-d", "1", "-c", "2", "-m", "0", timeout=60)
    took = time.monotonic() - started

    assert status == 1
    assert report["messages_sent"] > 0
    assert report["messages_sent"] + report["messages_failed"] == 1_000_000_000
    assert report["errors"] == {"not_started": report["messages_failed"]}
    assert sink.counters["messages"] == report["messages_sent"]
    assert report["elapsed_s"] < 5
    assert took < 20


def test_concurrency_above_count_opens_few() -> None:
    with running_sink() as sink:
        status, report = run_bench(sink.target, "-n", "3", "-c", "60000", timeout=30)
    assert status == 0
    assert report["messages_sent"] == 3
    assert report["connections"] == 3
    assert sink.counters["connections"] == 3


def test_starttls_and_auth_on_sink(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    password_file = tmp_path / "password"
    password_file.write_text("secret\n")
    with running_sink("--tls-cert", str(cert), "--tls-key", str(key)) as sink:
        status, report = run_bench(
            sink.target,
            "-n",
            "30",
            "-c",
            "3",
            "-m",
            "5",
            "--starttls",
            "--tls-no-verify",
            "--auth-user",
            "bench",
            "--auth-password-file",
            str(password_file),
        )
    assert status == 0, report["errors"]
    assert report["messages_sent"] == 30
    assert report["replies_by_stage"]["starttls"] == {"220": report["connections"]}
    assert report["replies_by_stage"]["auth"] == {"235": report["connections"]}
    assert sink.counters["messages"] == 30


def test_starttls_verified_fails_on_self_signed(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    with running_sink("--tls-cert", str(cert), "--tls-key", str(key)) as sink:
        status, report = run_bench(sink.target, "-n", "3", "-c", "1", "--starttls")
    assert status == 1
    assert report["messages_failed"] == 3
    assert report["errors"] == {"tls_handshake": 3}


def test_failed_connections_exit_status() -> None:
    with running_sink() as sink:
        target = sink.target
    status, report = run_bench(target, "-n", "5", "-c", "1")
    assert status == 1
    assert report["messages_failed"] == 5
    assert report["errors"] == {"connect_refused": 5}
    status, report = run_bench(target, "-n", "5", "-c", "1", "--allow-errors")
    assert status == 0


def test_target_host_name_resolved() -> None:
    with running_sink() as sink:
        status, report = run_bench(f"localhost:{sink.port}", "-n", "4", "-c", "2")
    assert status == 0
    assert report["messages_sent"] == 4
    assert report["settings"]["target"] == f"localhost:{sink.port}"
    assert sink.counters["messages"] == 4


def test_unresolvable_target_is_usage_error() -> None:
    # In a network namespace of its own the process has no route, so the
    # lookup fails at once and no query leaves the machine.
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True, check=False).returncode:
        pytest.skip("needs unshare -n (util-linux, and root or user namespaces)")
    completed = subprocess.run(
        [unshare, "-n", *relay_command("bench", "no-such-host.invalid:2525", "-n", "1000", "-c", "2")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith(
        "relay bench: bench target no-such-host.invalid:2525: cannot resolve no-such-host.invalid"
    ), completed.stderr
    assert "give an IP address or a name that resolves" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_stalled_greeting_timeout_named() -> None:
    # A one-hour delay holds back every reply, the greeting first.
    with running_sink("--delay", "3600000") as sink:
        status, report = run_bench(sink.target, "-n", "4", "-c", "2", "--timeout", "1")
    assert status == 1
    assert report["messages_failed"] == 4
    assert report["errors"] == {"greeting_timeout": 4}
    assert report["elapsed_s"] < 4
    assert sink.counters["connections"] == 4


def test_connect_errors_named_by_errno() -> None:
    def limit_open_files() -> None:
        # Fewer descriptors than connections, so some connects fail with EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with running_sink() as sink:
        completed = subprocess.run(
            relay_command("bench", sink.target, "--json", "-c", "100", "-n", "100"),
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=60,
            check=False,
            preexec_fn=limit_open_files,
        )
    report = orjson.loads(completed.stdout)

    assert completed.returncode == 1
    assert report["errors"]["connect_emfile"] > 0
    assert report["messages_sent"] + report["messages_failed"] == 100
    assert [kind for kind in report["errors"] if kind[len("connect_") :].isdigit()] == []


def _wait_for_sink_connections(sink: SinkProcess, deadline: float) -> None:
    """Ask the sink for its counters (SIGUSR1) until some client has connected."""
    assert sink.process.stdout is not None
    while time.monotonic() < deadline:
        sink.process.send_signal(signal.SIGUSR1)
        if orjson.loads(sink.process.stdout.readline())["connections"] > 0:
            return
        time.sleep(0.1)
    raise AssertionError("relay bench did not connect to the sink")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sigint_reports_partial_run(processes: str) -> None:
    # Each reply takes 200 ms, so the 30 s run is still going when Ctrl-C comes.
    with running_sink("--delay", "200") as sink:
        bench = subprocess.Popen(
            relay_command("bench", sink.target, "--json", "-d", "30", "-c", "4", "-P", processes),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Ctrl-C reaches the terminal's whole process group; a session of its
            # own lets the test do the same.  A shell's background job would
            # inherit SIGINT ignored, so the default is restored.
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            _wait_for_sink_connections(sink, time.monotonic() + 15)
            interrupted_at = time.monotonic()
            os.killpg(bench.pid, signal.SIGINT)
            stdout, stderr = bench.communicate(timeout=15)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.communicate()
        stopped_after = time.monotonic() - interrupted_at

    assert bench.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr
    report = orjson.loads(stdout)
    assert report["interrupted"] is True
    assert report["connections"] >= 1
    assert report["errors"].get("worker_process_failed", 0) == 0
    assert report["elapsed_s"] < 20
    assert stopped_after < 10


def test_children_stop_when_bench_killed() -> None:
    with running_sink() as sink:
        bench = subprocess.Popen(
            relay_command("bench", sink.target, "--json", "-d", "30", "-c", "4", "-P", "2"),
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        children: list[int] = []
        try:
            _wait_for_sink_connections(sink, time.monotonic() + 15)
            children = child_pids(bench.pid)
            assert len(children) == 2
            bench.kill()
            bench.wait(timeout=10)

            deadline = time.monotonic() + 10
            while any(process_running(pid) for pid in children) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [pid for pid in children if process_running(pid)] == []
        finally:
            for pid in children:
                if process_running(pid):
                    os.kill(pid, signal.SIGKILL)
            if bench.poll() is None:
                bench.kill()
            assert bench.stderr is not None
            stderr = bench.stderr.read().decode()
            bench.stderr.close()
    assert "Traceback" not in stderr


def test_text_report_shows_target_and_mean() -> None:
    with running_sink() as sink:
        completed = subprocess.run(
            relay_command("bench", sink.target, "-n", "20", "-c", "2", "-r", "2"),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0] == f"target     {sink.target} with 2 connections in 1 process"
    assert lines[1].startswith("messages   20 sent, 0 failed in ")
    assert lines[3] == "recipients 40 accepted, 0 rejected, 40 in messages sent"
    assert lines[4].split() == ["latency", "ms", "count", "mean", "p50", "p90", "p99", "p99.9", "max"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[5:9]}
    assert list(rows) == ["connect", "greeting", "end_of_data", "transaction"]
    for kind, values in rows.items():
        assert len(values) == 7, kind
    assert rows["end_of_data"][0] == "20"
    assert lines[-1] == "errors     none"
