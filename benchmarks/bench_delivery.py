"""End-to-end relay rate: smtp-source into the MTA, delivered to smtp-sink as smart host.

Measures messages relayed per second, from the first message sent until the
MTA's queue is empty again, for ``relay serve`` and for a private Postfix
instance doing the same job.  Postfix runs with relayhost set to the same
kind of smtp-sink, DNS off and its queue fsync'd as in production (see
``compare_postfix.py``).  Runs alternate between the two so both see the
same machine load.

Client: Postfix's ``smtp-source -s SESSIONS -l SIZE -m MESSAGES``, one
message per connection (no ``-d``), one recipient each.  Both MTAs keep
their default durability: relay's spool commits with ``synchronous=FULL``
before each 250, and Postfix fsyncs each queue file.

The queue is polled every ``POLL_INTERVAL`` seconds (relay: a read-only
SQLite query; Postfix: ``postqueue -p``), so the end time is late by up to
that much.  Postfix needs root (its master runs as root).  Postfix's
smtp-sink (3.7) does not offer CHUNKING, so relay sends with DATA to it;
``--next-hop relay-sink`` puts ``relay sink``, which offers CHUNKING, in its
place for both MTAs, and ``--no-chunking`` sets ``delivery.chunking = false``.
Usage:

    .venv/bin/python benchmarks/bench_delivery.py [--messages 5000] [--runs 3] [--json]
        [--next-hop smtp-sink|relay-sink] [--no-chunking]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_postfix import postfix_instance, queue_empty  # noqa: E402
from peers import free_port, smtp_sink_command, stop, wait_listening  # noqa: E402

from relay.spool import SpoolStore  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "source@bench.test"
RECIPIENT = "sink@example.org"
POLL_INTERVAL = 0.05
# A run whose queue has not drained by then raises RuntimeError and ends the benchmark.
DRAIN_TIMEOUT = 300.0


@contextlib.contextmanager
def smtp_sink(port: int) -> Iterator[None]:
    """Run smtp-sink on 127.0.0.1:port (as nobody when root, which it requires)."""
    process = subprocess.Popen(smtp_sink_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process, "smtp-sink")
        yield
    finally:
        stop(process)


@contextlib.contextmanager
def relay_sink(port: int) -> Iterator[None]:
    """Run ``relay sink`` on 127.0.0.1:port: it accepts and discards mail, offering PIPELINING and CHUNKING."""
    process = subprocess.Popen([sys.executable, "-m", "relay", "sink", "--listen", f"127.0.0.1:{port}"],
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, process, "relay sink")
        yield
    finally:
        stop(process)


NEXT_HOPS: dict[str, Callable[[int], contextlib.AbstractContextManager[None]]] = {
    "smtp-sink": smtp_sink,
    "relay-sink": relay_sink,
}


def relay_config(directory: Path, port: int, sink_port: int, chunking: bool) -> Path:
    path = directory / "relay.toml"
    path.write_text(
        f"""[server]
hostname = "bench-relay.localdomain"
# smtp-source opens all its sessions from one address; the default allows 50.
max_connections_per_client = 1000

[[listener]]
address = "127.0.0.1:{port}"
role = "mx"

[spool]
path = "{directory / 'spool'}"

[delivery]
relayhost = "[127.0.0.1]:{sink_port}"
relayhost_tls = "none"
chunking = {"true" if chunking else "false"}

[admin]
address = ""
"""
    )
    return path


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of process ``pid``, all threads included (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of /proc/PID/stat, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(pid: int) -> list[int]:
    """Return the worker processes of a ``relay serve`` supervisor (the process itself with one worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children] or [pid]


@contextlib.contextmanager
def relay_serve(
    directory: Path, port: int, sink_port: int, chunking: bool
) -> Iterator[tuple[Callable[[], bool], list[int]]]:
    """Run ``relay serve`` relaying to the sink; yield a spool-is-empty check and the worker PIDs."""
    config = relay_config(directory, port, sink_port, chunking)
    log = (directory / "relay.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(config)],
                               cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    store: SpoolStore | None = None

    def spool_empty() -> bool:
        nonlocal store
        if store is None:
            store = SpoolStore(directory / "spool")
        return not store.counts()

    try:
        wait_listening(port, process, "relay serve")
        yield spool_empty, worker_pids(process.pid)
    finally:
        if store is not None:
            store.close()
        stop(process)
        log.close()


def send(port: int, messages: int, size: int, sessions: int) -> None:
    command = [SMTP_SOURCE, "-s", str(sessions), "-l", str(size), "-m", str(messages),
               "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    completed = subprocess.run(command, capture_output=True, timeout=DRAIN_TIMEOUT, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {completed.stderr.decode(errors='replace')[-300:]}")


def measure(port: int, queue_is_empty: Callable[[], bool], messages: int, size: int, sessions: int) -> dict[str, float]:
    """Send the messages, wait for an empty queue; return accept and end-to-end rates."""
    started = time.monotonic()
    send(port, messages, size, sessions)
    accepted = time.monotonic()
    while not queue_is_empty():
        if time.monotonic() - started > DRAIN_TIMEOUT:
            raise RuntimeError(f"queue not empty after {DRAIN_TIMEOUT:g} s")
        time.sleep(POLL_INTERVAL)
    drained = time.monotonic()
    return {
        "accept_seconds": round(accepted - started, 3),
        "total_seconds": round(drained - started, 3),
        "accepted_per_second": round(messages / (accepted - started), 1),
        "relayed_per_second": round(messages / (drained - started), 1),
    }


def run_relay(scratch: Path, args: argparse.Namespace) -> dict[str, float]:
    messages, size, sessions = args.messages, args.size, args.sessions
    directory = Path(tempfile.mkdtemp(prefix="relay-", dir=scratch))
    sink_port, port = free_port(), free_port()
    next_hop = NEXT_HOPS[args.next_hop](sink_port)
    with next_hop, relay_serve(directory, port, sink_port, args.chunking) as (spool_empty, workers):
        before = [cpu_seconds(pid) for pid in workers]
        result = measure(port, spool_empty, messages, size, sessions)
        # With two or more workers the last process is the delivery process (it is forked last),
        # so its figure is what delivery costs.
        for index, (pid, start) in enumerate(zip(workers, before, strict=True)):
            result[f"worker{index}_cpu_seconds"] = round(cpu_seconds(pid) - start, 2)
    log = (directory / "relay.log").read_text(errors="replace")
    result["bounced"] = log.count(" bounced ")
    shutil.rmtree(directory, ignore_errors=True)
    return result


def run_postfix(scratch: Path, args: argparse.Namespace) -> dict[str, float]:
    messages, size, sessions = args.messages, args.size, args.sessions
    base = Path(tempfile.mkdtemp(prefix="postfix-", dir=scratch))
    sink_port, port = free_port(), free_port()
    with NEXT_HOPS[args.next_hop](sink_port), postfix_instance(base, port, sink_port, DRAIN_TIMEOUT):
        config = base / "etc"
        result = measure(port, lambda: queue_empty(config), messages, size, sessions)
    shutil.rmtree(base, ignore_errors=True)
    return result


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "processor": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000, help="messages per run (default 5000)")
    parser.add_argument("--size", type=int, default=1024, help="message size in octets (default 1024)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel smtp-source sessions (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="runs per MTA, alternating (default 3)")
    parser.add_argument("--no-postfix", action="store_true", help="measure relay only")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--next-hop", choices=sorted(NEXT_HOPS), default="smtp-sink",
                        help="smart host both MTAs relay to (default smtp-sink)")
    parser.add_argument("--no-chunking", dest="chunking", action="store_false",
                        help="set delivery.chunking = false, so relay sends with DATA even to a CHUNKING next hop")
    args = parser.parse_args(argv)
    for program in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(program, os.X_OK):
            parser.error(f"{program} not found; install the Debian postfix package")
    with_postfix = not args.no_postfix and shutil.which("postfix") is not None and os.geteuid() == 0

    runs: dict[str, list[dict[str, float]]] = {"relay": []}
    if with_postfix:
        runs["postfix"] = []
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as scratch_name:
        scratch = Path(scratch_name)
        for number in range(args.runs):
            for name in runs:
                # Writeback left over from the previous run would otherwise land on this one's fsyncs.
                os.sync()
                run = run_relay if name == "relay" else run_postfix
                result = run(scratch, args)
                runs[name].append(result)
                if not args.json:
                    print(f"run {number + 1} {name}: {result}", file=sys.stderr)

    medians = {name: statistics.median(r["relayed_per_second"] for r in results) for name, results in runs.items()}
    document: dict[str, Any] = {
        "benchmark": "end-to-end relay rate",
        "command": " ".join(["benchmarks/bench_delivery.py", *(argv if argv is not None else sys.argv[1:])]),
        "messages": args.messages,
        "size": args.size,
        "sessions": args.sessions,
        "next_hop": args.next_hop,
        "chunking": args.chunking,
        "machine": info,
        "runs": runs,
        "median_relayed_per_second": medians,
    }
    if "postfix" in medians:
        document["ratio_relay_to_postfix"] = round(medians["relay"] / medians["postfix"], 2)
    if args.json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for name, value in medians.items():
            print(f"{name}: {value:.0f} messages/s relayed end to end (median of {args.runs})")
        if "ratio_relay_to_postfix" in document:
            print(f"relay / postfix: {document['ratio_relay_to_postfix']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
