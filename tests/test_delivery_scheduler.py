"""The scheduler end to end: spool -> routing -> nsd MX lookup -> aiosmtpd or smtp-sink upstreams, and back as DSNs."""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import email
import mailbox
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from delivery_peers import (
    NameServer,
    RecordingHandler,
    accept_login,
    make_certificate,
    run_nsd,
    run_smtp_sink,
    run_upstream,
)
from mime_helpers import decoded_leaves

import relay.aliases
from conftest import free_port, require_corpus, unprivileged_command
from relay.aliases import parse_aliases, remember_checked
from relay.config import Config, load_config
from relay.delivery import Scheduler
from relay.delivery.downgrade import downgrade_to_7bit
from relay.delivery.dsn import _remote_mta, build_report
from relay.delivery.owner import process_start
from relay.delivery.scheduler import RECHECK_AFTER, Job, _LeaseKeeper
from relay.spool import (
    DeliveryResult,
    DsnState,
    Envelope,
    Outcome,
    Recipient,
    RecipientState,
    Spool,
    SpoolStore,
    StoredMessage,
    StoredRecipient,
)

BODY = b"From: alice@local.test\r\nTo: bob@mx.test\r\nSubject: hello\r\n\r\nline\r\n.starts with a dot\r\n"


@pytest.fixture(scope="module")
def nameserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NameServer]:
    with run_nsd(tmp_path_factory.mktemp("nsd")) as server:
        yield server


def make_config(
    directory: Path,
    nameserver: NameServer,
    port: int,
    extra: str = "",
    delivery: str = "",
    spool: str = "",
    scan_interval: float = 0.05,
) -> Config:
    (directory / "mail").mkdir(exist_ok=True)
    mailbox.Maildir(str(directory / "mail" / "alice"), create=True)
    # A key that ``delivery`` sets replaces the test default, as TOML allows a key only once.
    # The MX peers here all listen on loopback.
    backoff = "\n".join(
        line for line in ("minimal_backoff_time = 0.3", "maximal_backoff_time = 1", "allow_loopback_mx = true")
        if line.split(" =")[0] + " =" not in delivery
    )
    lease = "" if "lease_time =" in spool else 'lease_time = "30s"'
    path = directory / "relay.toml"
    path.write_text(
        f"""
[server]
hostname = "relay.test"
[spool]
path = "spool"
{lease}
{spool}
[policy]
local_domains = ["local.test"]
[delivery]
nameservers = ["127.0.0.1:{nameserver.port}"]
smtp_port = {port}
{backoff}
queue_scan_interval = {scan_interval}
connection_cache_time = 1
connect_timeout = 2
greeting_timeout = 5
{delivery}
[local]
maildir_root = "mail"
{extra}
"""
    )
    return load_config(path)


def commit(spool: Spool, sender: str, recipients: list[str], body: bytes = BODY, **envelope: Any) -> str:
    message = Envelope(sender=sender, recipients=tuple(Recipient(address=a) for a in recipients), **envelope)
    return spool.commit_blocking(message, body)


def spool_counts(config: Config) -> dict[str, int]:
    store = SpoolStore(config.spool.path)
    try:
        return store.counts()
    finally:
        store.close()


def run_until(config: Config, spool: Spool, done: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Run a scheduler until ``done()`` holds or ``timeout`` passes; return ``done()``."""

    async def main() -> bool:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                if await asyncio.to_thread(done):
                    return True
                await asyncio.sleep(0.05)
            return False
        finally:
            await scheduler.stop()
            await task

    return asyncio.run(main())


def stored_message(config: Config, queue_id: str) -> StoredMessage | None:
    """Return one message as the spool stores it now, or None when it is gone."""
    store = SpoolStore(config.spool.path)
    try:
        return store.load(queue_id)
    finally:
        store.close()


def unfolded(message: email.message.Message) -> str:
    """Return a message's text with every run of whitespace, folds included, as one space."""
    return " ".join(message.as_string().split())


def mailbox_messages(config: Config, user: str) -> list[email.message.Message]:
    return [message for _, message in mailbox.Maildir(str(Path(config.local.maildir_root) / user)).items()]


@pytest.fixture
def spool_for() -> Iterator[Callable[[Config], Spool]]:
    opened: list[Spool] = []

    def open_spool(config: Config) -> Spool:
        spool = Spool.from_config(config.spool)
        opened.append(spool)
        return spool

    yield open_spool
    for spool in opened:
        spool.close()


# The default passes every corpus body with its claim; 0 makes the scheduler read each one separately.
@pytest.mark.parametrize("spool_settings", ["", "claim_body_max_bytes = 0"], ids=["bodies-in-claim", "bodies-read"])
def test_corpus_through_mx_byte_for_byte(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, spool_settings: str
) -> None:
    corpus = sorted(require_corpus("cpython-email").glob("*.txt"))
    port = free_port("127.0.0.3")
    config = make_config(tmp_path, nameserver, port, spool=spool_settings)
    spool = spool_for(config)
    bodies = {}
    # The first MX (127.0.0.2) has no listener, so every message falls back to the second.
    with run_upstream("127.0.0.3", port) as upstream:
        for index, path in enumerate(corpus * 2):
            # Spooled bodies have CRLF line ends and end with one, as SMTP delivers them.
            body = path.read_bytes().replace(b"\r\n", b"\n").rstrip(b"\n").replace(b"\n", b"\r\n") + b"\r\n"
            queue_id = commit(spool, "alice@local.test", [f"user{index}@mx.test"], body)
            bodies[f"user{index}@mx.test"] = body
        assert run_until(config, spool, lambda: len(upstream.messages) == len(bodies) and not spool_counts(config))
    received = {m.recipients[0]: m.data for m in upstream.messages}
    for address, body in bodies.items():
        assert received[address] == body, address
    assert upstream.connections < len(bodies)
    assert queue_id


def test_rcpt_5xx_bounces_to_local_sender(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = RecordingHandler(refuse={"nobody@implicit.test": "550 5.1.1 no such user"})
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "alice@local.test", ["nobody@implicit.test", "bob@implicit.test"], ret="HDRS")
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    assert [m.recipients for m in handler.messages] == [["bob@implicit.test"]]
    (report,) = mailbox_messages(config, "alice")
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Return-Path"] == "<>"
    status = report.get_payload()[1]
    fields = [part for part in status.get_payload()]
    recipient_fields = fields[1]
    assert recipient_fields["Final-Recipient"] == "rfc822; nobody@implicit.test"
    assert recipient_fields["Action"] == "failed"
    assert recipient_fields["Status"] == "5.1.1"
    # RFC 3464 section 2.3.5: the next hop's name, without its address and port.
    assert recipient_fields["Remote-MTA"] == "dns; implicit.test"
    assert "550 5.1.1 no such user" in recipient_fields["Diagnostic-Code"]


def test_failures_at_two_domains_one_dsn(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The two domains are two jobs of one claim.  b.wild.test replies 0.5 s
    # later, and its failure still joins the DSN for a.wild.test's.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = RecordingHandler(
        refuse={"x@a.wild.test": "550 5.1.1 no x", "y@b.wild.test": "550 5.1.1 no y"},
        rcpt_delay={"y@b.wild.test": 0.5},
    )
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "alice@local.test", ["x@a.wild.test", "y@b.wild.test"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))

    (report,) = mailbox_messages(config, "alice")
    blocks = report.get_payload()[1].get_payload()[1:]
    assert sorted(block["Final-Recipient"] for block in blocks) == ["rfc822; x@a.wild.test", "rfc822; y@b.wild.test"]


def test_size_limit_bounce_names_no_remote_mta(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # The next hop offers SIZE 200 (RFC 1870), so the message never reaches
    # MAIL.  The 552 is relay's own reply, so the DSN gives it as an X-relay
    # diagnostic and names no Remote-MTA (RFC 3464 sections 2.3.5 and 2.3.6).
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    body = b"Subject: big\r\n\r\n" + b"x" * 300 + b"\r\n"
    with run_upstream("127.0.0.4", port, data_size_limit=200) as upstream:
        commit(spool, "alice@local.test", ["bob@implicit.test"], body=body)
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    assert upstream.messages == []
    (report,) = mailbox_messages(config, "alice")
    fields = report.get_payload()[1].get_payload()[1]
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.3.4"
    assert fields["Remote-MTA"] is None
    diagnostic = " ".join(fields["Diagnostic-Code"].split())  # unfolded
    assert diagnostic.startswith("X-relay; 552 5.3.4 message size ")
    assert " exceeds the limit 200 of implicit.test[127.0.0.4]:" in diagnostic


def test_bounce_decodes_envid_and_orcpt(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The spool keeps ENVID and the ORCPT address as xtext, their SMTP form.  The
    # DSN fields carry them decoded (RFC 3464 sections 2.2.1 and 2.3.1), so a
    # sender matches the bounce against the ENVID it chose, "+" included.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = RecordingHandler(refuse={"nobody@implicit.test": "550 5.1.1 no such user"})
    recipient = Recipient(address="nobody@implicit.test", orcpt="rfc822;first+2Blast@implicit.test")
    envelope = Envelope(sender="alice@local.test", recipients=(recipient,), envid="QQ+2B314159+3D")
    with run_upstream("127.0.0.4", port, handler):
        spool.commit_blocking(envelope, BODY)
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    (report,) = mailbox_messages(config, "alice")
    message_fields, recipient_fields = report.get_payload()[1].get_payload()
    assert message_fields["Original-Envelope-Id"] == "QQ+314159="
    assert recipient_fields["Original-Recipient"] == "rfc822;first+last@implicit.test"
    assert recipient_fields["Final-Recipient"] == "rfc822; nobody@implicit.test"


def test_refused_helo_bounce_names_remote_mta(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = RecordingHandler(helo_reply="554 5.7.1 relay.example.test is not welcome")

    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "alice@local.test", ["bob@implicit.test"], ret="HDRS")
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))

    (report,) = mailbox_messages(config, "alice")
    recipient_fields = report.get_payload()[1].get_payload()[1]
    assert recipient_fields["Action"] == "failed"
    assert recipient_fields["Status"] == "5.7.1"
    # The session never opened, but the refusal came from that host.
    assert recipient_fields["Remote-MTA"] == "dns; implicit.test"
    assert "554 5.7.1 relay.example.test is not welcome" in recipient_fields["Diagnostic-Code"]
    assert handler.messages == []


def test_rcpt_5xx_kept_when_session_fails(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # RFC 5321 section 3.3: the 550 for one recipient is final although a 421
    # for the next ends the session; only the second recipient waits.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = RecordingHandler(
        refuse={"nobody@implicit.test": "550 5.1.1 no such user", "later@implicit.test": "421 4.3.2 closing"}
    )
    with run_upstream("127.0.0.4", port, handler):
        queue_id = commit(spool, "alice@local.test", ["nobody@implicit.test", "later@implicit.test"], ret="HDRS")
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")))

    (report,) = mailbox_messages(config, "alice")
    recipient_fields = report.get_payload()[1].get_payload()[1]
    assert recipient_fields["Final-Recipient"] == "rfc822; nobody@implicit.test"
    assert recipient_fields["Status"] == "5.1.1"
    message = stored_message(config, queue_id)
    assert message is not None
    states = {r.address: (r.state.value, r.last_reply) for r in message.recipients}
    # Bounced at the first attempt, not after a retry that happened to order things differently.
    assert {r.address: r.attempts for r in message.recipients}["nobody@implicit.test"] == 1
    assert states["nobody@implicit.test"][0] == "bounced"
    assert states["later@implicit.test"][0] == "deferred"
    assert states["later@implicit.test"][1].startswith("421 4.3.2")


@pytest.mark.parametrize(
    ("peer", "field"),
    [
        ("mx1.example.net[192.0.2.1]:25", "dns; mx1.example.net"),
        ("192.0.2.7[192.0.2.7]:2600", "dns; [192.0.2.7]"),
        ("2001:db8::1[2001:db8::1]:25", "dns; [IPv6:2001:db8::1]"),
    ],
)
def test_remote_mta_names_next_hop(peer: str, field: str) -> None:
    assert _remote_mta(peer) == field


def test_more_dsns_than_one_batch_all_queued(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DSNs are queued a batch at a time; the rest must follow without waiting
    # for another failure or a restart.
    monkeypatch.setattr("relay.delivery.scheduler.DSN_BATCH", 3)
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = RecordingHandler(refuse={"nobody@implicit.test": "550 5.1.1 no such user"})
    with run_upstream("127.0.0.4", port, handler):
        for _ in range(8):
            commit(spool, "alice@local.test", ["nobody@implicit.test"], ret="HDRS")
        assert run_until(
            config, spool, lambda: len(mailbox_messages(config, "alice")) == 8 and not spool_counts(config)
        ), spool_counts(config)


# Run by a second Python process: commit a message to SPOOL with its first
# recipient bounced and the DSN for it owed but not queued.
_RECORD_FAILURE_ELSEWHERE = """
import sys
from relay.spool import Envelope, Recipient, Spool
spool = Spool.open(sys.argv[1])
try:
    envelope = Envelope(
        sender="alice@local.test",
        recipients=(Recipient("gone@local.test"), Recipient("alice@local.test")),
    )
    body = b"Subject: from another process\\r\\n\\r\\nbody\\r\\n"
    print(spool.commit_with_failures_blocking(envelope, body, {0: "550 5.1.1 no such user"}))
finally:
    spool.close()
"""


def test_dsn_owed_by_other_process_sent_within_scan(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # A failure that another process records, with its DSN owed, reaches no
    # running scheduler through its own results.  The scheduler looks for owed
    # DSNs once per queue_scan_interval (1 s here), so the DSN goes out within
    # that interval and the time it takes to deliver locally.
    config = make_config(tmp_path, nameserver, 25, scan_interval=1.0)
    spool = spool_for(config)
    commit(spool, "bob@local.test", ["alice@local.test"])

    async def main() -> float | None:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        try:
            # The first message delivered: the look for owed DSNs at start is over.
            deadline = loop.time() + 10.0
            while loop.time() < deadline and not await asyncio.to_thread(mailbox_messages, config, "alice"):
                await asyncio.sleep(0.05)
            child = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", _RECORD_FAILURE_ELSEWHERE, config.spool.path],
                capture_output=True, text=True, timeout=30,
            )
            assert child.returncode == 0, child.stderr
            recorded = loop.time()
            deadline = recorded + 5.0
            while loop.time() < deadline:
                messages = await asyncio.to_thread(mailbox_messages, config, "alice")
                if any(m.get_content_type() == "multipart/report" for m in messages):
                    return loop.time() - recorded
                await asyncio.sleep(0.05)
            return None
        finally:
            await scheduler.stop()
            await task

    waited = asyncio.run(main())
    assert waited is not None, "no DSN within 5 s of the failure"
    assert waited < config.delivery.queue_scan_interval + 1.0
    reports = [m for m in mailbox_messages(config, "alice") if m.get_content_type() == "multipart/report"]
    assert len(reports) == 1
    text = unfolded(reports[0])
    assert "Final-Recipient: rfc822; gone@local.test" in text
    assert "550 5.1.1 no such user" in text
    assert spool_counts(config) == {}


def test_corrupt_message_owing_dsn_keeps_scheduler(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # The body of a message that owes a DSN fails its CRC-32 when the DSN is
    # built.  The message is moved aside, and the scheduler goes on to
    # deliver the rest of the queue.
    config = make_config(tmp_path, nameserver, 25)
    spool = spool_for(config)
    broken = commit(spool, "bob@local.test", ["gone@local.test"])
    store = SpoolStore(config.spool.path)
    try:
        failure = DeliveryResult(broken, 0, Outcome.FAILED, "550 5.1.1 no such user", "")
        store.record_results([failure], None, time.time())
        store.connection.execute("UPDATE message SET body = ? WHERE queue_id = ?", (b"damaged!", broken))
    finally:
        store.close()
    commit(spool, "bob@local.test", ["alice@local.test"])
    assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")), timeout=5.0)
    assert (Path(config.spool.path) / "corrupt" / f"{broken}.body").read_bytes() == b"damaged!"


def test_message_without_recipients_moved_aside(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # A deferred message whose recipient rows are gone matches no claim, so
    # only the scan at scheduler start can find it.
    config = make_config(tmp_path, nameserver, 25)
    spool = spool_for(config)
    broken = commit(spool, "bob@local.test", ["later@local.test"])
    store = SpoolStore(config.spool.path)
    try:
        deferral = DeliveryResult(broken, 0, Outcome.DEFERRED, "451 4.3.0 later", "", time.time() + 3600)
        store.record_results([deferral], None, time.time())
        store.connection.execute("DELETE FROM recipient WHERE queue_id = ?", (broken,))
    finally:
        store.close()
    commit(spool, "bob@local.test", ["alice@local.test"])

    assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")), timeout=5.0)

    record = orjson.loads((Path(config.spool.path) / "corrupt" / f"{broken}.json").read_bytes())
    assert record["reason"] == "message has no recipients"
    assert record["recipient"] == []
    assert [row["outcome"] for row in record["attempt"]] == ["deferred"]
    with SpoolStore(config.spool.path) as reader:
        assert broken not in reader.queue_ids(state=None)


class _SlowDataHandler(RecordingHandler):
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(1.2)
        return await super().handle_DATA(server, session, envelope)


def test_hold_reaches_claimed_job(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # A job claimed before the hold but not yet sent must not be sent after it.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="destination_concurrency_limit = 1")
    spool = spool_for(config)
    handler = _SlowDataHandler()
    with run_upstream("127.0.0.4", port, handler):
        ids = [commit(spool, "alice@local.test", [f"user{n}@implicit.test"]) for n in range(3)]
        started = time.monotonic()
        held_counts: list[int] = []

        def hold_then_wait() -> bool:
            if not held_counts and time.monotonic() - started > 0.3:
                store = SpoolStore(config.spool.path)
                try:
                    with store.transaction():
                        held_counts.append(store.hold(ids[2], time.time()))
                finally:
                    store.close()
            return len(handler.messages) >= 2 and time.monotonic() - started > 5

        assert run_until(config, spool, hold_then_wait)

    assert held_counts == [1]
    assert sorted(m.recipients[0] for m in handler.messages) == ["user0@implicit.test", "user1@implicit.test"]
    message = stored_message(config, ids[2])
    assert message is not None
    assert [r.state for r in message.recipients] == [RecipientState.HELD]


def test_release_after_dropped_claim_delivers_at_once(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # The scheduler drops a held job's claim and gives its lease back, so a
    # release makes the recipient due at once, not when the 30 s lease runs out.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="destination_concurrency_limit = 1")
    spool = spool_for(config)
    handler = _SlowDataHandler()
    with run_upstream("127.0.0.4", port, handler):
        ids = [commit(spool, "alice@local.test", [f"user{n}@implicit.test"]) for n in range(3)]
        started = time.monotonic()
        steps: list[str] = []

        def hold_release_deliver() -> bool:
            store = SpoolStore(config.spool.path)
            try:
                if not steps and time.monotonic() - started > 0.3:
                    with store.transaction():
                        store.hold(ids[2], time.time())
                    steps.append("held")
                elif steps == ["held"] and len(handler.messages) >= 2 and time.monotonic() - started > 5:
                    with store.transaction():
                        store.release(ids[2], time.time())
                    steps.append("released")
            finally:
                store.close()
            return len(handler.messages) == 3

        assert run_until(config, spool, hold_release_deliver, timeout=15.0)
    assert steps == ["held", "released"]
    assert sorted(m.recipients[0] for m in handler.messages) == [f"user{n}@implicit.test" for n in range(3)]


def test_hold_reaches_claimed_local_job(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The same for a local job: claimed, held by an operator, then its turn comes.
    config = make_config(tmp_path, nameserver, free_port())
    spool = spool_for(config)
    queue_id = commit(spool, "carol@example.org", ["alice@local.test"])

    async def main() -> None:
        scheduler = Scheduler(config, spool)
        (claim,) = await spool.claim("test", limit=10)
        store = SpoolStore(config.spool.path)
        try:
            with store.transaction():
                assert store.hold(queue_id, time.time()) == 1
        finally:
            store.close()
        # Past the scheduler's recheck time: a job this old reads its state again.
        await asyncio.sleep(RECHECK_AFTER + 0.2)
        job = Job(claim, scheduler.router.route("local.test"), tuple(claim.recipients))
        await scheduler._deliver_local(job)

    asyncio.run(main())

    assert mailbox_messages(config, "alice") == []
    message = stored_message(config, queue_id)
    assert message is not None
    assert [r.state for r in message.recipients] == [RecipientState.HELD]


def test_null_sender_failure_sends_no_bounce(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = RecordingHandler(refuse={"nobody@implicit.test": "550 5.1.1 no such user"})
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "", ["nobody@implicit.test"])
        assert run_until(config, spool, lambda: not spool_counts(config))
    assert mailbox_messages(config, "alice") == []


def test_null_mx_bounces_without_connection(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.5")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    with run_upstream("127.0.0.5", port) as upstream:
        commit(spool, "alice@local.test", ["rcpt@null.test"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    assert upstream.connections == 0
    (report,) = mailbox_messages(config, "alice")
    assert report.get_payload()[1].get_payload()[1]["Status"] == "5.1.10"


@pytest.mark.parametrize("domain", ["loop.test", "zero.test", "mapped.test", "six.test", "numeric-self.test"])
def test_loopback_mx_bounces_as_loop(tmp_path: Path, nameserver: NameServer, spool_for: Any, domain: str) -> None:
    # Each domain's MX host resolves to an address of this host (127.0.0.1, 0.0.0.0, ::ffff:127.0.0.1 or ::1),
    # or is that address written into the MX record (numeric-self.test).
    port = free_port("127.0.0.1")
    config = make_config(tmp_path, nameserver, port, delivery="allow_loopback_mx = false")
    spool = spool_for(config)
    with run_upstream("127.0.0.1", port) as upstream:
        commit(spool, "alice@local.test", [f"rcpt@{domain}"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    assert upstream.connections == 0
    (report,) = mailbox_messages(config, "alice")
    fields = report.get_payload()[1].get_payload()[1]
    assert fields["Status"] == "5.4.6"
    assert f"mail for {domain} loops back to myself" in unfolded(report)


@pytest.mark.parametrize("domain", ["primary-down.test", "primary-gone.test"])
def test_loopback_backup_mx_defers(tmp_path: Path, nameserver: NameServer, spool_for: Any, domain: str) -> None:
    # The best MX host's lookup fails (SERVFAIL) or finds no such name, and the
    # backup MX host is this host: Postfix defers ("unable to find primary relay").
    port = free_port("127.0.0.1")
    config = make_config(tmp_path, nameserver, port, delivery="allow_loopback_mx = false")
    spool = spool_for(config)
    with run_upstream("127.0.0.1", port) as upstream:
        queue_id = commit(spool, "alice@local.test", [f"rcpt@{domain}"])

        def deferred() -> bool:
            message = stored_message(config, queue_id)
            return message is not None and message.recipients[0].state is RecipientState.DEFERRED

        assert run_until(config, spool, deferred)
    assert upstream.connections == 0
    assert mailbox_messages(config, "alice") == []
    message = stored_message(config, queue_id)
    assert message is not None
    assert message.recipients[0].last_reply.startswith(f"451 4.4.4 cannot find the primary MX host of {domain}")


def test_numeric_mx_delivered_to_address(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # numeric.test has "MX 10 127.0.0.7.": the address is used as written, as Postfix 3.x does.
    port = free_port("127.0.0.7")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    with run_upstream("127.0.0.7", port) as upstream:
        commit(spool, "alice@local.test", ["rcpt@numeric.test"])
        assert run_until(config, spool, lambda: bool(upstream.messages) and not spool_counts(config))
    assert [m.recipients for m in upstream.messages] == [["rcpt@numeric.test"]]
    assert mailbox_messages(config, "alice") == []


def test_mapped_loopback_literal_bounces(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # A dual-stack socket reaches 127.0.0.1 through ::ffff:127.0.0.1, so the literal is loopback too.
    port = free_port("127.0.0.1")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    with run_upstream("127.0.0.1", port) as upstream:
        commit(spool, "alice@local.test", ["rcpt@[IPv6:::ffff:127.0.0.1]"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    assert upstream.connections == 0
    (report,) = mailbox_messages(config, "alice")
    assert report.get_payload()[1].get_payload()[1]["Status"] == "5.7.1"


def test_literal_goes_to_relayhost(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # 192.0.2.1 (TEST-NET-1) is never reached: with a smart host every remote recipient goes there.
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    spool = spool_for(config)
    with run_upstream("127.0.0.7", port) as upstream:
        commit(spool, "alice@local.test", ["rcpt@[192.0.2.1]", "rcpt@[IPv6:2001:db8::1]"])
        assert run_until(config, spool, lambda: bool(upstream.messages) and not spool_counts(config))
    assert [sorted(m.recipients) for m in upstream.messages] == [["rcpt@[192.0.2.1]", "rcpt@[IPv6:2001:db8::1]"]]
    assert mailbox_messages(config, "alice") == []


def test_loopback_literal_bounces_with_relayhost(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    spool = spool_for(config)
    with run_upstream("127.0.0.7", port) as upstream:
        commit(spool, "alice@local.test", ["rcpt@[127.0.0.1]"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    assert upstream.connections == 0
    (report,) = mailbox_messages(config, "alice")
    assert report.get_payload()[1].get_payload()[1]["Status"] == "5.7.1"


def test_nxdomain_bounces(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    config = make_config(tmp_path, nameserver, free_port())
    spool = spool_for(config)
    commit(spool, "alice@local.test", ["rcpt@nx.test"])
    assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    (report,) = mailbox_messages(config, "alice")
    assert report.get_payload()[1].get_payload()[1]["Status"] == "5.1.2"


def test_invalid_domain_bounces_at_once(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The SMTP server rejects these forward-paths, but an alias or ``relay sendmail``
    # can still put one in the spool.  A retry could only fail the same way.
    config = make_config(tmp_path, nameserver, free_port())
    spool = spool_for(config)
    recipients = ["rcpt@a..test", "rcpt@" + "a" * 64 + ".test"]
    commit(spool, "alice@local.test", recipients)
    assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    (report,) = mailbox_messages(config, "alice")
    statuses = [part["Status"] for part in report.get_payload()[1].get_payload()[1:]]
    assert statuses == ["5.1.2", "5.1.2"]
    assert "not a valid DNS name" in unfolded(report)


class FlakyHandler(RecordingHandler):
    """Answers RCPT with 450 for the first ``failures`` attempts, then accepts."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.remaining = failures

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.remaining > 0:
            self.remaining -= 1
            return "450 4.2.1 try again later"
        return await super().handle_RCPT(server, session, envelope, address, options)


def test_4xx_then_success_on_retry(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = FlakyHandler(failures=2)
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "alice@local.test", ["bob@implicit.test"])
        assert run_until(config, spool, lambda: bool(handler.messages) and not spool_counts(config))
    assert handler.remaining == 0
    assert len(handler.messages) == 1
    assert mailbox_messages(config, "alice") == []


def test_queue_lifetime_expiry_bounces(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="maximal_queue_lifetime = 1")
    spool = spool_for(config)
    handler = FlakyHandler(failures=1000)
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "alice@local.test", ["bob@implicit.test"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))
    (report,) = mailbox_messages(config, "alice")
    fields = report.get_payload()[1].get_payload()[1]
    assert fields["Action"] == "failed"
    assert fields["Status"] == "4.2.1"
    # RFC 3464 section 2.3.6: Diagnostic-Code is the next hop's reply alone.
    assert " ".join(fields["Diagnostic-Code"].split()) == "smtp; 450 4.2.1 try again later"
    text = report.get_payload()[0].get_payload(decode=True).decode()
    line = " ".join(text.split("<bob@implicit.test>: failed: ", 1)[1].split("\n\n", 1)[0].split())
    assert line.startswith("450 4.2.1 try again later (the message expired after "), text
    assert line.endswith(" in the queue)"), text


def test_expiry_bounces_at_queue_lifetime(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Attempts come at about 0 s and 1.5 s, and the next backoff of 1.5 s
    # would end past the 2 s lifetime.  The last retry comes at the lifetime
    # instead, so the bounce is on time and a delay DSN's Will-Retry-Until
    # (arrival plus the lifetime) holds.
    port = free_port("127.0.0.4")
    settings = 'maximal_queue_lifetime = 2\nminimal_backoff_time = 1.5\nmaximal_backoff_time = 1.5'
    config = make_config(tmp_path, nameserver, port, delivery=settings)
    spool = spool_for(config)
    with run_upstream("127.0.0.4", port, FlakyHandler(failures=1000)), caplog.at_level("INFO", logger="relay"):
        commit(spool, "alice@local.test", ["bob@implicit.test"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))

    (bounced,) = [record.fields for record in caplog.records if getattr(record, "event", "") == "bounced"]  # type: ignore[attr-defined]
    assert 2.0 <= bounced["delay"] < 2.5
    deferred = [record.fields for record in caplog.records if getattr(record, "event", "") == "deferred"]  # type: ignore[attr-defined]
    assert len(deferred) == 2


def test_bounce_queue_lifetime_for_null_sender(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A DSN that keeps getting 4xx gives up after bounce_queue_lifetime,
    # while ordinary mail to the same host keeps its longer lifetime.
    port = free_port("127.0.0.4")
    settings = "maximal_queue_lifetime = 60\nbounce_queue_lifetime = 1"
    config = make_config(tmp_path, nameserver, port, delivery=settings)
    spool = spool_for(config)
    with run_upstream("127.0.0.4", port, FlakyHandler(failures=1000)), caplog.at_level("INFO", logger="relay"):
        commit(spool, "", ["dsn@implicit.test"])
        kept = commit(spool, "alice@local.test", ["bob@implicit.test"])
        assert run_until(config, spool, lambda: spool_counts(config) == {"deferred": 1}, timeout=10)
    stored = stored_message(config, kept)
    assert stored is not None
    assert stored.recipients[0].state is RecipientState.DEFERRED
    bounced = [record for record in caplog.records if getattr(record, "event", "") == "bounced"]
    assert [record.fields["to"] for record in bounced] == ["dsn@implicit.test"]  # type: ignore[attr-defined]
    assert bounced[0].fields["reply"] == "450 4.2.1 try again later"  # type: ignore[attr-defined]
    assert bounced[0].fields["reason"] == "message expired after 1 s in the queue"  # type: ignore[attr-defined]
    assert mailbox_messages(config, "alice") == []


def test_retry_delay_never_passes_maximum(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Doubling from 0.2 s reaches the 0.3 s maximum at the second retry.  The
    # random share added to spread retries out must not take a delay past it.
    port = free_port("127.0.0.4")
    settings = "minimal_backoff_time = 0.2\nmaximal_backoff_time = 0.3"
    config = make_config(tmp_path, nameserver, port, delivery=settings)
    spool = spool_for(config)
    delays: dict[float, float] = {}  # last_attempt -> next_attempt - last_attempt

    def five_deferrals() -> bool:
        stored = stored_message(config, queue_id)
        if stored is not None:
            (recipient,) = stored.recipients
            if recipient.last_attempt is not None:
                delays[recipient.last_attempt] = recipient.next_attempt - recipient.last_attempt
        return len(delays) >= 5

    with run_upstream("127.0.0.4", port, FlakyHandler(failures=1000)):
        queue_id = commit(spool, "alice@local.test", ["bob@implicit.test"])
        assert run_until(config, spool, five_deferrals)
    # The spool stamps last_attempt a moment after the scheduler computed next_attempt.
    ordered = [delays[moment] for moment in sorted(delays)]
    assert 0.19 <= ordered[0] <= 0.25
    assert max(ordered) <= 0.3
    assert ordered[-1] == pytest.approx(0.3, abs=0.01)


@contextmanager
def clock_set_back(seconds: float) -> Iterator[None]:
    """Run time.time() ``seconds`` behind the system clock, as after the clock is stepped back."""
    real = time.time
    time.time = lambda: real() - seconds
    try:
        yield
    finally:
        time.time = real


def test_clock_set_back_keeps_mail_due(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # A recipient deferred for 0.3 s, and a message received but not yet
    # tried, both carry times from before the clock went back three hours.
    # Neither may wait those three hours out.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = FlakyHandler(failures=1)
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "alice@local.test", ["bob@implicit.test"])
        assert run_until(config, spool, lambda: spool_counts(config).get("deferred") == 1)
        commit(spool, "alice@local.test", ["carol@implicit.test"])
        with clock_set_back(3 * 3600):
            assert run_until(config, spool, lambda: not spool_counts(config), timeout=10)
    assert sorted(message.recipients[0] for message in handler.messages) == [
        "bob@implicit.test", "carol@implicit.test",
    ]


def test_clock_set_back_ends_destination_backoff(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens at first, so the destination is backed off for about
    # 0.3 s.  The clock then goes back three hours while the scheduler runs:
    # the backoff still ends after 0.3 s, without a deferral after each claim.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    commit(spool, "alice@local.test", ["bob@implicit.test"])

    async def main() -> int:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + 10
            while spool_counts(config).get("deferred") != 1 and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert spool_counts(config).get("deferred") == 1
            with clock_set_back(3 * 3600), run_upstream("127.0.0.4", port) as upstream:
                deadline = loop.time() + 10
                while not upstream.messages and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                return len(upstream.messages)
        finally:
            await scheduler.stop()
            await task

    with caplog.at_level("INFO", logger="relay"):
        delivered = asyncio.run(main())
    assert delivered == 1
    events = [getattr(record, "event", "") for record in caplog.records]
    assert events.count("destination_backoff") == 1
    # The failed connection, and at most a few claims while the backoff ran.
    assert events.count("deferred") <= 5


def test_clock_set_back_while_running_moves_retry(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A step of five minutes is shorter than the ten-minute maximal backoff,
    # so only the running scheduler can tell that the retry half a second
    # ahead now sits five minutes ahead.
    port = free_port("127.0.0.4")
    settings = "minimal_backoff_time = 0.5\nmaximal_backoff_time = 600"
    config = make_config(tmp_path, nameserver, port, delivery=settings)
    spool = spool_for(config)
    handler = FlakyHandler(failures=1)

    async def main() -> int:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + 10
            while spool_counts(config).get("deferred") != 1 and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert spool_counts(config).get("deferred") == 1
            with clock_set_back(300):
                deadline = loop.time() + 10
                while not handler.messages and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                return len(handler.messages)
        finally:
            await scheduler.stop()
            await task

    with run_upstream("127.0.0.4", port, handler), caplog.at_level("INFO", logger="relay"):
        commit(spool, "alice@local.test", ["bob@implicit.test"])
        delivered = asyncio.run(main())
    assert delivered == 1
    (step,) = [record for record in caplog.records if getattr(record, "event", "") == "clock_set_back"]
    assert step.fields["recipients"] == 1  # type: ignore[attr-defined]


def test_destination_concurrency_limit(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="destination_concurrency_limit = 2")
    spool = spool_for(config)
    with run_upstream("127.0.0.4", port) as upstream:
        for index in range(40):
            commit(spool, "alice@local.test", [f"user{index}@implicit.test"])
        assert run_until(config, spool, lambda: len(upstream.messages) == 40 and not spool_counts(config))
    assert 1 <= upstream.max_active <= 2
    assert upstream.connections < 40


def test_recipients_split_per_transaction(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="recipients_per_transaction = 3")
    spool = spool_for(config)
    with run_upstream("127.0.0.4", port) as upstream:
        commit(spool, "alice@local.test", [f"user{index}@implicit.test" for index in range(7)])
        assert run_until(config, spool, lambda: not spool_counts(config))
    assert sorted(len(m.recipients) for m in upstream.messages) == [1, 3, 3]


def test_smart_host_with_starttls_and_auth(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    cert, key = make_certificate(tmp_path)
    (tmp_path / "password").write_text("secret\n")
    port = free_port("127.0.0.6")
    config = make_config(
        tmp_path, nameserver, 25,
        delivery=f'relayhost = "[127.0.0.6]:{port}"\nrelayhost_username = "relay"\n'
        f'relayhost_password_file = "password"\ntls_ca_file = "{cert}"',
    )
    spool = spool_for(config)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    with run_upstream("127.0.0.6", port, tls_context=server_tls, require_starttls=True,
                      authenticator=accept_login, auth_required=True) as upstream:
        for index in range(5):
            commit(spool, "alice@local.test", [f"user{index}@example.org"])
        assert run_until(config, spool, lambda: len(upstream.messages) == 5 and not spool_counts(config))
    assert all(m.tls for m in upstream.messages)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smart_host_wrong_password_defers(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture, mechanism: str
) -> None:
    # A 535 is a configuration error at this end, so the mail waits for its fix
    # (Postfix's smtp_sasl_auth_soft_bounce).  The password must not show up in
    # the log or in the stored reply that `relay queue show` and DSNs print.
    cert, key = make_certificate(tmp_path)
    password = "wrong-password-7f3a"
    (tmp_path / "password").write_text(f"{password}\n")
    port = free_port("127.0.0.6")
    config = make_config(
        tmp_path, nameserver, 25,
        delivery=f'relayhost = "[127.0.0.6]:{port}"\nrelayhost_username = "relay"\n'
        f'relayhost_password_file = "password"\ntls_ca_file = "{cert}"\n'
        'minimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"',
    )
    spool = spool_for(config)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    with caplog.at_level("DEBUG", logger="relay"), run_upstream(
        "127.0.0.6", port, tls_context=server_tls, require_starttls=True, authenticator=accept_login,
        auth_required=True, auth_exclude_mechanism=[other],
    ) as upstream:
        queue_id = commit(spool, "alice@local.test", ["user@example.org"])
        assert run_until(config, spool, lambda: spool_counts(config) == {"deferred": 1}, timeout=10.0)

    assert upstream.messages == []
    message = stored_message(config, queue_id)
    assert message is not None
    reply = message.recipients[0].last_reply
    assert reply.startswith("451 4.7.8 AUTH with 127.0.0.6[127.0.0.6]"), reply
    assert "535" in reply
    encoded = [base64.b64encode(password.encode()).decode(), base64.b64encode(f"\0relay\0{password}".encode()).decode()]
    relay_log = "\n".join(f"{record.getMessage()} {getattr(record, 'fields', '')}" for record in caplog.records
                          if record.name.startswith("relay"))
    for secret in [password, *encoded]:
        assert secret not in reply
        assert secret not in relay_log


def test_worker_error_defers_with_reason(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The CA bundle passed the start-up check and was damaged later: the
    # session fails, and the recipient is deferred with the reason instead of
    # the worker failing with no reply recorded.
    cert, key = make_certificate(tmp_path)
    port = free_port("127.0.0.6")
    config = make_config(
        tmp_path, nameserver, 25, delivery=f'relayhost = "[127.0.0.6]:{port}"\ntls_ca_file = "{cert}"'
    )
    spool = spool_for(config)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    Path(cert).write_text("not a certificate\n")
    with run_upstream("127.0.0.6", port, tls_context=server_tls, require_starttls=True) as upstream:
        queue_id = commit(spool, "alice@local.test", ["user@example.org"])
        assert run_until(config, spool, lambda: spool_counts(config) == {"deferred": 1}, timeout=10.0)
    assert upstream.messages == []
    message = stored_message(config, queue_id)
    assert message is not None
    assert message.recipients[0].last_reply.startswith(f"451 4.7.5 cannot use the CA file {cert}")


def test_smart_host_tls_required_defers_without_starttls(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    port = free_port("127.0.0.6")
    config = make_config(tmp_path, nameserver, 25, delivery=f'relayhost = "[127.0.0.6]:{port}"')
    spool = spool_for(config)
    with run_upstream("127.0.0.6", port) as upstream:
        commit(spool, "alice@local.test", ["user@example.org"])
        assert not run_until(config, spool, lambda: bool(upstream.messages), timeout=2.0)
    assert spool_counts(config) == {"deferred": 1}


@pytest.mark.parametrize(
    ("relayhost", "setting", "text"),
    [
        ("[nosuch.test]", "", "host nosuch.test has no address records"),
        ("nosuch.test", "", "nosuch.test"),
        ("loop.test", "allow_loopback_mx = false", "loops back to myself"),
        ("implicit.test", "", "greets as relay.test"),
    ],
    ids=["name-not-found", "domain-not-found", "mx-loopback", "greets-as-self"],
)
def test_smart_host_configuration_problem_defers(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, relayhost: str, setting: str, text: str
) -> None:
    # Postfix defers with 4.3.5 when the relayhost cannot be found or loops
    # back, because bouncing would lose all remote mail to a configuration error.
    port = free_port("127.0.0.4")
    config = make_config(
        tmp_path, nameserver, 25,
        delivery=f'relayhost = "{relayhost}:{port}"\nrelayhost_tls = "none"\n{setting}\n'
        'minimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"',
    )
    spool = spool_for(config)
    # implicit.test is 127.0.0.4, and this upstream greets with the relay's own name.
    with run_upstream("127.0.0.4", port, RecordingHandler(helo_reply="250 relay.test")) as upstream:
        queue_id = commit(spool, "alice@local.test", ["user@example.org"])
        assert run_until(config, spool, lambda: spool_counts(config) == {"deferred": 1}, timeout=10.0)

    assert upstream.messages == []
    message = stored_message(config, queue_id)
    assert message is not None
    reply = message.recipients[0].last_reply
    assert reply.startswith("451 4.3.5 "), reply
    assert text in reply
    assert reply.endswith("(relayhost configuration problem)")


def test_transport_to_smart_host_keeps_tls_apart(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # The transport table sends legacy.test to the smart host's own address and
    # port, with opportunistic TLS.  Mail for the smart host itself needs a
    # verified certificate, so it must not reuse legacy.test's parked session.
    # This certificate is not trusted, so that mail is deferred.
    cert, key = make_certificate(tmp_path)
    port = free_port("127.0.0.6")
    config = make_config(
        tmp_path, nameserver, 25,
        delivery=f'relayhost = "[127.0.0.6]:{port}"\nminimal_backoff_time = "1h"\nmaximal_backoff_time = "2h"',
        extra=f'[delivery.transport]\n"legacy.test" = "smtp:[127.0.0.6]:{port}"',
    )
    spool = spool_for(config)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    smart_host_ids: list[str] = []

    def smart_host_mail_settled() -> bool:
        # The smart host's message goes in once legacy.test's session is parked for reuse.
        if not smart_host_ids:
            if upstream.messages:
                smart_host_ids.append(commit(spool, "alice@local.test", ["user@example.org"]))
            return False
        return spool_counts(config) == {"deferred": 1} or len(upstream.messages) > 1

    with run_upstream("127.0.0.6", port, tls_context=server_tls, require_starttls=True) as upstream:
        legacy_id = commit(spool, "alice@local.test", ["user@legacy.test"])
        assert run_until(config, spool, smart_host_mail_settled)

    assert [m.recipients for m in upstream.messages] == [["user@legacy.test"]]
    assert stored_message(config, legacy_id) is None
    waiting = stored_message(config, smart_host_ids[0])
    assert waiting is not None
    assert "CERTIFICATE_VERIFY_FAILED" in waiting.recipients[0].last_reply


@pytest.mark.parametrize(
    ("options", "state"),
    [
        (["-r", "rcpt"], "deferred"),
        (["-f", "rcpt"], None),
        (["-Q", "mail"], "deferred"),
        (["-q", "data"], "deferred"),
        (["-f", "data"], None),
    ],
)
def test_smtp_sink_faults(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, options: list[str], state: str | None
) -> None:
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    spool = spool_for(config)
    with run_smtp_sink("127.0.0.7", port, *options):
        commit(spool, "", ["user@example.org"])
        if state is None:
            assert run_until(config, spool, lambda: not spool_counts(config))
        else:
            run_until(config, spool, lambda: False, timeout=1.0)
            assert spool_counts(config) == {state: 1}


def test_local_alias_to_local_and_remote(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    (tmp_path / "aliases").write_text("# team\nteam: alice, bob@implicit.test\n")
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, extra='aliases = "aliases"')
    spool = spool_for(config)
    with run_upstream("127.0.0.4", port) as upstream:
        commit(spool, "carol@example.org", ["team@local.test"])
        assert run_until(config, spool, lambda: bool(upstream.messages) and not spool_counts(config))
    (local_copy,) = mailbox_messages(config, "alice")
    assert local_copy["Return-Path"] == "<carol@example.org>"
    assert local_copy["Delivered-To"] == "team@local.test"
    assert upstream.messages[0].recipients == ["bob@implicit.test"]


def test_maildir_root_not_a_folder_defers(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # maildir_root is a file, so looking up alice gives ENOTDIR, also for root.
    # That is an error of this host: the alias is deferred, not bounced as if
    # it led to no user.
    (tmp_path / "aliases").write_text("team: alice, bob\n")
    config = make_config(tmp_path, nameserver, free_port("127.0.0.4"), extra='aliases = "aliases"')
    shutil.rmtree(tmp_path / "mail")
    (tmp_path / "mail").write_text("not a folder\n")
    spool = spool_for(config)
    queue_id = commit(spool, "carol@local.test", ["team@local.test"])

    def attempted() -> bool:
        stored = stored_message(config, queue_id)
        return stored is None or stored.recipients[0].attempts > 0

    with caplog.at_level("INFO", logger="relay"):
        assert run_until(config, spool, attempted)

    stored = stored_message(config, queue_id)
    assert stored is not None
    (recipient,) = stored.recipients
    assert recipient.state is RecipientState.DEFERRED
    assert recipient.last_reply == (
        f"451 4.3.0 local delivery failed: cannot read maildir_root {tmp_path / 'mail'} for user alice:"
        " Not a directory"
    )
    deferred = [record for record in caplog.records if getattr(record, "event", "") == "deferred"]
    assert len(deferred) == 1
    assert [record for record in caplog.records if record.exc_info] == []


def test_delivery_error_keeps_destination_running(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The lookup of a user under a maildir_root with a NUL character raises
    # ValueError, which local delivery does not expect.  The config check
    # rejects such a path, so the config is built past it to reach the
    # scheduler's guard against unexpected errors.  With one worker for the
    # destination, every job must still be tried and deferred with the error,
    # each logged once with its queue ID, and the jobs are delivered once a
    # reload fixes maildir_root.
    delivery = "destination_concurrency_limit = 1\nminimal_backoff_time = 60\nmaximal_backoff_time = 60"
    good = make_config(tmp_path, nameserver, 25, delivery=delivery)
    broken = good.replace(local=dataclasses.replace(good.local, maildir_root=good.local.maildir_root + "\0x"))
    spool = spool_for(broken)
    queue_ids = {commit(spool, "bob@local.test", ["alice@local.test"]) for _ in range(3)}

    def all_deferred() -> bool:
        messages = [stored_message(broken, queue_id) for queue_id in queue_ids]
        return all(m is not None and m.recipients[0].state is RecipientState.DEFERRED for m in messages)

    async def main() -> tuple[bool, bool]:
        scheduler = Scheduler(broken, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + 5.0
            while loop.time() < deadline and not await asyncio.to_thread(all_deferred):
                await asyncio.sleep(0.05)
            deferred = await asyncio.to_thread(all_deferred)
            scheduler.apply_config(good)
            await spool.flush()
            scheduler.wake()
            deadline = loop.time() + 5.0
            while loop.time() < deadline and len(await asyncio.to_thread(mailbox_messages, good, "alice")) < 3:
                await asyncio.sleep(0.05)
            return deferred, not await asyncio.to_thread(spool_counts, good)
        finally:
            await scheduler.stop()
            await task

    with caplog.at_level("INFO", logger="relay"):
        deferred, emptied = asyncio.run(main())
    assert deferred, spool_counts(good)
    assert emptied, spool_counts(good)
    assert len(mailbox_messages(good, "alice")) == 3
    errors = [record for record in caplog.records if getattr(record, "event", "") == "delivery_error"]
    assert sorted(record.fields["queue_id"] for record in errors) == sorted(queue_ids)  # type: ignore[attr-defined]
    assert all("ValueError: embedded null byte" in record.fields["error"] for record in errors)  # type: ignore[attr-defined]
    deferrals = [record for record in caplog.records if getattr(record, "event", "") == "deferred"]
    assert len(deferrals) == 3
    assert all("451 4.3.0 internal error during delivery: ValueError" in r.fields["reply"] for r in deferrals)  # type: ignore[attr-defined]
    # The error is logged once, as delivery_error, and not again as a bare traceback.
    assert [record for record in caplog.records if record.exc_info] == []


def test_alias_over_expansion_limit_deferred_at_delivery(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check of the config rejects such an alias.  Here the aliases were
    # checked with a larger limit than the config gives delivery, so only
    # delivery's own check stops the expansion: nothing is written or forwarded.
    monkeypatch.setattr(relay.aliases, "_checked_tables", {})
    aliases = tmp_path / "aliases"
    aliases.write_text("team: alice, bob, carol@example.org\n")
    remember_checked(str(aliases), parse_aliases(aliases.read_text(), expansion_limit=3))
    extra = 'aliases = "aliases"\nalias_expansion_limit = 2\nusers = ["bob"]'
    config = make_config(tmp_path, nameserver, free_port("127.0.0.4"), extra=extra)
    spool = spool_for(config)
    queue_id = commit(spool, "carol@local.test", ["team@local.test"])

    def attempted() -> bool:
        stored = stored_message(config, queue_id)
        return stored is None or stored.recipients[0].attempts > 0

    assert run_until(config, spool, attempted)

    stored = stored_message(config, queue_id)
    assert stored is not None
    (recipient,) = stored.recipients
    assert recipient.state is RecipientState.DEFERRED
    assert recipient.last_reply == (
        "451 4.3.5 <team@local.test>: alias team expands to 3 users and addresses, more than the 2 that"
        " local.alias_expansion_limit allows"
    )
    assert mailbox_messages(config, "alice") == []
    assert not (tmp_path / "mail" / "bob").exists()
    assert spool_counts(config) == {"deferred": 1}


# Runs one scheduler in a child process until the message given by its queue
# ID has had a delivery attempt, logging to stderr as relay serve does.
DELIVER_ONCE = """
import asyncio, sys, time
from relay.config import load_config
from relay.delivery import Scheduler
from relay.log import setup_logging
from relay.spool import Spool, SpoolStore

config = load_config(sys.argv[1])
queue_id = sys.argv[2]
setup_logging()


def attempted():
    store = SpoolStore(config.spool.path)
    try:
        stored = store.load(queue_id)
    finally:
        store.close()
    return stored is None or stored.recipients[0].attempts > 0


async def main():
    spool = Spool.from_config(config.spool)
    scheduler = Scheduler(config, spool)
    task = asyncio.create_task(scheduler.run())
    deadline = time.monotonic() + 10
    while not attempted() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await scheduler.stop()
    await task
    spool.close()


asyncio.run(main())
"""


def test_maildir_root_permission_denied_defers(nameserver: NameServer) -> None:
    # Root ignores the mode bits, so as root the delivery runs as nobody.
    command, _ = unprivileged_command([sys.executable, "-c", DELIVER_ONCE])
    # Not under tmp_path, whose parent folder is private to the user running the tests.
    directory = Path(tempfile.mkdtemp(prefix="relay-maildir-"))
    try:
        (directory / "aliases").write_text("team: alice, bob\n")
        config = make_config(directory, nameserver, 25, extra='aliases = "aliases"')
        spool = Spool.from_config(config.spool)
        try:
            queue_id = commit(spool, "carol@local.test", ["team@local.test"])
        finally:
            spool.close()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            for path in [directory, *directory.rglob("*")]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        (directory / "mail").chmod(0)

        child = subprocess.run(
            [*command, str(directory / "relay.toml"), queue_id],
            capture_output=True, text=True, timeout=30, cwd=directory,
        )

        assert child.returncode == 0, child.stderr
        stored = stored_message(config, queue_id)
        assert stored is not None
        (recipient,) = stored.recipients
        assert recipient.state is RecipientState.DEFERRED
        assert recipient.last_reply == (
            f"451 4.3.0 local delivery failed: cannot read maildir_root {directory / 'mail'} for user alice:"
            " Permission denied"
        )
        assert "Traceback" not in child.stderr
        assert "internal error" not in child.stderr
        deferred = [line for line in child.stderr.splitlines() if " deferred " in line]
        assert len(deferred) == 1
        assert f"queue_id={queue_id}" in deferred[0]
        assert "dsn=4.3.0" in deferred[0]
    finally:
        (directory / "mail").chmod(0o700)
        shutil.rmtree(directory)


def test_soft_failure_moves_on_to_backup_mx(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # mx.test: a.mx.test (127.0.0.2) first, b.mx.test (127.0.0.3) second.  The
    # first defers one recipient and rejects another for good.  Only the deferred
    # one goes on to the second host, and each result keeps the host that gave it.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later", "hard@mx.test": "550 5.1.1 no such user"})
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port) as backup:
        queue_id = commit(spool, "alice@local.test", ["soft@mx.test", "hard@mx.test", "fine@mx.test"])

        def settled() -> bool:
            message = stored_message(config, queue_id)
            return message is None or all(r.state is not RecipientState.QUEUED for r in message.recipients)

        # The DSN for hard@ waits until the message's job at the backup MX has ended.
        assert run_until(
            config, spool, lambda: bool(backup.messages) and settled() and bool(mailbox_messages(config, "alice"))
        )
    assert [m.recipients for m in primary.messages] == [["fine@mx.test"]]
    assert [m.recipients for m in backup.messages] == [["soft@mx.test"]]
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Final-Recipient: rfc822; hard@mx.test" in text
    assert "Remote-MTA: dns; a.mx.test" in text


class _RcptCountingHandler(RecordingHandler):
    """Counts every RCPT command and defers each one with 451."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpt_count = 0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        with self.lock:
            self.rcpt_count += 1
        return "451 4.3.0 try later"


def test_equal_preference_mx_is_backup(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # equal.test has a.mx.test and b.mx.test both at preference 10, in a random
    # order per lookup.  Whichever host defers a message first, the other one
    # is its backup: every message reaches both hosts once, and no retry runs
    # within the test because the backoff is a minute.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, delivery="minimal_backoff_time = 60\nmaximal_backoff_time = 60")
    spool = spool_for(config)
    first, second = _RcptCountingHandler(), _RcptCountingHandler()
    messages = 8
    with run_upstream("127.0.0.2", port, first), run_upstream("127.0.0.3", port, second):
        for _ in range(messages):
            commit(spool, "alice@local.test", ["soft@equal.test"])
        run_until(config, spool, lambda: False, timeout=3.0)
    assert spool_counts(config) == {"deferred": messages}
    assert first.rcpt_count == messages
    assert second.rcpt_count == messages


def test_pipelined_next_job_keeps_backup_mx(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # a.mx.test offers PIPELINING and defers soft@, so the next message's
    # commands go out with the first message's body.  soft@ still goes on to
    # b.mx.test at once instead of waiting out the minute of backoff.
    port = free_port("127.0.0.2")
    settings = "destination_concurrency_limit = 1\nminimal_backoff_time = 60\nmaximal_backoff_time = 60"
    config = make_config(tmp_path, nameserver, port, delivery=settings)
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"}, pipelining=True)
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port) as backup:
        commit(spool, "alice@local.test", ["first@mx.test", "soft@mx.test"])
        commit(spool, "alice@local.test", ["second@mx.test"])
        assert run_until(config, spool, lambda: bool(backup.messages) and not spool_counts(config), timeout=5.0), (
            spool_counts(config)
        )
    assert [m.recipients for m in primary.messages] == [["first@mx.test"], ["second@mx.test"]]
    assert primary.commands_pipelined_after_data >= 1
    assert [m.recipients for m in backup.messages] == [["soft@mx.test"]]


@pytest.mark.parametrize(("settings", "delivered"), [("", False), ("mx_address_limit = 0", True)])
def test_mx_address_limit_bounds_connects(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, settings: str, delivered: bool
) -> None:
    # many.test has six MX hosts, one address each, and only the last one
    # listens.  By default five addresses are tried, as Postfix does, so the
    # sixth is never reached and the recipient waits for the retry; with no
    # limit the sixth host gets the message.
    port = free_port("127.0.0.26")
    config = make_config(tmp_path, nameserver, port, delivery=settings)
    spool = spool_for(config)
    with run_upstream("127.0.0.26", port) as last:
        queue_id = commit(spool, "alice@local.test", ["bob@many.test"])

        def attempted() -> bool:
            message = stored_message(config, queue_id)
            return message is None or message.recipients[0].attempts > 0

        assert run_until(config, spool, attempted, timeout=10.0)
    assert bool(last.messages) is delivered
    if not delivered:
        message = stored_message(config, queue_id)
        assert message is not None
        assert message.recipients[0].state is RecipientState.DEFERRED
        assert "m5.many.test[127.0.0.25]" in (message.recipients[0].last_reply or "")


def test_refused_connect_names_host(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Neither MX host of mx.test listens.  The deferral's reply names the last
    # host tried in Postfix's form; no host replied, so last_host stays null.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, delivery="minimal_backoff_time = 60\nmaximal_backoff_time = 60")
    spool = spool_for(config)
    queue_id = commit(spool, "alice@local.test", ["bob@mx.test"])

    def attempted() -> bool:
        message = stored_message(config, queue_id)
        return message is not None and message.recipients[0].attempts > 0

    assert run_until(config, spool, attempted, timeout=10.0)
    reply = f"451 4.4.1 connect to b.mx.test[127.0.0.3]:{port}: Connection refused"
    message = stored_message(config, queue_id)
    assert message is not None
    assert message.recipients[0].state is RecipientState.DEFERRED
    assert message.recipients[0].last_reply == reply
    assert not message.recipients[0].last_host

    queue = [sys.executable, "-m", "relay", "queue"]
    json_output = subprocess.run([*queue, "list", "--json", "--spool", config.spool.path],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
    [recipient] = orjson.loads(json_output)["recipients"]
    assert recipient["last_reply"] == reply
    assert recipient["last_host"] is None


def test_refused_connect_dsn_has_no_remote_mta(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The relay wrote the diagnostic itself, so the DSN gives it as X-relay
    # and names no Remote-MTA (RFC 3464 section 2.3.5 and 2.3.6).
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, delivery="delay_warning_time = 0.2")
    spool = spool_for(config)
    commit_notify(spool, "alice@local.test", "bob@mx.test", ("DELAY",))
    assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")), timeout=10.0)
    (report,) = mailbox_messages(config, "alice")
    fields = report.get_payload()[1].get_payload()[1]
    assert fields["Action"] == "delayed"
    assert fields["Diagnostic-Code"].startswith("X-relay; 451 4.4.1 connect to ")
    assert fields["Remote-MTA"] is None


def test_parked_session_closed_by_server_not_reused(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # The next hop ends an idle connection after 0.3 s with a 421, within the
    # relay's 1 s connection cache.  The next message opens a new session
    # instead of failing on the closed one and waiting out a minute of backoff.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="minimal_backoff_time = 60\nmaximal_backoff_time = 60")
    spool = spool_for(config)
    second_committed: list[float] = []
    with run_upstream("127.0.0.4", port, timeout=0.3) as upstream:
        commit(spool, "alice@local.test", ["first@implicit.test"])

        def done() -> bool:
            if not second_committed:
                if upstream.messages and not spool_counts(config):
                    time.sleep(0.6)
                    commit(spool, "alice@local.test", ["second@implicit.test"])
                    second_committed.append(time.monotonic())
                return False
            return len(upstream.messages) == 2 or time.monotonic() - second_committed[0] > 2.0

        run_until(config, spool, done, timeout=10.0)
    assert [m.recipients for m in upstream.messages] == [["first@implicit.test"], ["second@implicit.test"]]
    assert upstream.connections == 2
    assert not spool_counts(config)


def test_backup_mx_failure_keeps_first_results(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # a.mx.test accepts fine@ and defers soft@; b.mx.test defers soft@ too, at
    # the end of data.  fine@ is delivered once, and soft@ stays deferred.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"})
    backup = RecordingHandler(data_reply="451 4.3.0 backup busy")
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        queue_id = commit(spool, "alice@local.test", ["fine@mx.test", "soft@mx.test"])
        run_until(config, spool, lambda: False, timeout=3.0)
    assert [m.recipients for m in primary.messages] == [["fine@mx.test"]]
    assert spool_counts(config) == {"delivered": 1, "deferred": 1}
    message = stored_message(config, queue_id)
    assert message is not None
    assert message.recipients[1].last_reply == "451 4.3.0 backup busy"


def test_opportunistic_tls_ignores_damaged_ca_file(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # MX delivery with opportunistic TLS never verifies, so a CA file damaged
    # after the start must not stop it.
    cert, key = make_certificate(tmp_path)
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery=f'tls_ca_file = "{cert}"')
    spool = spool_for(config)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    Path(cert).write_text("not a certificate\n")
    with run_upstream("127.0.0.4", port, tls_context=server_tls, require_starttls=True) as upstream:
        commit(spool, "alice@local.test", ["bob@implicit.test"])
        assert run_until(config, spool, lambda: bool(upstream.messages) and not spool_counts(config))
    assert upstream.messages[0].tls


def test_idle_destinations_dropped(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Every name under wild.test has an A record for 127.0.0.4, where the
    # upstream listens, and every name under dead.test one for 127.0.0.9, where
    # nothing does.  The scheduler's table of destinations grows with the
    # domains delivered to and shrinks back once they are idle.  The dead
    # destination stays while its backoff runs, then its recipient expires and
    # bounces to a local mailbox, and its entry goes too.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery='maximal_queue_lifetime = "2s"')
    spool = spool_for(config)
    domains = [f"d{number}.wild.test" for number in range(40)]
    sizes: list[int] = []
    suspended: list[bool] = []

    async def deliver() -> Scheduler:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                sizes.append(len(scheduler._destinations))
                dead = scheduler._destinations.get("host.dead.test")
                suspended.append(dead is not None and dead.suspended_until > time.monotonic())
                if not await asyncio.to_thread(spool_counts, config) and not scheduler._destinations:
                    break
        finally:
            await scheduler.stop()
            await task
        return scheduler

    with run_upstream("127.0.0.4", port) as upstream:
        commit(spool, "alice@local.test", ["bob@host.dead.test"])
        for domain in domains:
            commit(spool, "alice@local.test", [f"bob@{domain}"])
        scheduler = asyncio.run(deliver())
    assert len(upstream.messages) == len(domains)
    assert len(mailbox_messages(config, "alice")) == 1
    assert max(sizes) > 1
    assert any(suspended)
    assert scheduler._destinations == {}


def test_late_backup_mx_never_outlasts_lease(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  a.mx.test takes 2 s to defer soft@, so the backup
    # session to b.mx.test starts with 1 s of lease left, and b.mx.test takes
    # 1.5 s to accept the message.  A second scheduler on the same spool
    # claims whatever is due.  If the backup session outlasted the lease, that
    # scheduler would claim soft@ again and b.mx.test would get it twice.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"}, rcpt_delay={"soft@mx.test": 2.0})
    backup = RecordingHandler(data_delay=1.5)

    async def two_schedulers() -> None:
        schedulers = [Scheduler(config, spool), Scheduler(config, spool)]
        tasks = [asyncio.create_task(scheduler.run()) for scheduler in schedulers]
        try:
            await asyncio.sleep(8.0)
        finally:
            for scheduler in schedulers:
                await scheduler.stop()
            await asyncio.gather(*tasks)

    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        commit(spool, "alice@local.test", ["soft@mx.test"])
        asyncio.run(two_schedulers())
    assert [m.recipients for m in backup.messages] == [["soft@mx.test"]]
    assert spool_counts(config) == {}


def run_second_scheduler_later(
    config: Config, spool: Spool, started: Callable[[], bool], done: Callable[[], bool], timeout: float = 20.0
) -> None:
    """Run one scheduler until ``started()`` holds, then a second on the same spool, until ``done()`` or ``timeout``.

    Both then stop, and ``stop`` lets their transactions in flight finish,
    so a second delivery that one of them began is seen.
    """

    async def main() -> None:
        schedulers = [Scheduler(config, spool), Scheduler(config, spool)]
        tasks = [asyncio.create_task(schedulers[0].run())]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline and not await asyncio.to_thread(started):
                await asyncio.sleep(0.05)
            tasks.append(asyncio.create_task(schedulers[1].run()))
            while loop.time() < deadline and not await asyncio.to_thread(done):
                await asyncio.sleep(0.05)
        finally:
            for scheduler in schedulers:
                await scheduler.stop()
            await asyncio.gather(*tasks)

    asyncio.run(main())


def test_slow_transaction_never_outlasts_lease(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s and the next hop takes 3.5 s to reply to the end of data.
    # A second scheduler starts once the first has connected and claims
    # whatever is due.  If the lease ran out during the transaction, that
    # scheduler would claim bob@ again and the next hop would get him twice.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    upstream = RecordingHandler(data_delay=3.5)
    with run_upstream("127.0.0.4", port, upstream):
        commit(spool, "alice@local.test", ["bob@implicit.test"])
        run_second_scheduler_later(
            config, spool, lambda: upstream.connections > 0, lambda: not spool_counts(config), timeout=15.0
        )
    assert [m.recipients for m in upstream.messages] == [["bob@implicit.test"]]
    assert upstream.connections == 1
    assert spool_counts(config) == {}


def test_slow_greeting_never_outlasts_lease(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  The next hop accepts the connection and never greets,
    # so the session waits the 5 s greeting timeout.  A second scheduler on the
    # same spool starts half a second in.  If the lease ran out while the
    # session opened, either scheduler would claim bob@ again and connect a
    # second time: the second one at once, the first one after its session
    # failed, since one failure does not back the destination off here.
    port = free_port("127.0.0.4")
    settings = "minimal_backoff_time = 60\nmaximal_backoff_time = 60\ndestination_failure_limit = 3"
    config = make_config(tmp_path, nameserver, port, delivery=settings, spool='lease_time = "3s"')
    spool = spool_for(config)
    silent = socket.create_server(("127.0.0.4", port), backlog=8)
    try:
        queue_id = commit(spool, "alice@local.test", ["bob@implicit.test"])
        started = time.monotonic()
        run_second_scheduler_later(
            config, spool, lambda: time.monotonic() - started > 0.5, lambda: time.monotonic() - started > 6.5
        )
        # Nothing accepted the connections, so each one still waits in the backlog.
        silent.setblocking(False)
        connections = 0
        for _ in range(8):
            try:
                connection, _ = silent.accept()
            except BlockingIOError:
                break
            connection.close()
            connections += 1
    finally:
        silent.close()
    assert connections == 1
    message = stored_message(config, queue_id)
    assert message is not None
    assert message.recipients[0].state is RecipientState.DEFERRED
    assert "timed out" in (message.recipients[0].last_reply or "")


def test_pipelined_next_job_keeps_lease(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  The next hop offers PIPELINING and takes 3.5 s to reply
    # to each end of data, so the second message's commands go out with the
    # first body and then wait 3.5 s for it.  Its lease must not run out in
    # that wait, or the second scheduler would deliver it once more.
    port = free_port("127.0.0.4")
    config = make_config(
        tmp_path, nameserver, port, delivery="destination_concurrency_limit = 1", spool='lease_time = "3s"'
    )
    spool = spool_for(config)
    upstream = RecordingHandler(data_delay=3.5, pipelining=True)
    with run_upstream("127.0.0.4", port, upstream):
        commit(spool, "alice@local.test", ["first@implicit.test"])
        commit(spool, "alice@local.test", ["second@implicit.test"])
        run_second_scheduler_later(
            config, spool, lambda: upstream.connections > 0, lambda: not spool_counts(config), timeout=20.0
        )
    assert [m.recipients for m in upstream.messages] == [["first@implicit.test"], ["second@implicit.test"]]
    assert upstream.commands_pipelined_after_data >= 1
    assert upstream.connections == 1
    assert spool_counts(config) == {}


def test_hold_cuts_off_running_transaction(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s, so the lease of a running transaction is renewed every
    # second.  The message is held while the next hop takes 5 s to reply to
    # the end of data.  The renewal finds the recipient held, and the
    # scheduler closes the connection before that reply, without a QUIT that
    # the server could take for message text, so the message is not delivered.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    upstream = RecordingHandler(data_delay=5.0)
    held_at: list[float] = []
    with run_upstream("127.0.0.4", port, upstream):
        queue_id = commit(spool, "alice@local.test", ["bob@implicit.test"])

        def hold_then_wait() -> bool:
            if not held_at and upstream.connections > 0:
                store = SpoolStore(config.spool.path)
                try:
                    with store.transaction():
                        assert store.hold(queue_id, time.time()) == 1
                finally:
                    store.close()
                held_at.append(time.monotonic())
            return bool(held_at) and upstream.active == 0

        assert run_until(config, spool, hold_then_wait, timeout=4.0)
        closed_after = time.monotonic() - held_at[0]
    assert upstream.messages == []
    assert closed_after < 2.5
    message = stored_message(config, queue_id)
    assert message is not None
    assert [r.state for r in message.recipients] == [RecipientState.HELD]


def test_backup_mx_rcpt_5xx_kept_when_session_fails(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # a.mx.test defers both recipients.  b.mx.test rejects gone@ for good at
    # RCPT, accepts soft@, and drops the connection at the end of data.  The
    # 550 from b.mx.test is final (RFC 5321 section 3.3): gone@ bounces at this
    # attempt, and only soft@ keeps the first host's deferral.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, delivery="minimal_backoff_time = 60\nmaximal_backoff_time = 60")
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"gone@mx.test": "451 4.3.0 try later", "soft@mx.test": "451 4.3.0 try later"})
    backup = RecordingHandler(refuse={"gone@mx.test": "550 5.1.1 no such user"}, drop_after={"soft@mx.test"})
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        queue_id = commit(spool, "alice@local.test", ["gone@mx.test", "soft@mx.test"])
        assert run_until(
            config, spool, lambda: bool(backup.dropped) and bool(mailbox_messages(config, "alice")), timeout=8.0
        )
    message = stored_message(config, queue_id)
    assert message is not None
    states = {r.address: r for r in message.recipients}
    assert states["gone@mx.test"].state is RecipientState.BOUNCED
    assert states["gone@mx.test"].last_reply == "550 5.1.1 no such user"
    assert states["gone@mx.test"].attempts == 1
    assert states["soft@mx.test"].state is RecipientState.DEFERRED
    assert states["soft@mx.test"].last_reply == "451 4.3.0 try later"
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Final-Recipient: rfc822; gone@mx.test" in text
    assert "Remote-MTA: dns; b.mx.test" in text


def test_first_mx_results_recorded_before_backup(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # b.mx.test accepts the connection and never greets.  While the backup
    # session waits, fine@, which a.mx.test accepted, is already recorded:
    # a crash in that wait must not deliver it twice.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"})
    silent = socket.create_server(("127.0.0.3", port))
    silent.setblocking(False)
    backup_connections: list[socket.socket] = []
    connected_at: list[float] = []
    states: list[RecipientState] = []
    try:
        with run_upstream("127.0.0.2", port, primary):
            queue_id = commit(spool, "alice@local.test", ["fine@mx.test", "soft@mx.test"])

            def observe() -> bool:
                # The spool is read only once the backup session has connected.
                # The upstream stores fine@'s message before the scheduler reads
                # the 250, so an earlier read may find fine@ still queued.
                try:
                    backup_connections.append(silent.accept()[0])
                    connected_at.append(time.monotonic())
                except BlockingIOError:
                    pass
                if not connected_at:
                    return False
                message = stored_message(config, queue_id)
                if message is not None:
                    states.append(message.recipients[0].state)
                # Keep reading for a second of the wait for the greeting, which lasts greeting_timeout (5 s).
                return time.monotonic() - connected_at[0] > 1.0

            assert run_until(config, spool, observe, timeout=20.0), "the scheduler never connected to b.mx.test"
    finally:
        for connection in backup_connections:
            connection.close()
        silent.close()
    assert primary.messages
    assert states
    assert set(states) == {RecipientState.DELIVERED}


class _StallingHandler(RecordingHandler):
    """Counts the RCPT commands for each recipient and signals when a message's data has arrived."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.rcpt_counts: collections.Counter[str] = collections.Counter()
        self.data_arrived = threading.Event()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self.lock:
            self.rcpt_counts[address] += 1
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_arrived.set()
        return await super().handle_DATA(server, session, envelope)


def hold_message(config: Config, queue_id: str) -> None:
    store = SpoolStore(config.spool.path)
    try:
        with store.transaction():
            assert store.hold(queue_id, time.time()) >= 1
    finally:
        store.close()


def hold_then_settle(
    config: Config, queue_id: str, event: threading.Event, upstream: RecordingHandler
) -> tuple[Callable[[], bool], list[float]]:
    """Return a ``run_until`` check that puts ``queue_id`` on hold once ``event`` is set, and when it did.

    The check returns True once the upstream has no session left and a DSN reached alice's mailbox.
    """
    held_at: list[float] = []

    def hold_then_wait() -> bool:
        if not held_at and event.is_set():
            hold_message(config, queue_id)
            held_at.append(time.monotonic())
        return bool(held_at) and upstream.active == 0 and bool(mailbox_messages(config, "alice"))

    return hold_then_wait, held_at


def stop_once(config: Config, spool: Spool, event: threading.Event, missing: str) -> float:
    """Run a scheduler until ``event`` is set, stop it, and return how long the stop took.

    Fails with ``missing`` when the event is not set within 10 s.
    """

    async def main() -> float:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        try:
            arrived = await asyncio.to_thread(event.wait, 10.0)
            assert arrived, missing
        finally:
            started = time.monotonic()
            await scheduler.stop()
            await task
        return time.monotonic() - started

    return asyncio.run(main())


def test_slow_backup_mx_delivers_once(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  a.mx.test defers soft@ and b.mx.test takes 4.5 s, more
    # than a whole lease, to reply to the end of data.  A second scheduler on
    # the same spool starts once b.mx.test has a connection.  The backup
    # session's lease is renewed while it runs, so it is neither cut off nor
    # claimed again, and b.mx.test gets soft@ once.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"})
    backup = RecordingHandler(data_delay=4.5)
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        commit(spool, "alice@local.test", ["soft@mx.test"])
        run_second_scheduler_later(
            config, spool, lambda: backup.connections > 0, lambda: not spool_counts(config), timeout=20.0
        )
    assert [m.recipients for m in backup.messages] == [["soft@mx.test"]]
    assert backup.connections == 1
    assert spool_counts(config) == {}


def test_backup_mx_550_then_stall_bounces_once(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  a.mx.test defers both recipients.  b.mx.test rejects
    # gone@ with 550 at RCPT, accepts soft@, and then stalls 4.5 s before it
    # accepts the data, with a second scheduler on the same spool.  gone@
    # bounces once with the reply of b.mx.test, and neither recipient is sent again.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"gone@mx.test": "451 4.3.0 try later", "soft@mx.test": "451 4.3.0 try later"})
    backup = _StallingHandler(refuse={"gone@mx.test": "550 5.1.1 no such user"}, data_delay=4.5)
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        commit(spool, "alice@local.test", ["gone@mx.test", "soft@mx.test"])
        run_second_scheduler_later(
            config, spool, lambda: backup.connections > 0,
            lambda: not spool_counts(config) and bool(mailbox_messages(config, "alice")), timeout=20.0,
        )
    assert backup.rcpt_counts["gone@mx.test"] == 1
    assert backup.rcpt_counts["soft@mx.test"] == 1
    assert [m.recipients for m in backup.messages] == [["soft@mx.test"]]
    assert spool_counts(config) == {}
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Final-Recipient: rfc822; gone@mx.test" in text
    assert "Final-Recipient: rfc822; soft@mx.test" not in text
    assert "Remote-MTA: dns; b.mx.test" in text
    assert "550 5.1.1 no such user" in text


def test_hold_cuts_off_backup_mx_keeps_550(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  a.mx.test defers both recipients.  b.mx.test rejects
    # gone@ with 550 at RCPT, accepts soft@, and takes 5 s to reply to the end
    # of data.  The message is held once the data arrived there.  The backup
    # session's lease keeper finds the lease lost and cuts the session off.
    # The 550 decided gone@ before that, so gone@ bounces; soft@, whose RCPT
    # got only a 250, is neither delivered nor bounced and stays held.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"gone@mx.test": "451 4.3.0 try later", "soft@mx.test": "451 4.3.0 try later"})
    backup = _StallingHandler(refuse={"gone@mx.test": "550 5.1.1 no such user"}, data_delay=5.0)
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        queue_id = commit(spool, "alice@local.test", ["gone@mx.test", "soft@mx.test"])
        hold_then_wait, held_at = hold_then_settle(config, queue_id, backup.data_arrived, backup)
        assert run_until(config, spool, hold_then_wait, timeout=6.0)
        closed_after = time.monotonic() - held_at[0]
    assert backup.messages == []
    assert closed_after < 2.5
    message = stored_message(config, queue_id)
    assert message is not None
    states = {r.address: r for r in message.recipients}
    assert states["gone@mx.test"].state is RecipientState.BOUNCED
    assert states["gone@mx.test"].last_reply == "550 5.1.1 no such user"
    assert states["soft@mx.test"].state is RecipientState.HELD
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Final-Recipient: rfc822; gone@mx.test" in text
    assert "Remote-MTA: dns; b.mx.test" in text


def test_hold_cuts_off_session_keeps_550(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  The only host of implicit.test rejects gone@ with 550
    # at RCPT, accepts bob@, and takes 5 s to reply to the end of data.  The
    # message is held once the data arrived there, and the renewal cuts the
    # session off.  gone@ bounces with that 550; bob@, whose RCPT got only a
    # 250, is neither delivered nor bounced and stays held.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    upstream = _StallingHandler(refuse={"gone@implicit.test": "550 5.1.1 no such user"}, data_delay=5.0)
    with run_upstream("127.0.0.4", port, upstream):
        queue_id = commit(spool, "alice@local.test", ["gone@implicit.test", "bob@implicit.test"])
        hold_then_wait, held_at = hold_then_settle(config, queue_id, upstream.data_arrived, upstream)
        assert run_until(config, spool, hold_then_wait, timeout=6.0)
    assert upstream.messages == []
    message = stored_message(config, queue_id)
    assert message is not None
    states = {r.address: r for r in message.recipients}
    assert states["gone@implicit.test"].state is RecipientState.BOUNCED
    assert states["gone@implicit.test"].last_reply == "550 5.1.1 no such user"
    assert states["bob@implicit.test"].state is RecipientState.HELD
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Final-Recipient: rfc822; gone@implicit.test" in text
    assert "Final-Recipient: rfc822; bob@implicit.test" not in text


class _RejectMailThenStallHandler(RecordingHandler):
    """Offers PIPELINING, rejects MAIL with ``mail_reply``, then waits ``stall`` seconds before each RCPT reply.

    aiosmtpd answers an RCPT after a rejected MAIL with 503 at once, so this
    handler keeps the reverse-path to let each RCPT reach ``handle_RCPT``,
    where it stalls like a server that is slow to answer the rest of a group.
    """

    def __init__(self, mail_reply: str, stall: float) -> None:
        super().__init__(pipelining=True)
        self.mail_reply = mail_reply
        self.stall = stall
        self.mail_arrived = threading.Event()

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        envelope.mail_from = address
        self.mail_arrived.set()
        return self.mail_reply

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        await asyncio.sleep(self.stall)
        return "503 5.5.1 no valid sender"


def test_hold_cuts_off_after_mail_550_bounces(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 3 s.  The only host of implicit.test rejects MAIL with 550
    # and then takes 5 s to answer each pipelined RCPT.  The message is held
    # once MAIL arrived, and the renewal cuts the session off while the
    # client waits for the first RCPT reply.  The 550 to MAIL decided both
    # recipients, so both bounce with it instead of staying held.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, spool='lease_time = "3s"')
    spool = spool_for(config)
    upstream = _RejectMailThenStallHandler("550 5.7.1 sender rejected", stall=5.0)
    with run_upstream("127.0.0.4", port, upstream):
        queue_id = commit(spool, "alice@local.test", ["one@implicit.test", "two@implicit.test"])
        hold_then_wait, held_at = hold_then_settle(config, queue_id, upstream.mail_arrived, upstream)
        assert run_until(config, spool, hold_then_wait, timeout=6.0)
    assert upstream.messages == []
    # Every recipient bounced and the DSN went out, so the message left the spool.
    assert stored_message(config, queue_id) is None
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Final-Recipient: rfc822; one@implicit.test" in text
    assert "Final-Recipient: rfc822; two@implicit.test" in text
    assert "550 5.7.1 sender rejected" in text


def test_mail_4xx_then_rcpt_timeout_defers_with_4xx(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # The host defers MAIL with 451 and then answers no pipelined RCPT within
    # rcpt_timeout.  The session fails, and the recipient is deferred with the
    # reply to MAIL, which gives the reason, not with the timeout.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="rcpt_timeout = 0.3")
    spool = spool_for(config)
    upstream = _RejectMailThenStallHandler("451 4.7.1 greylisted, try later", stall=2.0)
    with run_upstream("127.0.0.4", port, upstream):
        queue_id = commit(spool, "alice@local.test", ["one@implicit.test"])

        def deferred() -> bool:
            message = stored_message(config, queue_id)
            return message is not None and message.recipients[0].state is RecipientState.DEFERRED

        assert run_until(config, spool, deferred, timeout=6.0)
    message = stored_message(config, queue_id)
    assert message is not None
    assert message.recipients[0].last_reply == "451 4.7.1 greylisted, try later"


def test_stop_keeps_550_of_cancelled_transaction(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The only host of implicit.test rejects gone@ with 550 at RCPT, accepts
    # bob@, and takes 5 s to reply to the end of data.  The scheduler stops
    # once the data arrived there and cancels the transaction after the grace
    # time.  The 550 decided gone@ before that, so gone@ is stored as bounced
    # with its DSN owed; bob@ got only a 250 to RCPT and is due again.
    monkeypatch.setattr("relay.delivery.scheduler.STOP_GRACE", 0.5)
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    upstream = _StallingHandler(refuse={"gone@implicit.test": "550 5.1.1 no such user"}, data_delay=5.0)
    with run_upstream("127.0.0.4", port, upstream):
        queue_id = commit(spool, "alice@local.test", ["gone@implicit.test", "bob@implicit.test"])
        stop_took = stop_once(config, spool, upstream.data_arrived, "the data never reached the upstream")
    assert stop_took < 3.0
    assert upstream.messages == []
    message = stored_message(config, queue_id)
    assert message is not None
    states = {r.address: r for r in message.recipients}
    assert states["gone@implicit.test"].state is RecipientState.BOUNCED
    assert states["gone@implicit.test"].last_reply == "550 5.1.1 no such user"
    assert states["gone@implicit.test"].dsn is DsnState.PENDING
    assert states["bob@implicit.test"].state is RecipientState.QUEUED
    with sqlite3.connect(Path(config.spool.path) / "spool.db") as connection:
        (lease_until,) = connection.execute(
            "SELECT lease_until FROM recipient WHERE queue_id = ? AND idx = 1", (queue_id,)
        ).fetchone()
    # Released by stop, so the next scheduler sends bob@ at once.
    assert lease_until is None or lease_until <= time.time()


def test_stop_keeps_550_of_cancelled_backup_mx(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a.mx.test defers both recipients.  b.mx.test rejects gone@ with 550 at
    # RCPT, accepts soft@, and takes 5 s to reply to the end of data.  The
    # scheduler stops once the data arrived there and cancels the backup
    # session after the grace time.  gone@ is stored as bounced by b.mx.test,
    # and soft@ keeps the deferral of a.mx.test.
    monkeypatch.setattr("relay.delivery.scheduler.STOP_GRACE", 0.5)
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"gone@mx.test": "451 4.3.0 try later", "soft@mx.test": "451 4.3.0 try later"})
    backup = _StallingHandler(refuse={"gone@mx.test": "550 5.1.1 no such user"}, data_delay=5.0)
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        queue_id = commit(spool, "alice@local.test", ["gone@mx.test", "soft@mx.test"])
        stop_took = stop_once(config, spool, backup.data_arrived, "the data never reached b.mx.test")
    assert stop_took < 3.0
    assert backup.messages == []
    message = stored_message(config, queue_id)
    assert message is not None
    states = {r.address: r for r in message.recipients}
    assert states["gone@mx.test"].state is RecipientState.BOUNCED
    assert states["gone@mx.test"].last_reply == "550 5.1.1 no such user"
    assert states["gone@mx.test"].last_host is not None
    assert states["gone@mx.test"].last_host.startswith("b.mx.test[")
    assert states["gone@mx.test"].dsn is DsnState.PENDING
    assert states["soft@mx.test"].state is RecipientState.DEFERRED
    assert states["soft@mx.test"].last_reply == "451 4.3.0 try later"


class _SlowQuitHandler(RecordingHandler):
    """Replies to QUIT only after ``quit_delay`` seconds, and signals when QUIT arrived."""

    def __init__(self, quit_delay: float, **settings: Any) -> None:
        super().__init__(**settings)
        self.quit_delay = quit_delay
        self.quit_arrived = threading.Event()

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quit_arrived.set()
        await asyncio.sleep(self.quit_delay)
        return "221 Bye"


def test_stop_during_backup_mx_quit_keeps_delivery(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a.mx.test defers soft@, b.mx.test accepts it and then takes 5 s to reply
    # to QUIT.  The scheduler stops while it waits, and cancels the session
    # after the grace time.  soft@ was delivered, so it must be stored as
    # delivered and never be sent again by the next scheduler.
    monkeypatch.setattr("relay.delivery.scheduler.STOP_GRACE", 0.5)
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"})
    backup = _SlowQuitHandler(5.0)
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        commit(spool, "alice@local.test", ["soft@mx.test"])
        stop_once(config, spool, backup.quit_arrived, "QUIT never reached b.mx.test")
    assert [m.recipients for m in backup.messages] == [["soft@mx.test"]]
    assert spool_counts(config) == {}


def test_fast_backup_mx_renews_no_lease(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Leases last 30 s.  a.mx.test delivers fine@ and defers soft@, and
    # b.mx.test takes 0.5 s to reply to the end of data, well within the first
    # third of the lease.  While b.mx.test waits, soft@ still has the lease of
    # the claim: it ends less than 30 s after fine@'s result was recorded, so
    # the backup session wrote no lease renewal to the spool.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"})
    backup = _StallingHandler(data_delay=0.5)
    seen: list[tuple[float, float]] = []
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        queue_id = commit(spool, "alice@local.test", ["fine@mx.test", "soft@mx.test"])

        def observe() -> bool:
            if backup.data_arrived.is_set() and not seen:
                with sqlite3.connect(Path(config.spool.path) / "spool.db") as connection:
                    (lease_until,) = connection.execute(
                        "SELECT lease_until FROM recipient WHERE queue_id = ? AND idx = 1", (queue_id,)
                    ).fetchone()
                    (recorded,) = connection.execute(
                        "SELECT time FROM attempt WHERE queue_id = ? AND idx = 0", (queue_id,)
                    ).fetchone()
                seen.append((lease_until, recorded))
            return bool(backup.messages) and not spool_counts(config)

        assert run_until(config, spool, observe, timeout=10.0)
    assert [m.recipients for m in backup.messages] == [["soft@mx.test"]]
    assert len(seen) == 1
    lease_until, recorded = seen[0]
    assert lease_until is not None
    assert lease_until < recorded + config.spool.lease_time


def test_double_bounce_copied_to_postmaster_once(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # With bounce_copy_to_postmaster a failed null-sender message is copied to
    # postmaster.  A failed delivery to postmaster itself is not copied, so a
    # message that fails there (a forged Delivered-To) cannot loop.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="bounce_copy_to_postmaster = true")
    spool = spool_for(config)
    handler = RecordingHandler(refuse={"nobody@implicit.test": "550 5.1.1 no such user"})
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "", ["nobody@implicit.test"])
        commit(spool, "", ["postmaster@local.test"], body=b"Delivered-To: postmaster@local.test\r\n\r\nx\r\n")
        assert run_until(
            config, spool, lambda: not spool_counts(config) and bool(mailbox_messages(config, "postmaster"))
        )
        run_until(config, spool, lambda: False, timeout=1.0)
    copies = mailbox_messages(config, "postmaster")
    assert len(copies) == 1
    assert copies[0]["Subject"] == "hello"


def test_double_bounce_at_two_mx_hosts_copied_once(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # A null-sender message fails for one recipient at a.mx.test and, after a
    # deferral there, for the other at the backup b.mx.test.  Both failures come
    # from one delivery attempt, so postmaster gets one copy, not one per host.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port, delivery="bounce_copy_to_postmaster = true")
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"hard@mx.test": "550 5.1.1 no such user", "soft@mx.test": "451 4.3.0 later"})
    backup = RecordingHandler(refuse={"soft@mx.test": "550 5.1.1 no such user here either"})
    with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
        commit(spool, "", ["hard@mx.test", "soft@mx.test"])
        assert run_until(
            config, spool, lambda: not spool_counts(config) and bool(mailbox_messages(config, "postmaster"))
        )
        run_until(config, spool, lambda: False, timeout=1.0)
    copies = mailbox_messages(config, "postmaster")
    assert len(copies) == 1
    assert copies[0]["Subject"] == "hello"


@pytest.mark.parametrize("recipient", ["rcpt@null.test", "rcpt@a..test"], ids=["null-mx", "invalid-domain"])
def test_double_bounce_with_corrupt_body_logs_copy_failure(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture, recipient: str
) -> None:
    # A null-sender message fails without a connection (null MX, or a domain
    # that is not a valid DNS name), and its body fails its CRC-32 when it is
    # read for the postmaster copy.  The message is moved aside, the failure is
    # logged as bounced, and the missing copy as postmaster_copy_failed, not
    # as an error of the delivery itself.
    config = make_config(
        tmp_path, nameserver, free_port(), delivery="bounce_copy_to_postmaster = true",
        spool="claim_body_max_bytes = 0",
    )
    spool = spool_for(config)
    queue_id = commit(spool, "", [recipient])
    store = SpoolStore(config.spool.path)
    try:
        store.connection.execute("UPDATE message SET body = ? WHERE queue_id = ?", (b"damaged!", queue_id))
    finally:
        store.close()
    aside = Path(config.spool.path) / "corrupt" / f"{queue_id}.body"
    with caplog.at_level("INFO", logger="relay"):
        assert run_until(config, spool, lambda: aside.exists() and not spool_counts(config), timeout=5.0)
        run_until(config, spool, lambda: False, timeout=0.3)
    events = [(getattr(r, "event", ""), getattr(r, "fields", {})) for r in caplog.records]
    assert [fields["queue_id"] for event, fields in events if event == "bounced"] == [queue_id]
    failures = [fields for event, fields in events if event == "postmaster_copy_failed"]
    assert [fields["queue_id"] for fields in failures] == [queue_id]
    assert "is corrupt" in failures[0]["error"]
    assert [fields for event, fields in events if event == "delivery_error"] == []
    assert [record for record in caplog.records if record.exc_info] == []
    assert mailbox_messages(config, "postmaster") == []


class _BodyDamagingHandler(RecordingHandler):
    """Damages a stored message body through direct SQL when a chosen recipient's RCPT arrives, then replies as set."""

    def __init__(self, config: Config, address: str, **settings: Any) -> None:
        super().__init__(**settings)
        self.config = config
        self.address = address
        self.queue_id = ""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address == self.address and self.queue_id:
            store = SpoolStore(self.config.spool.path)
            try:
                store.connection.execute("UPDATE message SET body = ? WHERE queue_id = ?", (b"damaged!", self.queue_id))
            finally:
                store.close()
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def test_backup_mx_task_corrupt_body_logged_once(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # a.mx.test offers PIPELINING and defers soft@, so the next message's
    # commands go out with the first message's body, and the backup session
    # for soft@ runs as a task of its own.  b.mx.test rejects soft@ for good,
    # and the body, read for the postmaster copy of the failed null-sender
    # message, fails its CRC-32.  The message is moved aside and the missing
    # copy is logged once with the queue ID, inside that task too.
    port = free_port("127.0.0.2")
    settings = (
        "destination_concurrency_limit = 1\nminimal_backoff_time = 60\nmaximal_backoff_time = 60\n"
        "bounce_copy_to_postmaster = true"
    )
    config = make_config(tmp_path, nameserver, port, delivery=settings, spool="claim_body_max_bytes = 0")
    spool = spool_for(config)
    primary = RecordingHandler(refuse={"soft@mx.test": "451 4.3.0 try later"}, pipelining=True)
    backup = _BodyDamagingHandler(config, "soft@mx.test", refuse={"soft@mx.test": "550 5.1.1 no such user"})
    corrupt = Path(config.spool.path) / "corrupt"
    with caplog.at_level("INFO", logger="relay"):
        with run_upstream("127.0.0.2", port, primary), run_upstream("127.0.0.3", port, backup):
            queue_id = commit(spool, "", ["first@mx.test", "soft@mx.test"])
            backup.queue_id = queue_id
            commit(spool, "alice@local.test", ["second@mx.test"])
            run_until(
                config, spool, lambda: (corrupt / f"{queue_id}.body").exists() and not spool_counts(config),
                timeout=5.0,
            )
            # Any error of the task would be logged right after the move aside.
            run_until(config, spool, lambda: False, timeout=0.5)
    assert [m.recipients for m in primary.messages] == [["first@mx.test"], ["second@mx.test"]]
    assert primary.commands_pipelined_after_data >= 1
    assert (corrupt / f"{queue_id}.body").read_bytes() == b"damaged!"
    events = [(getattr(r, "event", ""), getattr(r, "fields", {})) for r in caplog.records]
    assert [fields["queue_id"] for event, fields in events if event == "postmaster_copy_failed"] == [queue_id]
    bounced = [fields for event, fields in events if event == "bounced"]
    assert [(fields["to"], fields["reply"]) for fields in bounced] == [("soft@mx.test", "550 5.1.1 no such user")]
    assert [fields for event, fields in events if event in ("delivery_error", "deferred")] == []
    assert [record for record in caplog.records if record.exc_info] == []


def test_mx_that_is_this_relay_bounces(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # Both MX hosts of mx.test greet with the relay's own name: sending would
    # loop, so the mail bounces at once, naming the mail domain.
    port = free_port("127.0.0.2")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    with (
        run_upstream("127.0.0.2", port, server_hostname="relay.test") as first,
        run_upstream("127.0.0.3", port, server_hostname="RELAY.test") as second,
    ):
        commit(spool, "alice@local.test", ["bob@mx.test"])
        assert run_until(config, spool, lambda: not spool_counts(config) and bool(mailbox_messages(config, "alice")))
    assert first.messages == second.messages == []
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Status: 5.4.6" in text
    assert "this relay's own name: mail for mx.test loops back to myself" in text


def test_backup_mx_that_is_this_relay_defers(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # a.mx.test (127.0.0.2) refuses connections, and b.mx.test greets with the
    # relay's own name.  A backup MX that loops defers (Postfix 3.x: 4.4.6),
    # because the best MX host may take the mail later.
    port = free_port("127.0.0.3")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    with run_upstream("127.0.0.3", port, server_hostname="relay.test") as backup:
        queue_id = commit(spool, "alice@local.test", ["bob@mx.test"])

        def deferred() -> bool:
            message = stored_message(config, queue_id)
            return message is not None and message.recipients[0].state is RecipientState.DEFERRED

        assert run_until(config, spool, deferred)
    assert backup.messages == []
    assert mailbox_messages(config, "alice") == []
    message = stored_message(config, queue_id)
    assert message is not None
    reply = message.recipients[0].last_reply
    assert reply.startswith("451 4.4.6 b.mx.test[127.0.0.3]")
    assert reply.endswith("mail for mx.test loops back to myself at its backup MX host")


def test_best_mx_loop_skips_backup_mx(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # m1.many.test, the best MX host, greets with the relay's own name.  The
    # hosts after it are less preferred than this relay (RFC 5321 section 5.1),
    # so m2.many.test is never tried even though it would accept the mail.
    port = free_port("127.0.0.21")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    with (
        run_upstream("127.0.0.21", port, server_hostname="relay.test") as best,
        run_upstream("127.0.0.22", port) as backup,
    ):
        commit(spool, "alice@local.test", ["bob@many.test"])
        assert run_until(config, spool, lambda: not spool_counts(config) and bool(mailbox_messages(config, "alice")))
    assert best.messages == []
    assert backup.connections == 0
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Status: 5.4.6" in text
    assert "mail for many.test loops back to myself at its best MX host" in text


def test_alias_added_without_reload_delivered(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # RCPT re-reads a changed aliases file, so delivery must know the new alias too, not bounce it.
    aliases = tmp_path / "aliases"
    aliases.write_text("team: alice\n")
    config = make_config(tmp_path, nameserver, free_port("127.0.0.4"), extra='aliases = "aliases"')
    spool = spool_for(config)
    sent: list[str] = []

    def add_alias_then_wait() -> bool:
        # The scheduler runs, with the file as it was, before the alias is added.
        if not sent:
            aliases.write_text("team: alice\nsupport: alice\n")
            sent.append(commit(spool, "carol@local.test", ["support@local.test"]))
        return not spool_counts(config) and bool(mailbox_messages(config, "alice"))

    assert run_until(config, spool, add_alias_then_wait)

    (copy,) = mailbox_messages(config, "alice")
    assert copy["Delivered-To"] == "support@local.test"


def test_alias_forward_loop_bounces_once(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The aliases file cannot see this loop: the target is an address in a local
    # domain.  Delivered-To on the forwarded copy stops it at the second pass.
    (tmp_path / "aliases").write_text("loop: loop@local.test\n")
    config = make_config(tmp_path, nameserver, free_port("127.0.0.4"), extra='aliases = "aliases"')
    spool = spool_for(config)
    commit(spool, "alice@local.test", ["loop@local.test"])

    assert run_until(config, spool, lambda: not spool_counts(config) and bool(mailbox_messages(config, "alice")))

    (report,) = mailbox_messages(config, "alice")
    text = report.as_string()
    assert "Status: 5.4.6" in text
    assert "554 5.4.6 <loop@local.test>: mail forwarding loop" in text


def test_alias_forward_keeps_dsn_parameters(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # As Postfix's local delivery: RET, ENVID and the original recipient as ORCPT
    # go with the forwarded copy, and NOTIFY without SUCCESS, reported here already.
    (tmp_path / "aliases").write_text("fwd: bob@implicit.test\n")
    config = make_config(tmp_path, nameserver, free_port("127.0.0.4"), extra='aliases = "aliases"')
    spool = spool_for(config)
    original = Envelope(
        sender="alice@local.test",
        recipients=(Recipient("fwd@local.test", notify=("SUCCESS", "FAILURE")),),
        ret="FULL",
        envid="abc123",
    )
    queue_id = spool.commit_blocking(original, BODY)

    # Nothing listens at implicit.test's MX, so the forwarded copy stays deferred.
    assert run_until(config, spool, lambda: spool_counts(config) == {"deferred": 1})

    with sqlite3.connect(Path(config.spool.path) / "spool.db") as connection:
        (forward_id,) = connection.execute("SELECT queue_id FROM message WHERE queue_id != ?", (queue_id,)).fetchone()
    forwarded = stored_message(config, forward_id)
    assert forwarded is not None
    assert (forwarded.envelope.ret, forwarded.envelope.envid) == ("FULL", "abc123")
    [recipient] = forwarded.recipients
    assert recipient.address == "bob@implicit.test"
    assert recipient.notify == ("FAILURE",)
    assert recipient.orcpt == "rfc822;fwd@local.test"
    # The success DSN that the alias owed reports that the message went on: "expanded" (RFC 3464 section 2.3.3).
    (report,) = mailbox_messages(config, "alice")
    text = unfolded(report)
    assert "Final-Recipient: rfc822; fwd@local.test Action: expanded" in text


# alice has a Maildir.  carol has none and is not in [local] users, so the
# alias line alone declares her mailbox, and delivery creates it.
@pytest.mark.parametrize("user", ["alice", "carol"])
def test_alias_naming_itself_keeps_mailbox_copy(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, user: str
) -> None:
    (tmp_path / "aliases").write_text(f"{user}: {user}, bob@implicit.test\n")
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, extra='aliases = "aliases"')
    spool = spool_for(config)
    with run_upstream("127.0.0.4", port) as upstream:
        commit(spool, "dave@example.org", [f"{user}@local.test"])
        assert run_until(config, spool, lambda: bool(upstream.messages) and not spool_counts(config))

    (local_copy,) = mailbox_messages(config, user)
    assert local_copy["Delivered-To"] == f"{user}@local.test"
    assert upstream.messages[0].recipients == ["bob@implicit.test"]
    assert upstream.messages[0].data.startswith(f"Delivered-To: {user}@local.test\r\n".encode())


@pytest.mark.parametrize("address", ["postmaster", "POSTMASTER"])
def test_bare_postmaster_delivered_locally(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, address: str
) -> None:
    # A relayhost is set, so only the no-domain rule keeps <postmaster> local.
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    spool = spool_for(config)
    commit(spool, "carol@example.org", [address])
    assert run_until(config, spool, lambda: not spool_counts(config))
    (message,) = mailbox_messages(config, "postmaster")
    assert message["Return-Path"] == "<carol@example.org>"
    assert message["Delivered-To"] == address


def test_reload_applies_nameservers(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    # Nothing answers DNS on this port, so every lookup times out and defers.
    silent = types.SimpleNamespace(port=free_port("127.0.0.1"))
    before = make_config(tmp_path, silent, port, delivery="dns_timeout = 0.3")  # type: ignore[arg-type]
    after = make_config(tmp_path, nameserver, port, delivery="dns_timeout = 0.3")
    spool = spool_for(before)

    async def main(upstream: Any) -> bool:
        scheduler = Scheduler(before, spool)
        task = asyncio.create_task(scheduler.run())
        try:
            deadline = time.monotonic() + 20
            while spool_counts(before).get("deferred", 0) == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert spool_counts(before).get("deferred", 0) == 1
            scheduler.apply_config(after)
            while not upstream.messages and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return bool(upstream.messages)
        finally:
            await scheduler.stop()
            await task

    with run_upstream("127.0.0.4", port) as upstream:
        commit(spool, "carol@example.org", ["dave@implicit.test"])
        assert asyncio.run(main(upstream))
    assert upstream.messages[0].recipients == ["dave@implicit.test"]


def test_reload_resizes_connection_limit(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    config = make_config(tmp_path, nameserver, 25, delivery="connection_limit = 4")
    smaller = make_config(tmp_path, nameserver, 25, delivery="connection_limit = 1")
    larger = make_config(tmp_path, nameserver, 25, delivery="connection_limit = 6")
    spool = spool_for(config)

    async def main() -> list[bool]:
        scheduler = Scheduler(config, spool)
        scheduler.apply_config(smaller)
        await asyncio.sleep(0)
        # The 3 slots taken away are held, so only one connection may open.
        free_after_lowering = [scheduler._connections.locked()]
        await scheduler._connections.acquire()
        free_after_lowering.append(scheduler._connections.locked())
        scheduler._connections.release()
        scheduler.apply_config(larger)
        await asyncio.sleep(0)
        for _ in range(6):
            await asyncio.wait_for(scheduler._connections.acquire(), 1)
        free_after_raising = scheduler._connections.locked()
        await scheduler.stop()
        return [*free_after_lowering, free_after_raising]

    assert asyncio.run(main()) == [False, True, True]


def commit_notify(spool: Spool, sender: str, address: str, notify: tuple[str, ...]) -> str:
    envelope = Envelope(sender=sender, recipients=(Recipient(address=address, notify=notify),))
    return spool.commit_blocking(envelope, BODY)


@pytest.mark.parametrize(("sink_options", "actions"), [([], []), (["-N"], ["relayed"])])
def test_success_dsn_only_when_next_hop_lacks_dsn(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, sink_options: list[str], actions: list[str]
) -> None:
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    spool = spool_for(config)
    with run_smtp_sink("127.0.0.7", port, *sink_options):
        commit_notify(spool, "alice@local.test", "user@example.org", ("SUCCESS",))
        # A DSN, when owed, is delivered to the local sender before the spool is empty.
        assert run_until(config, spool, lambda: not spool_counts(config))
    reports = mailbox_messages(config, "alice")
    assert [report.get_payload()[1].get_payload()[1]["Action"] for report in reports] == actions


@pytest.mark.parametrize(
    ("notify", "warnings"),
    [((), 1), (("DELAY",), 1), (("FAILURE",), 0), (("NEVER",), 0)],
)
def test_delay_warning_once_per_recipient(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, notify: tuple[str, ...], warnings: int
) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="delay_warning_time = 0.2")
    spool = spool_for(config)
    # Three deferrals, the last two past the warning time, then delivery.
    handler = FlakyHandler(failures=3)
    with run_upstream("127.0.0.4", port, handler):
        commit_notify(spool, "alice@local.test", "bob@implicit.test", notify)
        assert run_until(config, spool, lambda: bool(handler.messages) and not spool_counts(config))
    assert handler.remaining == 0
    reports = mailbox_messages(config, "alice")
    assert len(reports) == warnings
    for report in reports:
        assert report["Subject"] == "Delayed Mail (still being retried)"
        fields = report.get_payload()[1].get_payload()[1]
        assert fields["Action"] == "delayed"
        assert fields["Status"] == "4.2.1"
        assert fields["Will-Retry-Until"]


def test_delay_warning_returns_header_with_ret_full(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    # RET=FULL asks for the whole message in a "failed" DSN (RFC 3461 section
    # 4.3).  A delay warning returns the header only, as Postfix's does, so a
    # large message is not sent back while it is still being delivered.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port, delivery="delay_warning_time = 0.2")
    spool = spool_for(config)
    handler = FlakyHandler(failures=3)
    with run_upstream("127.0.0.4", port, handler):
        commit(spool, "alice@local.test", ["bob@implicit.test"], ret="FULL")
        assert run_until(config, spool, lambda: bool(handler.messages) and not spool_counts(config))
    (report,) = mailbox_messages(config, "alice")
    assert report["Subject"] == "Delayed Mail (still being retried)"
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b".starts with a dot" not in report.as_bytes()


def test_delay_warning_off_by_default(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    handler = FlakyHandler(failures=2)
    with run_upstream("127.0.0.4", port, handler):
        commit_notify(spool, "alice@local.test", "bob@implicit.test", ("DELAY",))
        assert run_until(config, spool, lambda: bool(handler.messages) and not spool_counts(config))
    assert mailbox_messages(config, "alice") == []


def test_start_releases_only_dead_owners_leases(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    host = socket.gethostname()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    # Killed but not reaped until the end: a zombie runs no scheduler either.
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie_start = process_start(zombie.pid)
    zombie.kill()
    deadline = time.monotonic() + 5
    while process_start(zombie.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        owners = {
            "dead": f"{host}:{ended.pid}:0-1:1",
            "reused": f"{host}:{live.pid}:0-1:1",  # the PID now runs a process that started later
            "live": f"{host}:{live.pid}:{process_start(live.pid)}:1",
            "remote": f"elsewhere.test:{ended.pid}:0-1:1",
            "zombie": f"{host}:{zombie.pid}:{zombie_start}:1",
        }
        for name, owner in owners.items():
            commit(spool, "alice@local.test", [f"{name}@implicit.test"])
            assert len(asyncio.run(spool.claim(owner, limit=1))) == 1
        with run_upstream("127.0.0.4", port) as upstream:
            run_until(config, spool, lambda: False, timeout=2.0)
        delivered = sorted(address for message in upstream.messages for address in message.recipients)
        assert delivered == ["dead@implicit.test", "reused@implicit.test", "zombie@implicit.test"]
        # The scheduler released its own leases when it stopped.
        assert asyncio.run(spool.lease_owners()) == {owners["live"]: 1, owners["remote"]: 1}
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_corrupt_next_job_keeps_first_sent(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The second message's body fails its CRC-32 when it is read to pipeline
    # its commands after the first one.  The first message still goes out,
    # and is not deferred for the other one's error.
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"\ndestination_concurrency_limit = 1'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost, spool="claim_body_max_bytes = 0")
    # A long backoff, so a deferral by mistake outlasts the test.
    config = dataclasses.replace(
        config, delivery=dataclasses.replace(config.delivery, minimal_backoff_time=600, maximal_backoff_time=600)
    )
    spool = spool_for(config)
    handler = RecordingHandler(pipelining=True)
    with run_upstream("127.0.0.7", port, handler):
        commit(spool, "alice@local.test", ["first@example.org"])
        broken = commit(spool, "alice@local.test", ["second@example.org"])
        with sqlite3.connect(Path(config.spool.path) / "spool.db") as connection:
            connection.execute("UPDATE message SET body = ? WHERE queue_id = ?", (b"damaged!", broken))
        assert run_until(config, spool, lambda: not spool_counts(config), timeout=5.0), spool_counts(config)
    assert [m.recipients for m in handler.messages] == [["first@example.org"]]
    assert (Path(config.spool.path) / "corrupt" / f"{broken}.body").read_bytes() == b"damaged!"


def test_pipelined_transactions_keep_results_exact(
    tmp_path: Path, nameserver: NameServer, spool_for: Any
) -> None:
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"\ndestination_concurrency_limit = 1'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    # A long backoff, so a recipient deferred by mistake stays deferred for the rest of the test.
    config = dataclasses.replace(
        config, delivery=dataclasses.replace(config.delivery, minimal_backoff_time=600, maximal_backoff_time=600)
    )
    spool = spool_for(config)
    order = ["ok0", "reject", "ok1", "drop", "ok2", "ok3"]
    handler = RecordingHandler(
        refuse={"reject@example.org": "550 5.1.1 no such user"}, pipelining=True, drop_after={"drop@example.org"}
    )
    with run_upstream("127.0.0.7", port, handler):
        for name in order:
            commit(spool, "", [f"{name}@example.org"])
        expected = ["ok0@example.org", "ok1@example.org", "ok2@example.org", "ok3@example.org"]

        def settled() -> bool:
            return len(handler.messages) >= len(expected) and spool_counts(config) == {"deferred": 1}

        assert run_until(config, spool, settled), (spool_counts(config), handler.connections)
    assert sorted(r for m in handler.messages for r in m.recipients) == expected
    assert [m.recipients for m in handler.dropped] == [["drop@example.org"]]
    # The message after the drop had only its envelope on the lost connection, so it went over a second one.
    assert handler.connections == 2
    assert handler.commands_pipelined_after_data >= 1
    store = SpoolStore(config.spool.path)
    try:
        [message] = list(store.messages(store.queue_ids()))
    finally:
        store.close()
    assert [r.address for r in message.recipients] == ["drop@example.org"]


def test_flush_lifts_destination_backoff(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port("127.0.0.4")
    base = make_config(tmp_path, nameserver, port)
    # A backoff far longer than the test, so only the flush can bring the messages out.
    config = base.replace(
        delivery=dataclasses.replace(base.delivery, minimal_backoff_time=600.0, maximal_backoff_time=1200.0)
    )
    spool = spool_for(config)
    for number in range(3):
        commit(spool, "alice@local.test", [f"bob{number}@implicit.test"])

    def deferred() -> int:
        return spool_counts(config).get("deferred", 0)

    async def main() -> int:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        try:
            # Nothing listens yet: every attempt fails and the destination backs off.
            deadline = loop.time() + 10
            while deferred() < 3 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert deferred() == 3
            with run_upstream("127.0.0.4", port) as upstream:
                store = SpoolStore(config.spool.path)
                try:
                    assert store.flush(time.time()) == 3
                finally:
                    store.close()
                deadline = loop.time() + 10
                while len(upstream.messages) < 3 and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                return len(upstream.messages)
        finally:
            await scheduler.stop()
            await task

    with caplog.at_level("INFO", logger="relay"):
        delivered = asyncio.run(main())

    assert delivered == 3
    events = [getattr(record, "event", "") for record in caplog.records]
    # The three sessions failed in the same outage: one backoff, not three growing ones.
    assert events.count("destination_backoff") == 1
    assert events.count("flush_requested") == 1


class CountingScheduler(Scheduler):
    """A scheduler that counts its claims."""

    claims = 0

    async def _claim_once(self) -> bool:
        self.claims += 1
        return await super()._claim_once()


def test_burst_of_wakes_shares_claim(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.4")
    # No scan during the test: only wake-ups lead to claims.
    config = make_config(tmp_path, nameserver, port, delivery="claim_min_interval = 1", scan_interval=30)
    spool = spool_for(config)

    async def main(upstream: Any) -> tuple[float, int, int]:
        scheduler = CountingScheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        try:
            # A quiet spell longer than the interval: the next message is claimed at once.
            await asyncio.sleep(1.2)
            started = time.monotonic()
            await asyncio.to_thread(commit, spool, "alice@local.test", ["first@implicit.test"])
            scheduler.wake()
            while len(upstream.messages) < 1:
                await asyncio.sleep(0.01)
            first_delay = time.monotonic() - started

            # Ten messages, each followed by a wake-up, as the server sends one after its commits.
            claims_before = scheduler.claims
            for index in range(10):
                await asyncio.to_thread(commit, spool, "alice@local.test", [f"user{index}@implicit.test"])
                scheduler.wake()
            while len(upstream.messages) < 11:
                await asyncio.sleep(0.01)
            return first_delay, claims_before, scheduler.claims
        finally:
            await scheduler.stop()
            await task

    with run_upstream("127.0.0.4", port) as upstream:
        first_delay, claims_before, claims_after = asyncio.run(asyncio.wait_for(main(upstream), timeout=30))

    assert first_delay < 0.8
    # The burst came within one interval of the first claim, so one claim (two
    # when the burst straddles the end of the interval) took all ten.
    assert claims_after - claims_before <= 2


def _bounced(reply: str) -> StoredMessage:
    recipient = StoredRecipient(
        index=0, address="bob@remote.test", orcpt=None, notify=(), state=RecipientState.BOUNCED, attempts=1,
        next_attempt=0.0, last_attempt=1_700_000_000.0, last_reply=reply, last_host="mx.remote.test[192.0.2.1]:25",
        dsn=DsnState.PENDING,
    )
    envelope = Envelope(sender="alice@local.test", recipients=(Recipient(address="bob@remote.test"),))
    return StoredMessage(queue_id="Q", arrival=1_700_000_000.0, size=10, envelope=envelope, recipients=(recipient,))


def test_dsn_text_from_next_hop_made_safe() -> None:
    # A next hop's reply is untrusted text: the delivery-status part must stay
    # US-ASCII (RFC 3464 section 2.1), no line may pass 998 octets, and control
    # characters must not reach a reader's terminal, nor may a right-to-left
    # override reorder the plain-text part for display.
    reply = "550 5.1.1 Empf\u00e4nger \u2603 \x1b[31mred \u202egnp.exe " + "long " * 900
    message = _bounced(reply)

    report = build_report(message, b"Subject: s\r\n\r\nx\r\n", message.recipients, "mx.local.test", 1_700_000_100.0)

    assert max(len(line) for line in report.body.split(b"\r\n")) <= 998
    assert b"\x1b" not in report.body
    assert "\u202e".encode() not in report.body
    assert b"?[31mred ?gnp.exe" in report.body.split(b"Content-Type: message/delivery-status")[0]
    status_part = report.body.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]
    assert status_part.isascii()
    assert b"Diagnostic-Code: smtp; 550 5.1.1 Empf?nger ? ?[31m" in status_part
    # The human-readable part keeps the UTF-8, so the DSN goes with BODY=8BITMIME (RFC 6152 section 3).
    assert "Empfänger ☃".encode() in report.body
    assert report.envelope.body_type == "8BITMIME"


def test_dsn_long_utf8_reply_within_998_octets(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # The plain-text part keeps a reply's UTF-8, so a word of 900 two-octet
    # characters is cut by octets.  A cut by characters would make an
    # 1800-octet line, past the 998 of RFC 5322 section 2.1.1.
    port = free_port("127.0.0.4")
    config = make_config(tmp_path, nameserver, port)
    spool = spool_for(config)
    word = "\u00e9" * 900
    handler = RecordingHandler(refuse={"nobody@implicit.test": f"550 5.1.1 {word}"})
    with run_upstream("127.0.0.4", port, handler, enable_SMTPUTF8=True):
        commit(spool, "alice@local.test", ["nobody@implicit.test"])
        assert run_until(config, spool, lambda: bool(mailbox_messages(config, "alice")) and not spool_counts(config))

    maildir = mailbox.Maildir(str(Path(config.local.maildir_root) / "alice"))
    (raw,) = [maildir.get_bytes(key) for key in maildir.keys()]
    assert max(len(line) for line in raw.split(b"\n")) <= 998
    report = email.message_from_bytes(raw)
    text = report.get_payload()[0].get_payload(decode=True).decode()
    assert word in text.replace("\n ", "")


def test_dsn_utf8_recipient_written_as_ascii() -> None:
    # RFC 6533 section 3: in a US-ASCII delivery-status part a UTF-8 address is
    # utf-8-addr-xtext, with each non-ASCII character (and "+", "=", "\\") as \x{HEX}.
    recipient = dataclasses.replace(
        _bounced("550 5.1.1 unknown").recipients[0], address="j\u00fcrgen+x@remote.test", orcpt="utf-8;j\u00fcrgen"
    )
    message = dataclasses.replace(_bounced("550 5.1.1 unknown"), recipients=(recipient,))

    report = build_report(message, b"Subject: s\r\n\r\nx\r\n", message.recipients, "mx.local.test", 1_700_000_100.0)

    status_part = report.body.split(b"Content-Type: message/delivery-status")[1].split(b"\r\n--")[0]
    assert status_part.isascii()
    assert b"Final-Recipient: utf-8; j\\x{FC}rgen\\x{2B}x@remote.test\r\n" in status_part
    assert b"Original-Recipient: utf-8;j\\x{FC}rgen\r\n" in status_part


def test_dsn_utf8_header_returned_as_global_headers() -> None:
    # RFC 6533: an original header with UTF-8 goes back as message/global-headers.
    message = _bounced("550 5.1.1 unknown")
    original = "Subject: s\r\nReceived: for <j\u00fcrgen@remote.test>\r\n\r\nx\r\n".encode()

    report = build_report(message, original, message.recipients, "mx.local.test", 1_700_000_100.0)

    assert b"Content-Type: message/global-headers\r\n" in report.body
    assert b"text/rfc822-headers" not in report.body
    plain = build_report(message, b"Subject: s\r\n\r\nx\r\n", message.recipients, "mx.local.test", 1_700_000_100.0)
    assert b"Content-Type: text/rfc822-headers\r\n" in plain.body


def test_dsn_status_class_follows_reply() -> None:
    # RFC 3463 section 2: "550 4.2.2" is a permanent failure, so its status is 5.0.0.
    message = _bounced("550 4.2.2 mailbox full")

    report = build_report(message, b"Subject: s\r\n\r\nx\r\n", message.recipients, "mx.local.test", 1_700_000_100.0)

    assert b"Status: 5.0.0\r\n" in report.body
    assert report.envelope.body_type is None


# -- 8-bit mail for a next hop without 8BITMIME ----------------------------------

EIGHT_BIT_PARTS = (
    b"From: alice@local.test\r\nTo: user@example.org\r\nSubject: 8-bit parts\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="mixed"\r\n\r\n'
    b"--mixed\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n.a line with a leading dot\r\n"
    b"--mixed\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    + bytes(range(128, 256)) * 4
    + b"\r\n--mixed\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: enclosed\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nVoil\xe0\r\n"
    b"--mixed--\r\n"
)


@contextmanager
def sink_dump_directory() -> Iterator[Path]:
    """Yield a folder for smtp-sink's -d dumps that the user nobody, which it runs as under root, can write."""
    path = Path(tempfile.mkdtemp(prefix="relay-sink-dump-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_8bit_mail_converted_for_sink_without_8bitmime(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    spool = spool_for(config)
    # smtp-sink -8 leaves 8BITMIME out of its EHLO reply; -d writes each message to a file.
    with sink_dump_directory() as dump, run_smtp_sink("127.0.0.7", port, "-8", "-d", f"{dump}/%M."):
        recipients = ["user@example.org", "alice@local.test"]
        commit(spool, "carol@example.org", recipients, body=EIGHT_BIT_PARTS, body_type="8BITMIME")
        with caplog.at_level("INFO", logger="relay"):
            assert run_until(config, spool, lambda: not spool_counts(config) and any(dump.iterdir()))
        (dumped,) = [path.read_bytes() for path in dump.iterdir()]

    assert dumped.isascii()
    # smtp-sink writes LF line ends and its own fields first, the MAIL arguments among them.
    (mail_arguments,) = [line for line in dumped.split(b"\n") if line.startswith(b"X-Mail-Args:")]
    assert b"BODY=" not in mail_arguments
    assert decoded_leaves(dumped) == decoded_leaves(EIGHT_BIT_PARTS)
    assert b"\nContent-Transfer-Encoding: quoted-printable\n\nGr=C3=BC=C3=9Fe aus K=C3=B6ln\n" in dumped
    delivered = [record for record in caplog.records if getattr(record, "event", "") == "delivered"]
    converted = {record.fields["to"]: record.fields.get("converted") for record in delivered}  # type: ignore[attr-defined]
    assert converted == {"user@example.org": "7bit", "alice@local.test": None}
    # Local delivery stores the message as received, with LF line ends in the Maildir file.
    maildir = mailbox.Maildir(str(Path(config.local.maildir_root) / "alice"))
    (stored,) = [maildir.get_bytes(key) for key in maildir.keys()]
    assert stored.endswith(EIGHT_BIT_PARTS.replace(b"\r\n", b"\n"))


def test_8bit_mail_bounced_when_mime_downgrade_off(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    port = free_port("127.0.0.7")
    relayhost = f'relayhost = "[127.0.0.7]:{port}"\nrelayhost_tls = "none"\nmime_downgrade = false'
    config = make_config(tmp_path, nameserver, port, delivery=relayhost)
    spool = spool_for(config)
    with sink_dump_directory() as dump, run_smtp_sink("127.0.0.7", port, "-8", "-d", f"{dump}/%M."):
        commit(spool, "alice@local.test", ["user@example.org"], body=EIGHT_BIT_PARTS, body_type="8BITMIME")
        # The bounce goes to alice's local mailbox, and the spool empties once it is there.
        assert run_until(config, spool, lambda: not spool_counts(config))
        assert list(dump.iterdir()) == []
    (report,) = mailbox_messages(config, "alice")
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    fields = report.get_payload()[1].get_payload()[1]
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.6.3"
    diagnostic = " ".join(fields["Diagnostic-Code"].split())  # unfolded
    assert diagnostic.endswith("does not support 8BITMIME, which this message needs, and conversion to 7 bit is off"
                               " (delivery.mime_downgrade)")


def test_dsn_with_full_8bit_original_converts() -> None:
    # A DSN goes through the same client, so RET=FULL with an 8-bit original is
    # converted like any message when the sender's host lacks 8BITMIME.
    message = _bounced("550 5.1.1 Empf\u00e4nger unbekannt")
    message = dataclasses.replace(message, envelope=dataclasses.replace(message.envelope, ret="FULL"))

    report = build_report(message, EIGHT_BIT_PARTS, message.recipients, "mx.local.test", 1_700_000_100.0)
    converted = downgrade_to_7bit(report.body)

    assert report.envelope.body_type == "8BITMIME"
    assert converted.isascii()
    assert decoded_leaves(converted) == decoded_leaves(report.body)
    assert b"Content-Type: message/rfc822\r\n" in converted



def test_lease_keeper_renews_nearly_ended_lease(tmp_path: Path, nameserver: NameServer, spool_for: Any) -> None:
    # A job that waited in memory until less than LEASE_MARGIN of its lease
    # was left is still valid.  Its first renewal succeeds, so the
    # transaction runs on and is not cut off before the renewal could save it.
    config = make_config(tmp_path, nameserver, free_port(), spool='lease_time = "2s"')
    spool = spool_for(config)
    commit(spool, "carol@example.org", ["alice@local.test"])

    async def main() -> float:
        scheduler = Scheduler(config, spool)
        # 0.15 s left of the claim, less than the 0.2 s margin of a 2 s lease.
        (claim,) = await spool.claim("test", limit=10, lease_time=0.15)
        job = Job(claim, scheduler.router.route("local.test"), tuple(claim.recipients))
        keeper = _LeaseKeeper(scheduler, job)
        try:
            async with keeper.cutoff():
                await asyncio.sleep(0.3)
        finally:
            keeper.close()
        await scheduler.stop()
        return job.lease_until - time.time()

    left = asyncio.run(main())
    assert left > 1.0


def test_spool_failures_logged_once_per_interval(
    tmp_path: Path, nameserver: NameServer, spool_for: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # With the recipient table renamed away by another connection, every
    # claim and every look for owed DSNs fails, at each pass of the loop
    # (every 0.05 s here).  Each event is logged at once, then at most once
    # per interval (0.5 s here) with the count of failures since its last
    # line, and delivery resumes once the table is back.
    monkeypatch.setattr("relay.delivery.scheduler.SPOOL_FAILURE_LOG_INTERVAL", 0.5)
    config = make_config(tmp_path, nameserver, 25)
    spool = spool_for(config)

    def rename(old: str, new: str) -> None:
        connection = sqlite3.connect(Path(config.spool.path) / "spool.db")
        try:
            connection.execute(f"ALTER TABLE {old} RENAME TO {new}")
            connection.commit()
        finally:
            connection.close()

    async def main() -> bool:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(1.2)
            await asyncio.to_thread(rename, "recipient_away", "recipient")
            commit(spool, "bob@local.test", ["alice@local.test"])
            scheduler.wake()
            deadline = loop.time() + 5.0
            while loop.time() < deadline and not await asyncio.to_thread(mailbox_messages, config, "alice"):
                await asyncio.sleep(0.05)
            return bool(await asyncio.to_thread(mailbox_messages, config, "alice"))
        finally:
            await scheduler.stop()
            await task

    rename("recipient", "recipient_away")
    with caplog.at_level("INFO", logger="relay"):
        delivered = asyncio.run(main())
    assert delivered
    for event in ("claim_failed", "dsn_scan_failed"):
        lines = [record.fields for record in caplog.records if getattr(record, "event", "") == event]  # type: ignore[attr-defined]
        # About 24 failures in 1.2 s, logged at 0 s, about 0.5 s and about 1 s.
        assert 2 <= len(lines) <= 3, (event, lines)
        assert lines[0]["failures"] == 1, (event, lines)
        assert lines[1]["failures"] > 1, (event, lines)
        assert "no such table: recipient" in lines[0]["error"], (event, lines)


def test_failing_dsn_backs_off(tmp_path: Path, nameserver: NameServer, spool_for: Any,
                               caplog: pytest.LogCaptureFixture) -> None:
    # A trigger makes every commit of a DSN (null sender) fail with a spool
    # error for 2 s.  The scheduler looks for owed DSNs every 0.05 s, but the
    # failing DSN waits 0.3 s, then 0.6 s, then the 1 s maximum (plus up to a
    # quarter), so it is tried about four times, not forty.  Once the trigger
    # is gone, the DSN goes out at its next try.
    config = make_config(tmp_path, nameserver, 25)
    spool = spool_for(config)
    database = Path(config.spool.path) / "spool.db"

    def execute(statement: str) -> None:
        connection = sqlite3.connect(database)
        try:
            connection.execute(statement)
            connection.commit()
        finally:
            connection.close()

    execute(
        "CREATE TRIGGER no_dsn BEFORE INSERT ON message WHEN NEW.sender = ''"
        " BEGIN SELECT RAISE(ABORT, 'DSN commits fail in this test'); END"
    )
    queue_id = commit(spool, "alice@local.test", ["nobody@local.test"])

    async def main() -> StoredMessage | None:
        scheduler = Scheduler(config, spool)
        task = asyncio.create_task(scheduler.run())
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(2.0)
            stored = await asyncio.to_thread(stored_message, config, queue_id)
            await asyncio.to_thread(execute, "DROP TRIGGER no_dsn")
            deadline = loop.time() + 5.0
            while loop.time() < deadline and not await asyncio.to_thread(mailbox_messages, config, "alice"):
                await asyncio.sleep(0.05)
            return stored
        finally:
            await scheduler.stop()
            await task

    with caplog.at_level("INFO", logger="relay"):
        stored = asyncio.run(main())
    failures = [record.fields for record in caplog.records if getattr(record, "event", "") == "dsn_failed"]  # type: ignore[attr-defined]
    assert 2 <= len(failures) <= 5, failures
    assert [fields["attempts"] for fields in failures] == list(range(1, len(failures) + 1))
    assert failures[0]["retry_in"] >= 0.3
    assert failures[-1]["retry_in"] <= 1.0
    assert all("DSN commits fail in this test" in fields["error"] for fields in failures)
    assert stored is not None
    recipient = stored.recipients[0]
    assert recipient.dsn is DsnState.PENDING
    assert recipient.dsn_attempts in (len(failures), len(failures) - 1)
    assert recipient.dsn_due > time.time() - 2.0
    (report,) = mailbox_messages(config, "alice")
    assert "Final-Recipient: rfc822; nobody@local.test" in unfolded(report)
    assert spool_counts(config) == {}
