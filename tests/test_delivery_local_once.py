"""Local delivery gives each target of a recipient one copy: across a deferral, and across a stop of the scheduler.

The scheduler runs in this process on a real spool and writes real Maildir
folders.  No DNS server is needed, because every recipient is in a local
domain, so the resolver points at a loopback port where nothing listens.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import os
import smtplib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_helpers import RelayProcess, wait_until

from conftest import free_port
from relay.config import Config, load_config
from relay.delivery import Scheduler
from relay.delivery.maildir import LocalDelivery
from relay.spool import Envelope, Recipient, RecipientState, Spool, SpoolStore, StoredMessage
from relay.spool.store import database_path

BODY = b"From: dora@local.test\r\nTo: team@local.test\r\nSubject: once\r\n\r\nline\r\n"


def make_config(directory: Path, aliases: str, delivery: str = "") -> Config:
    (directory / "mail").mkdir()
    (directory / "aliases").write_text(aliases)
    path = directory / "relay.toml"
    path.write_text(
        f"""
[server]
hostname = "relay.test"
[spool]
path = "spool"
lease_time = "30s"
[policy]
local_domains = ["local.test"]
[delivery]
nameservers = ["127.0.0.1:{free_port("127.0.0.1")}"]
minimal_backoff_time = 0.3
maximal_backoff_time = 1
queue_scan_interval = 0.05
{delivery}
[local]
maildir_root = "mail"
users = ["alice", "bob", "carol"]
aliases = "aliases"
"""
    )
    return load_config(path)


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


def commit(spool: Spool, recipients: list[str]) -> str:
    envelope = Envelope(sender="dora@local.test", recipients=tuple(Recipient(address) for address in recipients))
    return spool.commit_blocking(envelope, BODY)


def stored_message(config: Config, queue_id: str) -> StoredMessage | None:
    with SpoolStore(config.spool.path) as store:
        return store.load(queue_id)


def attempted(config: Config, queue_id: str) -> bool:
    stored = stored_message(config, queue_id)
    return stored is None or stored.recipients[0].attempts > 0


def copies(config: Config, user: str) -> int:
    """Return how many messages ``user``'s Maildir has, also while delivery is still creating its folders."""
    return copies_in(Path(config.local.maildir_root).parent, user)


def copies_in(directory: Path, user: str) -> int:
    folder = directory / "mail" / user
    return sum(len(os.listdir(folder / part)) for part in ("new", "cur") if (folder / part).is_dir())


def run_until(config: Config, spool: Spool, done: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Run a scheduler until ``done()`` returns True or ``timeout`` passes; return ``done()``."""

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


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "event", "") == name]


def test_alias_retry_skips_delivered_targets(
    tmp_path: Path, spool_for: Callable[[Config], Spool], caplog: pytest.LogCaptureFixture
) -> None:
    # carol's "new" folder is a file, so her write fails after alice and bob
    # got the message.  The deferral stores alice and bob, and the retry,
    # once carol's folder is repaired, writes to carol alone.
    config = make_config(tmp_path, "team: alice, bob, carol\n")
    (tmp_path / "mail" / "carol").mkdir()
    (tmp_path / "mail" / "carol" / "new").write_text("not a folder\n")
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test"])

    with caplog.at_level(logging.INFO, logger="relay"):
        assert run_until(config, spool, lambda: attempted(config, queue_id))
    stored = stored_message(config, queue_id)
    assert stored is not None
    (recipient,) = stored.recipients
    assert recipient.state is RecipientState.DEFERRED
    assert recipient.delivered_targets == ("alice", "bob")
    assert recipient.last_reply is not None
    assert recipient.last_reply.startswith("451 4.3.0 local delivery failed: ")
    assert recipient.last_reply.endswith("; already delivered to alice, bob")
    assert (copies(config, "alice"), copies(config, "bob")) == (1, 1)

    (tmp_path / "mail" / "carol" / "new").unlink()
    with caplog.at_level(logging.INFO, logger="relay"):
        assert run_until(config, spool, lambda: stored_message(config, queue_id) is None)
    assert (copies(config, "alice"), copies(config, "bob"), copies(config, "carol")) == (1, 1, 1)
    (delivered,) = events(caplog, "delivered")
    assert delivered.__dict__["fields"]["to"] == "team@local.test"
    assert delivered.__dict__["fields"]["reply"] == "250 2.0.0 delivered to alice, bob, carol"
    assert len(events(caplog, "deferred")) == 1


def test_alias_skips_targets_after_alias_change(tmp_path: Path, spool_for: Callable[[Config], Spool]) -> None:
    # Targets are kept by name: after the alias gains dave, the retry
    # writes to carol and dave and still not again to alice.
    config = make_config(tmp_path, "team: alice, carol\n")
    (tmp_path / "mail" / "carol").mkdir()
    (tmp_path / "mail" / "carol" / "new").write_text("not a folder\n")
    (tmp_path / "mail" / "dave").mkdir()
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test"])

    assert run_until(config, spool, lambda: attempted(config, queue_id))
    (tmp_path / "mail" / "carol" / "new").unlink()
    (tmp_path / "aliases").write_text("team: alice, carol, dave\n")
    assert run_until(config, spool, lambda: stored_message(config, queue_id) is None)
    assert (copies(config, "alice"), copies(config, "carol"), copies(config, "dave")) == (1, 1, 1)


class _GatedDelivery(LocalDelivery):
    """A LocalDelivery whose Maildir write for ``user`` waits until ``gate`` is set, then writes for real."""

    user = ""
    entered: threading.Event
    gate: threading.Event

    def deliver(self, user: str, sender: str, recipient: str, body: bytes, *, binary: bool = False) -> Path:
        if user == self.user:
            self.entered.set()
            assert self.gate.wait(10.0), "the test never opened the gate"
        return super().deliver(user, sender, recipient, body, binary=binary)


def stop_during_write(config: Config, spool: Spool, user: str, monkeypatch: pytest.MonkeyPatch) -> float:
    """Run a scheduler until it writes to ``user``, stop it while that write waits past the grace time.

    Returns how long the stop took.  The write goes ahead one second after
    the stop began, when the stop has cancelled the delivery.
    """
    monkeypatch.setattr("relay.delivery.scheduler.STOP_GRACE", 0.2)

    async def main() -> float:
        scheduler = Scheduler(config, spool)
        gated = _GatedDelivery(scheduler.local.config, scheduler.local.aliases, scheduler.local.source)
        gated.user, gated.entered, gated.gate = user, threading.Event(), threading.Event()
        scheduler.local = gated
        task = asyncio.create_task(scheduler.run())
        try:
            assert await asyncio.to_thread(gated.entered.wait, 10.0), f"no write to {user} began"
        finally:
            started = time.monotonic()
            stopping = asyncio.create_task(scheduler.stop())
            await asyncio.sleep(1.0)
            assert not stopping.done()
            gated.gate.set()
            await stopping
            await task
        return time.monotonic() - started

    return asyncio.run(main())


def test_stop_records_write_in_flight(
    tmp_path: Path, spool_for: Callable[[Config], Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop cancels the delivery to alice while her write is in flight.
    # The write completes, and the stop records alice as delivered, so the
    # next scheduler has nothing to send.
    config = make_config(tmp_path, "")
    spool = spool_for(config)
    queue_id = commit(spool, ["alice@local.test"])
    took = stop_during_write(config, spool, "alice", monkeypatch)
    assert took < 3.0
    assert stored_message(config, queue_id) is None
    assert copies(config, "alice") == 1

    later = commit(spool, ["bob@local.test"])
    assert run_until(config, spool, lambda: stored_message(config, later) is None)
    assert copies(config, "alice") == 1


def test_stop_mid_alias_stores_targets(
    tmp_path: Path,
    spool_for: Callable[[Config], Spool],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The stop cancels the delivery to team while bob's write is in flight,
    # after alice's.  The recipient keeps its state and due time, and its
    # lease is released; alice and bob are stored as delivered.  The next
    # scheduler writes to carol alone.
    config = make_config(tmp_path, "team: alice, bob, carol\n")
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test", "bob@local.test"])
    with caplog.at_level(logging.INFO, logger="relay"):
        stop_during_write(config, spool, "bob", monkeypatch)
    stored = stored_message(config, queue_id)
    assert stored is not None
    team = stored.recipients[0]
    assert team.state is RecipientState.QUEUED
    assert team.attempts == 0
    assert team.delivered_targets == ("alice", "bob")
    assert stored.recipients[1].state is RecipientState.QUEUED
    assert (copies(config, "alice"), copies(config, "bob"), copies(config, "carol")) == (1, 1, 0)
    (cut_off,) = events(caplog, "local_delivery_cut_off")
    assert cut_off.__dict__["fields"]["delivered"] == ["alice", "bob"]
    with sqlite3.connect(database_path(config.spool.path)) as connection:
        leases = connection.execute("SELECT lease_until FROM recipient WHERE queue_id = ?", (queue_id,)).fetchall()
    assert all(until is None or until <= time.time() for (until,) in leases)

    assert run_until(config, spool, lambda: stored_message(config, queue_id) is None)
    # bob@ is a recipient of its own too, so bob has two copies: one per recipient.
    assert (copies(config, "alice"), copies(config, "bob"), copies(config, "carol")) == (1, 2, 1)


def test_stop_with_failed_write_keeps_target(
    tmp_path: Path,
    spool_for: Callable[[Config], Spool],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # bob's write is in flight when the stop cancels the delivery, and then
    # fails, because his "new" folder is a file.  Only alice is stored as
    # delivered, so the next scheduler still writes to bob and carol.
    config = make_config(tmp_path, "team: alice, bob, carol\n")
    (tmp_path / "mail" / "bob").mkdir()
    (tmp_path / "mail" / "bob" / "new").write_text("not a folder\n")
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test"])
    with caplog.at_level(logging.INFO, logger="relay"):
        stop_during_write(config, spool, "bob", monkeypatch)
    stored = stored_message(config, queue_id)
    assert stored is not None
    (team,) = stored.recipients
    assert team.state is RecipientState.QUEUED
    assert team.delivered_targets == ("alice",)
    (cut_off,) = events(caplog, "local_delivery_cut_off")
    assert cut_off.__dict__["fields"]["delivered"] == ["alice"]
    assert cut_off.__dict__["fields"]["stored"] is True

    (tmp_path / "mail" / "bob" / "new").unlink()
    assert run_until(config, spool, lambda: stored_message(config, queue_id) is None)
    assert (copies(config, "alice"), copies(config, "bob"), copies(config, "carol")) == (1, 1, 1)


def test_expired_alias_dsn_names_delivered_targets(tmp_path: Path, spool_for: Callable[[Config], Spool]) -> None:
    # carol's folder stays broken until the message expires.  The DSN to
    # dora reports team as failed, and its Diagnostic-Code names alice, who
    # got her one copy at the first attempt.
    config = make_config(tmp_path, "team: alice, carol\n", delivery="maximal_queue_lifetime = 1")
    (tmp_path / "mail" / "dora").mkdir()
    (tmp_path / "mail" / "carol").mkdir()
    (tmp_path / "mail" / "carol" / "new").write_text("not a folder\n")
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test"])
    assert run_until(config, spool, lambda: stored_message(config, queue_id) is None and copies(config, "dora") == 1)
    assert copies(config, "alice") == 1
    (report,) = mailbox.Maildir(str(tmp_path / "mail" / "dora"), create=False)
    fields = report.get_payload()[1].get_payload()[1]
    assert fields["Action"] == "failed"
    assert fields["Final-Recipient"] == "rfc822; team@local.test"
    diagnostic = " ".join(fields["Diagnostic-Code"].split())
    assert diagnostic.startswith("X-relay; 451 4.3.0 local delivery failed: ")
    assert diagnostic.endswith("; already delivered to alice")


def relay_with_team(directory: Path) -> RelayProcess:
    """Return a ``relay serve`` with two workers and a delivery process, where team@example.net is alice and carol."""
    (directory / "aliases").write_text("team: alice, carol\n")
    delivery = f"""
[delivery]
nameservers = ["127.0.0.1:{free_port("127.0.0.1")}"]
minimal_backoff_time = 0.3
maximal_backoff_time = 1
queue_scan_interval = 0.05
"""
    relay = RelayProcess(directory, workers=2, deliver=True, extra=delivery)
    config = relay.config_path.read_text()
    aliases = f'aliases = "{directory / "aliases"}"'
    relay.config_path.write_text(config.replace('users = ["rcpt"]', f'users = ["rcpt", "alice", "carol"]\n{aliases}'))
    return relay


def test_serve_restart_skips_delivered_targets(tmp_path: Path) -> None:
    # relay serve defers team@ because carol's "new" folder is a file, and
    # is stopped with SIGTERM.  The next relay serve, with carol's folder
    # repaired, writes to carol only.
    (tmp_path / "mail" / "carol").mkdir(parents=True)
    (tmp_path / "mail" / "carol" / "new").write_text("not a folder\n")
    relay = relay_with_team(tmp_path)
    with relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("dora@example.org", ["team@example.net"], BODY)
        assert wait_until(lambda: " deferred queue_id=" in relay.log()), relay.log()
    ((message, _),) = relay.spooled()
    (team,) = message.recipients
    assert team.delivered_targets == ("alice",)
    assert team.last_reply is not None
    assert team.last_reply.endswith("; already delivered to alice")

    (tmp_path / "mail" / "carol" / "new").unlink()
    restarted = relay_with_team(tmp_path)
    with restarted:
        assert wait_until(lambda: not restarted.spooled()), restarted.log()
    assert (copies_in(tmp_path, "alice"), copies_in(tmp_path, "carol")) == (1, 1)
    assert "delivered to alice, carol" in restarted.log()


def test_unknown_alias_member_bounces(
    tmp_path: Path, spool_for: Callable[[Config], Spool], caplog: pytest.LogCaptureFixture
) -> None:
    # ghost has no Maildir and is not in [local] users.  alice gets her one
    # copy, and ghost's copy bounces to dora with team as Original-Recipient.
    config = make_config(tmp_path, "team: alice, ghost\n")
    (tmp_path / "mail" / "dora").mkdir()
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test"])

    def settled() -> bool:
        return stored_message(config, queue_id) is None and copies(config, "dora") == 1

    with caplog.at_level(logging.INFO, logger="relay"):
        assert run_until(config, spool, settled)
    assert copies(config, "alice") == 1
    assert not (tmp_path / "mail" / "ghost").exists()

    (member,) = events(caplog, "alias_member_unknown")
    fields = member.__dict__["fields"]
    assert fields["queue_id"] == queue_id
    assert fields["to"] == "team@local.test"
    assert fields["members"] == ["ghost@local.test"]
    delivered = [
        record for record in events(caplog, "delivered") if record.__dict__["fields"]["to"] == "team@local.test"
    ]
    assert len(delivered) == 1
    assert delivered[0].__dict__["fields"]["reply"] == "250 2.0.0 expanded to alice, ghost@local.test"
    (bounced,) = events(caplog, "bounced")
    assert bounced.__dict__["fields"]["queue_id"] == fields["new_queue_id"]
    assert bounced.__dict__["fields"]["reply"] == "550 5.1.1 <ghost@local.test>: no such user here"

    (report,) = mailbox.Maildir(str(tmp_path / "mail" / "dora"), create=False)
    status = report.get_payload()[1].get_payload()[1]
    assert status["Action"] == "failed"
    assert status["Status"] == "5.1.1"
    assert status["Final-Recipient"] == "rfc822; ghost@local.test"
    assert status["Original-Recipient"] == "rfc822;team@local.test"
    assert " ".join(status["Diagnostic-Code"].split()) == "X-relay; 550 5.1.1 <ghost@local.test>: no such user here"


def test_unknown_alias_member_no_second_bounce(tmp_path: Path, spool_for: Callable[[Config], Spool]) -> None:
    # The members of a nested alias bounce in one DSN to dora, and the bounced
    # copy leaves nothing in the queue that could loop.
    config = make_config(tmp_path, "team: alice, helpers\nhelpers: ghost, nobody\n")
    (tmp_path / "mail" / "dora").mkdir()
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test"])

    def settled() -> bool:
        with SpoolStore(config.spool.path) as store:
            return not store.queue_ids() and copies(config, "dora") == 1

    assert run_until(config, spool, settled)
    assert stored_message(config, queue_id) is None
    assert (copies(config, "alice"), copies(config, "dora")) == (1, 1)
    (report,) = mailbox.Maildir(str(tmp_path / "mail" / "dora"), create=False)
    statuses = report.get_payload()[1].get_payload()[1:]
    final = [status["Final-Recipient"] for status in statuses]
    assert final == ["rfc822; ghost@local.test", "rfc822; nobody@local.test"]
    assert {status["Original-Recipient"] for status in statuses} == {"rfc822;team@local.test"}


def test_copy_of_copy_dsn_shows_first_id(tmp_path: Path, spool_for: Callable[[Config], Spool]) -> None:
    # team forwards a copy to fwd@, an alias too, whose copy then bounces
    # ghost.  The DSN shows the queue ID of the message dora submitted.
    config = make_config(tmp_path, "team: alice, fwd@local.test\nfwd: bob, ghost\n")
    (tmp_path / "mail" / "dora").mkdir()
    spool = spool_for(config)
    queue_id = commit(spool, ["team@local.test"])

    def settled() -> bool:
        with SpoolStore(config.spool.path) as store:
            return not store.queue_ids() and copies(config, "dora") == 1

    assert run_until(config, spool, settled)
    assert (copies(config, "alice"), copies(config, "bob")) == (1, 1)
    (report,) = mailbox.Maildir(str(tmp_path / "mail" / "dora"), create=False)
    fields = report.get_payload()[1].get_payload()[0]
    assert fields["X-Queue-ID"] == queue_id
    status = report.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; ghost@local.test"


def test_serve_bounces_unknown_alias_member(tmp_path: Path) -> None:
    # relay serve delivers alice's copy and bounces ghost's to rcpt, the sender.
    relay = relay_with_team(tmp_path)
    (tmp_path / "aliases").write_text("team: alice, ghost\n")
    with relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("rcpt@example.net", ["team@example.net"], BODY)
        assert wait_until(lambda: copies_in(tmp_path, "rcpt") == 1 and not relay.spooled()), relay.log()
    assert copies_in(tmp_path, "alice") == 1
    (line,) = [line for line in relay.log().splitlines() if " alias_member_unknown " in line]
    assert "to=team@example.net" in line
    assert "ghost@example.net" in line
    (report,) = mailbox.Maildir(str(tmp_path / "mail" / "rcpt"), create=False)
    status = report.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; ghost@example.net"
    assert status["Original-Recipient"] == "rfc822;team@example.net"


def test_serve_dsn_shows_submitted_queue_id(tmp_path: Path) -> None:
    # ghost's copy has a queue ID of its own, which the sender never saw.
    # The DSN shows the ID from the 250 reply to the end of data instead.
    relay = relay_with_team(tmp_path)
    (tmp_path / "aliases").write_text("team: alice, ghost\n")
    with relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo()
            client.mail("rcpt@example.net")
            client.rcpt("team@example.net")
            code, text = client.data(BODY)
        assert wait_until(lambda: copies_in(tmp_path, "rcpt") == 1 and not relay.spooled()), relay.log()
    assert code == 250
    submitted_id = text.decode().rpartition(" ")[2]
    (line,) = [line for line in relay.log().splitlines() if " alias_member_unknown " in line]
    copy_id = line.split(" new_queue_id=")[1].split()[0]
    assert copy_id != submitted_id

    (report,) = mailbox.Maildir(str(tmp_path / "mail" / "rcpt"), create=False)
    status = report.get_payload()[1].get_payload()[0]
    assert status["X-Queue-ID"] == submitted_id
    assert report["Message-ID"].startswith(f"<{submitted_id}.")
    assert copy_id not in report.as_string()
