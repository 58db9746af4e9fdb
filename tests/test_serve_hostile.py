"""Hostile and tricky inputs replayed over real sockets against ``relay serve``.

Each test is one kind of fault seen in another SMTP server (the docstring
names the system and the report), checked by the replies and by what the
spool holds afterwards.  Clients connect from 127.0.0.1, which is not a
trusted network here, or from 127.0.0.2, which is; so relay access, AUTH
and pipelining rules apply as they would to a stranger.  Every test runs
under uvloop and under the standard asyncio loop.
"""

from __future__ import annotations

import base64
import fcntl
import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.smtp.auth import set_password
from relay.spool.writer import WRITER_LOCK
from tests.server_helpers import EVENT_LOOPS, Listener, RawClient, RelayProcess, make_certificate, strip_received

EHLO = b"EHLO client.example.com\r\n"
T = [
    (b"MAIL FROM:<sender@example.com>\r\n", ["250"]),
    (b"RCPT TO:<rcpt@example.net>\r\n", ["250"]),
    (b"DATA\r\n", ["354"]),
]
PLAIN_OK = b"AUTH PLAIN " + base64.b64encode(b"\0user\0pass") + b"\r\n"
TRUSTED = "127.0.0.2"


@pytest.fixture(scope="module", params=EVENT_LOOPS)
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    directory = tmp_path_factory.mktemp(f"hostile-{request.param}")
    certificate = make_certificate(directory)
    passwords = directory / "passwd"
    set_password(str(passwords), "user", "pass")
    server = RelayProcess(
        directory,
        event_loop=request.param,
        listeners=[Listener(tls="starttls"), Listener(tls="implicit")],
        policy='trusted_networks = ["127.0.0.2/32"]',
        certificate=certificate,
        password_file=passwords,
    )
    with server:
        yield server


@pytest.fixture
def client(relay: RelayProcess) -> Iterator[RawClient]:
    with RawClient(relay.port) as raw:
        raw.exchange(b"", ["220 mx.example.test"])
        yield raw


def greet(raw: RawClient) -> None:
    raw.exchange(EHLO, ["250"])


def transaction(raw: RawClient, sender: str = "sender@example.com") -> None:
    raw.exchange(f"MAIL FROM:<{sender}>\r\n".encode(), ["250"])
    raw.exchange(b"RCPT TO:<rcpt@example.net>\r\n", ["250"])
    raw.exchange(b"DATA\r\n", ["354"])


def messages_from(relay: RelayProcess, sender: str) -> list[bytes]:
    return [body for message, body in relay.spooled() if message.envelope.sender == sender]


def starttls(raw: RawClient) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw.sock = context.wrap_socket(raw.sock, server_hostname="localhost")
    return raw.sock


# -- smuggling ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"From: <sender@example.com>\r\nSubject: one\r\n\r\nbody\n.\r\nMAIL FROM:<spoof@example.org>\r\n"
                     b"RCPT TO:<rcpt@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n",
                     id="aiosmtpd-lf-dot"),
        pytest.param(b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<spoof@example.org>\nRCPT TO:<rcpt@example.net>\n"
                     b"DATA\nx\r\n.\r\n", id="sendmail-lf-dot-lf"),
        pytest.param(b"Subject: a\r\n\r\nbody\r\n.\nMAIL FROM:<spoof@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n"
                     b"BDAT 5 LAST\r\nhello\r\n.\r\n", id="exim-crlf-dot-lf-bdat"),
        pytest.param(b"Subject: a\r\n\r\nline1\nline2\r\n.\r\n", id="postfix-bare-lf"),
        pytest.param(b"Subject: a\r\n\r\nfirst\nsecond\r\n.\r\n", id="chasquid-bare-lf"),
        pytest.param(b"From: <sender@example.com>\r\nX-A: one\ntwo\r\nTo: <rcpt@example.net>\r\nSubject: s\r\n\r\n"
                     b"body\r\n.\r\n", id="exim-bare-lf-in-header"),
    ],
)
def test_smuggling_closes_without_spooling(relay: RelayProcess, client: RawClient, body: bytes) -> None:
    """CVE-2024-27305, CVE-2023-51764/51765/51766, CVE-2023-52354: only CRLF.CRLF ends DATA."""
    sender = f"smuggle-{time.monotonic_ns()}@example.com"
    greet(client)
    transaction(client, sender)
    client.send(body)
    assert client.reply().startswith("521 5.5.2")
    assert client.closed()
    assert messages_from(relay, sender) == []
    assert messages_from(relay, "spoof@example.org") == []


def test_bare_lf_command_line_end(relay: RelayProcess, client: RawClient) -> None:
    """A bare LF ends each command line, pipelined or not; inside DATA only CRLF.CRLF ends the message."""
    client.exchange(b"EHLO client.example.com\nRSET\nNOOP\r\n", ["250-", "250 2.0.0", "250 2.0.0"])
    client.exchange(b"EHLO client.example.com\n", ["250"])
    client.exchange(b"MAIL FROM:<spoof@example.org>\n", ["250"])
    client.exchange(b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n", ["250", "354"])
    client.exchange(b"x\n.\n\r\n.\r\n", ["521 5.5.2"])
    assert messages_from(relay, "spoof@example.org") == []


def test_refused_data_text_not_run(relay: RelayProcess, client: RawClient) -> None:
    """The text pipelined behind a refused DATA never runs as commands, so no envelope comes from it."""
    greet(client)
    client.exchange(
        b"MAIL FROM:<form@example.com>\r\nRCPT TO:<nobody@example.net>\r\nDATA\r\n"
        b"Subject: contact form\r\n\r\nRSET\r\nMAIL FROM:<ceo@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n"
        b"DATA\r\nwire the money\r\n.\r\n",
        ["250 2.1.0", "5", "503 5.5.1", "554 5.5.0"],
    )
    assert client.closed()
    assert messages_from(relay, "ceo@example.org") == []


def test_data_control_character_drops_text(relay: RelayProcess, client: RawClient) -> None:
    """A DATA line that fails as an unknown command (CR CR LF from a text-mode stream) also drops the text behind it."""
    greet(client)
    client.exchange(
        b"MAIL FROM:<form@example.com>\r\nRCPT TO:<nobody@example.net>\r\nDATA\r\r\n"
        b"Subject: contact form\r\n\r\nRSET\r\nMAIL FROM:<cfo@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n"
        b"DATA\r\nwire the money\r\n.\r\n",
        ["250 2.1.0", "5", "500 5.5.1", "554 5.5.0"],
    )
    assert client.closed()
    assert messages_from(relay, "cfo@example.org") == []


# -- STARTTLS injection -------------------------------------------------------


def test_starttls_pipelined_commands_discarded(relay: RelayProcess, client: RawClient) -> None:
    """aiosmtpd CVE-2024-34083: plaintext after STARTTLS must not run inside TLS."""
    greet(client)
    client.exchange(b"STARTTLS\r\nMAIL FROM:<spoof@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n", ["220 2.0.0"])
    starttls(client)
    reply = client.exchange(EHLO, ["250"])[0]
    assert "AUTH PLAIN LOGIN" in reply
    assert "STARTTLS" not in reply
    client.exchange(b"DATA\r\n", ["503 5.5.1"])


def test_starttls_rset_injection(relay: RelayProcess, client: RawClient) -> None:
    """Postfix CVE-2011-0411: one TLS reply per TLS command."""
    greet(client)
    client.exchange(b"STARTTLS\r\nRSET\r\n", ["220"])
    starttls(client)
    client.exchange(b"NOOP\r\n", ["250"])
    client.exchange(b"QUIT\r\n", ["221"])


def test_failed_handshake_closes(relay: RelayProcess, client: RawClient) -> None:
    greet(client)
    client.exchange(b"STARTTLS\r\n", ["220"])
    client.send(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 32)
    assert client.closed()
    deadline = time.monotonic() + 5
    while "tls_failed" not in relay.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "tls_failed" in relay.log()


def test_stalled_handshake_times_out(tmp_path: Path) -> None:
    """A client that sends STARTTLS and then nothing is dropped after tls_handshake_timeout."""
    relay = RelayProcess(
        tmp_path,
        listeners=[Listener(tls="starttls")],
        server='tls_handshake_timeout = "1s"',
        certificate=make_certificate(tmp_path),
    )
    with relay, RawClient(relay.port) as client:
        client.exchange(b"", ["220"])
        greet(client)
        client.exchange(b"STARTTLS\r\n", ["220"])
        started = time.monotonic()
        assert client.closed()
        assert 0.8 <= time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while "tls_failed" not in relay.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "tls_failed" in relay.log()


# -- limits ---------------------------------------------------------------------


def test_size_limit_answered_after_data(tmp_path: Path) -> None:
    """aiosmtpd #9: no reply during DATA, one 552, nothing spooled, session usable."""
    with RelayProcess(tmp_path, policy="max_message_size = 100") as relay, RawClient(relay.port) as raw:
        raw.exchange(b"", ["220"])
        greet(raw)
        transaction(raw)
        raw.send(b"Subject: big\r\n\r\n" + b"a" * 120 + b"\r\n" + b"a" * 120 + b"\r\n")
        raw.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            raw.sock.recv(1)
        raw.sock.settimeout(10)
        raw.exchange(b".\r\n", ["552 5.3.4"])
        raw.exchange(b"RSET\r\n", ["250"])
        raw.exchange(b"MAIL FROM:<sender@example.com> SIZE=500\r\n", ["552 5.3.4"])
        raw.exchange(b"QUIT\r\n", ["221"])
        assert relay.spooled() == []


def test_streamed_oversized_message(tmp_path: Path) -> None:
    """nodemailer smtp-server #262: the size limit holds while DATA streams."""
    with RelayProcess(tmp_path, policy="max_message_size = 1048576") as relay, RawClient(relay.port) as raw:
        raw.exchange(b"", ["220"])
        greet(raw)
        raw.exchange(b"MAIL FROM:<sender@example.com> SIZE=100\r\n", ["250"])
        raw.exchange(b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n", ["250", "354"])
        block = b"x\r\n" * 100000
        for _ in range(20):
            raw.send(block)
        raw.exchange(b".\r\n", ["552 5.3.4"])
        raw.exchange(b"NOOP\r\n", ["250"])
        assert relay.spooled() == []


def test_long_ehlo(relay: RelayProcess, client: RawClient) -> None:
    """Exim CVE-2019-16928: a 10000-octet EHLO gets 500 and the session goes on."""
    client.exchange(b"EHLO " + b"a" * 10000 + b"\r\n", ["500 5.5.2"])
    time.sleep(0.1)
    client.exchange(b"EHLO " + b"a" * 490 + b"\r\n", ["250"])
    client.exchange(EHLO, ["250"])


def test_overlong_invalid_commands(relay: RelayProcess, client: RawClient) -> None:
    """A command line over 512 octets gets 500 5.5.2 even when its syntax is also invalid."""
    greet(client)
    client.exchange(b"RSET " + b"a" * 600 + b"\r\n", ["500 5.5.2"])
    client.exchange(b"XYZZY " + b"a" * 600 + b"\r\n", ["500 5.5.2"])
    client.exchange(b"NOOP\r\n", ["250"])


def test_long_body_lines_relayed_unchanged(relay: RelayProcess, client: RawClient) -> None:
    """maddy #352, aiosmtpd #285: body lines over 1000 octets are kept."""
    sender = "long-lines@example.com"
    greet(client)
    transaction(client, sender)
    client.exchange(b"Subject: long\r\n\r\n" + b"b" * 3000 + b"\r\n.." + b"b" * 3000 + b"\r\n.\r\n", ["250"])
    client.exchange(b"NOOP\r\n", ["250"])
    [body] = messages_from(relay, sender)
    assert strip_received(body) == b"Subject: long\r\n\r\n" + b"b" * 3000 + b"\r\n." + b"b" * 3000 + b"\r\n"


def test_endless_command_line_bounded(relay: RelayProcess, client: RawClient) -> None:
    """Mailpit CVE-2026-67445, go-smtp #60: a line without end is cut off early."""
    client.send(b"NOOP ")
    chunk = b"A" * 65536
    for _ in range(80):
        client.send(chunk)
    client.exchange(b"", ["500 5.5.2"])
    client.send(b"\r\n")
    time.sleep(0.1)
    client.exchange(b"NOOP\r\n", ["250"])


def test_endless_auth_line_bounded(relay: RelayProcess) -> None:
    """Mailpit CVE-2026-67445 (b): AUTH continuation lines are bounded too."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with RawClient(relay.listeners[1].port) as raw:
        raw.sock = context.wrap_socket(raw.sock, server_hostname="localhost")
        raw.exchange(b"", ["220"])
        greet(raw)
        raw.exchange(b"AUTH LOGIN\r\n", ["334 VXNlcm5hbWU6"])
        for _ in range(40):
            raw.send(b"A" * 65536)
        raw.exchange(b"", ["500 5.5.6"])


def test_parallel_endless_lines_leave_service(relay: RelayProcess) -> None:
    """Mailpit CVE-2026-67445 (c): many streaming clients do not starve others."""
    stop = threading.Event()

    def flood() -> None:
        with RawClient(relay.port) as raw:
            raw.send(b"NOOP ")
            for _ in range(64):
                if stop.is_set():
                    return
                try:
                    raw.send(b"A" * 16384)
                except OSError:
                    return

    threads = [threading.Thread(target=flood) for _ in range(20)]
    for thread in threads:
        thread.start()
    try:
        with RawClient(relay.port, source=TRUSTED) as raw:
            raw.exchange(b"", ["220"])
            raw.exchange(EHLO, ["250"])
            raw.exchange(b"QUIT\r\n", ["221"])
    finally:
        stop.set()
        for thread in threads:
            thread.join()


# -- parsing ------------------------------------------------------------------


def test_missing_brackets_stored_exactly(relay: RelayProcess, client: RawClient) -> None:
    """aiosmtpd #563: policy accepts a path without brackets; the envelope is exact."""
    greet(client)
    client.exchange(b"MAIL FROM:brackets@example.com\r\n", ["250"])
    client.exchange(b"MAIL FROM:<brackets@example.com>\r\n", ["503 5.5.1"])
    client.exchange(b"RCPT TO: <rcpt@example.net> NOTIFY=SUCCESS,FAILURE\r\nDATA\r\n", ["250", "354"])
    client.exchange(b"x\r\n.\r\n", ["250"])
    [(message, _body)] = [m for m in relay.spooled() if m[0].envelope.sender == "brackets@example.com"]
    assert message.recipients[0].address == "rcpt@example.net"
    assert message.recipients[0].notify == ("SUCCESS", "FAILURE")


def test_eight_bit_commands(relay: RelayProcess, client: RawClient) -> None:
    """aiosmtpd/sarlacc #4: 8-bit bytes in a command get one reply each, no crash."""
    greet(client)
    client.exchange(b"MAIL FROM:<s\xc3\xa9nder@example.com>\r\n", ["553 5.6.7"])
    client.exchange(b"MAIL FROM:<s\xe9nder@example.com> SMTPUTF8\r\n", ["5"])
    client.exchange(b"\xc0MAIL FROM:<sender@example.com>\r\n", ["5"])
    client.exchange(b"MAIL FROM:<s\xc3\xa9nder@example.com> SMTPUTF8\r\n", ["250"])


def test_utf8_recipient_spooled(relay: RelayProcess) -> None:
    """SMTPUTF8 on MAIL covers the RCPT paths after it (RFC 6531 section 3.4)."""
    with RawClient(relay.port, source="127.0.0.2") as trusted:
        trusted.exchange(b"", ["220 mx.example.test"])
        greet(trusted)
        trusted.exchange(b"MAIL FROM:<utf8@example.com>\r\n", ["250"])
        trusted.exchange("RCPT TO:<jörg@bücher.example>\r\n".encode(), ["553 5.6.7"])
        trusted.exchange(b"RSET\r\n", ["250"])
        trusted.exchange(b"MAIL FROM:<utf8@example.com> SMTPUTF8\r\n", ["250"])
        trusted.exchange("RCPT TO:<jörg@bücher.example>\r\nDATA\r\n".encode(), ["250", "354"])
        trusted.exchange(b"x\r\n.\r\n", ["250"])
    [(message, _body)] = [m for m in relay.spooled() if m[0].envelope.sender == "utf8@example.com"]
    assert message.recipients[0].address == "jörg@bücher.example"
    assert message.envelope.smtputf8


def test_quoted_and_invalid_local_parts(relay: RelayProcess, client: RawClient) -> None:
    """CPython bpo-27931, OpenSMTPD CVE-2020-7247, KumoMTA #495: syntax verdicts, never 4xx."""
    greet(client)
    client.exchange(b'MAIL FROM:<""@example.com>\r\n', ["250"])
    client.exchange(b"RSET\r\n", ["250"])
    client.exchange(b'MAIL FROM:<">\r\n', ["501"])
    start = time.monotonic()
    client.exchange(b"MAIL FROM:<;sleep 66;>\r\n", ["501"])
    assert time.monotonic() - start < 5
    client.exchange(b"MAIL FROM:<sender@example.com>\r\n", ["250"])
    client.exchange(b"RCPT TO:<;id;@example.net>\r\n", ["501"])
    client.exchange(b"RCPT TO:<rcpt>\r\n", ["501"])
    client.exchange(b'RCPT TO:<"info@"@example.net>\r\n', ["550 5.1.1"])
    client.exchange(b'RCPT TO:<"a b"@example.net>\r\n', ["550 5.1.1"])
    client.exchange(b"RCPT TO:<rcpt@example.net>\r\n", ["250"])
    # The quoted form of an existing mailbox is that mailbox (RFC 5321 section 4.1.2).
    client.exchange(b'RCPT TO:<"rcpt"@example.net>\r\n', ["250"])


def test_null_sender_stored_empty(relay: RelayProcess, client: RawClient) -> None:
    """MailHog #287: MAIL FROM:<> is accepted and stored as the empty sender."""
    greet(client)
    client.exchange(b"MAIL FROM:<>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n", ["250", "250", "354"])
    client.exchange(b"Subject: bounce-null\r\n\r\nx\r\n.\r\n", ["250"])
    client.exchange(b"MAIL FROM:<> SIZE=100\r\n", ["250"])
    bodies = [body for message, body in relay.spooled() if b"bounce-null" in body]
    assert len(bodies) == 1
    assert [m.envelope.sender for m, b in relay.spooled() if b"bounce-null" in b] == [""]


def test_body_and_size_parameters(relay: RelayProcess, client: RawClient) -> None:
    """Mailpit #407, go-smtp #255, gen_smtp #283: BODY and SIZE independent, any case."""
    greet(client)
    cases = [
        (b"BODY=8BITMIME", "250"),
        (b"body=8bitmime", "250"),
        (b"BODY=7bit", "250"),
        (b"BODY=BINARYMIME", "555"),
        (b"SIZE=abc", "501 5.5.4"),
        (b"SIZE=99999999999999999999", "552 5.3.4"),
        (b"BODY=8BITMIME BODY=7BIT", "501"),
    ]
    for parameters, expected in cases:
        client.exchange(b"MAIL FROM:<sender@example.com> " + parameters + b"\r\n", [expected])
        client.exchange(b"RSET\r\n", ["250"])


def test_tls_client_hello_on_plain_port(relay: RelayProcess) -> None:
    """Postfix 3.7.2 postscreen: TLS or RDP bytes on the plain port end cleanly."""
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 2
    for _ in range(50):
        with RawClient(relay.port) as raw:
            raw.exchange(b"", ["220"])
            raw.send(hello[:517] + b"\r\n")
            assert raw.reply().startswith("5")
        with RawClient(relay.port) as raw:
            raw.send(b"\x03\x00\x00\x13\x0e\xe0\x00\x00\x00\x00\x00\x01\x00\x08\x00\x03\x00\x00\x00")
    with RawClient(relay.port) as raw:
        raw.exchange(b"", ["220"])
        raw.exchange(EHLO, ["250"])


# -- pipelining and sequence ----------------------------------------------------


def test_improper_pipelining_untrusted(relay: RelayProcess, client: RawClient) -> None:
    """Postfix smuggling stopgap: message text before 354 from a stranger is refused."""
    sender = "pipelined-untrusted@example.com"
    greet(client)
    pipelined = f"MAIL FROM:<{sender}>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    client.send(pipelined.encode())
    assert [r[:9] for r in client.replies(3)] == ["250 2.1.0", "250 2.1.5", "554 5.5.0"]
    assert client.closed()
    assert messages_from(relay, sender) == []


def test_pipelining_trusted_in_order(relay: RelayProcess) -> None:
    sender = "pipelined-trusted@example.com"
    with RawClient(relay.port, source=TRUSTED) as raw:
        raw.exchange(b"", ["220"])
        raw.exchange(EHLO, ["250"])
        pipelined = f"MAIL FROM:<{sender}>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
        raw.send(pipelined.encode())
        assert [r[:3] for r in raw.replies(4)] == ["250", "250", "354", "250"]
    [body] = messages_from(relay, sender)
    assert strip_received(body) == b"Subject: x\r\n\r\nbody\r\n"


def test_second_ehlo_resets(relay: RelayProcess, client: RawClient) -> None:
    """aiosmtpd #78, go-smtp #281, OpenSMTPD #1147: a new EHLO acts like RSET."""
    greet(client)
    client.exchange(b"MAIL FROM:<sender@example.com>\r\n", ["250"])
    client.exchange(b"RCPT TO:<rcpt@example.net>\r\n", ["250"])
    client.exchange(b"EHLO client2.example.com\r\n", ["250"])
    client.exchange(b"DATA\r\n", ["503 5.5.1"])
    client.exchange(b"RCPT TO:<rcpt@example.net>\r\n", ["503 5.5.1"])
    client.exchange(b"MAIL FROM:<ehlo2@example.com>\r\n", ["250"])
    client.exchange(b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n", ["250", "354"])
    client.exchange(b"x\r\n.\r\n", ["250"])
    [body] = messages_from(relay, "ehlo2@example.com")
    assert body.startswith(b"Received: from client2.example.com (unknown [127.0.0.1])")


def test_rset_before_ehlo(relay: RelayProcess, client: RawClient) -> None:
    """OpenSMTPD #1149: RSET and NOOP work before EHLO; MAIL does not."""
    for command, expected in [(b"RSET", "250"), (b"NOOP", "250"), (b"rset", "250"),
                              (b"MAIL FROM:<sender@example.com>", "503 5.5.1"), (EHLO[:-2], "250")]:
        client.exchange(command + b"\r\n", [expected])


def test_failed_ehlo_keeps_state(relay: RelayProcess, client: RawClient) -> None:
    """go-smtp #198: MAIL after a failed EHLO gets 503, not a crash."""
    client.exchange(b"EHLO\r\n", ["501 5.5.4"])
    client.exchange(b"MAIL FROM:<sender@example.com>\r\n", ["503 5.5.1"])
    client.exchange(EHLO, ["250"])
    client.exchange(b"MAIL FROM:<sender@example.com>\r\n", ["250"])


def test_early_talker_answered_in_order(relay: RelayProcess) -> None:
    """Exim synchronization (K-9 #1329): without a greeting delay, replies stay in order."""
    with RawClient(relay.port) as raw:
        raw.send(EHLO)
        assert [r[:3] for r in raw.replies(2)] == ["220", "250"]


# -- BDAT ---------------------------------------------------------------------


def test_refused_bdat_consumes_chunk(relay: RelayProcess, client: RawClient) -> None:
    """go-smtp #315: a refused BDAT still reads its chunk."""
    greet(client)
    client.exchange(b"BDAT 9 LAST\r\nMAIL FROM", ["503 5.5.1"])
    client.exchange(b"NOOP\r\n", ["250"])
    client.exchange(
        b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<nosuchuser@example.net>\r\nBDAT 27 LAST\r\n"
        b"MAIL FROM:<x@example.org>\r\n",
        ["250", "550 5.1.1", "503"],
    )
    client.exchange(b"RSET\r\n", ["250"])
    assert messages_from(relay, "x@example.org") == []


def test_bdat_message_spooled(relay: RelayProcess, client: RawClient) -> None:
    greet(client)
    client.exchange(b"MAIL FROM:<bdat@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n", ["250", "250"])
    client.exchange(b"BDAT 12\r\nSubject: s\r\n", ["250"])
    client.exchange(b"BDAT 5 LAST\r\n\r\nx\r\n", ["250 2.0.0 Ok: queued as"])
    [body] = messages_from(relay, "bdat@example.com")
    assert strip_received(body) == b"Subject: s\r\n\r\nx\r\n"


def test_bdat_over_limit_read_then_timeout(tmp_path: Path) -> None:
    """A chunk far over the size limit is read and dropped, and a stalled one still times out."""
    policy = "max_message_size = 1000"
    server = 'data_timeout = "1s"'
    with RelayProcess(tmp_path, server=server, policy=policy) as relay, RawClient(relay.port) as client:
        client.exchange(b"", ["220"])
        greet(client)
        client.exchange(b"MAIL FROM:<bdat-big@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n", ["250", "250"])
        client.send(b"BDAT 300000 LAST\r\n")
        for _ in range(30):
            client.send(b"MAIL FROM:<spoof@example.org>\r\n" * 304 + b"RSET\r\n" * 96)
        client.exchange(b"", ["552 5.3.4"])
        client.exchange(b"NOOP\r\n", ["250"])

        client.exchange(b"MAIL FROM:<bdat-big@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n", ["250", "250"])
        client.send(b"BDAT 300000 LAST\r\n" + b"x" * 5000)
        started = time.monotonic()
        assert client.reply().startswith("421 4.4.2")
        assert time.monotonic() - started < 3
        assert client.closed()
        assert messages_from(relay, "bdat-big@example.com") == []
        assert messages_from(relay, "spoof@example.org") == []


def test_tls_close_inside_bdat(relay: RelayProcess, client: RawClient) -> None:
    """Exim CVE-2026-45185: TLS ends mid-chunk; nothing spooled, no cleartext read."""
    greet(client)
    client.exchange(b"STARTTLS\r\n", ["220"])
    tls = starttls(client)
    client.exchange(EHLO, ["250"])
    client.exchange(b"MAIL FROM:<bdat-tls@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n", ["250", "250"])
    tls.sendall(b"BDAT 100 LAST\r\n0123456789")
    plain = tls.unwrap()
    try:
        plain.sendall(b"MAIL FROM:<spoof@example.org>\r\n")
        plain.settimeout(5)
        data = plain.recv(4096)
    except OSError:
        data = b""
    assert not data.startswith(b"250")
    assert not data.startswith(b"5")
    time.sleep(0.2)
    assert messages_from(relay, "bdat-tls@example.com") == []


# -- AUTH ---------------------------------------------------------------------


def _tls_session(relay: RelayProcess, source: str = "127.0.0.1") -> RawClient:
    raw = RawClient(relay.port, source=source)
    raw.exchange(b"", ["220"])
    greet(raw)
    raw.exchange(b"STARTTLS\r\n", ["220"])
    starttls(raw)
    raw.exchange(EHLO, ["250"])
    return raw


def test_auth_equals_sign(relay: RelayProcess) -> None:
    """aiosmtpd #232, Exim 4.20: '=' is an empty response, never a success."""
    with _tls_session(relay) as raw:
        raw.exchange(b"AUTH PLAIN =\r\n", ["535 5.7.8"])
        raw.send(b"AUTH PLAIN\r\n")
        assert raw.reply() == "334 "
        raw.exchange(b"=\r\n", ["535"])
        raw.exchange(b"AUTH LOGIN\r\n", ["334 VXNlcm5hbWU6"])
        raw.exchange(b"=\r\n", ["334 UGFzc3dvcmQ6"])
        raw.exchange(b"=\r\n", ["535"])
        raw.exchange(PLAIN_OK, ["235"])


def test_auth_twice(relay: RelayProcess) -> None:
    """Haraka #2038: AUTH after success, or inside a transaction, gets 503."""
    with _tls_session(relay) as raw:
        raw.exchange(PLAIN_OK, ["235"])
        raw.exchange(b"AUTH LOGIN\r\n", ["503 5.5.1"])
        raw.exchange(b"MAIL FROM:<sender@example.com>\r\n", ["250"])
        raw.exchange(PLAIN_OK, ["503 5.5.1"])
        raw.exchange(b"RCPT TO:<anyone@example.org>\r\n", ["250"])


def test_auth_cancel_and_tls_required(relay: RelayProcess, client: RawClient) -> None:
    """aiosmtpd #10: AUTH before TLS is refused unread; '*' cancels."""
    greet(client)
    client.exchange(PLAIN_OK, ["530 5.7.0"])
    client.exchange(b"STARTTLS\r\n", ["220"])
    starttls(client)
    assert "AUTH PLAIN LOGIN" in client.exchange(EHLO, ["250"])[0]
    client.exchange(b"AUTH LOGIN\r\n", ["334 VXNlcm5hbWU6"])
    client.exchange(b"*\r\n", ["501 5.7.0"])
    client.send(b"AUTH PLAIN\r\n")
    assert client.reply() == "334 "
    client.exchange(b"*\r\n", ["501"])
    assert "pass" not in relay.log().replace("password", "")


def test_relay_denied_without_auth(relay: RelayProcess, client: RawClient) -> None:
    greet(client)
    client.exchange(b"MAIL FROM:<sender@example.com>\r\n", ["250"])
    client.exchange(b"RCPT TO:<anyone@example.org>\r\n", ["554 5.7.1"])


def test_auth_failures_delayed(relay: RelayProcess) -> None:
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong") + b"\r\n"
    with _tls_session(relay) as raw:
        for _ in range(4):
            raw.exchange(bad, ["535 5.7.8"])
        start = time.monotonic()
        raw.exchange(bad, ["535 5.7.8"])
        assert time.monotonic() - start >= 0.2
        raw.exchange(PLAIN_OK, ["235"])
    assert "auth_failed" in relay.log()


def test_auth_success_keeps_failure_count(relay: RelayProcess) -> None:
    """A client's own valid login must not reset the failures of its guesses at another user's password."""
    guess = b"AUTH PLAIN " + base64.b64encode(b"\0victim\0guess") + b"\r\n"
    source = "127.0.0.5"
    for _ in range(3):
        with _tls_session(relay, source) as raw:
            raw.exchange(guess, ["535 5.7.8"])
    with _tls_session(relay, source) as raw:
        raw.exchange(PLAIN_OK, ["235"])
    with _tls_session(relay, source) as raw:
        start = time.monotonic()
        raw.exchange(guess, ["535 5.7.8"])
        assert time.monotonic() - start >= 0.2


def test_auth_failed_user_cut_and_escaped(relay: RelayProcess) -> None:
    # A user name with a line break and 300 more characters, such as a pasted password.
    user = "mallory\n2026-01-01T00:00:00.000Z info relay.smtp: forged " + "b" * 300
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0" + user.encode() + b"\0wrong") + b"\r\n"
    with _tls_session(relay) as raw:
        raw.exchange(bad, ["535 5.7.8"])
        raw.exchange(b"QUIT\r\n", ["221"])
    deadline = time.monotonic() + 5
    while "user=\"mallory" not in relay.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in relay.log().splitlines() if " auth_failed " in line and "mallory" in line]
    assert len(lines) == 1, relay.log()
    logged = lines[0].split(" user=", 1)[1]
    # The first 100 characters, as Postfix 3.7 logs sasl_username, with the line break escaped.
    assert logged == '"' + user[:100].replace("\n", "\\n") + '..."'
    assert not any(line.startswith("2026-01-01T00:00:00.000Z") for line in relay.log().splitlines())


# -- spool-facing parameters ----------------------------------------------------


def test_xtext_control_characters_refused(relay: RelayProcess) -> None:
    """Exim CVE-2020-28021/28026: decoded CR/LF in AUTH= or ORCPT= never reach the spool."""
    with _tls_session(relay) as raw:
        raw.exchange(PLAIN_OK, ["235"])
        raw.exchange(b"MAIL FROM:<xtext@example.com> AUTH=sender+40example.com+0Ainjected\r\n", ["501 5.5.4"])
        raw.exchange(b"MAIL FROM:<xtext@example.com> AUTH=<>\r\n", ["250"])
        raw.exchange(
            b"RCPT TO:<rcpt@example.net> NOTIFY=FAILURE ORCPT=rfc822;rcpt+40example.net+0D+0AX-Evil:+201\r\n",
            ["501 5.5.4"],
        )
        raw.exchange(b"RCPT TO:<rcpt@example.net> ORCPT=rfc822;rcpt+40example.net\r\n", ["250"])
        raw.exchange(b"DATA\r\n", ["354"])
        raw.exchange(b"Subject: x\r\n\r\nx\r\n.\r\n", ["250"])
    [(message, body)] = [m for m in relay.spooled() if m[0].envelope.sender == "xtext@example.com"]
    assert len(message.recipients) == 1
    assert message.recipients[0].orcpt == "rfc822;rcpt@example.net"
    assert b"X-Evil" not in body


def test_mail_loop(relay: RelayProcess, client: RawClient) -> None:
    """Haraka #1150, maddy #79: more than 100 Received headers is a loop."""
    line = b"Received: from a.example by b.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
    greet(client)
    transaction(client, "loop@example.com")
    client.exchange(line * 101 + b"Subject: loop\r\n\r\nx\r\n.\r\n", ["554 5.4.6"])
    transaction(client, "loop@example.com")
    client.exchange(line * 20 + b"Subject: loop\r\n\r\nx\r\n.\r\n", ["250"])
    [body] = messages_from(relay, "loop@example.com")
    assert body.startswith(b"Received: from client.example.com (unknown [127.0.0.1])\r\n\tby mx.example.test")
    assert body.count(b"\r\nReceived:") == 20


def test_address_literals(relay: RelayProcess) -> None:
    """maddy #176, OpenSMTPD #18: literals by policy, never loopback, bad ones 501."""
    with _tls_session(relay) as raw:
        raw.exchange(PLAIN_OK, ["235"])
        raw.exchange(b"MAIL FROM:<sender@example.com>\r\n", ["250"])
        raw.exchange(b"RCPT TO:<rcpt@[192.0.2.30]>\r\n", ["550 5.7.1"])
        raw.exchange(b"RCPT TO:<rcpt@[IPv6:2001:db8::30]>\r\n", ["550 5.7.1"])
        raw.exchange(b"RCPT TO:<rcpt@[192.0.2.300]>\r\n", ["501"])
        raw.exchange(b"RCPT TO:<rcpt@[127.0.0.1]>\r\n", ["550 5.7.1"])
        raw.exchange(b"RCPT TO:<rcpt@[192.0.2.30].example.com>\r\n", ["501"])


def test_cr_in_arguments(relay: RelayProcess, client: RawClient) -> None:
    """Mailpit CVE-2026-23829: a CR in EHLO, MAIL or RCPT never reaches a header."""
    client.exchange(b"EHLO client.example.com\rX-Evil: 1\r\n", ["501"])
    client.exchange(EHLO, ["250"])
    client.exchange(b"MAIL FROM:<cr@example.com\rX-Injected: yes>\r\n", ["501"])
    client.exchange(b"MAIL FROM:<cr@example.com>\r\n", ["250"])
    client.exchange(b"RCPT TO:<rcpt@example.net\rBcc: x@example.org>\r\n", ["501"])
    client.exchange(b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n", ["250", "354"])
    client.exchange(b"Subject: s\r\n\r\nx\r\n.\r\n", ["250"])
    [body] = messages_from(relay, "cr@example.com")
    headers = body.split(b"\r\n\r\n", 1)[0]
    assert b"X-Evil" not in headers
    assert b"X-Injected" not in headers
    assert b"Bcc" not in headers
    assert b"\r" not in headers.replace(b"\r\n", b"")


def test_many_folded_header_lines(relay: RelayProcess, client: RawClient) -> None:
    """Exim CVE-2020-28020: 100000 continuation lines are stored unchanged."""
    header = b"Subject: a\r\n" + b" b\r\n" * 100000
    greet(client)
    transaction(client, "folded@example.com")
    client.exchange(header + b"\r\nbody\r\n.\r\n", ["250"])
    [body] = messages_from(relay, "folded@example.com")
    assert strip_received(body) == header + b"\r\nbody\r\n"


def test_helo_bare_lf_never_in_received(relay: RelayProcess, client: RawClient) -> None:
    """Exim 2003, KumoMTA #22: the EHLO name in Received holds no CR or LF."""
    client.exchange(b"EHLO host.example.com\nIP\r\n", ["250", "500 5.5.1"])
    client.exchange(EHLO, ["250"])
    transaction(client, "helo-lf@example.com")
    client.exchange(b"Subject: s\r\n\r\nbody\r\n.\r\n", ["250"])
    [body] = messages_from(relay, "helo-lf@example.com")
    assert body.startswith(b"Received: from client.example.com ")


@pytest.mark.parametrize(
    ("name", "written"),
    [
        (b"a(b;c", b"a?b?c"),
        (b'x)"<y>\\z@w,v', b"x???y??z?w?v"),
        (b"[192.0.2.1;(x]", b"?192.0.2.1??x?"),
        (b"[IPv6:2001:db8::1]", b"[IPv6:2001:db8::1]"),
        (b"[a[b]", b"?a?b?"),
        (b"host_1.example.com", b"host_1.example.com"),
    ],
)
def test_helo_specials_kept_out_of_received(
    relay: RelayProcess, client: RawClient, name: bytes, written: bytes
) -> None:
    """RFC 5321 section 4.4: an EHLO name cannot open a comment or start the date of Received.

    relay takes any EHLO name without blanks.  Written as sent, a "("
    would hide the rest of the header in a comment, and a ";" would end
    its tokens early for a reader that splits at the first ";".
    """
    sender = f"helo-{name.hex()}@example.com"
    client.exchange(b"EHLO " + name + b"\r\n", ["250"])
    transaction(client, sender)
    client.exchange(b"Subject: s\r\n\r\nbody\r\n.\r\n", ["250"])
    [body] = messages_from(relay, sender)
    first_line = body.split(b"\r\n", 1)[0]
    assert first_line == b"Received: from " + written + b" (unknown [127.0.0.1])"


def test_idle_socket_closed_by_peer(relay: RelayProcess) -> None:
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", relay.port))
        sock.close()
    with RawClient(relay.port) as raw:
        raw.exchange(b"", ["220"])


def test_input_before_delayed_greeting(tmp_path: Path) -> None:
    """Exim "synchronization error" (K-9 Mail report): with a greeting delay, early talkers are dropped."""
    with RelayProcess(tmp_path, server='greeting_delay = "1s"', policy='trusted_networks = ["127.0.0.2/32"]') as relay:
        with RawClient(relay.port) as early:
            early.send(EHLO)
            assert early.reply().startswith("554 5.5.0")
            assert early.closed()
        with RawClient(relay.port) as patient:
            started = time.monotonic()
            patient.exchange(b"", ["220 mx.example.test"])
            assert time.monotonic() - started >= 0.9
            patient.exchange(EHLO, ["250"])
        with RawClient(relay.port, source="127.0.0.2") as trusted:
            started = time.monotonic()
            trusted.exchange(b"", ["220 mx.example.test"])
            assert time.monotonic() - started < 0.9


def test_command_timeout_starts_at_greeting(tmp_path: Path) -> None:
    """A greeting delay longer than the command timeout does not cut the client off."""
    server = 'greeting_delay = "1.5s"\ncommand_timeout = "1s"'
    policy = 'trusted_networks = ["127.0.0.2/32"]'
    with RelayProcess(tmp_path, server=server, policy=policy) as relay, RawClient(relay.port) as client:
        started = time.monotonic()
        client.exchange(b"", ["220 mx.example.test"])
        assert time.monotonic() - started >= 1.4
        time.sleep(0.6)
        client.exchange(EHLO, ["250"])
        started = time.monotonic()
        assert client.reply().startswith("421 4.4.2")
        assert 0.8 <= time.monotonic() - started < 5


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_command_timeout_skips_handling_time(event_loop: str, tmp_path: Path) -> None:
    """Handling a long read of pipelined commands does not count as the client's idle time.

    Each unknown command gets a reply and a reject log line, so handling one
    read of up to 256 KiB of them can take longer than this command_timeout
    (about 1.5 s on a loaded 2-core host).  The client sends all commands and QUIT at once, so its
    next command is always waiting and a 421 4.4.2 would be the relay's own
    delay.  A large max_unsent_replies keeps the relay reading while the
    client reads nothing until it has sent everything.
    """
    commands = 60000
    server = (
        'command_timeout = "0.3s"\nmax_unsent_replies = "64M"\n'
        "max_errors = 100000000\nmax_junk_commands = 100000000"
    )
    with RelayProcess(tmp_path, event_loop=event_loop, server=server) as relay, RawClient(relay.port) as client:
        client.sock.settimeout(60.0)
        client.exchange(b"", ["220 mx.example.test"])
        client.exchange(EHLO, ["250"])
        client.send(b"XYZZY\r\n" * commands + b"QUIT\r\n")

        # The relay closes after the 221, so read to the end: at most one
        # recv per reply line, within the socket's timeout each.
        received = bytearray(client.pending)
        for _ in range(commands + 1):
            try:
                chunk = client.sock.recv(1 << 20)
            except ConnectionResetError:
                pytest.fail(f"reset after {len(received)} octets of replies; log ends: {relay.log()[-300:]}")
            if not chunk:
                break
            received += chunk
        answers = bytes(received).split(b"\r\n")
        others = [line for line in answers if not line.startswith(b"500 5.5.1")]
        assert answers.count(b"500 5.5.1 Unknown command") == commands, others[:3]
        assert others[0].startswith(b"221"), others
        assert others == [others[0], b""], others[:3]
        assert "timeout session=" not in relay.log()


def _wait_for_log(relay: RelayProcess, text: str, count: int = 1) -> str:
    """Return the log once ``text`` occurs ``count`` times in it, or after 5 seconds (lines are written in batches)."""
    deadline = time.monotonic() + 5
    while relay.log().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return relay.log()


def test_error_limit_reply_logged(tmp_path: Path) -> None:
    """The 421 after max_errors, reached by errors or by junk commands, gets a reject line like any 4xx."""
    server = "max_errors = 3\nmax_junk_commands = 2"
    with RelayProcess(tmp_path, server=server, policy='trusted_networks = ["127.0.0.2/32"]') as relay:
        with RawClient(relay.port) as client:
            client.exchange(b"", ["220"])
            greet(client)
            client.exchange(b"FOO\r\n", ["500"])
            client.exchange(b"BAR\r\n", ["500"])
            client.exchange(b"BAZ\r\n", ["500", "421 4.7.0"])
            assert client.closed()
        with RawClient(relay.port) as client:
            client.exchange(b"", ["220"])
            greet(client)
            # EHLO and the first NOOP are within max_junk_commands; the next three count as errors.
            client.exchange(b"NOOP\r\n", ["250"])
            client.exchange(b"NOOP\r\n", ["250"])
            client.exchange(b"NOOP\r\n", ["250"])
            client.exchange(b"NOOP\r\n", ["250", "421 4.7.0"])
            assert client.closed()
        log = _wait_for_log(relay, "Too many errors", 2)
    lines = [line for line in log.splitlines() if " reject " in line and "421 4.7.0 Too many errors" in line]
    assert len(lines) == 2, log
    assert "command=BAZ" in lines[0]
    assert "command=NOOP" in lines[1]


def test_connection_limits_and_timeouts(tmp_path: Path) -> None:
    """Per-client and total connection limits answer 421 4.7.0; an idle client gets 421 4.4.2."""
    server = 'max_connections_per_client = 2\nmax_connections = 5\ncommand_timeout = "1s"'
    policy = 'trusted_networks = ["127.0.0.2/32"]'
    with RelayProcess(tmp_path, server=server, policy=policy) as relay:
        clients = [RawClient(relay.port), RawClient(relay.port)]
        try:
            for client in clients:
                client.exchange(b"", ["220"])
            with RawClient(relay.port) as third:
                assert third.reply().startswith("421 4.7.0")
                assert third.closed()
            # A trusted client is exempt from the per-client limit, as Postfix exempts mynetworks.
            for _ in range(3):
                trusted = RawClient(relay.port, source="127.0.0.2")
                clients.append(trusted)
                trusted.exchange(b"", ["220"])
            with RawClient(relay.port, source="127.0.0.3") as over_total:
                assert over_total.reply().startswith("421 4.7.0")
            # Each refused connection is logged like any other rejection (log lines are written in batches).
            deadline = time.monotonic() + 5
            while relay.log().count("command=CONNECT") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert relay.log().count("command=CONNECT") == 2

            started = time.monotonic()
            assert clients[0].reply().startswith("421 4.4.2")
            assert clients[0].closed()
            assert 0.9 <= time.monotonic() - started < 5
        finally:
            for client in clients:
                client.close()


def test_spool_lock_timeout_replies_452(tmp_path: Path) -> None:
    """A spool write lock held past busy_timeout gets 452 4.3.1, not a hang, and a retry works."""
    with RelayProcess(tmp_path, spool='busy_timeout = "1s"') as relay, RawClient(relay.port) as client:
        client.exchange(b"", ["220"])
        greet(client)
        # Another open file description of writer.lock stands for a stopped relay process.
        holder = os.open(relay.spool / WRITER_LOCK, os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            transaction(client, "locked-out@example.com")
            started = time.monotonic()
            client.exchange(b"Subject: locked\r\n\r\nbody\r\n.\r\n", ["452 4.3.1"])
            assert time.monotonic() - started < 5
        finally:
            fcntl.flock(holder, fcntl.LOCK_UN)
            os.close(holder)
        assert messages_from(relay, "locked-out@example.com") == []

        transaction(client, "locked-out@example.com")
        client.exchange(b"Subject: retried\r\n\r\nbody\r\n.\r\n", ["250 2.0.0"])
        assert len(messages_from(relay, "locked-out@example.com")) == 1


def test_spool_write_failure_never_acknowledged(tmp_path: Path) -> None:
    """novu inbound #11034: a message the spool cannot store gets 452 4.3.1, never 250, and a retry works."""
    with RelayProcess(tmp_path, policy='trusted_networks = ["127.0.0.2/32"]') as relay:
        assert relay.process is not None
        pid = relay.process.pid
        body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1024
        with RawClient(relay.port) as client:
            client.exchange(b"", ["220"])
            greet(client)
            # Files of the relay may not grow past their size now: the next commit fails.
            used = sum(path.stat().st_size for path in relay.spool.glob("spool.db*"))
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (used + 65536, resource.RLIM_INFINITY))
            try:
                transaction(client, "full-disk@example.com")
                client.exchange(body + b".\r\n", ["452 4.3.1"])
            finally:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            assert messages_from(relay, "full-disk@example.com") == []

            transaction(client, "full-disk@example.com")
            client.exchange(body + b".\r\n", ["250 2.0.0"])
        [stored] = messages_from(relay, "full-disk@example.com")
        assert strip_received(stored) == body


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout: close sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_reset_during_tls_handshake_frees_slot(relay: RelayProcess) -> None:
    """A reset in the middle of the TLS handshake must not keep the connection's slot.

    The event loop reported the loss to its TLS layer only, so the slot stayed
    counted: 50 such resets locked a client out with 421, and max_connections
    of them everybody.
    """
    for _ in range(60):
        with RawClient(relay.port) as raw:
            raw.exchange(b"", ["220"])
            raw.exchange(EHLO, ["250"])
            raw.exchange(b"STARTTLS\r\n", ["220 2.0.0"])
            raw.send(b"\x16\x03\x01\x00")  # the start of a ClientHello, then nothing
            _reset(raw.sock)

    with RawClient(relay.port) as raw:
        assert raw.reply().startswith("220 ")
    assert "loop_exception" not in relay.log()


def test_reset_right_after_starttls_is_quiet(relay: RelayProcess) -> None:
    # The reset can arrive before the TLS upgrade starts; that must log no error.
    for _ in range(30):
        with RawClient(relay.port) as raw:
            raw.exchange(b"", ["220"])
            raw.send(EHLO + b"STARTTLS\r\n")
            _reset(raw.sock)

    with RawClient(relay.port) as raw:
        assert raw.reply().startswith("220 ")
    time.sleep(0.2)
    assert "loop_exception" not in relay.log()
    assert "AssertionError" not in relay.log()


def test_timeout_follows_data_mode(tmp_path: Path) -> None:
    """DATA and the commands after it each get their own timeout from the moment they start."""
    policy = 'trusted_networks = ["127.0.0.2/32"]'
    server = 'command_timeout = "4s"\ndata_timeout = "1s"'
    (tmp_path / "data").mkdir()
    (tmp_path / "command").mkdir()
    with RelayProcess(tmp_path / "data", server=server, policy=policy) as relay, RawClient(relay.port) as client:
        client.exchange(b"", ["220"])
        client.exchange(EHLO, ["250"])
        for command, expected in T:
            client.exchange(command, expected)
        client.send(b"Subject: partial\r\n\r\nno end")
        started = time.monotonic()
        assert client.reply().startswith("421 4.4.2")
        assert time.monotonic() - started < 3

    server = 'command_timeout = "1s"\ndata_timeout = "4s"'
    with RelayProcess(tmp_path / "command", server=server, policy=policy) as relay, RawClient(relay.port) as client:
        client.exchange(b"", ["220"])
        client.exchange(EHLO, ["250"])
        for command, expected in T:
            client.exchange(command, expected)
        client.exchange(b"Subject: whole\r\n\r\nbody\r\n.\r\n", ["250 2.0.0"])
        started = time.monotonic()
        assert client.reply().startswith("421 4.4.2")
        assert time.monotonic() - started < 3
