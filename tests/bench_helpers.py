"""Helpers for the ``relay bench`` and ``relay sink`` tests: run both as real commands."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from conftest import REPO_ROOT, free_port

# Seconds a test waits for a server to listen or to exit.
STARTUP_TIMEOUT = 15.0


def relay_command(*args: str) -> list[str]:
    """Return the argv that runs the relay command line from this source tree."""
    return [sys.executable, "-m", "relay", *args]


@dataclass
class SinkProcess:
    """A running ``relay sink``; ``counters`` and ``stderr`` are filled in when it stops."""

    process: subprocess.Popen[bytes]
    port: int
    counters: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def wait_for_listening(process: subprocess.Popen[bytes]) -> None:
    """Wait for the sink's ``listening`` log line, so no probe connection skews its counters."""
    assert process.stderr is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.1)
        if ready:
            line = process.stderr.readline()
            seen += line
            if b" listening " in line:
                return
            if not line:
                break
    raise AssertionError(f"relay sink did not report listening: {seen.decode()[-2000:]}")


@contextmanager
def running_sink(*options: str) -> Iterator[SinkProcess]:
    """Run ``relay sink --json`` with options on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        relay_command("sink", "--listen", f"127.0.0.1:{port}", "--json", *options),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sink = SinkProcess(process, port)
    try:
        wait_for_listening(process)
        yield sink
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        sink.stderr = stderr.decode()
        lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
        if lines:
            sink.counters = orjson.loads(lines[-1])
        assert process.returncode == 0, f"relay sink exited {process.returncode}: {stderr.decode()[-2000:]}"


def run_bench(target: str, *options: str, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """Run ``relay bench TARGET --json`` with options; return (exit status, report)."""
    completed = subprocess.run(
        relay_command("bench", target, "--json", *options),
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    stdout = completed.stdout.decode()
    assert stdout.strip(), f"relay bench printed nothing; stderr: {completed.stderr.decode()[-2000:]}"
    report: dict[str, Any] = orjson.loads(stdout)
    return completed.returncode, report


def child_pids(parent: int) -> list[int]:
    """Return the PIDs of the running processes whose parent is ``parent``, read from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so the fields are counted after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def process_running(pid: int) -> bool:
    """Return whether ``pid`` exists and is not a zombie, which an exited process stays until it is reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Create a self-signed certificate for 127.0.0.1 with openssl; return (cert, key)."""
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
