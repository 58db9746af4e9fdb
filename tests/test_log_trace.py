"""An operator can follow each message through ``relay serve``'s log by its queue ID.

A real ``relay serve`` with a local Maildir and an aiosmtpd next hop on
loopback receives mail over SMTP and from ``relay sendmail``.  The first
test reads back its JSON log lines for each queue ID: receipt, each
delivery attempt, the DSN, a forward by alias to a new queue ID, and
removal.  The others check the level, rate and fields of single events.
"""

from __future__ import annotations

import os
import resource
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from delivery_peers import RecordingHandler, run_upstream

from conftest import REPO_ROOT, free_port
from relay.metrics import SNAPSHOT_INTERVAL
from relay.smtp.implicit import ACCEPT_RETRY_DELAY
from tests.server_helpers import Listener, RelayProcess, make_certificate, wait_for_port, wait_until

CONFIG = """
[server]
hostname = "mx.example.test"
workers = {workers}

[[listener]]
address = "127.0.0.1:{port}"

[spool]
path = "{directory}/spool"

[policy]
local_domains = ["example.test"]

[local]
maildir_root = "{directory}/mail"
aliases = "{directory}/aliases"

[delivery]
mx_tls = "none"
minimal_backoff_time = "1s"
maximal_backoff_time = "1s"

[delivery.transport]
"remote.test" = "smtp:[127.0.0.1]:{next_hop_port}"

[log]
format = "json"

[admin]
address = "{admin}"
"""


class Serve:
    """One ``relay serve`` process whose JSON log goes to a file."""

    def __init__(self, directory: Path, next_hop_port: int, admin: str, workers: int) -> None:
        self.port = free_port()
        self.config = directory / "relay.toml"
        self.config.write_text(
            CONFIG.format(
                port=self.port, directory=directory, next_hop_port=next_hop_port, admin=admin, workers=workers
            )
        )
        self.log_path = directory / "relay.log"

    def events(self) -> list[dict[str, Any]]:
        """Return every log line so far as a JSON object; a line that is not one fails the test."""
        lines = self.log_path.read_bytes().splitlines()
        return [orjson.loads(line) for line in lines]

    def wait_for(self, event: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        """Return the first logged ``event`` with these field values, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.events():
                if line["event"] == event and all(line.get(key) == value for key, value in fields.items()):
                    return line
            assert time.monotonic() < deadline, f"no {event} {fields} logged; log:\n{self.log_path.read_text()}"
            time.sleep(0.05)


@contextmanager
def serve(directory: Path, next_hop_port: int, admin: str = "", workers: int = 1) -> Iterator[Serve]:
    server = Serve(directory, next_hop_port, admin, workers)
    with open(server.log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(server.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            cwd=directory,
        )
    try:
        wait_for_port("127.0.0.1", server.port, process=process)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def history(events: list[dict[str, Any]], queue_id: str) -> list[dict[str, Any]]:
    """Return the lines about queue_id, in log order."""
    return [line for line in events if line.get("queue_id") == queue_id]


def names(lines: list[dict[str, Any]]) -> list[str]:
    return [line["event"] for line in lines]


def test_message_life_traced_by_queue_id(tmp_path: Path) -> None:
    for user in ("alice", "bob"):
        (tmp_path / "mail" / user).mkdir(parents=True)
    (tmp_path / "aliases").write_text("fwd: carol@remote.test, bob\n")
    # The next hop itself accepts later@remote.test at the retry, because a
    # test lifting the refusal after the deferred line may be slower than the
    # 1 s backoff, and then the log would show more deferrals than one.
    handler = RecordingHandler(
        refuse={"nobody@remote.test": "550 5.1.1 no such user here"},
        reject_once={"later@remote.test": "451 4.3.0 try again later"},
    )
    next_hop_port = free_port()

    with run_upstream("127.0.0.1", next_hop_port, handler), serve(tmp_path, next_hop_port) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail(
                "alice@example.test",
                ["later@remote.test", "nobody@remote.test", "bob@example.test"],
                b"Subject: three recipients\r\n\r\nbody\r\n",
            )
            client.sendmail("alice@example.test", ["fwd@example.test"], b"Subject: alias\r\n\r\nbody\r\n")
        submitted = subprocess.run(
            [sys.executable, "-m", "relay", "sendmail", "--config", str(server.config),
             "-f", "alice@example.test", "bob@example.test"],
            input=b"Subject: from a program\n\nbody\n",
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            check=False,
            timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr

        first = server.wait_for("queued", recipients=3)["queue_id"]
        server.wait_for("removed", queue_id=first)
        alias = server.wait_for("queued", recipients=1)["queue_id"]
        forwarded = server.wait_for("forwarded", queue_id=alias)["new_queue_id"]
        server.wait_for("removed", queue_id=forwarded)
        picked_up = server.wait_for("picked_up", sender="alice@example.test")
        local = picked_up["queue_id"]
        server.wait_for("removed", queue_id=local)
        dsn = server.wait_for("dsn_queued", queue_id=first)["dsn_id"]
        server.wait_for("removed", queue_id=dsn)

    events = server.events()

    # The message to three recipients: one deferred then delivered, one bounced, one local.
    lines = history(events, first)
    assert names(lines)[0] == "queued"
    assert names(lines)[-1] == "removed"
    results = ("delivered", "deferred", "bounced")
    attempts = [(line["event"], line.get("to")) for line in lines if line["event"] in results]
    assert sorted(attempts) == sorted([
        ("deferred", "later@remote.test"),
        ("delivered", "later@remote.test"),
        ("bounced", "nobody@remote.test"),
        ("delivered", "bob@example.test"),
    ])
    assert attempts.index(("deferred", "later@remote.test")) < attempts.index(("delivered", "later@remote.test"))
    deferred = next(line for line in lines if line["event"] == "deferred")
    assert deferred["level"] == "info"
    assert deferred["dsn"] == "4.3.0"
    bounced = next(line for line in lines if line["event"] == "bounced")
    assert bounced["dsn"] == "5.1.1"
    assert bounced["reply"] == "550 5.1.1 no such user here"
    assert "dsn_queued" in names(lines)

    # The DSN about the bounce has its own queue ID, linked by dsn_queued.
    assert names(history(events, dsn)) == ["delivered", "removed"]
    assert history(events, dsn)[0]["to"] == "alice@example.test"

    # The alias: the forwarded copy has a new queue ID, linked to the old one.
    assert names(history(events, alias)) == ["queued", "forwarded", "delivered", "removed"]
    assert history(events, forwarded)[0]["to"] == "carol@remote.test"
    assert names(history(events, forwarded)) == ["delivered", "removed"]

    # relay sendmail's message starts with the scheduler's picked_up line.
    lines = history(events, local)
    assert names(lines) == ["picked_up", "delivered", "removed"]
    assert lines[0]["recipients"] == 1
    assert lines[0]["protocol"] == "local"
    assert lines[1]["to"] == "bob@example.test"
    # Only relay sendmail's message is picked up: DSNs and forwards are linked otherwise.
    assert [line["queue_id"] for line in events if line["event"] == "picked_up"] == [local]


def test_local_deferral_is_warning(tmp_path: Path) -> None:
    # A Maildir whose tmp folder is a file cannot take a message: a fault of
    # this host that an operator watching warnings must see.
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    (tmp_path / "mail" / "bob" / "tmp").write_text("not a folder\n")
    (tmp_path / "aliases").write_text("")

    with serve(tmp_path, free_port()) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: local\r\n\r\nbody\r\n")
        deferred = server.wait_for("deferred", to="bob@example.test")

    assert deferred["level"] == "warning"
    assert deferred["relay"] == "local"
    assert deferred["reply"].startswith("451 4.3.0 local delivery failed: ")


def test_snapshot_failure_logged_once_a_minute(tmp_path: Path) -> None:
    # The snapshot is saved every 2 s; a folder that cannot take it must not
    # add an identical warning to the log each time.
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "metrics").write_text("a file where the snapshot folder belongs\n")
    (tmp_path / "aliases").write_text("")

    with serve(tmp_path, free_port(), admin=f"127.0.0.1:{free_port()}") as server:
        first = server.wait_for("metrics_snapshot_failed")
        # Three more snapshot intervals.
        time.sleep(3 * SNAPSHOT_INTERVAL + 0.5)
        failures = [line for line in server.events() if line["event"] == "metrics_snapshot_failed"]

    assert failures == [first]
    assert first["level"] == "warning"
    assert first["failures"] == 1
    assert "metrics" in first["error"]


def test_stopping_lines_name_their_process(tmp_path: Path) -> None:
    # With several workers and the delivery process on one standard error,
    # each process's stopping line must say which process it is.
    (tmp_path / "aliases").write_text("")

    with serve(tmp_path, free_port(), workers=2) as server:
        for worker in range(3):
            server.wait_for("started", worker=worker)

    stopping = [line for line in server.events() if line["event"] == "stopping"]
    assert sorted(line.get("worker") for line in stopping) == [0, 1, 2]
    for line in stopping:
        assert line["signal"] == "SIGTERM"


@pytest.mark.parametrize(
    ("tls", "event_loop"),
    [("implicit", "uvloop"), ("none", "asyncio")],
    ids=["implicit-tls-listener", "plain-listener-asyncio"],
)
def test_accept_failure_logged_once_a_minute(tmp_path: Path, tls: str, event_loop: str) -> None:
    # Out of file descriptors, a listener retries its accept every second and
    # fails each time, but only the first failure of the minute may be logged.
    # Under uvloop a plain listener logs nothing, because libuv closes such clients.
    relay = RelayProcess(
        tmp_path,
        event_loop=event_loop,
        listeners=[Listener(tls=tls)],
        certificate=make_certificate(tmp_path) if tls == "implicit" else None,
    )
    clients: list[socket.socket] = []
    with relay:
        assert relay.process is not None
        pid = relay.process.pid
        open_files = len(os.listdir(f"/proc/{pid}/fd"))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_files + 2, hard))
        try:
            for _ in range(12):
                clients.append(socket.create_connection(("127.0.0.1", relay.port), timeout=5))
            assert wait_until(lambda: "accept_failed" in relay.log()), relay.log()
            # Three more retries, each a second apart.
            time.sleep(3.5)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            for client in clients:
                client.close()
        # asyncio schedules a retry for each failed accept, and one that runs
        # after the listener closed raises: let them all run before the stop.
        time.sleep(ACCEPT_RETRY_DELAY + 0.5)

        # The listener accepts again once descriptors are free.
        if tls == "implicit":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP_SSL("127.0.0.1", relay.port, timeout=10, context=context) as client:
                assert client.noop()[0] == 250
        else:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
                assert client.noop()[0] == 250

    failures = [line for line in relay.log().splitlines() if " accept_failed " in line]
    assert len(failures) == 1, relay.log()
    assert f"listener=127.0.0.1:{relay.port}" in failures[0]
    assert "Too many open files" in failures[0]
    assert failures[0].endswith(" failures=1")
    assert " error relay.smtp: " in failures[0]


def test_sendmail_dsn_linked_by_picked_up(tmp_path: Path) -> None:
    # relay sendmail queues a DSN for the recipient it rejects, and the
    # relay's log must link that DSN to the message it reports on.
    for user in ("alice", "bob"):
        (tmp_path / "mail" / user).mkdir(parents=True)
    (tmp_path / "aliases").write_text("")
    handler = RecordingHandler(refuse={"later@remote.test": "451 4.3.0 try again later"})
    next_hop_port = free_port()

    with run_upstream("127.0.0.1", next_hop_port, handler), serve(tmp_path, next_hop_port) as server:
        submitted = subprocess.run(
            [sys.executable, "-m", "relay", "sendmail", "--config", str(server.config),
             "-f", "alice@example.test", "bob@example.test", "later@remote.test", "ghost@example.test"],
            input=b"Subject: from a program\n\nbody\n",
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            check=False,
            timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr
        original = server.wait_for("picked_up", sender="alice@example.test")["queue_id"]
        dsn = server.wait_for("picked_up", original_queue_id=original)["queue_id"]
        server.wait_for("deferred", queue_id=original, to="later@remote.test")
        del handler.refuse["later@remote.test"]
        server.wait_for("removed", queue_id=original)
        server.wait_for("removed", queue_id=dsn)

    events = server.events()
    # The command names the message it queued, but not the DSN.
    assert f"queued as {original} for the valid recipients".encode() in submitted.stderr
    assert dsn.encode() not in submitted.stderr

    # The retry of later@remote.test is a second claim of the message, but
    # the message is picked up once, and so is its DSN.
    lines = history(events, original)
    assert names(lines).count("picked_up") == 1
    assert names(lines)[0] == "picked_up"
    assert lines[0]["recipients"] == 2
    assert "original_queue_id" not in lines[0]
    delivered = sorted(line["to"] for line in lines if line["event"] == "delivered")
    assert delivered == ["bob@example.test", "later@remote.test"]

    dsn_lines = history(events, dsn)
    assert names(dsn_lines) == ["picked_up", "delivered", "removed"]
    assert dsn_lines[0]["sender"] == ""
    assert dsn_lines[0]["recipients"] == 1
    assert dsn_lines[0]["original_queue_id"] == original
    assert dsn_lines[1]["to"] == "alice@example.test"
