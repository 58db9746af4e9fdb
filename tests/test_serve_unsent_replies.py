"""``server.max_unsent_replies``: relay serve stops reading a client that does not read its replies.

A raw socket client on loopback pipelines HELP commands (a 6-octet command
with a reply of about 120 octets) without reading, until its sends have
made no progress for a second, bounded in octets and seconds.  The relay's
resident memory then shows how many unsent replies it holds: kernel socket
buffers are not part of it, so the growth follows the configured limit, not
the loopback's buffer sizes.  Reading the replies afterwards shows that the
relay resumes and replies to every command.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_helpers import EVENT_LOOPS, Listener, RelayProcess, make_certificate, wait_until

HELP = b"HELP\r\n"
MIB = 1024 * 1024
# Bounds on one flood: octets of commands sent and seconds spent sending.
FLOOD_OCTETS = 256 * MIB
FLOOD_SECONDS = 30.0
# Seconds without progress after which the relay counts as no longer reading.
STALL_SECONDS = 1.0
# A receive buffer this small keeps the client's kernel from absorbing replies.
CLIENT_RCVBUF = 8192


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("unsent-replies-cert"))


def start_relay(directory: Path, certificate: tuple[Path, Path], limit: str, event_loop: str) -> RelayProcess:
    # HELP is not a junk command, so the error limits never end the flood.
    return RelayProcess(
        directory,
        event_loop=event_loop,
        listeners=[Listener(tls="starttls"), Listener(tls="implicit")],
        server=f'max_unsent_replies = "{limit}"',
        certificate=certificate,
    ).start()


@pytest.fixture
def relay_factory() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        try:
            assert relay.stop() == 0, relay.log()
        finally:
            relay.kill()


def resident_octets(pid: int) -> int:
    """Return the resident memory of a process, in octets, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def read_reply(sock: socket.socket, pending: bytearray) -> str:
    """Read one complete reply (multi-line joined by |); the pending octets stay in ``pending``."""
    lines: list[str] = []
    while True:
        while b"\r\n" not in pending:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {lines}"
            pending += chunk
        end = pending.index(b"\r\n")
        line = bytes(pending[:end])
        del pending[: end + 2]
        lines.append(line.decode("utf-8", "replace"))
        if line[3:4] != b"-":
            return "|".join(lines)


def connect(relay: RelayProcess, mode: str, cafile: Path) -> socket.socket:
    """Connect with a small receive buffer, greet with EHLO, and start TLS as ``mode`` selects."""
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    plain.settimeout(10.0)
    context = ssl.create_default_context(cafile=str(cafile))
    port = relay.listeners[1 if mode == "implicit" else 0].port
    plain.connect(("127.0.0.1", port))
    sock: socket.socket = plain
    if mode == "implicit":
        sock = context.wrap_socket(plain, server_hostname="localhost")
    pending = bytearray()
    assert read_reply(sock, pending).startswith("220")
    sock.sendall(b"EHLO client.example.com\r\n")
    assert read_reply(sock, pending).startswith("250")
    if mode == "starttls":
        sock.sendall(b"STARTTLS\r\n")
        assert read_reply(sock, pending).startswith("220")
        sock = context.wrap_socket(plain, server_hostname="localhost")
        sock.sendall(b"EHLO client.example.com\r\n")
        assert read_reply(sock, pending).startswith("250")
    assert not pending
    return sock


def flood(sock: socket.socket, command: bytes = HELP, minimum: int = 0) -> tuple[int, bytes, bool]:
    """Send ``command`` over and over without reading, until sending stalls or a bound is reached.

    Returns the octets sent, the octets of the last send that did not
    complete, and whether sending stalled.  A TLS socket must retry that send
    with the same octets (OpenSSL's SSL_write), so the caller sends them next.
    A stall before ``minimum`` octets are sent does not end the flood,
    because a slow relay may still be handling an earlier read.
    """
    chunk = command * (24576 // len(command))
    sent = 0
    stalled_since: float | None = None
    unsent = b""
    deadline = time.monotonic() + FLOOD_SECONDS
    sock.setblocking(False)
    try:
        while sent < FLOOD_OCTETS and time.monotonic() < deadline:
            unsent = chunk[sent % len(chunk) :]
            try:
                count = sock.send(unsent)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                count = 0
            if count:
                sent += count
                unsent = b""
                stalled_since = None
                continue
            now = time.monotonic()
            if stalled_since is None:
                stalled_since = now
            elif now - stalled_since >= STALL_SECONDS and sent >= minimum:
                return sent, unsent, True
            time.sleep(0.01)
        return sent, unsent, False
    finally:
        sock.setblocking(True)
        sock.settimeout(30.0)


def max_send_buffer() -> int:
    """Return the octets a TCP socket's send buffer can grow to, from /proc (tcp_wmem's maximum)."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


def drain(sock: socket.socket, pending: bytearray, commands: int) -> int:
    """Read replies until ``commands`` HELP replies have arrived; return how many did."""
    answered = 0
    deadline = time.monotonic() + 60.0
    while answered < commands and time.monotonic() < deadline:
        reply = read_reply(sock, pending)
        assert reply.startswith("214"), reply
        answered += 1
    return answered


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
def test_small_limit_stops_reading_then_resumes(
    mode: str,
    event_loop: str, tmp_path: Path, certificate: tuple[Path, Path], relay_factory: list[RelayProcess]
) -> None:
    relay = start_relay(tmp_path, certificate, "16K", event_loop)
    relay_factory.append(relay)
    assert relay.process is not None
    with connect(relay, mode, certificate[0]) as sock:
        before = resident_octets(relay.process.pid)
        sent, unsent, stalled = flood(sock)
        grown = resident_octets(relay.process.pid) - before

        assert stalled, f"the relay kept reading: {sent} octets sent"
        assert grown < 8 * MIB, f"resident memory grew by {grown} octets"

        # Resumes when the client reads: every complete command gets its reply.
        pending = bytearray()
        commands = sent // len(HELP)
        assert drain(sock, pending, commands) == commands
        sock.sendall(unsent)
        sent += len(unsent)
        # Complete the command the flood ended in, if any, then quit.
        tail = HELP[sent % len(HELP) :] if sent % len(HELP) else b""
        sock.sendall(tail + b"QUIT\r\n")
        rest = (sent + len(tail)) // len(HELP) - commands
        assert drain(sock, pending, rest) == rest
        assert read_reply(sock, pending).startswith("221")


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
def test_large_limit_holds_more_replies(
    mode: str,
    event_loop: str, tmp_path: Path, certificate: tuple[Path, Path], relay_factory: list[RelayProcess]
) -> None:
    # Above the transports' own high-water marks (64 KiB plain, 512 KiB TLS),
    # the relay keeps replies queued up to the configured limit before it stops.
    relay = start_relay(tmp_path, certificate, "24M", event_loop)
    relay_factory.append(relay)
    assert relay.process is not None
    with connect(relay, mode, certificate[0]) as sock:
        before = resident_octets(relay.process.pid)
        sent, _unsent, stalled = flood(sock)
        grown = resident_octets(relay.process.pid) - before

        assert stalled, f"the relay kept reading: {sent} octets sent"
        assert grown > 12 * MIB, f"resident memory grew by {grown} octets only"
        # A reply may be held about three times over: queued in the session,
        # joined for one write, and encrypted in the TLS transport's buffer.
        assert grown < 4 * 24 * MIB, f"resident memory grew by {grown} octets"


# The replies a flood can leave unsent past the limit: the one reply that
# crosses it (HELP's 214 is the longest here, 123 octets) and the 421 sent
# on the command timeout (48 octets).
REPLY_SLACK = 512


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
@pytest.mark.parametrize("command", [HELP, b"XYZZY\r\n"])
def test_unsent_replies_end_one_reply_past_limit(
    command: bytes, event_loop: str, tmp_path: Path, relay_factory: list[RelayProcess]
) -> None:
    """A plain-TCP client that never reads leaves at most the limit plus one reply unsent.

    The relay counted only the replies of the current read against the
    limit, and not those already in the transport's buffer, so about twice
    the limit could be left unsent.  The close_timeout line reports the
    octets in the transport's buffer when the connection is aborted.

    The relay's kernel takes replies first, up to the socket's maximum send
    buffer (4 MiB by default on Linux), and only the rest stays in the
    transport's buffer.  So the flood sends commands whose replies exceed
    that maximum plus twice the limit before it stops at a stall.
    """
    limit = MIB
    server = (
        f'max_unsent_replies = "{limit}"\ncommand_timeout = "1s"\nclose_timeout = "1s"\n'
        # Neither error limit may end the flood of unknown commands first.
        "max_errors = 100000000\nmax_junk_commands = 100000000"
    )
    relay = RelayProcess(tmp_path, event_loop=event_loop, server=server).start()
    relay_factory.append(relay)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.settimeout(10.0)
        sock.connect(("127.0.0.1", relay.listeners[0].port))
        pending = bytearray()
        assert read_reply(sock, pending).startswith("220")
        sock.sendall(b"EHLO client.example.com\r\n")
        assert read_reply(sock, pending).startswith("250")
        sock.sendall(command)
        reply = read_reply(sock, pending)
        assert reply.startswith(("214", "500")), reply
        # read_reply joins the lines of a reply with "|" in place of CRLF.
        reply_octets = len(reply.encode()) + reply.count("|") + 2
        assert not pending

        replies_needed = max_send_buffer() + 2 * limit
        minimum = replies_needed // reply_octets * len(command)
        sent, _unsent, stalled = flood(sock, command, minimum)
        assert sent >= minimum, f"only {sent} of {minimum} octets of commands sent in {FLOOD_SECONDS} s"
        assert stalled, f"the relay kept reading: {sent} octets sent"
        assert wait_until(lambda: "close_timeout session=" in relay.log(), 20.0), relay.log()

    match = re.search(r"close_timeout session=\S+ client=\S+ unsent=(\d+)", relay.log())
    assert match, relay.log()
    unsent = int(match.group(1))
    assert unsent > limit // 2, f"only {unsent} octets unsent"
    assert unsent <= limit + REPLY_SLACK, f"{unsent} octets unsent with max_unsent_replies = {limit}"
