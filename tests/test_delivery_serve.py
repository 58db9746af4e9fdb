"""``relay serve`` end to end: SMTP in, spool, MX lookup or smart host, SMTP out to an aiosmtpd upstream.

Each test runs a real ``relay serve`` process, sends with smtplib, and checks
what the upstream received against what was sent: byte for byte after the
Received header the relay prepends.  One test kills the relay with SIGKILL
while it delivers and checks that a restart delivers the rest at once.
"""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay.config import load_config
from relay.delivery.process import DeliveryProcess
from relay.spool import Envelope, Recipient, Spool, SpoolStore
from tests.conftest import free_port, require_corpus
from tests.delivery_peers import (
    NameServer,
    RecordingHandler,
    accept_login,
    make_certificate,
    run_nsd,
    run_upstream,
)
from tests.server_helpers import RelayProcess, strip_received, wait_until

MESSAGES = 1000
CLIENTS = 4


@pytest.fixture(scope="module")
def nameserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NameServer]:
    with run_nsd(tmp_path_factory.mktemp("nsd")) as server:
        yield server


def corpus_bodies() -> list[bytes]:
    """Return the corpus messages as a client sends them: CRLF line ends, ending with CRLF."""
    files = sorted(require_corpus("cpython-email").glob("msg_*.txt"))
    assert len(files) == 48
    bodies = []
    for path in files:
        crlf = re.sub(rb"\r\n|\r|\n", b"\r\n", path.read_bytes())
        bodies.append(crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n")
    return bodies


def send_all(port: int, messages: dict[str, bytes]) -> None:
    """Send each message to its recipient over ``CLIENTS`` parallel smtplib connections."""
    addresses = sorted(messages)

    def send_share(share: list[str]) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for address in share:
                client.sendmail("alice@example.com", [address], messages[address])

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(send_share, [addresses[start::CLIENTS] for start in range(CLIENTS)]))


def spool_empty(relay: RelayProcess) -> bool:
    """Return whether no recipient is left in the spool (safe while the scheduler deletes messages)."""
    store = SpoolStore(relay.spool)
    try:
        return not store.counts()
    finally:
        store.close()


def check_delivered(relay: RelayProcess, upstream: RecordingHandler, messages: dict[str, bytes]) -> None:
    assert wait_until(lambda: len(upstream.messages) >= len(messages) and spool_empty(relay), 60), (
        f"{len(upstream.messages)} of {len(messages)} delivered; log:\n{relay.log()[-3000:]}"
    )
    received = {m.recipients[0]: m.data for m in upstream.messages}
    assert sorted(received) == sorted(messages)
    for address, body in messages.items():
        assert strip_received(received[address]) == body, address


def delivery_section(nameserver: NameServer, port: int, settings: str = "") -> str:
    return f"""
[delivery]
nameservers = ["127.0.0.1:{nameserver.port}"]
smtp_port = {port}
connect_timeout = 2
allow_loopback_mx = true
{settings}
"""


def test_serve_corpus_through_mx(tmp_path: Path, nameserver: NameServer) -> None:
    bodies = corpus_bodies()
    messages = {f"user{index}@mx.test": bodies[index % len(bodies)] for index in range(MESSAGES)}
    port = free_port("127.0.0.3")
    # The first MX (127.0.0.2) has no listener, so every connection falls back to the second.
    relay = RelayProcess(tmp_path, workers=2, deliver=True, extra=delivery_section(nameserver, port))
    with run_upstream("127.0.0.3", port) as upstream, relay:
        send_all(relay.port, messages)
        check_delivered(relay, upstream, messages)
    assert upstream.connections < MESSAGES


def test_stop_leaves_only_spool_db(tmp_path: Path, nameserver: NameServer) -> None:
    # With two workers the delivery process also reads through connections of
    # its own reader threads.  Every process closes each of its connections at
    # a stop, so the last one to close checkpoints the WAL, and SQLite removes
    # -wal and -shm: spool.db alone then holds every commit, as a backup expects.
    messages = {f"user{index}@mx.test": b"Subject: stop\r\n\r\nbody\r\n" for index in range(20)}
    port = free_port("127.0.0.3")
    relay = RelayProcess(tmp_path, workers=2, deliver=True, extra=delivery_section(nameserver, port))
    with run_upstream("127.0.0.3", port) as upstream, relay:
        send_all(relay.port, messages)
        check_delivered(relay, upstream, messages)

    assert sorted(path.name for path in relay.spool.glob("spool.db*")) == ["spool.db"]


def test_serve_corpus_through_smart_host(tmp_path: Path, nameserver: NameServer) -> None:
    bodies = corpus_bodies()
    messages = {f"user{index}@example.org": bodies[index % len(bodies)] for index in range(MESSAGES)}
    cert, key = make_certificate(tmp_path)
    (tmp_path / "password").write_text("secret\n")
    port = free_port("127.0.0.6")
    settings = (
        f'relayhost = "[127.0.0.6]:{port}"\nrelayhost_username = "relay"\n'
        f'relayhost_password_file = "{tmp_path / "password"}"\ntls_ca_file = "{cert}"'
    )
    relay = RelayProcess(tmp_path, workers=2, deliver=True, extra=delivery_section(nameserver, 25, settings))
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    with run_upstream("127.0.0.6", port, tls_context=server_tls, require_starttls=True,
                      authenticator=accept_login, auth_required=True) as upstream, relay:
        send_all(relay.port, messages)
        check_delivered(relay, upstream, messages)
    assert all(message.tls for message in upstream.messages)


def test_long_lines_folded_for_aiosmtpd(tmp_path: Path, nameserver: NameServer) -> None:
    # aiosmtpd rejects a DATA line over 1000 octets with "500 Line too long", so without
    # delivery.line_length_limit the message would bounce.
    header = b"X-Long: " + b" ".join(b"item%d" % i for i in range(300)) + b"\r\n"
    body = b"Subject: long lines\r\n" + header + b"\r\n" + b"q" * 2500 + b"\r\nend\r\n"
    port = free_port("127.0.0.3")
    relay = RelayProcess(tmp_path, deliver=True, extra=delivery_section(nameserver, port))
    with run_upstream("127.0.0.3", port) as upstream, relay:
        send_all(relay.port, {"user@mx.test": body})
        assert wait_until(lambda: len(upstream.messages) == 1 and spool_empty(relay), 30), relay.log()[-3000:]
    received = strip_received(upstream.messages[0].data)
    assert max(len(line) for line in received.split(b"\r\n")) <= 998
    headers, _, text = received.partition(b"\r\n\r\n")
    assert headers.replace(b"\r\n ", b" ") + b"\r\n" == b"Subject: long lines\r\n" + header
    assert text == b"q" * 998 + b"\r\n " + b"q" * 997 + b"\r\n " + b"q" * 505 + b"\r\nend\r\n"


class SlowHandler(RecordingHandler):
    """Holds each end of data for a moment, so a kill lands while transactions are in flight."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.02)
        return await super().handle_DATA(server, session, envelope)


def test_kill_during_delivery_then_restart(tmp_path: Path, nameserver: NameServer) -> None:
    count = 300
    concurrency = 4
    body = b"Subject: kill test\r\n\r\nbody\r\n"
    messages = {f"user{index}@implicit.test": body for index in range(count)}
    port = free_port("127.0.0.4")
    settings = f"destination_concurrency_limit = {concurrency}\nconnection_cache_time = 5"
    relay = RelayProcess(tmp_path, deliver=True, extra=delivery_section(nameserver, port, settings))
    handler = SlowHandler()
    with run_upstream("127.0.0.4", port, handler) as upstream:
        relay.start()
        try:
            send_all(relay.port, messages)
            assert wait_until(lambda: len(upstream.messages) >= 50, 30)
            relay.kill()
        finally:
            relay.kill()
        before_restart = len(upstream.messages)
        assert before_restart < count, "every message was delivered before the kill"
        # The leases of the killed scheduler would otherwise hold its recipients for
        # spool.lease_time (30 minutes); the restart must release them at once.
        relay.start()
        try:
            assert wait_until(lambda: spool_empty(relay), 30), relay.log()[-3000:]
            assert relay.stop() == 0
        finally:
            relay.kill()
    assert "leases_released" in relay.log()
    delivered = Counter(address for message in upstream.messages for address in message.recipients)
    assert sorted(delivered) == sorted(messages)
    duplicates = sum(times - 1 for times in delivered.values())
    # Only transactions in flight at the kill may be repeated: at most one per connection.
    assert duplicates <= concurrency


@pytest.mark.parametrize("workers", [1, 2])
def test_commit_wakes_scheduler(tmp_path: Path, nameserver: NameServer, workers: int) -> None:
    port = free_port("127.0.0.4")
    # With a one-minute scan, only the wake-up after the commit delivers in time.
    # Two workers put the scheduler in a delivery process, woken through a pipe.
    settings = "queue_scan_interval = 60"
    relay = RelayProcess(
        tmp_path, workers=workers, deliver=True, extra=delivery_section(nameserver, port, settings)
    )
    with run_upstream("127.0.0.4", port) as upstream, relay:
        time.sleep(0.5)
        send_all(relay.port, {"user@implicit.test": b"Subject: wake\r\n\r\nbody\r\n"})
        assert wait_until(lambda: len(upstream.messages) == 1, 10)


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_delivery_process_idle_after_wake_pipe_closes(tmp_path: Path, nameserver: NameServer) -> None:
    # When every receiving worker has exited, the wake-up pipe reads end of
    # file.  The delivery process must stop watching it instead of spinning on
    # it, and still deliver mail that it finds at its queue scan.  relay serve
    # stops every process when a worker exits, so the delivery process runs
    # here in the test's own event loop, with a pipe whose write end is closed.
    port = free_port("127.0.0.4")
    relay = RelayProcess(
        tmp_path, workers=2, deliver=True, extra=delivery_section(nameserver, port, "queue_scan_interval = 1")
    )
    config = load_config(str(relay.config_path))
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.close(write_end)
    process = DeliveryProcess(config, index=2, wake_fd=read_end)

    async def exercise(upstream: Any) -> float:
        running = asyncio.get_running_loop().create_task(process.run())
        try:
            await asyncio.sleep(0.5)
            before = time.process_time()
            await asyncio.sleep(2.0)
            used = time.process_time() - before

            # Mail stored without a wake-up, as relay sendmail stores it, goes out at the next scan.
            spool = Spool.from_config(config.spool)
            try:
                spool.commit_blocking(
                    Envelope(sender="alice@example.com", recipients=(Recipient(address="user@implicit.test"),)),
                    b"Subject: after the workers\r\n\r\nbody\r\n",
                )
            finally:
                spool.close()
            deadline = time.monotonic() + 5
            while not upstream.messages and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return used
        finally:
            process._stop.set()
            await running

    try:
        with run_upstream("127.0.0.4", port) as upstream:
            used = asyncio.run(exercise(upstream))
    finally:
        os.close(read_end)
    assert used < 0.5, f"the test process used {used:.2f} s of CPU in 2 s with nothing to do"
    assert len(upstream.messages) == 1
