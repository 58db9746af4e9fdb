"""A second ``relay serve`` or ``relay sink`` on an address that one already listens on.

Every case runs real instances on loopback ports.  The second instance
exits with status 1 and the in-use error naming the address, and the first
still takes mail over smtplib.  Once the first has stopped (SIGTERM or
SIGKILL), a new start on the address succeeds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench_helpers import child_pids, process_running, relay_command, wait_for_listening

from conftest import REPO_ROOT, free_port
from tests.server_helpers import make_certificate, wait_for_port, wait_until

# Seconds a test waits for an instance to listen or to exit.
TIMEOUT = 30.0
# Seconds a test waits for one of two instances started together to exit.
RACE_TIMEOUT = 15.0

IN_USE = "is already in use by another process; stop that process or choose another address"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")


@dataclass
class Address:
    """One listener of a test config: host, port and TLS mode."""

    host: str
    port: int
    tls: str = "none"

    @property
    def text(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def write_config(directory: Path, addresses: list[Address], certificate: tuple[Path, Path] | None = None) -> Path:
    """Write a relay config with one listener per address and its own spool; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[server]",
        'hostname = "mx.example.test"',
        "[spool]",
        f'path = "{directory / "spool"}"',
        "[policy]",
        'local_domains = ["example.net"]',
        "[local]",
        f'maildir_root = "{directory / "mail"}"',
        'users = ["rcpt"]',
        "[admin]",
        'address = ""',
    ]
    if certificate is not None:
        lines += ["[tls]", f'cert = "{certificate[0]}"', f'key = "{certificate[1]}"']
    for address in addresses:
        lines += ["[[listener]]", f'address = "{address.text}"', f'tls = "{address.tls}"']
    config = directory / "relay.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def start_serve(config: Path, workers: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--workers", str(workers), "--no-delivery"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        cwd=config.parent,
    )


def run_serve_until_exit(config: Path, workers: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config), "--workers", str(workers), "--no-delivery"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        cwd=config.parent,
        check=False,
        timeout=TIMEOUT,
    )


def wait_listening(process: subprocess.Popen[bytes], addresses: list[Address]) -> None:
    for address in addresses:
        wait_for_port(address.host, address.port, timeout=TIMEOUT, process=process)


@dataclass
class Stopped:
    """What an instance left once it exited."""

    status: int
    stdout: str
    stderr: str


def stop(process: subprocess.Popen[bytes]) -> Stopped:
    """SIGTERM ``process`` and wait for it to exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_with_children(process)
        raise AssertionError(f"the instance did not stop within {TIMEOUT} s of SIGTERM") from None
    return Stopped(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


def kill_with_children(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process`` and then each of its child processes."""
    if process.poll() is not None:
        return
    children = child_pids(process.pid)
    process.kill()
    process.communicate()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_serve(config: Path, addresses: list[Address], workers: int = 2) -> Iterator[subprocess.Popen[bytes]]:
    process = start_serve(config, workers)
    try:
        wait_listening(process, addresses)
        yield process
    finally:
        kill_with_children(process)


def send_message(address: Address) -> None:
    """Send one message over smtplib; raise when the relay does not accept it."""
    if address.tls == "implicit":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client: smtplib.SMTP = smtplib.SMTP_SSL(address.host, address.port, timeout=10, context=context)
    else:
        client = smtplib.SMTP(address.host, address.port, timeout=10)
    with client:
        refused = client.sendmail("sender@example.org", ["rcpt@example.net"], b"Subject: lock\r\n\r\nbody\r\n")
    assert refused == {}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("certificate"))


def listener_cases() -> list[object]:
    return [
        pytest.param("127.0.0.1", "none", id="plain-ipv4"),
        pytest.param("127.0.0.1", "implicit", id="implicit-ipv4"),
        pytest.param("::1", "none", id="plain-ipv6", marks=needs_ipv6),
        pytest.param("::1", "implicit", id="implicit-ipv6", marks=needs_ipv6),
    ]


@pytest.mark.parametrize(("host", "tls"), listener_cases())
def test_second_serve_refused(tmp_path: Path, certificate: tuple[Path, Path], host: str, tls: str) -> None:
    address = Address(host, free_port(host), tls)
    # A plain listener next to the one under test, so that the first relay's mail is checked over both.
    plain = Address("127.0.0.1", free_port())
    first_config = write_config(tmp_path / "first", [address, plain], certificate)
    second_config = write_config(tmp_path / "second", [address], certificate)

    with running_serve(first_config, [address, plain]) as first:
        result = run_serve_until_exit(second_config, 2)

        assert result.returncode == 1
        assert f"relay serve: listener {address.text} {IN_USE}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "second" / "spool").exists()
        send_message(address)
        send_message(plain)
        stopped = stop(first)

    assert stopped.status == 0, stopped.stderr
    with running_serve(second_config, [address]) as second:
        send_message(address)
        stopped = stop(second)
    assert stopped.status == 0, stopped.stderr


@pytest.mark.parametrize(("host", "tls"), listener_cases())
def test_simultaneous_serve_starts_one_wins(
    tmp_path: Path, certificate: tuple[Path, Path], host: str, tls: str
) -> None:
    # Started together, both instances may pass the bind check before either
    # worker binds its SO_REUSEPORT socket, so only the lock decides between them.
    address = Address(host, free_port(host), tls)
    configs = [write_config(tmp_path / name, [address], certificate) for name in ("one", "two")]
    processes = [start_serve(config, 2) for config in configs]
    try:
        # The loser exits right after reading its config, well before the winner listens.
        deadline = time.monotonic() + RACE_TIMEOUT
        while time.monotonic() < deadline and all(process.poll() is None for process in processes):
            time.sleep(0.05)
        statuses = [process.poll() for process in processes]
        exited = [process for process, status in zip(processes, statuses, strict=True) if status is not None]
        running = [process for process, status in zip(processes, statuses, strict=True) if status is None]

        assert len(exited) == 1, "neither instance exited, so both share the address"
        assert len(running) == 1
        loser = stop(exited[0])
        assert loser.status == 1
        assert f"relay serve: listener {address.text} {IN_USE}" in loser.stderr
        wait_listening(running[0], [address])
        send_message(address)
        stopped = stop(running[0])
        assert stopped.status == 0, stopped.stderr
    finally:
        for process in processes:
            kill_with_children(process)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_starts_after_first_killed(tmp_path: Path, workers: int) -> None:
    address = Address("127.0.0.1", free_port())
    config = write_config(tmp_path / "relay", [address])
    first = start_serve(config, workers)
    try:
        wait_listening(first, [address])
        children = child_pids(first.pid)
        first.kill()
        first.communicate()
        # Workers outlive a supervisor killed with SIGKILL until they notice it is gone, and they hold the address.
        assert wait_until(lambda: not any(process_running(pid) for pid in children), timeout=TIMEOUT)
    finally:
        kill_with_children(first)

    with running_serve(config, [address], workers=workers) as second:
        send_message(address)
        stopped = stop(second)
    assert stopped.status == 0, stopped.stderr


@contextlib.contextmanager
def running_sink(address: Address, workers: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        relay_command("sink", "--listen", address.text, "--workers", str(workers)),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_listening(process)
        yield process
    finally:
        kill_with_children(process)


def run_sink_until_exit(address: Address, workers: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        relay_command("sink", "--listen", address.text, "--workers", str(workers)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize(
    "host", [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6", marks=needs_ipv6)]
)
@pytest.mark.parametrize("second_workers", [1, 2])
def test_second_sink_refused(host: str, second_workers: int) -> None:
    address = Address(host, free_port(host))

    with running_sink(address, workers=2) as first:
        result = run_sink_until_exit(address, second_workers)

        assert result.returncode == 1
        assert f"relay sink: listener {address.text} {IN_USE}" in result.stderr
        assert "Traceback" not in result.stderr
        send_message(address)
        stopped = stop(first)

    assert stopped.status == 0, stopped.stderr
    assert "messages=1 " in stopped.stdout
    with running_sink(address, workers=second_workers) as second:
        send_message(address)
        stopped = stop(second)
    assert stopped.status == 0, stopped.stderr


def test_serve_refused_on_sink_address(tmp_path: Path) -> None:
    address = Address("127.0.0.1", free_port())
    config = write_config(tmp_path / "relay", [address])

    with running_sink(address, workers=2) as sink:
        result = run_serve_until_exit(config, 2)

        assert result.returncode == 1
        assert f"relay serve: listener {address.text} {IN_USE}" in result.stderr
        stopped = stop(sink)
    assert stopped.status == 0, stopped.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_sink_starts_after_first_killed(workers: int) -> None:
    address = Address("127.0.0.1", free_port())

    with running_sink(address, workers=workers) as first:
        children = child_pids(first.pid)
        first.kill()
        first.communicate()
        # The workers watch a pipe from the sink process and stop once it is gone.
        assert wait_until(lambda: not any(process_running(pid) for pid in children), timeout=TIMEOUT)

    with running_sink(address, workers=workers) as second:
        send_message(address)
        stopped = stop(second)
    assert stopped.status == 0, stopped.stderr
