"""relay sink idle timeout: silent and stalled clients are closed with 421 and counted."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from bench_helpers import SinkProcess, make_certificate, relay_command, running_sink, wait_for_listening

from conftest import REPO_ROOT, free_port

TIMEOUT = 0.3
TIMEOUT_REPLY = b"421 4.4.2 Timeout exceeded, closing connection\r\n"
# Seconds a test waits for a reply before it fails.  It is far above TIMEOUT,
# so a loaded machine does not fail the suite.
READ_LIMIT = 10.0


def _connect(sink: SinkProcess) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", sink.port), timeout=READ_LIMIT)
    assert _read_reply(client).startswith(b"220 ")
    return client


def _read_reply(client: socket.socket) -> bytes:
    """Return one whole reply (every line of a multi-line reply), or b"" at end of stream."""
    received = b""
    while True:
        chunk = client.recv(1)
        if not chunk:
            return received
        received += chunk
        if received.endswith(b"\r\n"):
            last_line = received[: -2].rsplit(b"\r\n", 1)[-1]
            if last_line[3:4] != b"-":
                return received


def _command(client: socket.socket, line: bytes) -> bytes:
    client.sendall(line + b"\r\n")
    return _read_reply(client)


def _start_transaction(client: socket.socket) -> None:
    assert _command(client, b"EHLO client.test").startswith(b"250-")
    assert _command(client, b"MAIL FROM:<a@example.test>").startswith(b"250 ")
    assert _command(client, b"RCPT TO:<b@example.test>").startswith(b"250 ")


def _assert_timed_out(client: socket.socket, since: float) -> None:
    assert _read_reply(client) == TIMEOUT_REPLY
    waited = time.monotonic() - since
    assert waited >= TIMEOUT - 0.02, waited
    assert client.recv(1) == b""


def test_silent_client_gets_421() -> None:
    with running_sink("--timeout", str(TIMEOUT)) as sink:
        with _connect(sink) as client:
            _assert_timed_out(client, time.monotonic())
    assert sink.counters["timeouts"] == 1
    assert sink.counters["connections"] == 1
    assert "Traceback" not in sink.stderr


def test_silent_after_commands_gets_421() -> None:
    with running_sink("--timeout", str(TIMEOUT)) as sink:
        with _connect(sink) as client:
            assert _command(client, b"EHLO client.test").startswith(b"250-")
            _assert_timed_out(client, time.monotonic())
    assert sink.counters["timeouts"] == 1


def test_stall_mid_data_gets_421() -> None:
    with running_sink("--timeout", str(TIMEOUT)) as sink:
        with _connect(sink) as client:
            _start_transaction(client)
            assert _command(client, b"DATA").startswith(b"354 ")
            client.sendall(b"Subject: stalled\r\n\r\nfirst line of the body\r\n")
            _assert_timed_out(client, time.monotonic())
    assert sink.counters["timeouts"] == 1
    assert sink.counters["messages"] == 0


def test_stall_mid_bdat_chunk_gets_421() -> None:
    with running_sink("--timeout", str(TIMEOUT)) as sink:
        with _connect(sink) as client:
            _start_transaction(client)
            client.sendall(b"BDAT 100 LAST\r\n" + b"x" * 10)
            _assert_timed_out(client, time.monotonic())
    assert sink.counters["timeouts"] == 1
    assert sink.counters["messages"] == 0


def test_active_client_not_cut() -> None:
    timeout = 0.4
    interval = 0.1
    with running_sink("--timeout", str(timeout)) as sink:
        with _connect(sink) as client:
            started = time.monotonic()
            for _ in range(8):
                time.sleep(interval)
                assert _command(client, b"NOOP") == b"250 2.0.0 Ok\r\n"
            _start_transaction(client)
            assert _command(client, b"DATA").startswith(b"354 ")
            for number in range(8):
                time.sleep(interval)
                client.sendall(b"body line %d\r\n" % number)
            time.sleep(interval)
            assert _command(client, b".").startswith(b"250 ")
            elapsed = time.monotonic() - started
            assert _command(client, b"QUIT") == b"221 2.0.0 Bye\r\n"
    # The session lasted several timeouts, but no pause reached one.
    assert elapsed > 3 * timeout
    assert sink.counters["timeouts"] == 0
    assert sink.counters["messages"] == 1


def test_postponed_replies_not_idle() -> None:
    # Each reply comes 0.6 s late, twice the timeout, and the client waits for it.
    with running_sink("--timeout", str(TIMEOUT), "--delay", "600") as sink:
        with _connect(sink) as client:
            assert _command(client, b"EHLO client.test").startswith(b"250-")
            assert _command(client, b"QUIT") == b"221 2.0.0 Bye\r\n"
    assert sink.counters["timeouts"] == 0


def test_client_not_reading_is_aborted() -> None:
    ehlo_count = 100_000
    with running_sink("--timeout", str(TIMEOUT)) as sink:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive buffer, so the sink's replies back up behind it.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(READ_LIMIT)
        with client:
            client.connect(("127.0.0.1", sink.port))
            client.sendall(b"EHLO client.test\r\n" * ehlo_count)
            # The sink's replies, about 13 MB, are far more than the socket
            # buffers hold, so it still has unsent replies when it times out.
            time.sleep(TIMEOUT + 1.0)
            received = 0
            deadline = time.monotonic() + READ_LIMIT
            try:
                while time.monotonic() < deadline:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    received += len(chunk)
            except ConnectionResetError:
                pass
    assert sink.counters["timeouts"] == 1
    assert received < ehlo_count * 100
    assert "Traceback" not in sink.stderr


def test_starttls_handshake_stall_counted(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    with running_sink("--timeout", str(TIMEOUT), "--tls-cert", str(cert), "--tls-key", str(key)) as sink:
        with _connect(sink) as client:
            assert _command(client, b"STARTTLS").startswith(b"220 ")
            started = time.monotonic()
            # No ClientHello follows, so the handshake never starts.
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - started >= TIMEOUT - 0.02
    assert sink.counters["timeouts"] == 1
    assert "Traceback" not in sink.stderr


def test_timeouts_summed_across_workers() -> None:
    with running_sink("--timeout", str(TIMEOUT), "--workers", "2") as sink:
        clients = [_connect(sink) for _ in range(3)]
        try:
            for client in clients:
                assert _read_reply(client) == TIMEOUT_REPLY
        finally:
            for client in clients:
                client.close()
    assert sink.counters["timeouts"] == 3


def test_text_summary_shows_timeouts() -> None:
    port = free_port()
    process = subprocess.Popen(
        relay_command("sink", "--listen", f"127.0.0.1:{port}", "--timeout", str(TIMEOUT)),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_listening(process)
        with socket.create_connection(("127.0.0.1", port), timeout=READ_LIMIT) as client:
            assert _read_reply(client).startswith(b"220 ")
            assert _read_reply(client) == TIMEOUT_REPLY
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert " timeouts=1" in stdout.decode()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf"])
def test_bad_timeout_is_usage_error(value: str) -> None:
    completed = subprocess.run(
        # "--timeout=VALUE", because argparse reads a lone "-inf" as an option.
        relay_command("sink", f"--timeout={value}"), cwd=REPO_ROOT, capture_output=True, timeout=30, check=False
    )
    assert completed.returncode == 2
    expected = f"--timeout: {float(value):g} must be a finite number of seconds above 0"
    assert expected.encode() in completed.stderr, completed.stderr
    assert b"Traceback" not in completed.stderr


def test_non_numeric_timeout_is_usage_error() -> None:
    completed = subprocess.run(
        relay_command("sink", "--timeout", "soon"), cwd=REPO_ROOT, capture_output=True, timeout=30, check=False
    )
    assert completed.returncode == 2
    assert b"--timeout: invalid float value: 'soon'" in completed.stderr, completed.stderr
