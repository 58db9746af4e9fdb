"""The relay command line as an operator meets it: usage errors and a closed standard output."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
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
    config.write_text('[server]\nhostname = "mx.example.test"\n')

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


@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (("serve", "--bogus"), "relay serve: error: unrecognized arguments: --bogus"),
        (("queue", "list", "--bogus"), "relay queue list: error: unrecognized arguments: --bogus"),
        (("status", "extra"), "relay status: error: unrecognized arguments: extra"),
        (("check-config", "a.toml", "b.toml"), "relay check-config: error: unrecognized arguments: b.toml"),
        (("bench", "127.0.0.1:9", "--frob"), "relay bench: error: unrecognized arguments: --frob"),
        (("bench", "127.0.0.1:9", "-c", "65536"), "relay bench: --concurrency: 65536 is above the maximum 65535"),
        (("bench", "127.0.0.1:9", "-s", "100"), "relay bench: --size 100: 100 octets is below the minimum 224"),
        (
            ("bench", "127.0.0.1:9", "--rate", "1e200", "-d", "1e200"),
            "relay bench: --rate 1e+200 for --duration 1e+200: the number of messages is not finite",
        ),
        (("serve", "--listen", "nowhere"), "relay serve: --listen: invalid address 'nowhere': missing port"),
        (("serve", "--workers", "0"), "relay serve: --workers: 0 is below the minimum 1"),
        (("serve", "--spool", ""), "relay serve: --spool is empty"),
        (("mailbox", "alice", "x"), "relay mailbox: error: argument N: expected a message number of at least 1"),
        (("mailbox", "alice", "1.5"), "relay mailbox: error: argument N: expected a message number of at least 1"),
        (("mailbox", "alice", "0"), "relay mailbox: error: argument N: expected a message number of at least 1"),
        (("mailbox", "alice", "-1"), "relay mailbox: error: argument N: expected a message number of at least 1"),
    ],
)
def test_usage_error_names_subcommand(tmp_path: Path, args: tuple[str, ...], prefix: str) -> None:
    # Nothing listens on port 9, and tmp_path keeps a spool that serve might create out of the tree.
    completed = subprocess.run(
        relay_command(*args),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 2
    last_line = completed.stderr.splitlines()[-1]
    assert last_line.startswith(prefix), completed.stderr
    assert "Traceback" not in completed.stderr
    assert list(tmp_path.iterdir()) == []


def test_serve_script_keeps_working_directory(tmp_path: Path) -> None:
    if not (REPO_ROOT / ".venv" / "bin" / "relay").exists():
        pytest.skip("scripts/serve would first build .venv; run scripts/test or scripts/serve once")
    # An invalid value makes relay serve exit after reading the file, before it listens.
    (tmp_path / "relay.toml").write_text("[server]\nmax_errors = 0\n")

    completed = subprocess.run(
        [str(REPO_ROOT / "scripts" / "serve"), "--config", "relay.toml"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.stderr == "relay.toml:server.max_errors: value 0 is below the minimum 1\n"
    assert completed.returncode == 1
