"""Open-relay and address tricks against ``relay serve`` with delivery running.

The relay has a local domain, a relay domain and ``trusted_networks``
narrowed to 127.0.0.1, and its client connects from 127.0.0.9, so it is
a stranger.  An aiosmtpd smart host is the relay's only next hop, and a
second aiosmtpd listens on 127.0.0.1 at ``delivery.smtp_port``, where an
address literal would send mail.  Each test checks the replies and then
what these peers received.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.delivery_peers import RecordingHandler, run_upstream
from tests.server_helpers import RawClient, RelayProcess, wait_until

STRANGER = "127.0.0.9"


@dataclass
class Site:
    relay: RelayProcess
    smart_host: RecordingHandler
    internal: RecordingHandler  # the peer on 127.0.0.1 at delivery.smtp_port


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    smart_port = free_port()
    internal_port = free_port()
    smart_host = RecordingHandler(refuse={"refused@relayed.test": "550 5.1.1 no such user"})
    internal = RecordingHandler()
    relay = RelayProcess(
        tmp_path,
        policy='local_domains = ["local.test"]\nrelay_domains = ["relayed.test"]\ntrusted_networks = ["127.0.0.1/32"]',
        extra="\n".join(
            [
                "[delivery]",
                f'relayhost = "[127.0.0.1]:{smart_port}"',
                'relayhost_tls = "none"',
                f"smtp_port = {internal_port}",
                'mx_tls = "none"',
            ]
        ),
        deliver=True,
    )
    with ExitStack() as stack:
        stack.enter_context(run_upstream("127.0.0.1", smart_port, smart_host))
        stack.enter_context(run_upstream("127.0.0.1", internal_port, internal))
        stack.enter_context(relay)
        yield Site(relay, smart_host, internal)


def send(port: int, sender: str, recipient: str, expected: str) -> None:
    """Send one message from the stranger's address; ``expected`` is the start of the RCPT reply."""
    with RawClient(port, source=STRANGER) as client:
        client.exchange(b"", ["220"])
        client.exchange(b"EHLO stranger.example\r\n", ["250"])
        client.exchange(f"MAIL FROM:<{sender}>\r\n".encode(), ["250"])
        client.exchange(f"RCPT TO:<{recipient}>\r\n".encode(), [expected])
        if expected.startswith("250"):
            client.exchange(b"DATA\r\n", ["354"])
            client.exchange(b"Subject: relay test\r\n\r\nbody\r\n.\r\n", ["250"])
        client.exchange(b"QUIT\r\n", ["221"])


# Forward-paths of the classic open-relay test suites, each with the reply
# a stranger gets.  5.1.1 means the address was taken as a local user that
# does not exist, so nothing is relayed.
RELAY_TRICKS = [
    ("user%other.example@local.test", "550 5.1.1"),
    ('"user@other.example"@local.test', "550 5.1.1"),
    ('"user\\@other.example"@local.test', "550 5.1.1"),
    ("other.example!user@local.test", "550 5.1.1"),
    ("user@other.example@local.test", "501 5.1.3"),
    ("@local.test:user@other.example", "554 5.7.1"),
    ("@local.test,@relayed.test:user@other.example", "554 5.7.1"),
    ("user%other.example@relayed.test", "554 5.7.1"),
    ('"user@other.example"@relayed.test', "554 5.7.1"),
    ("other.example!user@relayed.test", "554 5.7.1"),
    ("user@sub.relayed.test", "554 5.7.1"),
    ("user@other.example", "554 5.7.1"),
    ("user@other.example.", "501 5.1.3"),
    ("user@[127.0.0.9]", "550 5.7.1"),
    ("user@[127.0.0.1]", "550 5.7.1"),
    ("user@[192.0.2.1]", "550 5.7.1"),
    ("user@[IPv6:::1]", "550 5.7.1"),
    ("user@[IPv6:::ffff:127.0.0.1]", "550 5.7.1"),
    ("user@[IPv6:2001:db8::1]", "550 5.7.1"),
    ("user@[tag:other.example]", "501 5.1.3"),
    ("user@LOCAL.TEST", "550 5.1.1"),
    ("user@xn--bcher-kva.test", "554 5.7.1"),
]


def test_relay_tricks_rejected(site: Site) -> None:
    for recipient, expected in RELAY_TRICKS:
        send(site.relay.port, "stranger@other.example", recipient, expected)
    assert site.relay.spooled() == []
    assert site.smart_host.messages == []
    assert site.internal.messages == []


def test_local_forms_delivered_locally(site: Site) -> None:
    for recipient in ["postmaster", "Postmaster@LOCAL.TEST", '"rcpt"@local.test', "RCPT@local.test"]:
        send(site.relay.port, "stranger@other.example", recipient, "250 2.1.5")
    mailbox = site.relay.directory / "mail"
    assert wait_until(lambda: len(list(mailbox.glob("*/new/*"))) == 4), site.relay.log()
    assert site.smart_host.messages == []
    assert site.internal.messages == []


def test_bounce_never_sent_to_mapped_loopback(site: Site) -> None:
    """A reverse-path of ``[IPv6:::ffff:127.0.0.1]`` must not steer the bounce at this host."""
    sender = "x@[IPv6:::ffff:127.0.0.1]"
    send(site.relay.port, sender, "refused@relayed.test", "250 2.1.5")
    assert wait_until(lambda: f"to={sender}" in site.relay.log()), site.relay.log()
    # Any connection to the internal peer would have been made by now.
    time.sleep(1.0)
    assert site.internal.messages == []
    dsn_lines = [line for line in site.relay.log().splitlines() if f"to={sender}" in line and "dsn_queued" not in line]
    assert dsn_lines, site.relay.log()
    assert all("dsn=5.7.1" in line for line in dsn_lines), dsn_lines
