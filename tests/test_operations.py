"""`relay serve` operations: SIGHUP reload and /metrics against a running relay."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, free_port, require_peer, unprivileged_command
from relay.config import TLSConfig
from relay.signals import DUPLICATE_WINDOW
from relay.smtp.tls import TLSSetupError, server_context
from tests.delivery_peers import RecordingHandler, run_upstream
from tests.server_helpers import RawClient, RelayProcess, make_certificate, wait_for_port, wait_until

# Loopback is not trusted here, so relaying to other domains is denied and
# policy changes show in RCPT replies.
BASE = """
[server]
hostname = "mx.example.test"
workers = {workers}

[[listener]]
address = "127.0.0.1:{port}"

[spool]
path = "spool"

[policy]
local_domains = [{domains}]
trusted_networks = ["192.0.2.0/24"]

[local]
maildir_root = "mail"
users = ["alice"]

[delivery]
minimal_backoff_time = "1h"

[delivery.transport]
{transport}

[admin]
address = "127.0.0.1:{admin_port}"

# Worker 0 alone logs a rejected file at error level, the other processes at
# debug level; the tests count every process's line to know that all have reloaded.
[log]
level = "debug"
"""


class Relay:
    def __init__(self, directory: Path, workers: int, transport: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.admin_port = free_port()
        self.workers = workers
        self.transport = transport
        self.config = directory / "relay.toml"
        self.log_path = directory / "relay.log"
        self.write(domains='"example.test"')
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, domains: str, broken: bool = False) -> None:
        text = BASE.format(
            workers=self.workers, port=self.port, domains=domains, transport=self.transport, admin_port=self.admin_port
        )
        if broken:
            text += "\n[policy.extra]\nmax_recipients = \"many\"\n"
        self.config.write_text(text)

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                cwd=self.directory,
            )
        wait_for_port("127.0.0.1", self.port, process=self.process)
        wait_for_port("127.0.0.1", self.admin_port, process=self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s); log:\n{self.log()}"
            time.sleep(0.05)

    def stop(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert "Traceback" not in self.log(), self.log()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    server = Relay(tmp_path, workers=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def rcpt_code(port: int, recipient: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example.com")
        client.mail("sender@example.org")
        code, _ = client.rcpt(recipient)
        return code


def test_sighup_adds_domain_without_dropping_session(relay: Relay) -> None:
    open_session = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    open_session.ehlo("client.example.com")
    assert rcpt_code(relay.port, "alice@new.test") == 554

    relay.write(domains='"example.test", "new.test"')
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    relay.wait_for_log("reloaded", count=2)

    # Both workers took the change; SO_REUSEPORT spreads the sessions over them.
    assert all(rcpt_code(relay.port, "alice@new.test") == 250 for _ in range(6))
    assert open_session.noop()[0] == 250
    open_session.mail("sender@example.org")
    assert open_session.rcpt("alice@example.test")[0] == 250
    open_session.quit()


def test_sighup_with_invalid_config_keeps_old(relay: Relay) -> None:
    relay.write(domains='"example.test"', broken=True)
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    relay.wait_for_log("reload_failed", count=2)

    assert rcpt_code(relay.port, "alice@example.test") == 250
    assert rcpt_code(relay.port, "alice@other.test") == 554
    assert "policy.extra" in relay.log()
    assert "reloaded" not in relay.log()


def test_sighup_during_startup_reaches_every_process(tmp_path: Path) -> None:
    # A SIGHUP that arrives while some workers are still starting is kept
    # and acted on once they are up, instead of being dropped or ending them.
    server = Relay(tmp_path, workers=3)
    with open(server.log_path, "wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(server.config)],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=tmp_path,
        )
    try:
        # Signal as soon as the supervisor, done with the config file, forks its first child.
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        deadline = time.monotonic() + 15
        while not children.read_text().split():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.001)
        server.write(domains='"example.test"', broken=True)
        server.process.send_signal(signal.SIGHUP)

        # Three workers and the delivery process each re-read the file.
        server.wait_for_log("reload_failed", count=4)
        wait_for_port("127.0.0.1", server.port, process=server.process)
        assert server.process.poll() is None
        assert rcpt_code(server.port, "alice@example.test") == 250
    finally:
        server.stop()


def pending_signal_mask(pid: int) -> int:
    """Return the blocked-signal mask of process ``pid`` from /proc (bit N-1 is signal N)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("SigBlk:")[1].split()[0], 16)


def test_entry_imports_nothing_heavy() -> None:
    # relay.entry blocks the signals before it imports the command line, so
    # the block comes before asyncio, ssl and the config code load only while
    # relay.entry itself imports none of them.  (Checking a running relay's
    # memory map instead races with its start-up on a busy machine.)
    code = "import sys, relay.entry; print(sorted(m for m in ('asyncio', 'ssl', 'relay.cli') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    assert result.stdout.strip() == "[]"


# Seconds that test_sighup_from_first_moment_survives waits for each step of
# the relay's startup.  Only a relay that never gets there uses it all, and
# with two workers four processes start, which on a busy machine takes seconds.
STARTUP_TIMEOUT = 60.0


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_from_first_moment_survives(tmp_path: Path, workers: int) -> None:
    # systemd may send ExecReload's SIGHUP right after the start.  Each round
    # signals as soon as relay serve holds SIGHUP back, then every few
    # milliseconds until it listens; the relay must come up and reload.
    sighup_bit = 1 << (signal.SIGHUP - 1)
    for attempt in range(3):
        directory = tmp_path / f"attempt{attempt}"
        directory.mkdir()
        server = Relay(directory, workers=workers)
        with open(server.log_path, "wb") as log:
            server.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(server.config)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=directory,
            )
        try:
            pid = server.process.pid
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while server.process.poll() is None and not pending_signal_mask(pid) & sighup_bit:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.0005)
            assert server.process.poll() is None, server.log()

            # The signals go on until the relay listens, however long its startup
            # takes on a busy machine, so that every step of the startup gets some.
            deadline = time.monotonic() + STARTUP_TIMEOUT
            listening = False
            while not listening and server.process.poll() is None and time.monotonic() < deadline:
                server.process.send_signal(signal.SIGHUP)
                with socket.socket() as probe:
                    listening = probe.connect_ex(("127.0.0.1", server.port)) == 0
                time.sleep(0.005)
            assert server.process.poll() is None, server.log()
            assert listening, f"relay did not listen within {STARTUP_TIMEOUT} s; log:\n{server.log()}"
            # A reload in each process: the workers, and with several of them the
            # delivery process (numbered after them).  Each is waited for by its
            # number, because a process may reload once for each of several SIGHUPs.
            for index in range(1 if workers == 1 else workers + 1):
                server.wait_for_log(f"reloaded worker={index} ", timeout=STARTUP_TIMEOUT)
            assert rcpt_code(server.port, "alice@example.test") == 250
        finally:
            server.stop()
        assert server.process.returncode == 0, server.log()


# The moments of a start at which the start-up signal tests send a signal.
# Each comes after the one before it.  relay serve has blocked its signals,
# the supervisor has forked, and the process that runs the scheduler is
# opening the spool with its event loop running.  The last two are delays.
STARTUP_MOMENTS = ("blocked", "forked", "opening_spool", "after_0.3s", "after_1s")
PROCESS_LINE = re.compile(r": (reloaded|reload_failed|started|stopping|stopped) (?:[^\n]* )?worker=(\d+)")


def start_blocking_signals(server: Relay, event_loop: str = "uvloop") -> subprocess.Popen[bytes]:
    """Start relay serve in a session of its own; return once it has blocked SIGHUP."""
    with open(server.log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(server.config), "--event-loop", event_loop],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            cwd=server.directory, start_new_session=True,
        )
    server.process = process
    # Before that, the interpreter's startup ends on the default action of SIGHUP.
    sighup_bit = 1 << (signal.SIGHUP - 1)
    deadline = time.monotonic() + 15
    while process.poll() is None and not pending_signal_mask(process.pid) & sighup_bit:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.0005)
    assert process.poll() is None, server.log()
    return process


def wait_for_moment(process: subprocess.Popen[bytes], workers: int, moment: str) -> None:
    """Wait until the start of ``process`` reaches ``moment``, one of ``STARTUP_MOMENTS``, or has passed it."""
    if moment.startswith("after_"):
        time.sleep(float(moment.removeprefix("after_").removesuffix("s")))
        return
    if moment == "blocked":
        return
    children_file = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 15
    while process.poll() is None and time.monotonic() < deadline:
        children = children_file.read_text().split()
        if moment == "forked" and (children or workers == 1):
            return
        if moment == "opening_spool":
            # The delivery process is forked last.  With one worker the first
            # process runs the scheduler.  Its spool writer is the first thread
            # it starts beside the loop's.
            scheduler_pid = None
            if workers == 1:
                scheduler_pid = str(process.pid)
            elif len(children) > workers:
                scheduler_pid = children[-1]
            if scheduler_pid is not None:
                try:
                    if len(list(Path(f"/proc/{scheduler_pid}/task").iterdir())) > 1:
                        return
                except FileNotFoundError:
                    return
        time.sleep(0.0002)


def lines_per_process(log: str, event: str) -> dict[int, int]:
    """Return how many ``event`` lines each process (by worker number) logged."""
    counts: dict[int, int] = {}
    for found_event, worker in PROCESS_LINE.findall(log):
        if found_event == event:
            counts[int(worker)] = counts.get(int(worker), 0) + 1
    return counts


def session_processes(session: int) -> list[int]:
    """Return the processes of ``session`` that have not exited, read from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def no_session_processes(session: int) -> bool:
    """Return whether every process of ``session`` has exited."""
    return not session_processes(session)


@pytest.mark.parametrize("workers", [1, 2])
def test_startup_sighup_reloads_once(tmp_path: Path, workers: int) -> None:
    # One SIGHUP per start, at a different moment of it each round.  Every
    # process re-reads the config exactly once, so none loses or doubles it.
    processes = 1 if workers == 1 else workers + 1
    expected = {worker: 1 for worker in range(processes)}
    during_startup = 0
    for moment in STARTUP_MOMENTS:
        directory = tmp_path / moment
        directory.mkdir()
        server = Relay(directory, workers=workers)
        process = start_blocking_signals(server)
        try:
            wait_for_moment(process, workers, moment)
            if len(lines_per_process(server.log(), "started")) < processes:
                during_startup += 1
            process.send_signal(signal.SIGHUP)

            wait_for_port("127.0.0.1", server.port, process=process)
            server.wait_for_log("reloaded", count=processes)
            # Long enough for a second reload, which would follow within milliseconds.
            time.sleep(0.5)
            log = server.log()
            assert lines_per_process(log, "reloaded") == expected, f"SIGHUP at {moment}:\n{log}"
            assert lines_per_process(log, "reload_failed") == {}, log
            assert lines_per_process(log, "started") == expected, log
        finally:
            server.stop()
        assert process.returncode == 0, server.log()
    # Unless start-up is far faster than here, some rounds hit it.
    assert during_startup > 0


@pytest.mark.parametrize(
    ("workers", "signum", "event_loop"),
    [(1, signal.SIGTERM, "uvloop"), (2, signal.SIGTERM, "uvloop"), (2, signal.SIGINT, "asyncio")],
)
def test_startup_stop_signal_stops_once(tmp_path: Path, workers: int, signum: int, event_loop: str) -> None:
    # A stop sent while relay serve starts ends every process once and
    # cleanly, with status 0, one stopping line each and no process left.
    processes = 1 if workers == 1 else workers + 1
    expected = {worker: 1 for worker in range(processes)}
    for moment in STARTUP_MOMENTS:
        directory = tmp_path / moment
        directory.mkdir()
        server = Relay(directory, workers=workers)
        process = start_blocking_signals(server, event_loop)
        try:
            wait_for_moment(process, workers, moment)
            process.send_signal(signum)
            returncode = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log = server.log()
        assert returncode == 0, f"{signal.Signals(signum).name} at {moment}:\n{log}"
        assert "Traceback" not in log, log
        assert "exit_now" not in log, log
        assert "worker_exit" not in log, log
        # Every process forks and reaches its loop before it acts on the held signal.
        assert lines_per_process(log, "stopping") == expected, log
        assert lines_per_process(log, "stopped") == expected, log
        assert wait_until(partial(no_session_processes, process.pid)), session_processes(process.pid)


SUPERVISOR_STOPPED = re.compile(
    r" supervisor_stopped pid=(\d+) (signal=\S+|reason=\"[^\"]*\") seconds=([\d.]+) processes=3 status=(\d+)\n"
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_supervisor_logs_its_stop(tmp_path: Path, signum: int) -> None:
    server = Relay(tmp_path, workers=2)
    server.start()
    try:
        assert server.process is not None
        server.wait_for_log(" started ", count=3)

        server.process.send_signal(signum)
        status = server.process.wait(30)
    finally:
        server.stop()

    log = server.log()
    assert status == 0, log
    stops = SUPERVISOR_STOPPED.findall(log)
    assert len(stops) == 1, log
    pid, cause, seconds, status = stops[0]
    assert int(pid) == server.process.pid
    assert cause == f"signal={signal.Signals(signum).name}"
    assert float(seconds) < 30
    assert status == "0"
    # Logged once the workers and the delivery process have stopped.
    assert log.rindex(" stopped ") < log.index(" supervisor_stopped ")


@pytest.mark.parametrize("late", [signal.SIGHUP, signal.SIGINT])
def test_signal_after_stop_keeps_status(tmp_path: Path, late: int) -> None:
    # A systemctl reload, or a second Ctrl-C within half a second, can reach
    # the supervisor after its last worker has exited.  It must still exit 0,
    # and without a traceback, instead of dying by the signal's default action.
    server = Relay(tmp_path, workers=2)
    server.start()
    try:
        assert server.process is not None
        server.wait_for_log(" started ", count=3)

        server.process.send_signal(signal.SIGTERM)
        # About one signal per millisecond until the supervisor has exited, at most 5 s.
        deadline = time.monotonic() + 5
        sent = 0
        while server.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                server.process.send_signal(late)
            sent += 1
            time.sleep(0.001)
        status = server.process.wait(30)
    finally:
        server.stop()

    log = server.log()
    assert sent > 0
    assert status == 0, log
    assert "Traceback" not in log
    assert " supervisor_stopped " in log


def test_supervisor_logs_stop_after_worker_killed(relay: Relay) -> None:
    assert relay.process is not None
    relay.wait_for_log(" started ", count=3)
    children = Path(f"/proc/{relay.process.pid}/task/{relay.process.pid}/children").read_text().split()

    os.kill(int(children[0]), signal.SIGKILL)
    status = relay.process.wait(30)

    log = relay.log()
    assert status == 1, log
    stops = SUPERVISOR_STOPPED.findall(log)
    assert len(stops) == 1, log
    _pid, cause, _seconds, exit_status = stops[0]
    assert re.fullmatch(r'reason="worker \d exited with status -9"', cause), cause
    assert exit_status == "1"
    assert " error relay.smtp: supervisor_stopped " in log


def started_pid(log: str, worker: int) -> int:
    """Return the PID from the ``started`` line of worker ``worker`` (the delivery process: ``server.workers``)."""
    match = re.search(rf" started worker={worker} pid=(\d+) ", log)
    assert match is not None, log
    return int(match.group(1))


def test_child_stopped_alone_stops_all(relay: Relay) -> None:
    # A SIGTERM to the delivery process's PID ends it with status 0.  The
    # workers would go on accepting mail that no process delivers.
    assert relay.process is not None
    relay.wait_for_log(" started ", count=3)
    delivery = started_pid(relay.log(), 2)

    os.kill(delivery, signal.SIGTERM)
    status = relay.process.wait(30)

    log = relay.log()
    assert status == 1, log
    assert f" worker_exit worker=2 pid={delivery} status=0\n" in log
    assert ' supervisor_stopped pid=' in log
    assert 'reason="worker 2 exited with status 0"' in log
    assert log.count(" stopped worker=") == 3, log


def open_in_data(port: int) -> smtplib.SMTP:
    """Open an SMTP session that has sent DATA and got 354, so that its message is in progress."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.ehlo("client.example.com")
    client.mail("sender@example.org")
    client.docmd("RCPT TO:<alice@example.test>")
    code, _ = client.docmd("DATA")
    assert code == 354
    return client


def finish_data(client: smtplib.SMTP) -> int:
    """Send the rest of the message; return the reply code, or 0 when the server has closed the connection."""
    try:
        client.send(b"Subject: in grace\r\n\r\nbody\r\n.\r\n")
        code, _ = client.getreply()
    except (smtplib.SMTPServerDisconnected, OSError):
        return 0
    finally:
        client.close()
    return code


def test_second_child_exit_keeps_grace(tmp_path: Path) -> None:
    # After worker 0 dies the supervisor stops the others.  Worker 2 dying
    # later, in its grace, must not reach worker 1 as a second SIGTERM, which
    # would end its sessions in DATA at once instead of after shutdown_grace.
    relay = Relay(tmp_path, workers=3)
    relay.start()
    assert relay.process is not None
    try:
        relay.wait_for_log(" started ", count=4)
        log = relay.log()
        # SO_REUSEPORT spreads the sessions over the 3 workers, so that
        # workers 1 and 2 both get some of 24 (one gets none with a chance of
        # about 2 * (2/3) ** 24, or 1 in 8,000).
        clients = [open_in_data(relay.port) for _ in range(24)]

        os.kill(started_pid(log, 0), signal.SIGKILL)
        relay.wait_for_log("stopping signal=SIGTERM worker=1")
        time.sleep(DUPLICATE_WINDOW + 0.2)
        os.kill(started_pid(log, 2), signal.SIGKILL)
        relay.wait_for_log("worker_exit worker=2")
        codes = [finish_data(client) for client in clients]
        status = relay.process.wait(30)
    finally:
        relay.stop()

    log = relay.log()
    assert status == 1, log
    assert "exit_now" not in log
    assert 250 in codes, (codes, log)
    assert set(codes) <= {0, 250}, codes
    # Each 250 reply is a message in the spool.
    assert log.count(" queued queue_id=") == codes.count(250), log


def test_children_stop_when_supervisor_killed(relay: Relay) -> None:
    assert relay.process is not None
    children = Path(f"/proc/{relay.process.pid}/task/{relay.process.pid}/children").read_text().split()
    assert len(children) == 3  # two workers and the delivery process

    relay.process.kill()
    relay.process.wait()

    # Each child notices through the supervisor pipe, logs it and stops gracefully.
    relay.wait_for_log("supervisor_gone", count=3)
    relay.wait_for_log("stopped", count=3)
    deadline = time.monotonic() + 15
    while any(running(pid) for pid in children):
        assert time.monotonic() < deadline, relay.log()
        time.sleep(0.05)


def running(pid: str) -> bool:
    """Return whether process ``pid`` exists and has not exited (a zombie waits for a parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_sighup_with_nameserver_name_keeps_old(relay: Relay) -> None:
    # A host name as nameserver: every process, the delivery process too, rejects the file.
    backoff = 'minimal_backoff_time = "1h"'
    relay.config.write_text(relay.config.read_text().replace(backoff, f'{backoff}\nnameservers = ["localhost"]'))
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    relay.wait_for_log("reload_failed", count=3)

    log = relay.log()
    assert "'localhost' is not an IP address" in log
    assert "reloaded" not in log
    assert "loop_exception" not in log
    assert rcpt_code(relay.port, "alice@example.test") == 250


def test_sighup_with_unreadable_credentials_keeps_old(relay: Relay) -> None:
    # A directory as the credentials file: each worker logs reload_failed and goes on.
    relay.write(domains='"other.test"')
    relay.config.write_text(relay.config.read_text() + f'\n[auth]\npassword_file = "{relay.directory}"\n')
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    relay.wait_for_log("reload_failed", count=2)

    assert "is a directory; give the path of a file" in relay.log()
    assert "loop_exception" not in relay.log()
    assert rcpt_code(relay.port, "alice@example.test") == 250


def open_fifo_writer(path: Path, timeout: float = 15.0) -> int:
    """Open the write end of the FIFO ``path`` once a reader has opened it; return the descriptor."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Without a reader, a non-blocking open for writing fails with ENXIO.
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        assert time.monotonic() < deadline, f"no process opened {path} for reading"
        time.sleep(0.01)


def fifo_reader_count(pid: int, path: Path) -> int:
    """Return how many descriptors of process ``pid`` are open on ``path``."""
    count = 0
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) == str(path):
                count += 1
        except FileNotFoundError:
            pass  # closed while listed
    return count


def feed_fifo(path: Path, data: bytes, pid: int, timeout: float = 15.0) -> None:
    """Hand ``data`` to the next read of the FIFO ``path`` by ``pid``, and wait until that reader closed it.

    The wait keeps the next feed from reaching this reader: a reader still
    blocked in read() after the writer closed would take a new writer's
    data too.  A reader blocked in open() has no descriptor yet, so the
    next one is not counted.
    """
    descriptor = open_fifo_writer(path, timeout)
    deadline = time.monotonic() + timeout
    try:
        os.write(descriptor, data)
        # FIONREAD counts the octets still in the pipe: 0 once the reader has taken them all.
        while struct.unpack("i", fcntl.ioctl(descriptor, termios.FIONREAD, b"\0" * 4))[0]:
            assert time.monotonic() < deadline, f"{path} was not read"
            time.sleep(0.01)
    finally:
        os.close(descriptor)
    while fifo_reader_count(pid, path):
        assert time.monotonic() < deadline, f"{path} was not closed after end of file"
        time.sleep(0.01)


def test_sighup_rejected_by_scheduler_keeps_listeners(tmp_path: Path) -> None:
    # With one worker the scheduler runs in it.  The reload reads the relayhost
    # password file three times: in its file check, in the check of the
    # scheduler's config, then in the router the scheduler applies.  A file
    # replaced before the last read passes both checks and fails the scheduler.
    # A FIFO makes that order certain, because each read gets its own content.
    # The listeners must then keep the old domains too, and the reload is
    # logged once, as reload_failed.
    relay = Relay(tmp_path, workers=1)
    relay.start()
    try:
        password_file = tmp_path / "relayhost-password"
        os.mkfifo(password_file)
        relay.write(domains='"example.test", "other.test"')
        backoff = 'minimal_backoff_time = "1h"'
        relayhost = f'relayhost = "[127.0.0.1]:{free_port()}"\nrelayhost_password_file = "{password_file}"'
        relay.config.write_text(relay.config.read_text().replace(backoff, f"{backoff}\n{relayhost}"))
        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        feed_fifo(password_file, b"secret\n", relay.process.pid)
        feed_fifo(password_file, b"secret\n", relay.process.pid)
        feed_fifo(password_file, b"\xff\xfe not UTF-8\n", relay.process.pid)
        relay.wait_for_log("reload_failed")
        assert rcpt_code(relay.port, "bob@other.test") == 554
        assert rcpt_code(relay.port, "alice@example.test") == 250
    finally:
        relay.stop()
    assert "the scheduler cannot use it: UnicodeDecodeError" in relay.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rejected_file_keeps_every_listener(tmp_path: Path, workers: int) -> None:
    # A relayhost password file that is not UTF-8 is rejected by the reload's
    # file check in every process.  With one worker the scheduler runs in it,
    # with two in the delivery process.  The listeners must keep the old domains
    # in both cases, and the reload is logged at error level once, as reload_failed.
    relay = Relay(tmp_path, workers=workers)
    relay.start()
    try:
        password_file = tmp_path / "relayhost-password"
        password_file.write_bytes(b"\xff\xfe not UTF-8\n")
        relay.write(domains='"example.test", "other.test"')
        backoff = 'minimal_backoff_time = "1h"'
        relayhost = f'relayhost = "[127.0.0.1]:{free_port()}"\nrelayhost_password_file = "{password_file}"'
        relay.config.write_text(relay.config.read_text().replace(backoff, f"{backoff}\n{relayhost}"))
        processes = 1 if workers == 1 else workers + 1
        # Sent without waiting for the delivery process to be up, which then
        # handles it once its loop runs.
        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        relay.wait_for_log("reload_failed", count=processes)

        # SO_REUSEPORT spreads the connections over the workers by a hash, so most likely each one gets some.
        for _ in range(4 * workers):
            assert rcpt_code(relay.port, "bob@other.test") == 554
        assert rcpt_code(relay.port, "alice@example.test") == 250
    finally:
        relay.stop()
    log = relay.log()
    failures = [line for line in log.splitlines() if " reload_failed " in line]
    assert len(failures) == processes, log
    assert all("relayhost_password_file" in line and "is not valid UTF-8" in line for line in failures), log
    assert len([line for line in failures if " error " in line]) == 1, log
    assert "reloaded" not in log
    assert "loop_exception" not in log


def test_sighup_reports_settings_needing_restart(relay: Relay) -> None:
    relay.workers = 3
    relay.write(domains='"example.test"')
    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    relay.wait_for_log("reloaded", count=2)

    assert "reload_needs_restart" in relay.log()
    assert "server.workers" in relay.log()


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def send(port: int, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        # The sender is a local user, so the bounce is delivered to its Maildir.
        client.sendmail("alice@example.test", [recipient], b"Subject: metrics\r\n\r\nbody\r\n")


def wait_for_metric(port: int, name: str, labels: tuple[tuple[str, str], ...], minimum: float) -> None:
    deadline = time.monotonic() + 20
    while True:
        value = scrape(port).get(name, {}).get(labels, 0.0)
        if value >= minimum:
            return
        assert time.monotonic() < deadline, f"{name}{dict(labels)} stayed at {value}, expected {minimum}"
        time.sleep(0.2)


def test_metrics_move_with_delivered_deferred_bounced(tmp_path: Path) -> None:
    sink = require_peer("smtp-sink")
    bounce_port = free_port("127.0.0.1")
    closed_port = free_port("127.0.0.1")
    transport = (
        f'"defer.test" = "smtp:[127.0.0.1]:{closed_port}"\n' f'"bounce.test" = "smtp:[127.0.0.1]:{bounce_port}"'
    )
    relay = Relay(tmp_path, workers=1, transport=transport)
    rejecting = subprocess.Popen(
        [sink, "-u", "nobody", "-f", "rcpt", f"127.0.0.1:{bounce_port}", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", bounce_port)
        # Loopback must be trusted here so that it may relay to the transport domains.
        untrusted = 'trusted_networks = ["192.0.2.0/24"]'
        relay.config.write_text(relay.config.read_text().replace(untrusted, 'trusted_networks = ["127.0.0.0/8"]'))
        relay.start()

        send(relay.port, "alice@example.test")
        send(relay.port, "someone@defer.test")
        send(relay.port, "someone@bounce.test")

        # alice's message and the bounce for the bounce.test recipient.
        wait_for_metric(relay.admin_port, "relay_recipients_delivered_total", (), 2)
        wait_for_metric(relay.admin_port, "relay_recipients_deferred_total", (), 1)
        wait_for_metric(relay.admin_port, "relay_recipients_bounced_total", (), 1)
        # The scheduler logs, and so counts, a deferral before its spool write
        # commits, and this gauge is read from the spool at each scrape.
        wait_for_metric(relay.admin_port, "relay_queue_recipients", (("state", "deferred"),), 1)
        samples = scrape(relay.admin_port)
        assert samples["relay_messages_received_total"][()] >= 3
        assert samples["relay_connections_total"][(("listener", f"127.0.0.1:{relay.port}"),)] >= 3
        assert samples["relay_destination_attempts_total"][(("destination", "defer.test"), ("result", "deferred"))] >= 1
        assert samples["relay_queue_recipients"][(("state", "deferred"),)] == 1
        assert samples["relay_delivery_latency_seconds_count"][()] >= 2
        assert samples["relay_spool_commit_batch_messages_count"][()] >= 3
        assert samples["relay_spool_commit_seconds_count"][()] >= 3
        # A session to the bounce.test sink opened; it may still be parked, so 0 or 1.
        active = samples["relay_destination_connections_active"]
        assert len(active) >= 1
        assert all(value in (0, 1) for value in active.values())
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        relay.stop()
        rejecting.terminate()
        rejecting.wait(10)


def run_sendmail(relay: Relay, args: list[str], message: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run relay sendmail with the relay's config, ``args`` and ``message`` on its standard input."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "sendmail", "--config", str(relay.config), *args],
        input=message,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        check=False,
        timeout=60,
    )


def test_sendmail_t_delivers_to_all_without_bcc(tmp_path: Path) -> None:
    for user in ("alice", "bob", "dave"):
        (tmp_path / "mail" / user).mkdir(parents=True)
    relay = Relay(tmp_path, workers=1)
    message = (
        b"From: app@example.test\n"
        b"To: alice@example.test\n"
        b"Cc: bob@example.test\n"
        b"Bcc: dave@example.test\n"
        b"Subject: nightly report\n"
        b"\n"
        b"all good\n"
    )
    injected = run_sendmail(relay, ["-t", "-f", "cron@example.test"], message)
    assert injected.returncode == 0, injected.stderr

    relay.start()
    try:
        deadline = time.monotonic() + 20
        delivered: dict[str, list[Path]] = {}
        while time.monotonic() < deadline:
            delivered = {user: list((tmp_path / "mail" / user / "new").glob("*")) for user in ("alice", "bob", "dave")}
            if all(delivered.values()):
                break
            time.sleep(0.1)
    finally:
        relay.stop()

    for user in ("alice", "bob", "dave"):
        assert len(delivered[user]) == 1, f"{user}: {delivered[user]}\n{relay.log()}"
        body = delivered[user][0].read_bytes()
        assert body.startswith(b"Return-Path: <cron@example.test>\n")
        assert f"Delivered-To: {user}@example.test\n".encode() in body
        assert b"Subject: nightly report\n" in body
        assert b"Bcc:" not in body


def test_sendmail_bare_name_delivered_locally(tmp_path: Path) -> None:
    # With server.hostname among the local domains, a bare name gets
    # @server.hostname, and the scheduler still delivers it to the Maildir.
    (tmp_path / "mail" / "alice").mkdir(parents=True)
    relay = Relay(tmp_path, workers=1)
    relay.write(domains='"example.test", "mx.example.test"')
    injected = run_sendmail(relay, ["-f", "cron", "alice"], b"Subject: bare name\n\nhello\n")
    assert injected.returncode == 0, injected.stderr

    relay.start()
    try:
        deadline = time.monotonic() + 20
        delivered: list[Path] = []
        while not delivered and time.monotonic() < deadline:
            delivered = list((tmp_path / "mail" / "alice" / "new").glob("*"))
            time.sleep(0.1)
    finally:
        relay.stop()

    assert len(delivered) == 1, relay.log()
    body = delivered[0].read_bytes()
    assert body.startswith(b"Return-Path: <cron@mx.example.test>\n")
    assert b"Delivered-To: alice@mx.example.test\n" in body
    assert b"Subject: bare name\n" in body


@pytest.mark.parametrize("moment", ["starting", "running"])
def test_group_sigterm_is_one_stop_request(tmp_path: Path, moment: str) -> None:
    # systemd's control-group kill and a terminal's Ctrl-C signal every process,
    # and the supervisor forwards once more: still one graceful stop, also
    # while the workers are still opening the spool and their sockets.
    relay = Relay(tmp_path, workers=2)
    with open(relay.log_path, "wb") as log:
        relay.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(relay.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            cwd=tmp_path,
            start_new_session=True,
        )
    if moment == "running":
        wait_for_port("127.0.0.1", relay.port, process=relay.process)
        relay.wait_for_log("scheduler_start")
    else:
        relay.wait_for_log("relay.")

    os.killpg(relay.process.pid, signal.SIGTERM)

    assert relay.process.wait(30) == 0, relay.log()
    assert "exit_now" not in relay.log()
    assert "worker_exit" not in relay.log()


def test_second_sigterm_exits_at_once(relay: Relay) -> None:
    assert relay.process is not None
    open_session = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    open_session.ehlo("client.example.com")
    open_session.mail("sender@example.org")
    open_session.docmd("RCPT TO:<alice@example.test>")
    open_session.docmd("DATA")

    relay.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    relay.process.send_signal(signal.SIGTERM)

    assert relay.process.wait(30) != 0
    assert "exit_now" in relay.log()
    open_session.close()


class _SlowDataHandler(RecordingHandler):
    """Holds the reply to each end of data for ``data_delay`` seconds and sets ``data_started`` when it begins."""

    def __init__(self, data_delay: float) -> None:
        super().__init__(data_delay=data_delay)
        self.data_started = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_started.set()
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_after_sigterm_ignored(tmp_path: Path, workers: int) -> None:
    # A delivery waiting for the upstream's reply to its end of data keeps the
    # scheduler's stop running: in worker 0 with one worker, else in the
    # delivery process.  A SIGHUP during that stop re-reads nothing, so no
    # process logs reloaded after stopping, and the delivery still completes.
    upstream_port = free_port()
    relay = Relay(tmp_path, workers=workers, transport=f'"slow.test" = "smtp:[127.0.0.1]:{upstream_port}"')
    # Loopback must be trusted here so that it may relay to slow.test.
    untrusted = 'trusted_networks = ["192.0.2.0/24"]'
    relay.config.write_text(relay.config.read_text().replace(untrusted, 'trusted_networks = ["127.0.0.0/8"]'))
    handler = _SlowDataHandler(data_delay=3.0)
    with run_upstream("127.0.0.1", upstream_port, handler):
        relay.start()
        assert relay.process is not None
        try:
            send(relay.port, "someone@slow.test")
            assert handler.data_started.wait(15), relay.log()
            relay.process.send_signal(signal.SIGTERM)
            # Every process that runs a scheduler or listeners logs its own stopping line.
            relay.wait_for_log("stopping", count=1 if workers == 1 else workers + 1)
            relay.process.send_signal(signal.SIGHUP)
            assert relay.process.wait(30) == 0, relay.log()
        finally:
            relay.stop()
    log = relay.log()
    assert "reloaded" not in log
    assert "reload_ignored" in log
    assert "loop_exception" not in log
    assert [m.recipients for m in handler.messages] == [["someone@slow.test"]]


def serve_until_exit(config: Path, workers: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``relay serve`` with a config that must stop it before any worker starts."""
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--workers", workers],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=cwd,
        check=False, timeout=60,
    )


def test_spool_path_that_is_a_file_refused(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("not a spool\n")
    config = tmp_path / "relay.toml"
    listener = f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n'
    config.write_text(listener + '[spool]\npath = "spool"\n[admin]\naddress = ""\n')

    result = serve_until_exit(config, "1", tmp_path)

    assert result.returncode == 1
    assert "spool: it is not a directory; give a directory in --spool or [spool] path" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_relay_on_same_port_refused(relay: Relay, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    config = other / "relay.toml"
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{relay.port}"\n[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(config, "2", other)

    assert result.returncode == 1
    # Another process causes this, not a config value, so no file is named.
    assert result.stderr.splitlines() == [
        f"relay serve: listener 127.0.0.1:{relay.port} is already in use by another process;"
        " stop that process or choose another address"
    ]
    assert not (other / "spool").exists()


def test_foreign_listener_address_reported_before_workers(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: bind fails locally, nothing is sent.
    port = free_port()
    (tmp_path / "relay.toml").write_text(
        f'[[listener]]\naddress = "192.0.2.1:{port}"\n[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(tmp_path / "relay.toml", "2", tmp_path)

    assert result.returncode == 1
    config = tmp_path / "relay.toml"
    assert f"{config}:listener[0].address: 192.0.2.1:{port}: the address is not one of this machine's;" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "spool").exists()


def test_one_address_under_two_names_rejected(tmp_path: Path) -> None:
    # [::1] and [0::1] are one address; only its text differs, so the config check passes.
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = free_port()
    (tmp_path / "relay.toml").write_text(
        f'[[listener]]\naddress = "[::1]:{port}"\n[[listener]]\naddress = "[0::1]:{port}"\n'
        '[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(tmp_path / "relay.toml", "1", tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{tmp_path / 'relay.toml'}:listener[1].address: [0::1]:{port} is the same address as listener[0]"
        f" ([::1]:{port}); remove one of them"
    ]
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_certificate_reported_before_workers(tmp_path: Path, workers: int) -> None:
    (tmp_path / "cert.pem").write_text("x\n")
    (tmp_path / "key.pem").write_text("x\n")
    config = tmp_path / "relay.toml"
    port = free_port()
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{port}"\ntls = "starttls"\n[tls]\ncert = "cert.pem"\nkey = "key.pem"\n'
        '[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(config, str(workers), tmp_path)

    assert result.returncode == 1
    assert f"cannot load TLS certificate {tmp_path / 'cert.pem'}" in result.stderr
    assert f"{tmp_path / 'cert.pem'} contains no valid PEM certificate" in result.stderr


def test_key_not_matching_certificate_named(tmp_path: Path) -> None:
    cert, _key = make_certificate(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _other_cert, other_key = make_certificate(other)

    with pytest.raises(TLSSetupError) as raised:
        server_context(TLSConfig(cert=str(cert), key=str(other_key)))

    assert f"{other_key} is not the private key of that certificate" in str(raised.value)
    assert raised.value.config_key == "tls.key"


def _starttls_works(port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example.com")
        client.starttls(context=context)
        return client.ehlo("client.example.com")[0] == 250


def test_bad_certificate_reload_keeps_tls_working(tmp_path: Path) -> None:
    # The new chain is loaded into a context of its own first: a key that does
    # not match must leave the running certificate in place, not break STARTTLS.
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cert, key = make_certificate(tmp_path / "one")
    _other_cert, other_key = make_certificate(tmp_path / "two")
    port = free_port()
    config = tmp_path / "relay.toml"
    text = (
        f'[server]\nworkers = 1\n[[listener]]\naddress = "127.0.0.1:{port}"\ntls = "starttls"\n'
        f'[tls]\ncert = "{cert}"\nkey = "{{key}}"\n[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )
    config.write_text(text.format(key=key))
    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config), "--no-delivery"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=tmp_path,
        )
    try:
        wait_for_port("127.0.0.1", port, process=process)
        config.write_text(text.format(key=other_key))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload_failed" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)

        assert "reloaded" not in log_path.read_text()
        assert _starttls_works(port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def _served_certificate(port: int) -> bytes:
    """Return the DER certificate that a default TLS client gets after STARTTLS."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example.com")
        client.starttls(context=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        served = client.sock.getpeercert(binary_form=True)
    assert served is not None
    return served


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_reload_serves_new_key_type(tmp_path: Path) -> None:
    # Rotation from an ECDSA to an RSA certificate under the same file names.
    # OpenSSL keeps one certificate per key type in a context, and OpenSSL 3
    # clients prefer ECDSA, so a reload into the running context would go on
    # serving them the old certificate.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    old_certificate = _der(cert)
    (tmp_path / "rsa").mkdir()
    rsa_cert, rsa_key = make_certificate(tmp_path / "rsa")
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nworkers = 1\n[[listener]]\naddress = "127.0.0.1:{port}"\ntls = "starttls"\n'
        f'[tls]\ncert = "{cert}"\nkey = "{key}"\n[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )
    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config), "--no-delivery"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=tmp_path,
        )
    try:
        wait_for_port("127.0.0.1", port, process=process)
        assert _served_certificate(port) == old_certificate

        key.write_bytes(rsa_key.read_bytes())
        cert.write_bytes(rsa_cert.read_bytes())
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reloaded" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)

        assert _served_certificate(port) == _der(rsa_cert)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert "Traceback" not in log_path.read_text()


def test_bad_aliases_rejected_at_check_and_reload(relay: Relay) -> None:
    # A bad line in the aliases file fails check-config, and a reload with it is
    # rejected by every process alike, with no half-applied config.
    aliases = relay.directory / "aliases"
    aliases.write_text("sales alice\n")
    relay.config.write_text(relay.config.read_text().replace("[local]\n", f'[local]\naliases = "{aliases}"\n'))

    checked = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(relay.config)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), check=False, timeout=60,
    )
    assert checked.returncode == 1
    assert f"{aliases}: line 1:" in checked.stderr

    assert relay.process is not None
    relay.process.send_signal(signal.SIGHUP)
    # Two workers and the delivery process.
    relay.wait_for_log("reload_failed", count=3)
    assert "loop_exception" not in relay.log()
    assert "reloaded" not in relay.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_undeliverable_aliases_stop_serve_before_workers(tmp_path: Path, workers: int) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("pipe: |/bin/touch x\na1: a2\na2: a1\n")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n[spool]\npath = "spool"\n'
        f'[local]\naliases = "{aliases}"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(config, str(workers), tmp_path)

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    prefix = f"{config}:local.aliases: {aliases}: "
    assert lines[0].startswith(prefix + "line 1: alias pipe: target '|/bin/touch x' is a command")
    assert lines[1].startswith(prefix + "line 2: aliases form a loop, a1 -> a2 -> a1")
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_non_utf8_relayhost_password_stops_serve(tmp_path: Path, workers: int) -> None:
    # No relayhost_username, so the password is never sent, but the router reads the file.
    password_file = tmp_path / "relayhost-password"
    password_file.write_bytes(b"\xff\xfe not UTF-8\n")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n[spool]\npath = "spool"\n'
        f'[delivery]\nrelayhost = "[127.0.0.1]:{free_port()}"\nrelayhost_password_file = "{password_file}"\n'
        '[admin]\naddress = ""\n'
    )

    result = serve_until_exit(config, str(workers), tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}:delivery.relayhost_password_file: {password_file} is not valid UTF-8: byte 0xff at offset 0;"
        " save the password as UTF-8 text"
    ]
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_unusable_spool_is_one_error(tmp_path: Path, workers: int) -> None:
    # Each worker would otherwise log its own spool_error and exit.
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "spool.db").write_text("not a database\n")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(config, str(workers), tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}:spool.path: spool {tmp_path / 'spool'}: open failed: file is not a database"
    ]


def test_uncreatable_spool_names_fix(tmp_path: Path) -> None:
    # Linux lets no one create a directory in /proc, root included.
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n'
        '[spool]\npath = "/proc/relay-spool"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(config, "2", tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}:spool.path: cannot open spool /proc/relay-spool: No such file or directory;"
        " give a directory that this user can create and write, in --spool or [spool] path"
    ]


def test_spool_option_error_names_option(tmp_path: Path) -> None:
    # The spool comes from --spool, not from the file, so the error names the option.
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n[spool]\npath = "spool"\n[admin]\naddress = ""\n'
    )

    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--spool", "/proc/relay-spool"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=tmp_path,
        check=False, timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "relay serve: --spool: cannot open spool /proc/relay-spool: No such file or directory;"
        " give a directory that this user can create and write, in --spool or [spool] path"
    ]
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_maildir_root_file_stops_serve(tmp_path: Path, workers: int) -> None:
    # RCPT would reply 451 for every local user, and delivery would defer them all.
    (tmp_path / "mail").write_text("not a folder\n")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n[spool]\npath = "spool"\n'
        '[local]\nmaildir_root = "mail/users"\n[admin]\naddress = ""\n'
    )

    result = serve_until_exit(config, str(workers), tmp_path)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}:local.maildir_root: {tmp_path / 'mail'} is not a directory, so {tmp_path / 'mail/users'}"
        " cannot be created; give a directory"
    ]
    assert not (tmp_path / "spool").exists()


def serve_as_unprivileged_user(config: Path, cwd: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``relay serve`` as a user whom mode 0 keeps out of a file; return the result and the user's name."""
    command, user = unprivileged_command(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--workers", "2"]
    )
    result = subprocess.run(
        command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=cwd,
        check=False, timeout=60,
    )
    return result, user


@pytest.mark.parametrize(
    ("settings", "locked", "expected"),
    [
        (
            'tls = "starttls"\n[tls]\ncert = "cert.pem"\nkey = "key.pem"\n[spool]\npath = "spool"\n',
            "key.pem",
            "{dir}/relay.toml:tls.key: cannot load TLS certificate {dir}/cert.pem with key {dir}/key.pem:"
            " cannot read {dir}/key.pem: permission denied; let user {user} read it",
        ),
        (
            '[spool]\npath = "spool"\n[delivery]\nrelayhost = "[127.0.0.1]:2526"\nrelayhost_password_file = "pw"\n',
            "pw",
            "{dir}/relay.toml:delivery.relayhost_password_file: cannot read {dir}/pw: permission denied;"
            " let user {user} read it",
        ),
        (
            '[spool]\npath = "locked"\n',
            "locked",
            "{dir}/relay.toml:spool.path: cannot open spool {dir}/locked: permission denied; let user {user} write it,"
            " or give another directory in --spool or [spool] path",
        ),
    ],
)
def test_permission_denied_names_user(settings: str, locked: str, expected: str) -> None:
    # pytest's tmp_path sits in a folder of mode 0700, which the other user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="relay-permissions-"))
    try:
        make_certificate(folder)
        (folder / "pw").write_text("secret\n")
        (folder / "locked").mkdir()
        # The user may enter the folder and read the config, but not read the locked file or write the locked folder.
        folder.chmod(0o755)
        config = folder / "relay.toml"
        config.write_text(f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n{settings}[admin]\naddress = ""\n')
        config.chmod(0o644)
        (folder / "cert.pem").chmod(0o644)
        (folder / locked).chmod(0o555 if locked == "locked" else 0)

        result, user = serve_as_unprivileged_user(config, folder)

        assert result.returncode == 1
        assert result.stderr.splitlines() == [expected.format(dir=folder, user=user)]
    finally:
        shutil.rmtree(folder)


def test_undeliverable_aliases_rejected_live_and_at_reload(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: alice\n")
    relay = Relay(tmp_path, workers=2)
    relay.config.write_text(relay.config.read_text().replace("[local]\n", f'[local]\naliases = "{aliases}"\n'))
    relay.start()
    try:
        assert rcpt_code(relay.port, "sales@example.test") == 250
        aliases.write_text("sales: alice\npipe: |/bin/true\nloop: pool\npool: loop\n")

        # RCPT re-reads a changed aliases file, and keeps the names read before when it is invalid.
        assert rcpt_code(relay.port, "pipe@example.test") == 550
        assert rcpt_code(relay.port, "loop@example.test") == 550
        assert rcpt_code(relay.port, "sales@example.test") == 250

        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        # Two errors, each logged by the two workers and the delivery process.
        relay.wait_for_log("reload_failed", count=6)
        log = relay.log()
        assert log.count("line 2: alias pipe: target '|/bin/true' is a command") >= 3
        assert log.count("line 3: aliases form a loop, loop -> pool -> loop") >= 3
        assert "reloaded" not in log
    finally:
        relay.stop()


def test_restart_forgets_old_snapshots(tmp_path: Path) -> None:
    # A snapshot left by an earlier run's worker (here one that a smaller restart
    # no longer has) must not add its counts to the new run's metrics.
    server = Relay(tmp_path, workers=2)
    old = tmp_path / "spool" / "metrics"
    old.mkdir(parents=True)
    (old / "worker-7.json").write_bytes(b'{"relay_messages_received_total": [[[], 5000]]}')
    server.start()
    try:
        samples = scrape(server.admin_port)
        assert samples["relay_messages_received_total"][()] < 5000
        assert not (old / "worker-7.json").exists()
    finally:
        server.stop()


def test_reload_keeps_open_session_timeouts(tmp_path: Path) -> None:
    """A session open at a reload keeps the command_timeout that it started with."""
    relay = RelayProcess(tmp_path, server='command_timeout = "3s"').start()
    try:
        client = RawClient(relay.port)
        assert client.reply().startswith("220 ")
        relay.config_path.write_text(
            relay.config_path.read_text().replace('command_timeout = "3s"', 'command_timeout = "1h"')
        )
        relay.signal(signal.SIGHUP)
        assert wait_until(lambda: " reloaded " in relay.log()), relay.log()
        # Idle from here on: the 3 s of the start end the session, not the 1 h of the reload.
        client.exchange(b"NOOP\r\n", ["250"])
        idle_since = time.monotonic()
        client.sock.settimeout(10.0)

        assert client.reply().startswith("421 4.4.2"), relay.log()
        assert time.monotonic() - idle_since < 6.0
        client.close()
        # A session that starts after the reload gets the new timeout.
        with RawClient(relay.port) as fresh:
            assert fresh.reply().startswith("220 ")
            assert not fresh.closed(timeout=4.0)
        assert relay.stop() == 0
    finally:
        relay.kill()
