"""relay bench against aiosmtpd: counts, rejections, STARTTLS and AUTH against another server."""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from bench_helpers import make_certificate, run_bench

from conftest import free_port

_NUMBER = re.compile(r"(\d+)@")


def _number(address: str) -> int:
    match = _NUMBER.search(address)
    assert match is not None, address
    return int(match.group(1))


class CountingHandler:
    """Accepts everything except what the reject rules name; counts what it accepted."""

    def __init__(self, reject_rcpt_mod: int = 0, reject_data_mod: int = 0) -> None:
        self.reject_rcpt_mod = reject_rcpt_mod
        self.reject_data_mod = reject_data_mod
        self.messages = 0
        self.octets = 0
        self.lock = threading.Lock()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # Recipient rcpt{n}: numbers with n % mod == 1 get a temporary rejection.
        if self.reject_rcpt_mod and _number(address) % self.reject_rcpt_mod == 1:
            return "450 4.2.1 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert envelope.mail_from is not None
        if self.reject_data_mod and _number(envelope.mail_from) % self.reject_data_mod == 0:
            return "554 5.6.0 Message content rejected"
        with self.lock:
            self.messages += 1
            self.octets += len(envelope.original_content or b"")
        return "250 2.0.0 OK"


@contextmanager
def aiosmtpd_server(handler: CountingHandler, **options: Any) -> Iterator[str]:
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        controller.stop()


def test_counts_match_aiosmtpd() -> None:
    handler = CountingHandler()
    with aiosmtpd_server(handler) as target:
        status, report = run_bench(target, "-n", "150", "-c", "5", "-m", "3")
    assert status == 0
    assert report["messages_sent"] == 150
    assert handler.messages == 150
    assert report["bytes_sent"] == 150 * 1024
    assert report["latencies_ms"]["end_of_data"]["count"] == 150


def test_rejections_counted_by_stage() -> None:
    # n % 5 == 1 fails at RCPT (20 messages); n % 4 == 0 fails at end of
    # data unless it already failed at RCPT (25 - 5 = 20 messages).
    handler = CountingHandler(reject_rcpt_mod=5, reject_data_mod=4)
    with aiosmtpd_server(handler) as target:
        status, report = run_bench(target, "-n", "100", "-c", "4", "-m", "0", "--to", "rcpt{n}@example.test")
    assert status == 1
    assert report["messages_sent"] == 60
    assert report["messages_failed"] == 40
    assert handler.messages == 60
    assert report["errors"]["rcpt_4xx"] == 20
    assert report["errors"]["no_recipient_accepted"] == 20
    assert report["errors"]["data_5xx"] == 20
    assert report["replies_by_stage"]["rcpt"] == {"250": 80, "450": 20}
    assert report["replies_by_stage"]["end_of_data"] == {"250": 60, "554": 20}
    assert report["recipients_rejected"] == 20


def test_starttls_and_auth_plain(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen: list[tuple[str, bytes, bytes]] = []

    def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        seen.append((mechanism, data.login, data.password))
        return AuthResult(success=data.password == b"s3cret pass", handled=False)

    password_file = tmp_path / "password"
    password_file.write_text("s3cret pass\n")
    handler = CountingHandler()
    with aiosmtpd_server(
        handler, tls_context=context, require_starttls=True, authenticator=authenticate, auth_required=True
    ) as target:
        status, report = run_bench(
            target,
            "-n",
            "12",
            "-c",
            "2",
            "-m",
            "3",
            "--starttls",
            "--tls-ca",
            str(cert),
            "--auth-user",
            "bench",
            "--auth-password-file",
            str(password_file),
        )
    assert status == 0, report["errors"]
    assert report["messages_sent"] == 12
    assert handler.messages == 12
    assert report["replies_by_stage"]["auth"] == {"235": report["connections"]}
    assert {mechanism for mechanism, _, _ in seen} == {"PLAIN"}
    assert all(login == b"bench" for _, login, _ in seen)


def test_wrong_password_fails_every_message(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    password_file = tmp_path / "password"
    password_file.write_text("wrong\n")
    handler = CountingHandler()
    with aiosmtpd_server(
        handler,
        tls_context=context,
        require_starttls=True,
        authenticator=lambda *args: AuthResult(success=False, handled=False),
        auth_required=True,
    ) as target:
        status, report = run_bench(
            target,
            "-n",
            "4",
            "-c",
            "1",
            "--starttls",
            "--tls-no-verify",
            "--auth-user",
            "bench",
            "--auth-password-file",
            str(password_file),
        )
    assert status == 1
    assert report["messages_failed"] == 4
    assert report["errors"] == {"auth_5xx": 4}
    assert handler.messages == 0
