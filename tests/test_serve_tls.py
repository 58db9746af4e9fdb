"""Server-side TLS handshakes over real sockets.

After STARTTLS a failed handshake is logged with its reason between the
session's ``connect`` and ``disconnect`` lines.  Each test connects from a
loopback address of its own, so that its lines can be told from those of
other tests.  Every test runs under uvloop and under the standard asyncio
loop.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.server_helpers import EVENT_LOOPS, Listener, RawClient, RelayProcess, make_certificate

EHLO = b"EHLO client.example.com\r\n"
# Only 127.0.0.2 is trusted, so the per-client connection limit applies to the test clients.
POLICY = 'trusted_networks = ["127.0.0.2/32"]'


def read_to_close(raw: RawClient, timeout: float = 5.0) -> bytes:
    """Read until the server closes the connection; return what it sent, such as a TLS alert."""
    raw.sock.settimeout(timeout)
    received = b""
    try:
        while chunk := raw.sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def client_lines(relay: RelayProcess, client: str, event: str, timeout: float = 5.0) -> list[str]:
    """Wait for an ``event`` line about ``client``; return every line about that client."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in relay.log().splitlines() if f" client={client} " in line + " "]
        if any(f" {event} " in line for line in lines):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} line for {client} within {timeout} s; log:\n{relay.log()}")
        time.sleep(0.05)


def event_names(lines: list[str]) -> list[str]:
    return [line.split(": ", 1)[1].split(" ", 1)[0] for line in lines]


def field(line: str, name: str) -> str:
    found = re.search(rf' {name}=("[^"]*"|\S+)', line)
    assert found is not None, f"no {name}= in {line!r}"
    return found.group(1).strip('"')


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_starttls_failures_logged_in_order(tmp_path: Path, event_loop: str) -> None:
    """A failed STARTTLS handshake is logged with its reason between the session's connect and disconnect."""
    relay = RelayProcess(
        tmp_path,
        event_loop=event_loop,
        listeners=[Listener(tls="starttls")],
        policy=POLICY,
        server='tls_handshake_timeout = "1s"',
        certificate=make_certificate(tmp_path),
    )
    cases = [("127.0.0.3", EHLO, "WRONG_VERSION_NUMBER"), ("127.0.0.4", b"", "handshake timed out")]
    with relay:
        for source, after_starttls, reason in cases:
            with RawClient(relay.port, source=source) as raw:
                raw.exchange(b"", ["220"])
                raw.exchange(EHLO, ["250"])
                raw.exchange(b"STARTTLS\r\n", ["220 2.0.0"])
                raw.send(after_starttls)
                read_to_close(raw)
            lines = client_lines(relay, source, "disconnect")
            assert event_names(lines) == ["connect", "tls_failed", "disconnect"], lines
            assert field(lines[1], "error") == reason
