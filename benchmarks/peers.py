"""Start and stop the benchmarks' peer processes on loopback.

``bench_server.py``, ``bench_delivery.py`` and ``compare.py`` run relay,
smtp-sink, aiosmtpd and Postfix as separate processes listening on
127.0.0.1.  This module contains what they share: a free port, waiting until a
process listens, stopping it, and the smtp-sink command line.  Nothing here
connects anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

# smtp-sink refuses to run as root without -u, so as root it runs as this user.
SINK_USER = "nobody"
STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def find_program(name: str) -> str | None:
    """Return the path of a program, looking in the sbin folders too (Postfix installs its tools there)."""
    extra = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def wait_listening(port: int, process: subprocess.Popen[bytes] | None = None, name: str = "server") -> None:
    """Wait until something accepts connections on 127.0.0.1:port; raise RuntimeError after STARTUP_TIMEOUT.

    With ``process``, raise at once when it exits before listening.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {STARTUP_TIMEOUT:g} s")


def stop(process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Stop a process started by a benchmark: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def smtp_sink_command(port: int) -> list[str]:
    """Return the smtp-sink command line for 127.0.0.1:port; raise RuntimeError when smtp-sink is missing."""
    program = find_program("smtp-sink")
    if program is None:
        raise RuntimeError("smtp-sink not found; install the Debian postfix package")
    user = ["-u", SINK_USER] if os.geteuid() == 0 else []
    # 1000: the listen backlog, so that no connection waits for an accept slot.
    return [program, *user, f"127.0.0.1:{port}", "1000"]
