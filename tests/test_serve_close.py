"""How relay serve ends connections with clients that stop reading, half-close or reset.

Every case runs ``relay serve`` as a subprocess and a raw socket client on
loopback.  The checks are what a client or an operator can see: the TCP
state of the client's socket, the replies, the log lines and the spool.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.server_helpers import EVENT_LOOPS, RelayProcess

HELP = b"HELP\r\n"
EHLO = b"EHLO client.example.com\r\n"
# A receive buffer this small keeps the client's kernel from absorbing replies.
CLIENT_RCVBUF = 4096
# Bounds on one flood: octets of commands sent and seconds spent sending.
FLOOD_OCTETS = 64 * 1024 * 1024
FLOOD_SECONDS = 20.0
# Seconds without progress after which the relay counts as no longer reading.
STALL_SECONDS = 1.0
# Linux's tcp_states.h: TCP_ESTABLISHED is 1 and TCP_CLOSE is 7.
TCP_ESTABLISHED = 1
TCP_CLOSE = 7


def tcp_state(sock: socket.socket) -> int:
    """Return the kernel's TCP state of ``sock`` (the first octet of TCP_INFO)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return int(struct.unpack("B", info[:1])[0])


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` every 50 ms for up to ``seconds``; return whether it became true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def read_reply(sock: socket.socket) -> str:
    """Read one reply of up to a few lines without reading further (the caller sends one command at a time)."""
    data = b""
    while not data.endswith(b"\r\n") or data.rsplit(b"\r\n", 2)[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data.decode("utf-8", "replace")


def flood_without_reading(sock: socket.socket, command: bytes) -> int:
    """Send ``command`` over and over without reading, until sending stalls; return the octets sent."""
    chunk = command * (65536 // len(command))
    sent = 0
    stalled_since: float | None = None
    deadline = time.monotonic() + FLOOD_SECONDS
    sock.setblocking(False)
    try:
        while sent < FLOOD_OCTETS and time.monotonic() < deadline:
            try:
                count = sock.send(chunk[sent % len(chunk) :])
            except BlockingIOError:
                count = 0
            if count:
                sent += count
                stalled_since = None
                continue
            now = time.monotonic()
            if stalled_since is None:
                stalled_since = now
            elif now - stalled_since >= STALL_SECONDS:
                return sent
            time.sleep(0.01)
    finally:
        sock.setblocking(True)
    raise AssertionError(f"the relay kept reading: {sent} octets sent")


def connect_small_buffer(port: int) -> socket.socket:
    """Connect with a small receive buffer and greet with EHLO."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.settimeout(10.0)
    sock.connect(("127.0.0.1", port))
    assert read_reply(sock).startswith("220")
    sock.sendall(EHLO)
    assert read_reply(sock).startswith("250")
    return sock


# -- closing with unsent replies ---------------------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_close_with_unsent_replies_aborts(event_loop: str, tmp_path: Path) -> None:
    """A timed-out client that never read its replies loses the connection after close_timeout.

    Without the bound, close() waited for the client to read megabytes of
    HELP replies, holding the connection's slot and memory for as long as
    the client stayed connected.
    """
    server = 'command_timeout = "1s"\nclose_timeout = "1s"\nmax_unsent_replies = "4M"'
    with RelayProcess(tmp_path, event_loop=event_loop, server=server) as relay:
        sock = connect_small_buffer(relay.port)
        with sock:
            flood_without_reading(sock, HELP)
            assert tcp_state(sock) == TCP_ESTABLISHED

            # command_timeout (1s) queues the 421 and closes, close_timeout (1s) aborts.
            assert wait_until(lambda: tcp_state(sock) == TCP_CLOSE, 8.0), "the relay kept the connection open"
            # Log lines are written in batches, so they may trail the reset a little.
            assert wait_until(lambda: "disconnect session=" in relay.log().split("close_timeout")[-1], 5.0)
            log = relay.log()
            assert "relay.smtp: timeout session=" in log, log
            assert log.count("close_timeout session=") == 1, log
