"""Compare relay with other SMTP servers and clients on the standard workloads.

    .venv/bin/python benchmarks/compare.py            # everything found, 3 runs each
    .venv/bin/python benchmarks/compare.py --runs 1 --servers relay-sink,smtp-sink --workloads W1

Workloads (message size, connections, messages per connection):

    W1  1 KiB,  20 connections, one message per connection
    W2  1 KiB,  20 persistent connections (smtp-source -d)
    W3  100 KiB, 20 connections, one message per connection
    W4  1 KiB, 100 connections, one message per connection
    W5  1 KiB,  1 connection at a time, one message per connection

Servers: ``relay-serve`` (durable spool, relaying what it accepts to an
smtp-sink), ``relay-sink``, ``relay-serve-sink`` (a ``relay serve``
listener with role ``sink``: the full session, no spool),
``aiosmtpd-null``, ``aiosmtpd-fsync`` (fsync in a thread pool) and
``aiosmtpd-fsync-loop`` (fsync on the event loop), all ``aiosmtpd_server.py``
on uvloop; the ratios use the better of the two fsync handlers, ``smtp-sink`` (Postfix's test sink) and
``postfix`` (a private loopback-only instance relaying to an smtp-sink).
Clients: ``relay-bench`` and Postfix's ``smtp-source``.  The script installs
nothing: a peer that is missing is reported as unavailable and skipped.

Each server is started once per workload.  For each run, relay bench sends
for ``--seconds`` and smtp-source then sends as many messages as relay bench
managed in that time (at least ``MIN_MESSAGES``), so both clients run for
about the same time whatever the server's speed.  Figures are messages per
second: the median of the runs, with min and max.  Results go to a section
of ``benchmarks/RESULTS.md`` (between ``SECTION_BEGIN`` and ``SECTION_END``,
the rest of the file is kept), an SVG chart and, with ``--json``, raw runs.

Everything listens on 127.0.0.1 and every run is bounded by a message
count or a duration.  Starting Postfix and smtp-sink needs root, as both
drop privileges to an unprivileged user.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT))

from compare_report import write_results  # noqa: E402
from peers import find_program, free_port, smtp_sink_command, stop, wait_listening  # noqa: E402

# smtp-source sends at least this many messages per run, so a very slow
# server still yields a measurable run.
MIN_MESSAGES = 100
# smtp-source sends at most this many, so a mis-calibration cannot run for long.
MAX_MESSAGES = 200_000
# Seconds to wait for Postfix to drain its queue.
DRAIN_TIMEOUT = 120.0


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    connections: int
    persistent: bool
    description: str


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", 1024, 20, False, "1 KiB, 20 connections, 1 message each"),
    "W2": Workload("W2", 1024, 20, True, "1 KiB, 20 persistent connections"),
    "W3": Workload("W3", 102400, 20, False, "100 KiB, 20 connections, 1 message each"),
    "W4": Workload("W4", 1024, 100, False, "1 KiB, 100 connections, 1 message each"),
    "W5": Workload("W5", 1024, 1, False, "1 KiB, 1 sequential connection"),
}


@contextlib.contextmanager
def running(command: list[str], port: int, **options: Any) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **options)
    try:
        wait_listening(port, process)
        yield process
    finally:
        stop(process, timeout=10)


# Servers.  Each returns a reason when unavailable, or a context manager
# that runs the server on the port and yields an optional "between runs" hook.

ServerContext = Callable[[int, Path], contextlib.AbstractContextManager[Callable[[], None] | None]]


@dataclass(frozen=True)
class Server:
    name: str
    label: str
    check: Callable[[], str | None]
    run: ServerContext


def _python() -> str:
    return sys.executable


def _check_relay_command(command: str) -> Callable[[], str | None]:
    def check() -> str | None:
        completed = subprocess.run(
            [_python(), "-m", "relay", command, "--help"], cwd=REPO_ROOT, capture_output=True, check=False
        )
        if completed.returncode != 0:
            return f"relay {command} is not available: {completed.stderr.decode().strip()[-200:]}"
        return None

    return check


@contextlib.contextmanager
def _relay_sink(port: int, workdir: Path) -> Iterator[None]:
    with running([_python(), "-m", "relay", "sink", "--listen", f"127.0.0.1:{port}"], port, cwd=REPO_ROOT):
        yield None


def _relay_config(port: int, workdir: Path, role: str, downstream: int) -> Path:
    config = workdir / "relay.toml"
    config.write_text(
        f"""
[server]
hostname = "relay.bench.localdomain"
# W4 opens 100 connections from one address.  Postfix exempts $mynetworks
# from its per-client limit (smtpd_client_event_limit_exceptions), so the
# comparison lifts relay's limit for the loopback client as well.
max_connections_per_client = 1000

[[listener]]
address = "127.0.0.1:{port}"
role = "{role}"

[spool]
path = "{workdir / "relay-spool"}"

[policy]
relay_domains = ["example.test"]

[delivery]
relayhost = "[127.0.0.1]:{downstream}"
relayhost_tls = "none"
nameservers = ["127.0.0.1:9"]

[delivery.transport]
"example.test" = "smtp:[127.0.0.1]:{downstream}"

[local]
maildir_root = "{workdir / "mail"}"

[admin]
address = ""
"""
    )
    return config


@contextlib.contextmanager
def _relay_serve(port: int, workdir: Path) -> Iterator[None]:
    if find_program("smtp-sink") is None:
        raise RuntimeError("relay serve relays to smtp-sink, which is not installed")
    downstream = free_port()
    config = _relay_config(port, workdir, "mx", downstream)
    with running(smtp_sink_command(downstream), downstream):
        command = [_python(), "-m", "relay", "serve", "--config", str(config)]
        with running(command, port, cwd=REPO_ROOT):
            yield None


@contextlib.contextmanager
def _relay_serve_sink_role(port: int, workdir: Path) -> Iterator[None]:
    # A listener with role "sink" discards what it accepts, so nothing is relayed.
    config = _relay_config(port, workdir, "sink", free_port())
    command = [_python(), "-m", "relay", "serve", "--config", str(config)]
    with running(command, port, cwd=REPO_ROOT):
        yield None


def _check_aiosmtpd() -> str | None:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        return "aiosmtpd is not installed (pip install aiosmtpd)"
    return None


def _aiosmtpd(handler: str, fsync_in: str = "thread") -> ServerContext:
    @contextlib.contextmanager
    def run(port: int, workdir: Path) -> Iterator[None]:
        command = [
            _python(),
            str(REPO_ROOT / "benchmarks" / "aiosmtpd_server.py"),
            "--listen",
            f"127.0.0.1:{port}",
            "--handler",
            handler,
            "--directory",
            str(workdir / "aiosmtpd"),
            "--fsync-in",
            fsync_in,
        ]
        with running(command, port):
            yield None

    return run


def _check_smtp_sink() -> str | None:
    if find_program("smtp-sink") is None:
        return "smtp-sink not found (Debian package postfix)"
    return None


@contextlib.contextmanager
def _smtp_sink(port: int, workdir: Path) -> Iterator[None]:
    with running(smtp_sink_command(port), port):
        yield None


def _check_postfix() -> str | None:
    if find_program("postfix") is None or find_program("smtp-sink") is None:
        return "postfix not found (Debian package postfix)"
    if os.geteuid() != 0:
        return "starting a private Postfix instance needs root"
    return None


@contextlib.contextmanager
def _postfix(port: int, workdir: Path) -> Iterator[Callable[[], None]]:
    from compare_postfix import postfix_instance

    downstream = free_port()
    with running(smtp_sink_command(downstream), downstream):
        with postfix_instance(workdir / "postfix", port, downstream, DRAIN_TIMEOUT) as drain:
            wait_listening(port, name="Postfix")
            yield drain


SERVERS: dict[str, Server] = {
    "relay-serve": Server("relay-serve", "relay serve (durable)", _check_relay_command("serve"), _relay_serve),
    "relay-sink": Server("relay-sink", "relay sink", _check_relay_command("sink"), _relay_sink),
    "relay-serve-sink": Server(
        "relay-serve-sink", "relay serve, sink role", _check_relay_command("serve"), _relay_serve_sink_role
    ),
    "aiosmtpd-null": Server("aiosmtpd-null", "aiosmtpd do-nothing", _check_aiosmtpd, _aiosmtpd("null")),
    "aiosmtpd-fsync": Server(
        "aiosmtpd-fsync", "aiosmtpd write+fsync in a thread pool", _check_aiosmtpd, _aiosmtpd("fsync")
    ),
    "aiosmtpd-fsync-loop": Server(
        "aiosmtpd-fsync-loop", "aiosmtpd write+fsync on the loop", _check_aiosmtpd, _aiosmtpd("fsync", "loop")
    ),
    "smtp-sink": Server("smtp-sink", "smtp-sink", _check_smtp_sink, _smtp_sink),
    "postfix": Server("postfix", "Postfix (queue fsync'd)", _check_postfix, _postfix),
}

CLIENTS = ("relay-bench", "smtp-source")


# Clients


@dataclass
class RunResult:
    messages: int
    seconds: float
    failed: int
    rate: float
    detail: dict[str, Any] = field(default_factory=dict)


def run_relay_bench(port: int, workload: Workload, seconds: float, processes: int) -> RunResult:
    per_connection = "0" if workload.persistent else "1"
    processes = min(processes, workload.connections)
    command = [
        _python(),
        "-m",
        "relay",
        "bench",
        f"127.0.0.1:{port}",
        "--json",
        "--allow-errors",
        "-c",
        str(workload.connections),
        "-m",
        per_connection,
        "-s",
        str(workload.size),
        "-d",
        str(seconds),
        "-P",
        str(processes),
        "--timeout",
        "30",
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=seconds + 120, check=False)
    if not completed.stdout.strip():
        raise RuntimeError(f"relay bench printed nothing: {completed.stderr.decode()[-500:]}")
    report = orjson.loads(completed.stdout)
    return RunResult(
        messages=report["messages_sent"],
        seconds=report["elapsed_s"],
        failed=report["messages_failed"],
        rate=report["messages_per_s"],
        detail={"latency_ms": report["latency_ms"], "errors": report["errors"]},
    )


def run_smtp_source(port: int, workload: Workload, messages: int) -> RunResult:
    program = find_program("smtp-source")
    assert program is not None
    command = [program, "-s", str(workload.connections), "-m", str(messages), "-l", str(workload.size)]
    if workload.persistent:
        command.append("-d")
    command.append(f"127.0.0.1:{port}")
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    # smtp-source exits non-zero and prints a fatal line when a session fails.
    failed = 0 if completed.returncode == 0 else messages
    return RunResult(
        messages=messages,
        seconds=elapsed,
        failed=failed,
        rate=messages / elapsed if failed == 0 else 0.0,
        detail={"stderr": completed.stderr.decode()[-300:]} if failed else {},
    )


# Driver


def measure(
    server: Server, workloads: list[Workload], clients: list[str], runs: int, seconds: float, processes: int
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Run every client and workload against one server; return runs by workload and client."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for workload in workloads:
        port = free_port()
        by_client: dict[str, list[dict[str, Any]]] = {client: [] for client in clients}
        with tempfile.TemporaryDirectory(prefix=f"compare-{server.name}-") as scratch:
            try:
                with server.run(port, Path(scratch)) as between_runs:
                    for _ in range(runs):
                        bench = None
                        if "relay-bench" in clients:
                            bench = run_relay_bench(port, workload, seconds, processes)
                            by_client["relay-bench"].append(bench.__dict__)
                            if between_runs is not None:
                                between_runs()
                        if "smtp-source" in clients:
                            count = int(bench.messages / bench.seconds * seconds) if bench and bench.seconds else 0
                            count = min(max(count, MIN_MESSAGES), MAX_MESSAGES)
                            source = run_smtp_source(port, workload, count)
                            by_client["smtp-source"].append(source.__dict__)
                            if between_runs is not None:
                                between_runs()
                        _progress(server, workload, by_client)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"  {server.name} {workload.name}: failed: {exc}", file=sys.stderr)
                by_client = {client: [{"error": str(exc)}] for client in clients}
        results[workload.name] = by_client
    return results


def _progress(server: Server, workload: Workload, by_client: dict[str, list[dict[str, Any]]]) -> None:
    parts = []
    for client, runs in by_client.items():
        if runs:
            parts.append(f"{client} {runs[-1]['rate']:.0f}/s ({runs[-1]['failed']} failed)")
    print(f"  {server.name} {workload.name}: " + ", ".join(parts), file=sys.stderr, flush=True)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return median, min and max messages per second of complete runs, or None."""
    rates = [run["rate"] for run in runs if "rate" in run and run["failed"] == 0]
    if not rates or len(rates) < len(runs):
        return None
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}


def machine_description() -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version(), "kernel": platform.release()}
    for module in ("uvloop", "aiosmtpd"):
        with contextlib.suppress(ImportError, AttributeError):
            versions[module] = __import__(module).__version__
    postconf = find_program("postconf")
    if postconf:
        completed = subprocess.run([postconf, "-d", "mail_version"], capture_output=True, check=False)
        versions["postfix"] = completed.stdout.decode().split("=")[-1].strip() or "unknown"
    from relay import __version__

    versions["relay"] = __version__
    return {"cpu": cpu, "cores": str(os.cpu_count()), **versions}


def _figure_options(argv: list[str]) -> list[str]:
    """Return argv without the output options, which do not change the figures."""
    kept: list[str] = []
    skip_value = False
    for argument in argv:
        if skip_value:
            skip_value = False
        elif argument in ("--json", "--results", "--svg"):
            skip_value = True
        elif not argument.startswith(("--json=", "--results=", "--svg=")):
            kept.append(argument)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare relay with other SMTP servers on W1 to W5.")
    parser.add_argument("--runs", type=int, default=3, help="runs per server, workload and client (default: 3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one relay bench run (default: 2)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated servers (default: all)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated workloads (default: all)")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated clients (default: both)")
    parser.add_argument("--bench-processes", type=int, default=2, help="relay bench processes (default: 2)")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--svg", type=Path, default=REPO_ROOT / "benchmarks" / "compare.svg")
    parser.add_argument("--json", type=Path, help="also write every run to this JSON file")
    args = parser.parse_args(argv)

    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    clients = args.clients.split(",")
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown client {sorted(unknown)[0]}; choose from {', '.join(CLIENTS)}")
    if "smtp-source" in clients and find_program("smtp-source") is None:
        print("smtp-source not found (Debian package postfix); running relay bench only", file=sys.stderr)
        clients.remove("smtp-source")

    started = time.monotonic()
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name in args.servers.split(","):
        server = SERVERS[name]
        reason = server.check()
        if reason is not None:
            print(f"{name}: unavailable: {reason}", file=sys.stderr)
            unavailable[name] = reason
            continue
        print(f"{name}:", file=sys.stderr)
        results[name] = measure(server, workloads, clients, args.runs, args.seconds, args.bench_processes)
    elapsed = time.monotonic() - started

    summary = {
        server: {
            workload: {client: summarize(runs) for client, runs in by_client.items()}
            for workload, by_client in by_workload.items()
        }
        for server, by_workload in results.items()
    }
    command = "benchmarks/compare.py " + " ".join(_figure_options(argv if argv is not None else sys.argv[1:]))
    document = {
        "command": command.strip(),
        "elapsed_s": round(elapsed, 1),
        "runs": args.runs,
        "seconds": args.seconds,
        "bench_processes": args.bench_processes,
        "machine": machine_description(),
        "workloads": {name: workload.description for name, workload in WORKLOADS.items() if workload in workloads},
        "servers": {name: SERVERS[name].label for name in SERVERS},
        "unavailable": unavailable,
        "summary": summary,
    }
    if args.json:
        args.json.write_bytes(orjson.dumps({**document, "raw": results}, option=orjson.OPT_INDENT_2))
    write_results(document, args.results, args.svg)
    print(f"wrote {args.results} and {args.svg} in {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
