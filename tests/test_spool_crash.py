"""Durability under SIGKILL, and several processes writing and reading one spool.

The crash test kills a committing child at a random moment and checks that
every message whose commit had returned is in the spool byte for byte, with
all its recipients, and that SQLite's integrity check passes.  Each round
reopens the same spool, so recovery after a crash is exercised every time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from spool_helpers import PYTHON, TESTS, child_environment, make_body, make_envelope

from relay.spool import RecipientState, SpoolStore, StoredMessage

CHILD = str(TESTS / "spool_children.py")
CRASH_ROUNDS = 20
# A fixed seed makes a failing round reproducible; the seed is in the failure message.
CRASH_SEED = 20260704


class _LineReader:
    """Collects a child's stdout lines on a thread, so the parent can kill at any moment."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self.first = threading.Event()
        self._process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            if raw.endswith(b"\n"):  # a line cut by the kill was never complete
                self.lines.append(raw.decode().rstrip("\n"))
                self.first.set()
        self.first.set()

    def join(self) -> list[str]:
        self._thread.join(timeout=30)
        return self.lines


def _start_committer(spool: Path, tasks: int, limit: int, tag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, CHILD, "commit", str(spool), str(tasks), str(limit), tag],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=child_environment(),
    )


def _check_acknowledged(store: SpoolStore, lines: list[str], context: str) -> None:
    for line in lines:
        _, queue_id, seed, size, recipients = line.split()
        message = store.load(queue_id)
        assert message is not None, f"{context}: acknowledged message {queue_id} ({seed}) is missing"
        expected = make_envelope(recipients=int(recipients))
        assert message.envelope.recipients == expected.recipients, f"{context}: {queue_id} recipients differ"
        assert store.load_body(queue_id) == make_body(seed, int(size)), f"{context}: {queue_id} body differs"


def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    chooser = random.Random(CRASH_SEED)
    acknowledged: list[str] = []
    for round_number in range(CRASH_ROUNDS):
        context = f"round {round_number} (seed {CRASH_SEED})"
        child = _start_committer(spool, tasks=20, limit=1_000_000, tag=f"r{round_number}")
        reader = _LineReader(child)
        try:
            assert reader.first.wait(timeout=30), f"{context}: child acknowledged nothing in 30 s"
            time.sleep(chooser.uniform(0.0, 0.4))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL, f"{context}: child exited with {child.returncode} before the kill"
        lines = reader.join()
        assert lines, f"{context}: no acknowledged commit"
        acknowledged.extend(lines)

        with SpoolStore(spool) as store:
            assert store.integrity_check() == ["ok"], context
            # Earlier rounds' messages must survive the later crashes too.
            _check_acknowledged(store, acknowledged, context)


def test_two_processes_commit_while_listed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    per_child = 1000
    children = [_start_committer(spool, tasks=20, limit=per_child, tag=tag) for tag in ("a", "b")]
    readers = [_LineReader(child) for child in children]
    listings: list[list[dict[str, Any]]] = []
    try:
        for reader in readers:
            assert reader.first.wait(timeout=30), "a committing child acknowledged nothing in 30 s"
        for _ in range(10):  # bounded: at most 10 listings, each a few hundred ms
            if all(child.poll() is not None for child in children):
                break
            completed = subprocess.run(
                [PYTHON, "-m", "relay", "queue", "list", "--json", "--spool", str(spool)],
                capture_output=True,
                env=child_environment(),
                timeout=60,
                check=False,
            )
            assert completed.returncode == 0, completed.stderr.decode()
            listings.append([orjson.loads(line) for line in completed.stdout.splitlines()])
    finally:
        for child in children:
            child.wait(timeout=120)
    for child in children:
        assert child.returncode == 0

    lines = [line for reader in readers for line in reader.join()]
    assert len(lines) == 2 * per_child
    with SpoolStore(spool) as store:
        assert len(store.queue_ids()) == 2 * per_child
        assert store.integrity_check() == ["ok"]
        _check_acknowledged(store, lines, "two processes")
        final = {
            message.queue_id: message
            for message in store.messages(store.queue_ids())
            if isinstance(message, StoredMessage)
        }

    assert listings, "no listing ran while the children were writing"
    previous = 0
    for listing in listings:
        # Each listing is one snapshot: it only grows, and every message in it is complete.
        assert len(listing) >= previous
        previous = len(listing)
        for document in listing:
            stored = final[str(document["queue_id"])]
            recipients = document["recipients"]
            assert [r["address"] for r in recipients] == [r.address for r in stored.recipients]
            assert {r["state"] for r in recipients} == {RecipientState.QUEUED.value}
