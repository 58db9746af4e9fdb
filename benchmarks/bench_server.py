"""Measure messages per second accepted over SMTP: relay serve and relay sink against peers.

    .venv/bin/python benchmarks/bench_server.py                     # all servers, W1-W5, 3 runs
    .venv/bin/python benchmarks/bench_server.py --runs 1 --servers relay-serve,aiosmtpd-null --workloads W1

The client is Postfix's ``smtp-source`` on loopback, for every server:

    W1  1 KiB messages, one per connection, 20 connections at a time
    W2  1 KiB messages over 20 persistent connections (``smtp-source -d``)
    W3  100 KiB messages, one per connection, 20 connections at a time
    W4  1 KiB messages, one per connection, 100 connections at a time
    W5  1 KiB messages, one per connection, one connection at a time

Servers:

- ``relay-serve``: ``relay serve`` with a durable spool on disk (SQLite,
  ``synchronous=FULL``; the 250 follows the fsync) and ``--workers``
  processes.  Its scheduler relays every accepted message to an ``smtp-sink``
  on loopback during the run, so delivery competes for the same CPUs.
  ``server.max_connections_per_client`` is raised to 1000: W4 opens 100
  connections from 127.0.0.1, more than the default of 50 split between the
  workers.  (Postfix exempts ``$mynetworks`` from its per-client limits by
  default, through ``smtpd_client_event_limit_exceptions``.)  Each workload
  starts once the spool is empty, so no backlog of the previous one is being
  delivered meanwhile.  The row ``relay-serve relayed`` is the end-to-end
  rate: the messages divided by the time from the start of sending until
  the spool was empty again.
- ``relay-sink``: ``relay sink`` with ``--workers`` processes.
- ``aiosmtpd-null``, ``aiosmtpd-fsync-loop``, ``aiosmtpd-fsync-thread``:
  ``benchmarks/aiosmtpd_server.py`` on uvloop, answering 250 at once, or
  after writing and fsyncing the message on the event loop or in a thread pool.
- ``smtp-sink``: Postfix's sink (``-u nobody`` when run as root).

Each run starts every server in turn (the order rotates between runs, so a
noisy moment does not always hit the same server), sends a short warm-up,
then runs each workload once with a fixed message count.  The rate is the
count divided by smtp-source's wall time; a run that smtp-source reports as
failed aborts the benchmark.  The figures are medians over ``--runs``, and
the ratios compare medians from the same invocation, which is what stays
meaningful on a shared machine.  Files (spools, the fsync handler's
messages, logs) go to a new directory under ``--directory`` (default: the
current one), removed at the end.  Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT))

from peers import free_port, smtp_sink_command, stop, wait_listening  # noqa: E402

from relay.spool.store import database_path  # noqa: E402

PYTHON = sys.executable
SMTP_SOURCE = "smtp-source"
SMTP_SINK = "smtp-sink"
# Seconds relay serve gets to deliver its backlog to the smtp-sink after a workload.
DRAIN_TIMEOUT = 300.0
# An smtp-source run longer than this raises TimeoutExpired and ends the benchmark.
RUN_TIMEOUT = 300.0
SENDER = "bench@example.test"
RECIPIENT = "rcpt@example.test"


@dataclass(frozen=True)
class Workload:
    name: str
    size: int  # octets per message, smtp-source -l
    sessions: int  # concurrent connections, smtp-source -s
    persistent: bool  # all messages over the same connections, smtp-source -d
    messages: int  # messages per run at --scale 1


WORKLOADS = {
    w.name: w
    for w in (
        Workload("W1", 1024, 20, False, 4000),
        Workload("W2", 1024, 20, True, 10000),
        Workload("W3", 100 * 1024, 20, False, 1500),
        Workload("W4", 1024, 100, False, 4000),
        Workload("W5", 1024, 1, False, 1000),
    )
}
SERVERS = ("relay-serve", "relay-sink", "aiosmtpd-null", "aiosmtpd-fsync-loop", "aiosmtpd-fsync-thread", "smtp-sink")
WARM_UP = Workload("warm-up", 1024, 20, False, 200)
# relay serve's end-to-end rate: the workload's messages divided by the time
# from the first one sent until the last one was delivered to the smtp-sink.
RELAYED = "relay-serve relayed"


def relay_config(directory: Path, port: int, delivery_port: int, workers: int) -> Path:
    path = directory / "relay.toml"
    path.write_text(
        f"""[server]
hostname = "bench.localdomain"
workers = {workers}
# W4 opens 100 connections from one address; the default allows 50 per client.
max_connections_per_client = 1000

[[listener]]
address = "127.0.0.1:{port}"
role = "mx"

[spool]
path = "{directory / 'spool'}"

[delivery]
relayhost = "[127.0.0.1]:{delivery_port}"
relayhost_tls = "none"

[admin]
address = ""
"""
    )
    return path


@contextlib.contextmanager
def running(name: str, directory: Path, workers: int) -> Iterator[int]:
    """Start server ``name`` (and its delivery sink), yield its port, stop it afterwards."""
    port = free_port()
    directory.mkdir(parents=True)
    log = (directory / "server.log").open("wb")
    helpers: list[subprocess.Popen[bytes]] = []
    command: list[str]
    if name == "relay-serve":
        delivery_port = free_port()
        helpers.append(subprocess.Popen(smtp_sink_command(delivery_port), stdout=subprocess.DEVNULL, stderr=log))
        wait_listening(delivery_port, helpers[0], "delivery smtp-sink")
        config = relay_config(directory, port, delivery_port, workers)
        command = [PYTHON, "-m", "relay", "serve", "--config", str(config)]
    elif name == "relay-sink":
        command = [PYTHON, "-m", "relay", "sink", "--listen", f"127.0.0.1:{port}", "--workers", str(workers)]
    elif name.startswith("aiosmtpd-"):
        handler = "null" if name == "aiosmtpd-null" else "fsync"
        command = [PYTHON, str(REPO_ROOT / "benchmarks" / "aiosmtpd_server.py"), "--listen", f"127.0.0.1:{port}"]
        command += ["--handler", handler]
        if handler == "fsync":
            command += ["--directory", str(directory / "messages"), "--fsync-in", name.rsplit("-", 1)[1]]
    elif name == "smtp-sink":
        command = smtp_sink_command(port)
    else:
        raise ValueError(f"unknown server {name!r}; expected one of {', '.join(SERVERS)}")
    # Writeback left over from the previous server would otherwise land on this one's fsyncs.
    os.sync()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_listening(port, process, name)
        yield port
    finally:
        stop(process)
        for helper in helpers:
            stop(helper)
        log.close()


def send(port: int, workload: Workload, messages: int) -> float:
    """Run smtp-source for one workload and return messages per second."""
    command = [SMTP_SOURCE, "-s", str(workload.sessions), "-l", str(workload.size), "-m", str(messages)]
    if workload.persistent:
        command.append("-d")
    command += ["-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT)
    elapsed = time.monotonic() - started
    if result.returncode != 0 or result.stderr:
        error = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(command)} failed with status {result.returncode}: {error}")
    return messages / elapsed


def wait_drained(spool: Path) -> None:
    """Wait until relay serve has delivered and deleted every message in ``spool``."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    uri = f"file:{database_path(spool)}?mode=ro"
    left = -1
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as connection:
            (left,) = connection.execute("SELECT count(*) FROM message").fetchone()
        if left == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"relay serve still had {left} messages in {spool} after {DRAIN_TIMEOUT:.0f} s")


def machine() -> dict[str, Any]:
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "postfix"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "processor": _processor_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postfix": version.stdout.strip() or "unknown",
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _processor_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ratio_rows(medians: dict[str, dict[str, float]], workloads: list[str]) -> list[tuple[str, dict[str, float]]]:
    """Return the target ratios that the measured servers allow, per workload."""
    rows: list[tuple[str, dict[str, float]]] = []

    def add(label: str, numerator: str, denominators: list[str]) -> None:
        present = [d for d in denominators if d in medians]
        if numerator not in medians or not present:
            return
        values = {}
        for workload in workloads:
            best = max(medians[d][workload] for d in present)
            values[workload] = medians[numerator][workload] / best
        rows.append((label, values))

    add("relay-serve / best aiosmtpd-fsync", "relay-serve", ["aiosmtpd-fsync-loop", "aiosmtpd-fsync-thread"])
    add("relay-serve / aiosmtpd-null", "relay-serve", ["aiosmtpd-null"])
    add("relay-sink / smtp-sink", "relay-sink", ["smtp-sink"])
    return rows


def markdown(
    medians: dict[str, dict[str, float]], runs: dict[str, dict[str, list[float]]], workloads: list[str]
) -> str:
    head = "| server | " + " | ".join(workloads) + " |\n| --- |" + " ---: |" * len(workloads) + "\n"
    lines = [head.rstrip("\n")]
    for server, figures in medians.items():
        cells = [f"{figures[w]:,.0f}" for w in workloads]
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    for label, values in ratio_rows(medians, workloads):
        lines.append(f"| {label} | " + " | ".join(f"{values[w]:.2f}x" for w in workloads) + " |")
    lines.append("")
    lines.append("Runs (messages/s, in order):")
    for server, per_workload in runs.items():
        text = "; ".join(f"{w} " + ", ".join(f"{x:,.0f}" for x in per_workload[w]) for w in workloads)
        lines.append(f"- {server}: {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs per server and workload (default: 3)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated servers (default: all)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated workloads (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="relay worker processes (default: 2)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every message count by this")
    parser.add_argument("--directory", type=Path, default=Path.cwd(), help="parent of the scratch directory")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the medians here")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    for name in servers:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}; expected one of {', '.join(SERVERS)}")
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found on PATH; install Debian's postfix package")

    info = machine()
    print(f"machine: {orjson.dumps(info).decode()}", flush=True)
    measured = servers + [RELAYED] if "relay-serve" in servers else servers
    runs: dict[str, dict[str, list[float]]] = {s: {w: [] for w in workloads} for s in measured}
    scratch = Path(tempfile.mkdtemp(prefix="bench-server-", dir=args.directory))
    try:
        for number in range(args.runs):
            order = servers[number % len(servers) :] + servers[: number % len(servers)]
            for server in order:
                directory = scratch / f"{number}-{server}"
                with running(server, directory, args.workers) as port:
                    send(port, WARM_UP, WARM_UP.messages)
                    for name in workloads:
                        workload = WORKLOADS[name]
                        if server == "relay-serve":
                            # Every workload starts with an empty queue, as Postfix's does in
                            # compare.py, rather than with the previous one's delivery backlog.
                            wait_drained(directory / "spool")
                        messages = max(1, round(workload.messages * args.scale))
                        started = time.monotonic()
                        rate = send(port, workload, messages)
                        runs[server][name].append(rate)
                        print(f"run {number + 1} {server} {name}: {rate:,.0f} messages/s", flush=True)
                        if server == "relay-serve":
                            wait_drained(directory / "spool")
                            relayed = messages / (time.monotonic() - started)
                            runs[RELAYED][name].append(relayed)
                            print(f"run {number + 1} {RELAYED} {name}: {relayed:,.0f} messages/s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    medians = {s: {w: statistics.median(runs[s][w]) for w in workloads} for s in measured}
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(markdown(medians, runs, workloads))
    if args.json:
        document = {"machine": info, "workers": args.workers, "scale": args.scale, "runs": runs, "medians": medians}
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
