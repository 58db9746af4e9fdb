"""The relay command line as an operator meets it: a closed standard output."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from bench_helpers import STARTUP_TIMEOUT, relay_command, wait_for_listening

from conftest import REPO_ROOT, free_port


def run_with_closed_stdout(*args: str, stdin: str = "", cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``relay ARGS`` with standard output a pipe whose reader has already gone (``| head`` that quit)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            relay_command(*args),
            cwd=cwd,
            input=stdin,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


def test_check_config_closed_stdout(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[server]\nhostname = \"mx.example.test\"\n")

    completed = run_with_closed_stdout("check-config", str(config))

    assert completed.stderr == ""
    assert completed.returncode == 1


def test_passwd_closed_stdout(tmp_path: Path) -> None:
    completed = run_with_closed_stdout("passwd", str(tmp_path / "passwords"), "alice", stdin="secret\n")

    assert completed.stderr == ""
    assert completed.returncode == 1
    assert (tmp_path / "passwords").read_text().startswith("alice:")


def test_sendmail_help_closed_stdout() -> None:
    completed = run_with_closed_stdout("sendmail", "--help")

    assert completed.stderr == ""
    assert completed.returncode == 1


def test_sink_and_bench_closed_stdout() -> None:
    port = free_port()
    read_end, write_end = os.pipe()
    os.close(read_end)
    sink = subprocess.Popen(
        relay_command("sink", "--listen", f"127.0.0.1:{port}"),
        cwd=REPO_ROOT,
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        wait_for_listening(sink)
        # SIGUSR1 prints the counters to the closed standard output.
        sink.send_signal(signal.SIGUSR1)
        bench = run_with_closed_stdout("bench", f"127.0.0.1:{port}", "-n", "20", "-c", "2")
        json_bench = run_with_closed_stdout("bench", f"127.0.0.1:{port}", "-n", "20", "-c", "2", "--json")
    finally:
        if sink.poll() is None:
            sink.send_signal(signal.SIGTERM)
        try:
            _, sink_stderr = sink.communicate(timeout=STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            sink.kill()
            _, sink_stderr = sink.communicate()

    assert bench.stderr == ""
    assert bench.returncode == 1
    assert json_bench.stderr == ""
    assert json_bench.returncode == 1
    assert "Traceback" not in sink_stderr.decode()
    assert "cannot listen" not in sink_stderr.decode()
    assert sink.returncode == 0
