"""relay sink reply pacing: a client that pipelines without reading holds bounded sink memory."""

from __future__ import annotations

import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from bench_helpers import SinkProcess, relay_command, running_sink

from conftest import REPO_ROOT, free_port

EHLO = b"EHLO client.test\r\n"
# Input a client sends without reading replies.  Each EHLO reply is about ten
# times longer, so an unpaced sink buffers some 40 MB of replies for it.
FLOOD_OCTETS = 4 * 1024 * 1024
# Growth of the sink's resident memory that the test tolerates: the socket
# buffers, one read of input and the unsent replies up to their limit, with room
# for the allocator.
RSS_GROWTH_LIMIT = 16 * 1024 * 1024
# Seconds without room in the socket's send buffer after which the sink is
# taken to have stopped reading.
STALL = 1.0
TIME_LIMIT = 20.0


def resident_octets(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def read_reply(client: socket.socket) -> bytes:
    """Return one whole reply, every line of a multi-line reply included."""
    received = b""
    while True:
        chunk = client.recv(1)
        assert chunk, f"connection closed after {received!r}"
        received += chunk
        if received.endswith(b"\r\n") and received[:-2].rsplit(b"\r\n", 1)[-1][3:4] != b"-":
            return received


def flood(client: socket.socket, limit: int) -> int:
    """Send EHLO commands without reading until ``limit`` octets or a stall; return the octets sent."""
    client.setblocking(False)
    chunk = EHLO * (65536 // len(EHLO))
    sent = 0
    deadline = time.monotonic() + TIME_LIMIT
    while sent < limit and time.monotonic() < deadline:
        _, writable, _ = select.select([], [client], [], STALL)
        if not writable:
            break
        sent += client.send(chunk)
    return sent


def connect(sink: SinkProcess) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", sink.port), timeout=TIME_LIMIT)
    # A small receive buffer, so the sink's replies back up behind it.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert read_reply(client).startswith(b"220 ")
    return client


def test_unread_replies_pause_reading() -> None:
    with running_sink("--timeout", "60") as sink:
        with connect(sink) as client:
            before = resident_octets(sink.process.pid)

            sent = flood(client, FLOOD_OCTETS)
            time.sleep(0.5)  # let the sink handle what it read
            grown = resident_octets(sink.process.pid) - before
            assert grown < RSS_GROWTH_LIMIT, f"sink grew by {grown} octets after {sent} octets of commands"


def test_paused_connection_answers_every_command() -> None:
    # A tiny limit pauses reading many times while the client catches up;
    # no command may lose its reply across a pause.
    lines = 20_000
    with running_sink("--timeout", "60", "--max-unsent-replies", "1K") as sink:
        client = socket.create_connection(("127.0.0.1", sink.port), timeout=TIME_LIMIT)
        with client:
            assert read_reply(client).startswith(b"220 ")
            client.sendall(EHLO)
            reply_size = len(read_reply(client))

            client.sendall(EHLO * lines + b"QUIT\r\n")
            expected = lines * reply_size + len(b"221 2.0.0 Bye\r\n")
            received = b""
            deadline = time.monotonic() + TIME_LIMIT
            while len(received) < expected and time.monotonic() < deadline:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                received += chunk
    assert len(received) == expected
    assert received.endswith(b"221 2.0.0 Bye\r\n")
    assert sink.counters["commands"] == lines + 2


def test_postponed_replies_pause_reading() -> None:
    # With --delay the replies wait in timers instead of the write buffer; they count as unsent too.
    with running_sink("--timeout", "60", "--delay", "2000") as sink:
        with connect(sink) as client:
            before = resident_octets(sink.process.pid)
            sent = flood(client, FLOOD_OCTETS)
            time.sleep(0.5)
            grown = resident_octets(sink.process.pid) - before
            assert grown < RSS_GROWTH_LIMIT, f"sink grew by {grown} octets after {sent} octets of commands"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-1", "invalid size '-1'"),
        ("0", "0 is below the minimum 1 octet"),
        ("2G", "2147483648 is above the maximum 1073741824 octets (1G)"),
    ],
)
def test_bad_max_unsent_replies_is_usage_error(value: str, fragment: str) -> None:
    result = subprocess.run(
        relay_command("sink", "--listen", f"127.0.0.1:{free_port()}", "--max-unsent-replies", value),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("relay sink: ")
    assert f"--max-unsent-replies: {fragment}" in result.stderr


def test_max_unsent_replies_help_names_limits() -> None:
    result = subprocess.run(
        relay_command("sink", "--help"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    # argparse wraps help text at the terminal width, so compare with the line breaks removed.
    text = " ".join(result.stdout.split())
    assert "suffix K, M or G allowed, from 1 to 1G" in text
