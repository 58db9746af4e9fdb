"""Child processes for the spool's crash, concurrency and full-disk tests.

Run as ``python spool_children.py MODE SPOOL_DIR [ARGS]`` with
``spool_helpers.child_environment()``.  Each mode prints one line per event on
stdout (flushed at once) so the parent reads exactly what was acknowledged:

- ``commit SPOOL TASKS LIMIT TAG``: TASKS concurrent tasks commit messages until
  LIMIT are done (the crash test kills it before); after each commit returns
  it prints ``ok QUEUE_ID SEED SIZE RECIPIENTS``.
- ``disk-full SPOOL LIMIT``: with RLIMIT_FSIZE at LIMIT octets, commits a small
  message, then one larger than LIMIT, then raises the limit and commits
  again; prints one JSON object describing each step.
- ``filesystem-full SPOOL``: SPOOL is on a small file system of its own; fills
  it with a filler file, commits (expecting the spool error), removes the
  filler and commits again; prints one JSON object per step.
"""

from __future__ import annotations

import asyncio
import random
import resource
import signal
import sys
from pathlib import Path

import orjson
from spool_helpers import make_body, make_envelope

from relay.spool import Spool, SpoolError, SpoolStore

# Sizes that exercise small rows, overflow pages and WAL growth in one run.
SIZES = (200, 1000, 8000, 60_000, 200_000)


def _report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _commit_many(directory: Path, tasks: int, limit: int, tag: str) -> None:
    spool = Spool.open(directory)
    counter = iter(range(limit))

    async def worker(number: int) -> None:
        chooser = random.Random(f"{tag}-{number}")
        for sequence in counter:
            seed = f"{tag}-{number}-{sequence}"
            size = chooser.choice(SIZES)
            recipients = chooser.randint(1, 4)
            queue_id = await spool.commit(make_envelope(recipients=recipients), make_body(seed, size))
            _report(f"ok {queue_id} {seed} {size} {recipients}")

    try:
        await asyncio.gather(*(worker(number) for number in range(tasks)))
    finally:
        await spool.aclose()


def _disk_full(directory: Path, limit: int) -> None:
    # Without this the kernel kills the process with SIGXFSZ at the limit, and
    # SQLite never gets the EFBIG error a full disk would produce.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    spool = Spool.open(directory)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        small = spool.commit_blocking(make_envelope(), make_body("small", 1000))
        _report(orjson.dumps({"step": "small", "queue_id": small}).decode())

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            spool.commit_blocking(make_envelope(), make_body("too-big", limit * 2))
            _report(orjson.dumps({"step": "big", "error": None}).decode())
        except SpoolError as exc:
            _report(orjson.dumps({"step": "big", "error": str(exc)}).decode())

        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        again = spool.commit_blocking(make_envelope(), make_body("again", 1000))
        _report(orjson.dumps({"step": "again", "queue_id": again}).decode())
    finally:
        spool.close()
    with SpoolStore(directory) as store:
        _report(
            orjson.dumps({"step": "check", "ids": store.queue_ids(), "integrity": store.integrity_check()}).decode()
        )


def _filesystem_full(directory: Path) -> None:
    spool = Spool.open(directory / "spool")
    try:
        small = spool.commit_blocking(make_envelope(), make_body("small", 1000))
        _report(orjson.dumps({"step": "small", "queue_id": small}).decode())

        filler = directory / "filler"
        chunk = b"\0" * 65536
        with open(filler, "wb", buffering=0) as stream:
            for _ in range(100_000):  # bounded: 6 GiB at most, far beyond a test file system
                try:
                    stream.write(chunk)
                except OSError:
                    break
        try:
            spool.commit_blocking(make_envelope(), make_body("no-space", 200_000))
            _report(orjson.dumps({"step": "full", "error": None}).decode())
        except SpoolError as exc:
            _report(orjson.dumps({"step": "full", "error": str(exc)}).decode())

        filler.unlink()
        again = spool.commit_blocking(make_envelope(), make_body("again", 200_000))
        _report(orjson.dumps({"step": "again", "queue_id": again}).decode())
    finally:
        spool.close()
    with SpoolStore(directory / "spool") as store:
        ids = store.queue_ids()
        _report(orjson.dumps({"step": "check", "ids": ids, "integrity": store.integrity_check()}).decode())


def main(argv: list[str]) -> int:
    mode, directory = argv[0], Path(argv[1])
    if mode == "commit":
        asyncio.run(_commit_many(directory, int(argv[2]), int(argv[3]), argv[4]))
    elif mode == "disk-full":
        _disk_full(directory, int(argv[2]))
    elif mode == "filesystem-full":
        _filesystem_full(directory)
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected commit, disk-full or filesystem-full")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
