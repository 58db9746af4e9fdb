"""Shared fixtures: free loopback ports, scratch directories, external peers.

Peers from Debian packages (swaks, smtp-source, nsd, curl) are looked up on
PATH and in /usr/sbin.  Outside CI a missing peer skips the tests that need
it; with ``CI=true`` it fails them, so a CI run can never pass by skipping.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.spool import Spool

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The shared corpus sits beside the repository; RELAY_CORPUS overrides it.
CORPUS_DIR = Path(os.environ.get("RELAY_CORPUS", REPO_ROOT.parent / "shared" / "corpus"))


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    """A spool opened in a scratch directory, closed after the test."""
    opened = Spool.open(tmp_path / "spool")
    try:
        yield opened
    finally:
        opened.close()


# Ports below Linux's default ephemeral range (32768-60999) that the pytest-xdist
# processes share out when RELAY_TEST_PORTS is unset.
XDIST_PORTS = range(20000, 32000)


def _xdist_port_range() -> str:
    """Return this pytest-xdist process's share of XDIST_PORTS as ``LOW-HIGH``, or "" outside xdist.

    Each process then probes only its own ports, so a port that one of them
    found free cannot be taken by the other's relay before it is bound, nor
    by the kernel as the source port of an outgoing connection.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return ""
    index = int(worker[2:])
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    width = len(XDIST_PORTS) // count
    low = XDIST_PORTS.start + index * width
    return f"{low}-{low + width - 1}"


def _port_range() -> range | None:
    """Return the ports that RELAY_TEST_PORTS (``LOW-HIGH``) allows, or None when it is unset.

    Under pytest-xdist without RELAY_TEST_PORTS, each process gets its own
    share of XDIST_PORTS.
    """
    text = os.environ.get("RELAY_TEST_PORTS", "") or _xdist_port_range()
    if not text:
        return None
    low, _, high = text.partition("-")
    try:
        return range(int(low), int(high) + 1)
    except ValueError:
        raise pytest.UsageError(f"RELAY_TEST_PORTS={text!r} is invalid; expected LOW-HIGH, e.g. 31000-31999") from None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on host that was free a moment ago.

    With RELAY_TEST_PORTS set, the port comes from that range, so tests on a
    shared machine stay inside the ports they were given.  The TCP and UDP
    ports are both probed, because nsd listens on both.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    allowed = _port_range()
    if allowed is None:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
            return port
    start = random.randrange(len(allowed))
    for offset in range(len(allowed)):
        candidate = allowed[(start + offset) % len(allowed)]
        try:
            with socket.socket(family, socket.SOCK_STREAM) as tcp, socket.socket(family, socket.SOCK_DGRAM) as udp:
                tcp.bind((host, candidate))
                udp.bind((host, candidate))
        except OSError:
            continue
        return candidate
    raise RuntimeError(f"no free port on {host} in {allowed.start}-{allowed.stop - 1}")


def find_peer(name: str) -> str | None:
    """Return the path of an external program, also searching the sbin folders."""
    extra = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def require_peer(name: str) -> str:
    """Return a peer's path; skip the test without it, or fail it under CI."""
    path = find_peer(name)
    if path is None:
        message = f"{name} not found on PATH; install it (scripts/test does so as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


# The user that tests running as root use for a command that file modes must
# apply to: nobody on Debian (uid and gid 65534).
UNPRIVILEGED_ID = 65534


def unprivileged_command(command: list[str]) -> tuple[list[str], str]:
    """Return ``command`` as a user that file modes apply to, and that user's name.

    Root reads and writes every file, so as root the command runs as nobody
    through setpriv (util-linux), and the test is skipped without setpriv.
    """
    if os.geteuid() != 0:
        return command, pwd.getpwuid(os.geteuid()).pw_name
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is missing, so the command cannot run as another user")
    switch = [setpriv, f"--reuid={UNPRIVILEGED_ID}", f"--regid={UNPRIVILEGED_ID}", "--clear-groups"]
    return [*switch, *command], pwd.getpwuid(UNPRIVILEGED_ID).pw_name


def require_corpus(subdir: str = "") -> Path:
    """Return a corpus folder; skip without it, or fail under CI."""
    path = CORPUS_DIR / subdir
    if not path.is_dir():
        message = f"message corpus {path} not found; set RELAY_CORPUS to its folder"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def unused_port() -> Callable[[str], int]:
    """Factory returning a free port on a loopback address (default 127.0.0.1)."""
    return free_port


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A scratch directory made the current one, so default relative paths land in it."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
