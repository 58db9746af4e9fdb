"""Process metrics in the Prometheus text exposition format (version 0.0.4).

The format is written directly instead of through ``prometheus-client``.
relay needs counters, gauges and histograms with labels, added up over
several worker processes.  That package offers the sum only through its
multiprocess mode, which keeps one mmap file per metric and process.  Here
each process keeps its own ``Registry`` and saves a JSON snapshot of it
to ``SPOOL/metrics/worker-N.json`` every ``SNAPSHOT_INTERVAL`` seconds and
at exit (to a temporary folder instead when only sink listeners run, see
``snapshot_override``).  The admin listener adds those snapshots to its own live values.

Most counters move in ``observe_event``, which sees every ``log_event``
call whatever the log level, so the server, the spool and the scheduler
need no metric calls of their own.

Metric and label names follow the Prometheus conventions: a ``relay_``
prefix, ``_total`` for counters, base units (seconds, octets).
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from relay._parser import VERBS
from relay.log import add_observer

# How often a worker saves its snapshot: a scrape may see values this old.
SNAPSHOT_INTERVAL = 2.0
# A snapshot older than this comes from a process that no longer runs.
STALE_AFTER = 10 * SNAPSHOT_INTERVAL

# Upper bounds, in seconds, for delivery and commit latency histograms: from
# one fsync (about a millisecond) to a slow remote server (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Upper bounds for the number of messages in one spool commit batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

LabelValues = tuple[str, ...]


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help_text = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if not labels and not self.labelnames:
            return ()
        # Same length and every name present means the same set of names.
        if len(labels) == len(self.labelnames):
            try:
                return tuple([str(labels[name]) for name in self.labelnames])
            except KeyError:
                pass
        raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")


class Counter(_Metric):
    """A value that only goes up (resets when the process restarts)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount


class Gauge(_Metric):
    """A value that goes up and down, such as active connections."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self.values[self._key(labels)] = value

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def value(self, default: float = 0.0, **labels: str) -> float:
        """Return this process's value for ``labels``, or ``default`` when it was never set."""
        key = self._key(labels)
        with self._lock:
            return self.values.get(key, default)


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their count and sum."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))
        # Per label set: per-bucket counts (not cumulative), then count and sum.
        self.values: dict[LabelValues, list[float]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            row = self.values.get(key)
            if row is None:
                row = self.values[key] = [0.0] * (len(self.buckets) + 2)
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    row[index] += 1
                    break
            row[-2] += 1
            row[-1] += value


Metric = Counter | Gauge | Histogram


class Registry:
    """The metrics of one process."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def _add(self, metric: Metric) -> Any:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self.metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        result: Counter = self._add(Counter(name, help_text, labelnames))
        return result

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        result: Gauge = self._add(Gauge(name, help_text, labelnames))
        return result

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        result: Histogram = self._add(Histogram(name, help_text, buckets, labelnames))
        return result

    def snapshot(self) -> dict[str, list[list[Any]]]:
        """Return every value as JSON-ready data: name to a list of [labels, value]."""
        result: dict[str, list[list[Any]]] = {}
        for name, metric in self.metrics.items():
            with metric._lock:
                result[name] = [[list(key), value] for key, value in metric.values.items()]
        return result

    def render(self, others: Iterable[dict[str, list[list[Any]]]] = ()) -> str:
        """Return the text exposition of this registry plus other processes' snapshots.

        Counters and histograms are added up; gauges too, because every gauge
        here is a per-process share (connections, sessions) of a total.
        """
        merged: dict[str, dict[LabelValues, Any]] = {}
        for snapshot in [self.snapshot(), *others]:
            for name, rows in snapshot.items():
                if name not in self.metrics:
                    continue
                target = merged.setdefault(name, {})
                for labels, value in rows:
                    key = tuple(labels)
                    if isinstance(value, list):
                        previous = target.get(key)
                        if previous is not None:
                            value = [a + b for a, b in zip(previous, value, strict=True)]
                        target[key] = value
                    else:
                        target[key] = target.get(key, 0.0) + value

        lines: list[str] = []
        for name, metric in self.metrics.items():
            lines.append(f"# HELP {name} {_escape_help(metric.help_text)}")
            lines.append(f"# TYPE {name} {metric.kind}")
            series: dict[LabelValues, Any] = merged.get(name, {})
            if not series and not metric.labelnames:
                # An unlabelled series exists from the start, so rate() and alerts see
                # a 0 and not a missing series before the first event.
                series = {(): [0.0] * (len(metric.buckets) + 2) if isinstance(metric, Histogram) else 0.0}
            for key, value in sorted(series.items()):
                labels = dict(zip(metric.labelnames, key, strict=True))
                if isinstance(metric, Histogram):
                    lines.extend(_histogram_lines(metric, labels, value))
                else:
                    lines.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _histogram_lines(metric: Histogram, labels: dict[str, str], row: list[float]) -> list[str]:
    lines = []
    cumulative = 0.0
    for bound, count in zip(metric.buckets, row[: len(metric.buckets)], strict=True):
        cumulative += count
        lines.append(f"{metric.name}_bucket{_labels({**labels, 'le': repr(float(bound))})} {_number(cumulative)}")
    lines.append(f"{metric.name}_bucket{_labels({**labels, 'le': '+Inf'})} {_number(row[-2])}")
    lines.append(f"{metric.name}_count{_labels(labels)} {_number(row[-2])}")
    lines.append(f"{metric.name}_sum{_labels(labels)} {_number(row[-1])}")
    return lines


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def save_snapshot(registry: Registry, directory: Path, name: str) -> None:
    """Write the registry's snapshot to DIRECTORY/NAME.json atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{name}.{os.getpid()}.tmp"
    temporary.write_bytes(orjson.dumps(registry.snapshot()))
    os.replace(temporary, directory / f"{name}.json")


# The folder of the processes' snapshots when it is not inside the spool:
# ``relay serve`` sets it before its processes fork, so each one inherits it.
# None means SPOOL/metrics.
snapshot_override: Path | None = None


def snapshot_directory(spool_path: str) -> Path:
    """Return the folder of the processes' snapshots: ``snapshot_override``, else inside the spool directory."""
    if snapshot_override is not None:
        return snapshot_override
    return Path(spool_path) / "metrics"


# Start of the name of the private snapshot folder; the PID of the process
# that created it and a random part follow, as in relay-metrics-4242-k3j9x2.
PRIVATE_FOLDER_PREFIX = "relay-metrics-"


def create_private_folder() -> Path:
    """Create the private snapshot folder of a sink-only ``relay serve`` in the temporary folder."""
    return Path(tempfile.mkdtemp(prefix=f"{PRIVATE_FOLDER_PREFIX}{os.getpid()}-"))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The PID belongs to another user's process.
        return True
    return True


def remove_stale_private_folders(parent: Path | None = None) -> list[tuple[Path, int]]:
    """Remove the private snapshot folders whose process is gone; return each (folder, PID).

    A process killed with SIGKILL cannot remove its folder.  A folder is
    stale when it belongs to this user, no process has the PID in its name,
    and it has not changed for ``STALE_AFTER`` seconds.  The age check keeps
    the folder of a live process in another PID namespace that shares the
    temporary folder, because a live process saves a snapshot into it every
    ``SNAPSHOT_INTERVAL`` seconds.  Folders named without a PID, as older
    versions made them, are left alone.
    """
    directory = parent if parent is not None else Path(tempfile.gettempdir())
    removed = []
    now = time.time()
    for path in directory.glob(f"{PRIVATE_FOLDER_PREFIX}*-*"):
        pid_text = path.name[len(PRIVATE_FOLDER_PREFIX) :].partition("-")[0]
        if not (pid_text.isascii() and pid_text.isdigit()):
            continue
        pid = int(pid_text)
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or now - info.st_mtime <= STALE_AFTER:
            continue
        if pid == os.getpid() or _process_exists(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append((path, pid))
    return removed


def clear_snapshots(directory: Path) -> None:
    """Remove the snapshots of an earlier run, which ``relay serve`` does before its processes start.

    Otherwise a restart with fewer workers would add the old ones' counts
    until they go stale, and Prometheus would then see a counter reset.
    """
    for path in directory.glob("*.json"):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def load_snapshots(directory: Path, exclude: str) -> list[dict[str, list[list[Any]]]]:
    """Read the snapshots other live processes saved, skipping ``exclude``.

    A snapshot not rewritten for ``STALE_AFTER`` seconds belongs to a process
    that is gone (an earlier run, or one with more workers); it is left out,
    which Prometheus treats as a counter reset.
    """
    snapshots = []
    now = time.time()
    for path in sorted(directory.glob("*.json")):
        if path.stem == exclude:
            continue
        try:
            if now - path.stat().st_mtime > STALE_AFTER:
                continue
            snapshots.append(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            # A file being replaced or truncated: its values show up on the next scrape.
            continue
    return snapshots


REGISTRY = Registry()

connections = REGISTRY.counter("relay_connections_total", "SMTP connections accepted, by listener.", ["listener"])
connections_active = REGISTRY.gauge("relay_connections_active", "SMTP connections open now.")
messages_received = REGISTRY.counter("relay_messages_received_total", "Messages accepted and spooled.")
octets_received = REGISTRY.counter("relay_message_octets_received_total", "Octets of the messages spooled.")
messages_rejected = REGISTRY.counter(
    "relay_messages_rejected_total",
    "4xx and 5xx replies, by command and enhanced status code.",
    ["command", "status"],
)
auth_failures = REGISTRY.counter("relay_auth_failures_total", "Failed AUTH attempts.")
recipients_delivered = REGISTRY.counter("relay_recipients_delivered_total", "Recipients delivered.")
recipients_deferred = REGISTRY.counter(
    "relay_recipients_deferred_total", "Delivery attempts that ended in a temporary failure."
)
recipients_bounced = REGISTRY.counter("relay_recipients_bounced_total", "Recipients that failed for good.")
queue_recipients = REGISTRY.gauge("relay_queue_recipients", "Recipients in the spool, by state.", ["state"])
queue_oldest_age = REGISTRY.gauge(
    "relay_queue_oldest_age_seconds", "Age of the oldest message with a recipient in this state.", ["state"]
)


class BoundedLabel:
    """The values of one label, capped: after ``limit`` distinct values the rest map to "other".

    A relay that sends to very many domains would otherwise add series
    without end, and every scrape would grow with them.  The first values
    seen keep their own series until the process restarts.
    """

    OTHER = "other"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        """Return ``value`` if it has or can still get a series of its own, else "other"."""
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return self.OTHER


# The destination label of the two families below, set from [admin] max_destination_labels at start.
destination_label = BoundedLabel(100)
destination_attempts = REGISTRY.counter(
    "relay_destination_attempts_total",
    "Delivery attempt results per recipient domain: delivered, deferred or bounced.",
    ["destination", "result"],
)
destination_active = REGISTRY.gauge(
    "relay_destination_connections_active", "Outbound SMTP connections open, per next hop.", ["destination"]
)
delivery_latency = REGISTRY.histogram(
    "relay_delivery_latency_seconds", "Time from arrival to delivery of a recipient.", LATENCY_BUCKETS
)
spool_batch_size = REGISTRY.histogram(
    "relay_spool_commit_batch_messages", "Changes in one spool transaction (group commit).", BATCH_BUCKETS
)
spool_commit_latency = REGISTRY.histogram(
    "relay_spool_commit_seconds", "Time to commit and fsync one spool transaction.", LATENCY_BUCKETS
)
# Set in worker 0 alone, so the sum over processes is its value: by its own
# reload with one worker, and with several by its admin listener from the
# outcome of every process (relay.reload_status).
config_reload_applied = REGISTRY.gauge(
    "relay_config_last_reload_successful",
    "1 while every process applied the last config reload (or none was made) and all run one config, else 0.",
)
tls_handshakes = REGISTRY.counter(
    "relay_tls_handshakes_total", "TLS handshakes by side (server, client) and result.", ["side", "result"]
)


# The ``command`` label of relay_messages_rejected_total is one of the parser's
# verbs or "other".  A reject line's command may carry the address ("RCPT
# TO:<a@b>") or a client's unknown verb, and either as a label would add a
# series per value.


def _reject_command(command: object) -> str:
    """Return the SMTP verb of a reject line's command, or "other" for an unknown one."""
    words = str(command).split(None, 1)
    verb = words[0].upper() if words else ""
    return verb if verb in VERBS else "other"


def _reply_status(reply: object) -> str:
    # Reject lines look like "550 5.1.1 text"; the enhanced code is the label.
    parts = str(reply).split(" ", 2)
    return parts[1] if len(parts) > 1 and parts[1][:1] in ("4", "5") else (parts[0] if parts else "")


def _domain(address: object) -> str:
    _, at, domain = str(address).rpartition("@")
    return domain.lower() if at else ""


def observe_event(event: str, fields: dict[str, Any]) -> None:
    """Count one log event in the metrics; installed as a ``relay.log`` observer."""
    if event == "connect":
        connections.inc(listener=str(fields.get("listener", "")))
        connections_active.inc()
    elif event == "disconnect":
        connections_active.dec()
    elif event == "queued":
        messages_received.inc()
        octets_received.inc(float(fields.get("size", 0) or 0))
    elif event == "reject":
        status = _reply_status(fields.get("reply", ""))
        messages_rejected.inc(command=_reject_command(fields.get("command")), status=status)
    elif event == "auth_failed":
        auth_failures.inc()
    elif event == "tls":
        tls_handshakes.inc(side="server", result="ok")
    elif event == "tls_failed":
        tls_handshakes.inc(side="server", result="failed")
    elif event == "tls_fallback":
        tls_handshakes.inc(side="client", result="failed")
    elif event == "committed":
        spool_batch_size.observe(float(fields.get("jobs", 0) or 0))
        seconds = fields.get("seconds")
        if isinstance(seconds, (int, float)):
            spool_commit_latency.observe(float(seconds))
    elif event in ("delivered", "deferred", "bounced"):
        destination_attempts.inc(destination=destination_label(_domain(fields.get("to", ""))), result=event)
        if event == "delivered":
            recipients_delivered.inc()
            delay = fields.get("delay")
            if isinstance(delay, (int, float)):
                delivery_latency.observe(float(delay))
        elif event == "deferred":
            recipients_deferred.inc()
        else:
            recipients_bounced.inc()


add_observer(observe_event)
