"""systemd readiness: `relay serve` reports READY=1, RELOADING=1 and STOPPING=1 on NOTIFY_SOCKET.

The sequences are those that ``Type=notify`` and ``Type=notify-reload``
units expect (sd_notify(3), systemd.service(5)).
"""

from __future__ import annotations

import logging
import os
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port
from relay.notify import Notifier, SupervisorReports
from tests.server_helpers import wait_for_port

CONFIG = """
[server]
hostname = "mx.example.test"
workers = {workers}

[[listener]]
address = "127.0.0.1:{port}"

[spool]
path = "spool"

[policy]
local_domains = ["example.test"]
max_recipients = {max_recipients}

[local]
maildir_root = "mail"
users = ["alice", "bob"]

[admin]
address = "{admin}"
"""

# Bounds every wait for a report or a log line; startup takes well under a second.
TIMEOUT = 15.0


class ServeRun:
    """One `relay serve` subprocess started with NOTIFY_SOCKET set to ``notify_socket``."""

    def __init__(self, directory: Path, workers: int, notify_socket: str, *, admin: bool = False) -> None:
        self.directory = directory
        self.workers = workers
        self.port = free_port()
        self.admin_port = free_port() if admin else 0
        self.config = directory / "relay.toml"
        self.write_config(max_recipients=1000)
        self.log_path = directory / "relay.log"
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), NOTIFY_SOCKET=notify_socket)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=directory,
            )

    def write_config(self, max_recipients: int) -> None:
        admin = f"127.0.0.1:{self.admin_port}" if self.admin_port else ""
        text = CONFIG.format(workers=self.workers, port=self.port, max_recipients=max_recipients, admin=admin)
        self.config.write_text(text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.log().count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s); log:\n{self.log()}"
            assert self.process.poll() is None, self.log()
            time.sleep(0.02)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


class NotifyListener:
    """The service manager's side: a unix datagram socket that records each report and its sender's PID."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        # systemd checks the sender's PID the same way, from SCM_CREDENTIALS.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = TIMEOUT) -> tuple[dict[str, str], int]:
        """Return the next report as a dict of its fields, and the PID that sent it."""
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _address = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        sender = -1
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack("iII", value[: struct.calcsize("iII")])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return fields, sender

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_listener(tmp_path: Path) -> Iterator[tuple[NotifyListener, str]]:
    path = tmp_path / "notify"
    listener = NotifyListener(str(path))
    try:
        yield listener, str(path)
    finally:
        listener.close()


def read_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        return client.recv(512)


def second_recipient_codes(port: int, connections: int = 8) -> list[int]:
    """Return the reply code to a second RCPT on each of several connections, spread over the workers."""
    codes = []
    for _ in range(connections):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.example.com")
            client.mail("sender@example.org")
            client.rcpt("alice@example.test")
            code, _ = client.rcpt("bob@example.test")
            codes.append(code)
    return codes


def admin_status(port: int) -> bytes:
    """Send one GET /healthz without any retry; return the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        return client.recv(4096).split(b"\r\n", 1)[0]


def monotonic_usec() -> int:
    # CLOCK_MONOTONIC is one clock for every process on the machine, so it compares with the relay's.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_reports_ready_reload_stopping(
    tmp_path: Path, notify_listener: tuple[NotifyListener, str], workers: int
) -> None:
    listener, path = notify_listener
    run = ServeRun(tmp_path, workers, path, admin=True)
    try:
        fields, sender = listener.receive()

        assert fields.get("READY") == "1", fields
        # No retry: READY=1 waits for the admin listener as well as the SMTP listeners.
        assert admin_status(run.admin_port) == b"HTTP/1.1 200 OK"
        assert f"127.0.0.1:{run.port} (mx)" in fields.get("STATUS", ""), fields
        # NotifyAccess=main: only the process systemd started may report.
        assert sender == run.process.pid
        assert read_greeting(run.port).startswith(b"220 ")
        assert second_recipient_codes(run.port, connections=1) == [250]

        run.write_config(max_recipients=1)
        requested = monotonic_usec()
        # Type=notify-reload sends SIGHUP, as does ExecReload=kill -HUP $MAINPID.
        run.process.send_signal(signal.SIGHUP)
        reloading, sender = listener.receive()

        assert reloading.get("RELOADING") == "1", reloading
        assert int(reloading["MONOTONIC_USEC"]) >= requested, reloading
        assert sender == run.process.pid

        fields, sender = listener.receive()

        assert fields.get("READY") == "1", fields
        assert "rejected" not in fields.get("STATUS", ""), fields
        assert sender == run.process.pid
        # Every worker applies the new limit by the time READY=1 arrives.
        assert second_recipient_codes(run.port) == [452] * 8
        # Each worker reloaded, and with several workers the delivery process too.
        # Their own lines are then debug lines, and the supervisor logs one summary.
        if workers == 1:
            run.wait_for_log(" reloaded ", count=1)
        else:
            run.wait_for_log(" reload_summary ", count=1)
            assert 'applied=worker-0,worker-1,delivery rejected=""' in run.log(), run.log()

        run.process.send_signal(signal.SIGTERM)
        fields, sender = listener.receive()

        assert fields.get("STOPPING") == "1", fields
        assert sender == run.process.pid
    finally:
        status = run.stop()
    assert status == 0, run.log()
    # Nothing follows STOPPING=1.
    with pytest.raises(TimeoutError):
        listener.receive(timeout=0.2)
    assert "notify_failed" not in run.log()
    assert "Traceback" not in run.log(), run.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_reports_rejected_reload(
    tmp_path: Path, notify_listener: tuple[NotifyListener, str], workers: int
) -> None:
    listener, path = notify_listener
    run = ServeRun(tmp_path, workers, path)
    try:
        fields, _ = listener.receive()
        assert fields.get("READY") == "1", fields

        run.config.write_text(run.config.read_text().replace("max_recipients = 1000", "max_recipients = many"))
        run.process.send_signal(signal.SIGHUP)
        reloading, _ = listener.receive()
        fields, _ = listener.receive()

        assert reloading.get("RELOADING") == "1", reloading
        # A rejected file still ends the reload, so that systemctl reload returns.
        assert fields.get("READY") == "1", fields
        assert "rejected" in fields.get("STATUS", ""), fields
        run.wait_for_log(" reload_failed ", count=1)
        # The running config stays in force.
        assert second_recipient_codes(run.port, connections=2) == [250, 250]
    finally:
        status = run.stop()
    assert status == 0, run.log()
    assert "Traceback" not in run.log(), run.log()


def admin_get(port: int, target: str) -> bytes:
    """Return the body of one GET to the admin listener."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(f"GET {target} HTTP/1.1\r\nHost: relay.test\r\n\r\n".encode())
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    return response.partition(b"\r\n\r\n")[2]


def test_rejected_reload_logged_once_and_shown(tmp_path: Path, notify_listener: tuple[NotifyListener, str]) -> None:
    listener, path = notify_listener
    run = ServeRun(tmp_path, 2, path, admin=True)
    try:
        fields, _ = listener.receive()
        assert fields.get("READY") == "1", fields
        assert admin_get(run.admin_port, "/healthz") == b"ok\n"
        assert b"\nrelay_config_last_reload_successful 1\n" in admin_get(run.admin_port, "/metrics")

        good = run.config.read_text()
        run.config.write_text(good.replace("max_recipients = 1000", "max_recipients = many"))
        run.process.send_signal(signal.SIGHUP)
        assert listener.receive()[0].get("RELOADING") == "1"
        assert listener.receive()[0].get("READY") == "1"

        health = admin_get(run.admin_port, "/healthz")
        assert health.startswith(b"ok\n"), health
        assert b"reload was rejected" in health
        assert b"\nrelay_config_last_reload_successful 0\n" in admin_get(run.admin_port, "/metrics")

        run.config.write_text(good)
        run.process.send_signal(signal.SIGHUP)
        assert listener.receive()[0].get("RELOADING") == "1"
        assert listener.receive()[0].get("READY") == "1"

        assert admin_get(run.admin_port, "/healthz") == b"ok\n"
        assert b"\nrelay_config_last_reload_successful 1\n" in admin_get(run.admin_port, "/metrics")
    finally:
        status = run.stop()
    log = run.log()

    assert status == 0, log
    # Two workers and the delivery process read the same bad file: one error line, not three.
    assert log.count(" reload_failed ") == 1, log
    assert "error relay.reload: reload_failed worker=0" in log, log


def test_serve_reports_hangups_in_a_row(tmp_path: Path, notify_listener: tuple[NotifyListener, str]) -> None:
    listener, path = notify_listener
    run = ServeRun(tmp_path, 2, path)
    reports: list[dict[str, str]] = []
    try:
        fields, _ = listener.receive()
        assert fields.get("READY") == "1", fields

        run.write_config(max_recipients=1)
        requested = monotonic_usec()
        for _ in range(3):
            run.process.send_signal(signal.SIGHUP)
        # Reports until none has come for a second; the whole exchange takes well under that.
        while True:
            try:
                fields, _ = listener.receive(timeout=1.0)
            except TimeoutError:
                break
            reports.append(fields)
            assert len(reports) < 20, reports

        assert reports, "no report after three SIGHUPs"
        assert reports[0].get("RELOADING") == "1", reports
        assert reports[-1].get("READY") == "1", reports
        # A SIGHUP during a reload may add a RELOADING=1, but READY=1 comes only after one.
        kinds = ["RELOADING" if "RELOADING" in fields else "READY" for fields in reports]
        assert ["READY", "READY"] not in [kinds[i : i + 2] for i in range(len(kinds) - 1)], reports
        assert set(kinds) == {"RELOADING", "READY"}, reports
        assert all(int(fields["MONOTONIC_USEC"]) >= requested for fields in reports if "RELOADING" in fields)
        assert second_recipient_codes(run.port) == [452] * 8
    finally:
        status = run.stop()
    assert status == 0, run.log()
    assert "Traceback" not in run.log(), run.log()


def test_serve_runs_when_notify_socket_missing(tmp_path: Path) -> None:
    run = ServeRun(tmp_path, 1, str(tmp_path / "missing"))
    try:
        wait_for_port("127.0.0.1", run.port, timeout=TIMEOUT, process=run.process)
        with smtplib.SMTP("127.0.0.1", run.port, timeout=10) as client:
            client.ehlo("client.example.com")
            client.mail("sender@example.org")
            code, _ = client.rcpt("alice@example.test")
        assert code == 250
    finally:
        status = run.stop()
    log = run.log()

    assert status == 0, log
    # READY=1 and STOPPING=1 both failed; only the first failure is logged.
    assert log.count("notify_failed") == 1, log
    assert str(tmp_path / "missing") in log


def test_notifier_abstract_socket() -> None:
    name = f"relay-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    listener = NotifyListener(b"\0" + name.encode())
    try:
        notifier = Notifier("@" + name)

        assert notifier.send("READY=1\nSTATUS=up")
        fields, sender = listener.receive(timeout=5)
    finally:
        listener.close()

    assert fields == {"READY": "1", "STATUS": "up"}
    assert sender == os.getpid()


def test_notifier_relative_path_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier("run/notify")

    with caplog.at_level(logging.WARNING, logger="relay.notify"):
        assert not notifier.send("READY=1")
        assert not notifier.send("STOPPING=1")
    warnings = [record for record in caplog.records if getattr(record, "event", None) == "notify_failed"]

    assert len(warnings) == 1
    assert warnings[0].fields["socket"] == "run/notify"  # type: ignore[attr-defined]
    assert "absolute path" in warnings[0].fields["error"]  # type: ignore[attr-defined]


def test_notifier_without_socket_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()

    assert not notifier.enabled
    assert not notifier.send("READY=1")


def test_notifier_takes_socket_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    notifier = Notifier.from_environment()

    assert notifier.address == "/run/systemd/notify"
    # Removed, so that child processes cannot report in the main process's place.
    assert "NOTIFY_SOCKET" not in os.environ


def test_requests_after_reports_end_ignored(tmp_path: Path) -> None:
    # The reporting thread ends once every child has exited, and closes its
    # end of the request pipe.  A SIGHUP or SIGTERM that reaches the
    # supervisor after that, before it exits, must not raise BrokenPipeError.
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        reports = SupervisorReports(Notifier(path), "status", workers=1, children=1)
        # No child has the write end of the report pipe open, so the thread reaches its end of file at once.
        thread = reports.start()
        thread.join(5)
        assert not thread.is_alive()

        reports.request_reload()
        reports.request_stop()
