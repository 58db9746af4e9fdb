"""How relay serve ends connections with clients that stop reading, half-close or reset.

Every case runs ``relay serve`` as a subprocess and a raw socket client on
loopback.  The checks are what a client or an operator can see: the TCP
state of the client's socket, the replies, the log lines and the spool.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.spool.writer import WRITER_LOCK
from tests.server_helpers import EVENT_LOOPS, Listener, RawClient, RelayProcess, make_certificate, wait_until

HELP = b"HELP\r\n"
EHLO = b"EHLO client.example.com\r\n"
# A receive buffer this small keeps the client's kernel from absorbing replies.
CLIENT_RCVBUF = 4096
# Bounds on one flood: octets of commands sent and seconds spent sending.
FLOOD_OCTETS = 64 * 1024 * 1024
FLOOD_SECONDS = 20.0
# Seconds without progress after which the relay counts as no longer reading.
STALL_SECONDS = 1.0
# With room for one connection, a slot that is not given back shows as 421 to the next client.
ONE_CONNECTION = "max_connections = 1"
# Linux's tcp_states.h: TCP_ESTABLISHED is 1 and TCP_CLOSE is 7.
TCP_ESTABLISHED = 1
TCP_CLOSE = 7


def tcp_state(sock: socket.socket) -> int:
    """Return the kernel's TCP state of ``sock`` (the first octet of TCP_INFO)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return int(struct.unpack("B", info[:1])[0])


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
    """Connect with a small receive buffer and greet with EHLO, retrying for up to 5 s while the relay is full."""
    deadline = time.monotonic() + 5.0
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.settimeout(10.0)
        sock.connect(("127.0.0.1", port))
        greeting = read_reply(sock)
        if greeting.startswith("220") or time.monotonic() > deadline:
            break
        sock.close()
        time.sleep(0.1)
    assert greeting.startswith("220 "), greeting
    sock.sendall(EHLO)
    assert read_reply(sock).startswith("250")
    return sock


def connect(relay: RelayProcess) -> RawClient:
    """Connect and read the 220 greeting, retrying for up to 5 s while the relay is full.

    A client's close reaches the relay a moment after the client returns,
    so the slot of the previous connection may still be taken.
    """
    deadline = time.monotonic() + 5.0
    while True:
        client = RawClient(relay.port)
        greeting = client.reply()
        if greeting.startswith("220") or time.monotonic() > deadline:
            break
        client.close()
        time.sleep(0.1)
    assert greeting.startswith("220 "), greeting
    return client


def assert_slot_free(relay: RelayProcess) -> None:
    """Check that a new client gets the 220 greeting, not the 421 of a full server."""
    connect(relay).close()


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- closing with unsent replies ---------------------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_close_with_unsent_replies_aborts(event_loop: str, tmp_path: Path) -> None:
    """A timed-out client that never read its replies loses the connection after close_timeout.

    Without the bound, close() waited for the client to read megabytes of
    HELP replies, holding the connection's slot and memory for as long as
    the client stayed connected.
    """
    server = f'command_timeout = "1s"\nclose_timeout = "1s"\nmax_unsent_replies = "4M"\n{ONE_CONNECTION}'
    with RelayProcess(tmp_path, event_loop=event_loop, server=server) as relay:
        sock = connect_small_buffer(relay.port)
        with sock:
            flood_without_reading(sock, HELP)
            assert tcp_state(sock) == TCP_ESTABLISHED

            # command_timeout (1s) queues the 421 and closes, close_timeout (1s) aborts.
            assert wait_until(lambda: tcp_state(sock) == TCP_CLOSE, 8.0), "the relay kept the connection open"
            # Log lines are written in batches, so they may trail the reset a little.
            assert wait_until(lambda: "close_timeout session=" in relay.log(), 5.0), relay.log()
            assert wait_until(lambda: "disconnect session=" in relay.log().split("close_timeout")[-1], 5.0)
            log = relay.log()
            assert "relay.smtp: timeout session=" in log, log
            assert log.count("close_timeout session=") == 1, log
        assert_slot_free(relay)



@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_shutdown_skips_grace_for_closed(event_loop: str, tmp_path: Path) -> None:
    """SIGTERM does not wait shutdown_grace for a closed session whose client reads nothing.

    The session carries no message, yet the grace waited for its close and
    the worker stopped without its disconnect line.
    """
    server = 'command_timeout = "1s"\nclose_timeout = "2m"\nshutdown_grace = "20s"\nmax_unsent_replies = "4M"'
    relay = RelayProcess(tmp_path, event_loop=event_loop, server=server).start()
    try:
        sock = connect_small_buffer(relay.port)
        with sock:
            flood_without_reading(sock, HELP)
            assert wait_until(lambda: "relay.smtp: timeout session=" in relay.log(), 5.0), relay.log()

            started = time.monotonic()
            assert relay.stop(30.0) == 0
            assert time.monotonic() - started < 5.0
        log = relay.log()
        assert "disconnect session=" in log.split("relay.smtp: timeout session=")[-1], log
    finally:
        relay.kill()

# -- half-close ------------------------------------------------------------------

ENVELOPE = b"MAIL FROM:<half@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n"


@pytest.fixture(scope="module", params=EVENT_LOOPS)
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    directory = tmp_path_factory.mktemp(f"close-{request.param}")
    with RelayProcess(directory, event_loop=request.param, server=ONE_CONNECTION) as started:
        yield started


def senders(relay: RelayProcess) -> list[str]:
    return [message.envelope.sender for message, _body in relay.spooled()]


@pytest.mark.parametrize(
    ("partial", "expected"),
    [
        pytest.param(b"DATA\r\nSubject: half\r\n\r\nno end of data\r\n", ["354"], id="data"),
        pytest.param(b"BDAT 100 LAST\r\n0123456789", [], id="bdat-inside-chunk"),
        pytest.param(b"BDAT 10\r\n0123456789", ["250"], id="bdat-between-chunks"),
    ],
)
def test_half_close_mid_message(relay: RelayProcess, partial: bytes, expected: list[str]) -> None:
    """A client that half-closes inside a message gets the replies due, then the close; nothing is queued."""
    sender = f"half-{len(partial)}@example.com"
    with connect(relay) as client:
        client.exchange(EHLO, ["250"])
        client.exchange(ENVELOPE.replace(b"half@example.com", sender.encode()), ["250", "250"])
        client.send(partial)
        client.sock.shutdown(socket.SHUT_WR)
        client.sock.settimeout(5.0)
        client.exchange(b"", expected)
        assert client.closed()
    assert sender not in senders(relay)
    assert_slot_free(relay)
    log = relay.log()
    assert "Traceback" not in log, log
    assert "loop_exception" not in log, log


def test_half_close_after_end_of_data(relay: RelayProcess) -> None:
    """A client that half-closes right after the final dot still gets its 250, and the message is queued."""
    with connect(relay) as client:
        client.exchange(EHLO, ["250"])
        client.exchange(ENVELOPE.replace(b"half@", b"half-done@") + b"DATA\r\n", ["250", "250", "354"])
        client.send(b"Subject: done\r\n\r\nbody\r\n.\r\n")
        client.sock.shutdown(socket.SHUT_WR)
        client.sock.settimeout(10.0)
        assert client.reply().startswith("250 2.0.0")
        assert client.closed()
    assert senders(relay).count("half-done@example.com") == 1
    assert_slot_free(relay)


# -- reset while the spool commits --------------------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_reset_during_commit(event_loop: str, tmp_path: Path) -> None:
    """A client reset while its message is being committed: queued once, logged once, slot given back."""
    with RelayProcess(tmp_path, event_loop=event_loop, server=ONE_CONNECTION) as relay:
        client = connect(relay)
        client.exchange(EHLO, ["250"])
        client.exchange(ENVELOPE.replace(b"half@", b"reset@") + b"DATA\r\n", ["250", "250", "354"])
        # Another open file description of writer.lock holds the commit until it is released.
        holder = os.open(relay.spool / WRITER_LOCK, os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            client.send(b"Subject: reset\r\n\r\nbody\r\n.\r\n")
            time.sleep(0.5)
            reset(client.sock)
            # The RST reaches the relay's socket while the commit still waits for the lock.
            time.sleep(0.5)
            assert "relay.smtp: queued " not in relay.log()
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)
        assert wait_until(lambda: "messages=1 " in relay.log(), 10.0), relay.log()
        assert senders(relay) == ["reset@example.com"]
        assert_slot_free(relay)
        log = relay.log()
        assert log.count("relay.smtp: queued ") == 1, log
        assert log.count("messages=1 ") == 1, log


# -- TLS handshake after STARTTLS ----------------------------------------------------


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_stalled_starttls_frees_slot(event_loop: str, tmp_path: Path) -> None:
    """A client that sends half a ClientHello after STARTTLS is dropped after tls_handshake_timeout."""
    relay = RelayProcess(
        tmp_path,
        event_loop=event_loop,
        listeners=[Listener(tls="starttls")],
        server=f'tls_handshake_timeout = "1s"\n{ONE_CONNECTION}',
        certificate=make_certificate(tmp_path),
    )
    with relay:
        client = connect(relay)
        client.exchange(EHLO, ["250"])
        client.exchange(b"STARTTLS\r\n", ["220"])
        client.send(b"\x16\x03\x01\x00")
        started = time.monotonic()
        assert client.closed(8.0)
        assert time.monotonic() - started < 5
        client.close()
        assert wait_until(lambda: "tls_failed" in relay.log(), 5.0), relay.log()
        assert_slot_free(relay)


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_shutdown_aborts_stalled_starttls(event_loop: str, tmp_path: Path) -> None:
    """SIGTERM does not wait tls_handshake_timeout for a client that stalls its STARTTLS handshake.

    The handshake carries no message, yet the stop waited for it as for a
    commit in flight, past shutdown_grace.
    """
    relay = RelayProcess(
        tmp_path,
        event_loop=event_loop,
        listeners=[Listener(tls="starttls")],
        server='shutdown_grace = "1s"\ntls_handshake_timeout = "2m"',
        certificate=make_certificate(tmp_path),
    ).start()
    try:
        client = connect(relay)
        client.exchange(EHLO, ["250"])
        client.exchange(b"STARTTLS\r\n", ["220"])
        client.send(b"\x16\x03\x01\x00")

        started = time.monotonic()
        assert relay.stop(30.0) == 0
        assert time.monotonic() - started < 10.0
        assert client.closed(5.0)
        client.close()
        log = relay.log()
        assert "disconnect session=" in log.split("stopping signal=SIGTERM")[-1], log
    finally:
        relay.kill()
