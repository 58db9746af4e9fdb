"""Run ``relay serve`` as a subprocess on loopback and inspect what it spooled.

``RelayProcess`` writes a config file, starts the server with the chosen
event loop, waits until the port accepts connections and, on ``stop``,
sends SIGTERM and checks that the server exited 0 and logged no unhandled
event-loop exception.  ``spooled`` reads the spool database directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.spool import SpoolStore
from relay.spool.types import StoredMessage
from tests.conftest import REPO_ROOT, free_port

EVENT_LOOPS = ("uvloop", "asyncio")

# The setup the hostile-input cases assume: example.net is local, SIZE 10 MiB.
_POLICY_DEFAULTS = {
    "local_domains": 'local_domains = ["example.net"]',
    "max_message_size": "max_message_size = 10485760",
}


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Create a self-signed certificate for localhost with openssl; return (cert, key)."""
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def wait_for_port(
    host: str, port: int, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"relay exited with status {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay did not listen on {host}:{port} within {timeout} s") from None
            time.sleep(0.05)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` every 50 ms for up to ``timeout`` seconds; return whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@dataclass
class Listener:
    role: str = "mx"
    tls: str = "none"
    auth_plaintext: bool = False
    port: int = 0


class RelayProcess:
    """One ``relay serve`` process with its own config, spool and log file."""

    def __init__(
        self,
        directory: Path,
        *,
        event_loop: str = "uvloop",
        listeners: list[Listener] | None = None,
        extra: str = "",
        policy: str = "",
        server: str = "",
        spool: str = "",
        workers: int = 1,
        certificate: tuple[Path, Path] | None = None,
        tls: str = "",
        password_file: Path | None = None,
        deliver: bool = False,
        admin_address: str = "",
    ) -> None:
        self.directory = directory
        self.event_loop = event_loop
        self.deliver = deliver
        self.listeners = listeners or [Listener()]
        for listener in self.listeners:
            listener.port = listener.port or free_port()
        self.spool = directory / "spool"
        self.log_path = directory / "relay.log"
        self.config_path = directory / "relay.toml"
        lines = [
            "[server]",
            'hostname = "mx.example.test"',
            f"workers = {workers}",
            server,
            "[spool]",
            f'path = "{self.spool}"',
            spool,
            "[policy]",
            policy,
            *[line for key, line in _POLICY_DEFAULTS.items() if f"{key} =" not in policy],
            "[local]",
            f'maildir_root = "{directory / "mail"}"',
            'users = ["rcpt"]',
            "[admin]",
            f'address = "{admin_address}"',
        ]
        if certificate:
            lines += ["[tls]", f'cert = "{certificate[0]}"', f'key = "{certificate[1]}"', tls]
        if password_file:
            lines += ["[auth]", f'password_file = "{password_file}"', 'failure_delay = "0.2s"']
        for listener in self.listeners:
            lines += [
                "[[listener]]",
                f'address = "127.0.0.1:{listener.port}"',
                f'role = "{listener.role}"',
                f'tls = "{listener.tls}"',
                f"auth_plaintext = {'true' if listener.auth_plaintext else 'false'}",
            ]
        lines.append(extra)
        self.config_path.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.listeners[0].port

    def start(self) -> RelayProcess:
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.log_path, "wb") as log:
            # Receive only unless ``deliver``: most tests check what the server
            # spools, which a running scheduler would deliver and delete.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(self.config_path),
                 "--event-loop", self.event_loop, *([] if self.deliver else ["--no-delivery"])],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=self.directory,
            )
        try:
            for listener in self.listeners:
                wait_for_port("127.0.0.1", listener.port, process=self.process)
        except TimeoutError:
            self.kill()
            raise AssertionError(f"relay did not start; log:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0, *, send_signal: bool = True) -> int:
        """SIGTERM the server (unless already signalled), wait, and check the log is clean."""
        assert self.process is not None
        if send_signal and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"relay did not stop within {timeout} s; log:\n{self.log()}") from None
        log = self.log()
        assert "loop_exception" not in log, log
        assert "Traceback" not in log, log
        return status

    def kill(self) -> None:
        """SIGKILL the server and, with several workers, each worker process."""
        if self.process is not None and self.process.poll() is None:
            workers = _child_pids(self.process.pid)
            self.process.kill()
            self.process.wait()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def spooled(self) -> list[tuple[StoredMessage, bytes]]:
        """Return every message in the spool with its body, in arrival order."""
        if not (self.spool / "spool.db").exists():
            return []
        store = SpoolStore(self.spool)
        try:
            result = []
            for queue_id in store.queue_ids():
                message = store.load(queue_id)
                assert message is not None
                result.append((message, store.load_body(queue_id)))
            return result
        finally:
            store.close()

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                assert self.stop() == 0, self.log()
        finally:
            self.kill()


def _child_pids(pid: int) -> list[int]:
    # Worker processes forked by a supervisor would outlive it when it is killed.
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def strip_received(body: bytes) -> bytes:
    """Return a stored body without the Received header the relay prepended."""
    assert body.startswith(b"Received: from "), body[:80]
    end = body.index(b"\r\n", 0)
    while body[end + 2 : end + 3] in (b"\t", b" "):
        end = body.index(b"\r\n", end + 2)
    return body[end + 2 :]


class RawClient:
    """A plain socket client that sends exact bytes and reads whole replies."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """Read one complete reply (multi-line joined by |); "" when the server closed."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.pending:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return "|".join(lines)
                self.pending += chunk
            line, self.pending = self.pending.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "|".join(lines)

    def replies(self, count: int) -> list[str]:
        return [self.reply() for _ in range(count)]

    def closed(self, timeout: float = 5.0) -> bool:
        """Return whether the server closed the connection (no further bytes)."""
        self.sock.settimeout(timeout)
        try:
            data = self.pending or self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return data == b""

    def exchange(self, data: bytes, expected: list[str]) -> list[str]:
        """Send data, read one reply per expected prefix and check each."""
        if data:
            self.send(data)
        got = self.replies(len(expected))
        for reply, want in zip(got, expected, strict=True):
            assert reply.startswith(want), f"reply {reply!r}, expected {want!r}; all: {got}"
        return got

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
