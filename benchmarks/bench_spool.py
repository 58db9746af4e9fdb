"""Measure durable commits per second: relay's spool against a file-per-message spool.

For each message size (1 KiB and 100 KiB by default) and each number of
concurrent committers (1, 20 and 100), two stores take turns, ``--repeat``
runs of ``--seconds`` each, and the medians are compared:

- ``relay``: ``relay.spool.Spool``; N asyncio tasks on one event loop (as in
  one server worker) each await ``submit_commit`` in a loop.  Group commit lets the
  tasks share one SQLite transaction and one fsync per batch.
- ``file-fsync``: the baseline, what a file-per-message spool with a per-message
  fsync does.  N threads each write one file per message (envelope line, then
  body), fsync the file, close it and fsync its directory before counting the
  message as acknowledged.

Both stores write to the same file system (``--dir``, default a new temporary
directory under the current one, removed at the end) and are measured in the
same run.  So their ratio is meaningful even on a busy machine where the
absolute figures are not.
``--json`` prints one JSON document with the machine, every figure and the
relay/baseline ratio per case.

Usage: ``python benchmarks/bench_spool.py [--seconds 1] [--repeat 3] [--json] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from relay.spool import Envelope, Recipient, Spool

SIZES = (1024, 100 * 1024)
CONCURRENCY = (1, 20, 100)

ENVELOPE = Envelope(
    sender="bench@example.test",
    recipients=(Recipient("rcpt1@example.test"), Recipient("rcpt2@example.test")),
    client_address="127.0.0.1",
    helo_name="bench.example.test",
    protocol="ESMTP",
)


def make_body(size: int) -> bytes:
    """Return a message of exactly ``size`` octets: a header block and CRLF lines."""
    header = b"Subject: spool benchmark\r\nMessage-ID: <bench@example.test>\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = header + line * ((size - len(header)) // len(line) + 1)
    return body[: size - 2] + b"\r\n"


def percentile(samples: list[float], fraction: float) -> float:
    """Return the sample at ``fraction`` (0..1) of the sorted samples; 0.0 when there are none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summarize(store: str, size: int, concurrency: int, latencies: list[float], elapsed: float) -> dict[str, Any]:
    """Return one result row: commit count, rate and latency percentiles in milliseconds."""
    return {
        "store": store,
        "size": size,
        "concurrency": concurrency,
        "commits": len(latencies),
        "seconds": round(elapsed, 3),
        "commits_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }


# -- relay's spool -----------------------------------------------------------------


async def _bench_relay(directory: Path, size: int, concurrency: int, seconds: float) -> dict[str, Any]:
    spool = Spool.open(directory)
    body = make_body(size)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    loop = asyncio.get_running_loop()

    async def committer() -> None:
        # submit_commit, as the server's sessions call it: they hold their loop.
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await spool.submit_commit(ENVELOPE, body, loop=loop)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(committer() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await spool.aclose()
    row = summarize("relay", size, concurrency, latencies, elapsed)
    row["batches"] = spool.committed_batches
    return row


# -- the file-per-message baseline ------------------------------------------------


def _bench_files(directory: Path, size: int, concurrency: int, seconds: float) -> dict[str, Any]:
    directory.mkdir(parents=True)
    body = make_body(size)
    envelope_line = b"sender=bench@example.test rcpt=rcpt1@example.test,rcpt2@example.test\n"
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    deadline = time.perf_counter() + seconds

    def committer(number: int) -> None:
        sequence = 0
        own = latencies[number]
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            path = directory / f"{number}-{sequence}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, envelope_line)
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            # The new directory entry is durable only after the directory is fsynced.
            directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
            own.append(time.perf_counter() - started)
            sequence += 1

    threads = [threading.Thread(target=committer, args=(number,)) for number in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return summarize("file-fsync", size, concurrency, [x for own in latencies for x in own], elapsed)


# -- driver --------------------------------------------------------------------


def _filesystem_of(path: Path) -> str:
    """Return the type of the file system holding ``path`` from /proc/mounts, or "unknown"."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 3 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return kind


def _machine(directory: Path) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "filesystem": _filesystem_of(directory.resolve()),
    }


def _event_loop_runner(name: str) -> Callable[[Any], Any]:
    if name == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def _rates(values: list[float]) -> str:
    return "/".join(f"{value:.0f}" for value in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Durable commits per second: relay's spool against file+fsync.")
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of each run in seconds (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case and store, alternating (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--dir", type=Path, help="directory to write in (default: a new one under the current one)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="message sizes in octets")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY), help="committer counts")
    args = parser.parse_args(argv)
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not an existing directory; create it or name another")

    base = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir or Path.cwd()))
    run_loop = _event_loop_runner(args.loop)
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            for concurrency in args.concurrency:
                relay_rates: list[float] = []
                file_rates: list[float] = []
                # Alternate the two stores so that a burst of load from elsewhere on
                # the machine hits both about equally; report the medians.
                for repeat in range(args.repeat):
                    case = f"{size}-{concurrency}-{repeat}"
                    # Each run starts with no dirty pages of the previous one, whose
                    # writeback an fsync would otherwise pay for (ext4 data=ordered).
                    os.sync()
                    relay_row = run_loop(_bench_relay(base / f"relay-{case}", size, concurrency, args.seconds))
                    os.sync()
                    file_row = _bench_files(base / f"files-{case}", size, concurrency, args.seconds)
                    relay_row["repeat"] = file_row["repeat"] = repeat
                    rows.extend([relay_row, file_row])
                    relay_rates.append(relay_row["commits_per_second"])
                    file_rates.append(file_row["commits_per_second"])
                relay_median = statistics.median(relay_rates)
                file_median = statistics.median(file_rates)
                ratio = relay_median / max(file_median, 1e-9)
                ratios.append(
                    {
                        "size": size,
                        "concurrency": concurrency,
                        "relay_median_per_second": relay_median,
                        "file_fsync_median_per_second": file_median,
                        "relay_over_file_fsync": round(ratio, 2),
                    }
                )
                if not args.json:
                    print(
                        f"{size:>7} B x {concurrency:>3}: relay {relay_median:>9.1f}/s"
                        f"  file-fsync {file_median:>8.1f}/s  ratio {ratio:>6.2f}"
                        f"  (medians of {args.repeat}; relay {_rates(relay_rates)}, file {_rates(file_rates)})",
                        flush=True,
                    )
        machine = _machine(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        document = {
            "benchmark": "spool",
            "command": " ".join(["benchmarks/bench_spool.py", *(argv if argv is not None else sys.argv[1:])]),
            "loop": args.loop,
            "seconds_per_run": args.seconds,
            "repeat": args.repeat,
            "machine": machine,
            "results": rows,
            "ratios": ratios,
        }
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
