"""``relay status``: a summary of the spool by recipient state and destination.

Reads the spool with its own read-only connection inside one read
transaction, so it gives a consistent snapshot while the relay runs, needs
only read access to the spool, and never changes it.  The same summary feeds
the queue gauges of ``/metrics``.  Works on ``--spool DIR`` or the ``[spool]
path`` of ``--config FILE``; a missing spool is reported with exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import orjson

from relay.cli import add_config_option, escape_controls, stop_output
from relay.spool import SpoolError, SpoolStore
from relay.spool.cli import UsageError, format_iso_time, open_store
from relay.spool.store import fresh_domains

# States in the order an operator reads them; a state with no recipient shows 0.
STATES = ("queued", "deferred", "held", "delivered", "bounced")
# Recipients still owed a delivery attempt count as backlog.
BACKLOG_STATES = ("queued", "deferred")


@dataclass(frozen=True)
class Destination:
    """Backlog of one recipient domain."""

    domain: str
    queued: int
    deferred: int
    oldest_arrival: float


@dataclass(frozen=True)
class QueueSummary:
    """Counts of messages and recipients, by state and by destination."""

    messages: int
    recipients: dict[str, int]
    oldest_arrival: dict[str, float]
    destinations: list[Destination] = field(default_factory=list)


def summarize(store: SpoolStore, top: int = 10) -> QueueSummary:
    """Read the summary from an open spool in one read transaction."""
    connection = store.connection
    with store.snapshot():
        (messages,) = connection.execute("SELECT count(*) FROM message").fetchone()
        by_state = connection.execute(
            "SELECT r.state, count(*), min(m.arrival) FROM recipient r "
            "JOIN message m ON m.queue_id = r.queue_id GROUP BY r.state"
        ).fetchall()
        by_domain = connection.execute(
            "SELECT r.domain, sum(r.state = 'queued'), sum(r.state = 'deferred'), min(m.arrival) "
            "FROM recipient r JOIN message m ON m.queue_id = r.queue_id "
            "WHERE r.state IN ('queued', 'deferred') GROUP BY r.domain"
        ).fetchall()
        # Messages not yet attempted have no recipient rows: every recipient is queued.
        fresh = connection.execute(
            "SELECT f.domains, m.arrival FROM fresh f JOIN message m ON m.id = f.id"
        ).fetchall()

    recipients = {state: count for state, count, _ in by_state}
    oldest_arrival = {state: oldest for state, _, oldest in by_state}
    backlog = {domain: [queued, deferred, oldest] for domain, queued, deferred, oldest in by_domain}
    for domain_list, arrival in fresh:
        domains = fresh_domains(domain_list)
        for domain in domains:
            entry = backlog.setdefault(domain, [0, 0, arrival])
            entry[0] += 1
            entry[2] = min(entry[2], arrival)
        recipients["queued"] = recipients.get("queued", 0) + len(domains)
        oldest_arrival["queued"] = min(oldest_arrival.get("queued", arrival), arrival)
    ranked = sorted(backlog.items(), key=lambda item: (-(item[1][0] + item[1][1]), item[0]))
    if top >= 0:
        ranked = ranked[:top]
    return QueueSummary(
        messages=messages,
        recipients=recipients,
        oldest_arrival=oldest_arrival,
        destinations=[Destination(domain, queued, deferred, oldest) for domain, (queued, deferred, oldest) in ranked],
    )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}m"
    if seconds < 172800:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def format_summary(summary: QueueSummary, now: float) -> str:
    """Return the summary as the table ``relay status`` prints."""
    total = sum(summary.recipients.values())
    lines = [f"Spool: {summary.messages} message(s), {total} recipient(s)", ""]
    lines.append(f"{'State':<10} {'Recipients':>10}  Oldest")
    for state in STATES:
        count = summary.recipients.get(state, 0)
        oldest = summary.oldest_arrival.get(state)
        lines.append(f"{state:<10} {count:>10}  {_age(now - oldest) if oldest is not None else '-'}")

    lines.append("")
    if not summary.destinations:
        lines.append("No backlog: no recipient is queued or deferred.")
        return "\n".join(lines)
    lines.append("Top destinations by backlog:")
    width = max(24, *(len(item.domain) for item in summary.destinations))
    lines.append(f"{'Domain':<{width}} {'Queued':>7} {'Deferred':>8}  Oldest")
    for item in summary.destinations:
        # A domain may hold bidirectional or control characters (SMTPUTF8), which a terminal would act on.
        domain = escape_controls(item.domain) if item.domain else "(no domain)"
        lines.append(f"{domain:<{width}} {item.queued:>7} {item.deferred:>8}  {_age(now - item.oldest_arrival)}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    try:
        with open_store(args) as store:
            summary = summarize(store, args.top)
    except (UsageError, SpoolError) as exc:
        print(f"relay status: {exc}", file=sys.stderr)
        return 1

    try:
        if args.json:
            # Times as in relay queue list --json: UTC ISO 8601 text, not Unix seconds.
            document = {
                "messages": summary.messages,
                "recipients": {state: summary.recipients.get(state, 0) for state in STATES},
                "oldest_arrival": {state: format_iso_time(oldest) for state, oldest in summary.oldest_arrival.items()},
                "destinations": [
                    {**vars(item), "oldest_arrival": format_iso_time(item.oldest_arrival)}
                    for item in summary.destinations
                ],
            }
            sys.stdout.write(orjson.dumps(document).decode() + "\n")
            sys.stdout.flush()
        else:
            print(format_summary(summary, time.time()), flush=True)
    except BrokenPipeError:
        return stop_output()
    return 0


def _destination_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return count


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``relay status``."""
    parser = subparsers.add_parser("status", help="summarize the spool by state and destination")
    add_config_option(parser)
    parser.add_argument("--spool", metavar="DIR", help="spool directory (default: [spool] path of the config)")
    parser.add_argument(
        "--top", type=_destination_count, default=10, metavar="N", help="destinations to list (default: 10)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    # Read-only: an operator or a monitoring script needs only read access to the spool.
    parser.set_defaults(handler=_run, read_only=True)
