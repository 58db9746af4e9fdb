"""Latency histograms and run counters for ``relay bench``.

Latencies are recorded in whole microseconds into a log-linear histogram.
Values below 128 us get a bucket each, and larger values share 64 buckets
per power of two.  So a reported percentile is within 1/64 (1.6 %) of the
true sample, and memory stays fixed however long the run.  Histograms and counters
from several worker processes merge by adding bucket counts, so the merged
percentiles equal those of one process that saw every sample.

Percentiles use the nearest-rank definition: p99 is the smallest recorded
value that at least 99 % of the samples do not exceed.  The maximum is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# 64 buckets per power of two above the exact range; 41 powers cover
# 2**47 us (about four years), far past any timeout.
_SUB_BUCKETS = 64
_EXACT_LIMIT = 2 * _SUB_BUCKETS
_BUCKET_COUNT = _SUB_BUCKETS * 42

PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))

# Latency histograms every run records, in report order.
LATENCY_KINDS: tuple[str, ...] = ("connect", "greeting", "end_of_data", "transaction")


def _bucket_of(value: int) -> int:
    if value < _EXACT_LIMIT:
        return value
    shift = value.bit_length() - 7
    return shift * _SUB_BUCKETS + (value >> shift)


def _bucket_low(bucket: int) -> int:
    if bucket < _EXACT_LIMIT:
        return bucket
    shift = bucket // _SUB_BUCKETS - 1
    return (bucket - shift * _SUB_BUCKETS) << shift


def _bucket_high(bucket: int) -> int:
    if bucket < _EXACT_LIMIT:
        return bucket
    shift = bucket // _SUB_BUCKETS - 1
    return _bucket_low(bucket) + (1 << shift) - 1


class Histogram:
    """Counts of latency samples in microseconds, in log-linear buckets."""

    __slots__ = ("counts", "count", "min", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKET_COUNT
        self.count = 0
        self.min = 0
        self.max = 0
        self.total = 0

    def record(self, microseconds: int) -> None:
        """Add one sample; negative values (clock steps) count as zero."""
        value = microseconds if microseconds > 0 else 0
        bucket = _bucket_of(value)
        if bucket >= _BUCKET_COUNT:
            bucket = _BUCKET_COUNT - 1
        self.counts[bucket] += 1
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def merge(self, other: Histogram) -> None:
        """Add every sample of other to this histogram."""
        if other.count == 0:
            return
        counts = self.counts
        for index, number in enumerate(other.counts):
            if number:
                counts[index] += number
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, fraction: float) -> int:
        """Return the nearest-rank percentile in microseconds (0 when empty)."""
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for bucket, number in enumerate(self.counts):
            seen += number
            if seen >= rank:
                # The middle of the bucket, kept inside the observed range.
                middle = (_bucket_low(bucket) + _bucket_high(bucket)) // 2
                return min(max(middle, self.min), self.max)
        return self.max

    def summary_ms(self) -> dict[str, float]:
        """Return count, mean, p50, p90, p99, p999 and max; times in milliseconds."""
        result: dict[str, float] = {"count": self.count}
        result["mean"] = round(self.total / self.count / 1000, 3) if self.count else 0.0
        for name, fraction in PERCENTILES:
            result[name] = round(self.percentile(fraction) / 1000, 3)
        result["max"] = round(self.max / 1000, 3)
        return result

    def to_state(self) -> dict[str, Any]:
        """Return a compact picklable form for passing between processes."""
        sparse = {index: number for index, number in enumerate(self.counts) if number}
        return {"counts": sparse, "count": self.count, "min": self.min, "max": self.max, "total": self.total}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Histogram:
        """Rebuild a histogram from ``to_state`` output."""
        histogram = cls()
        for index, number in state["counts"].items():
            histogram.counts[int(index)] = number
        histogram.count = state["count"]
        histogram.min = state["min"]
        histogram.max = state["max"]
        histogram.total = state["total"]
        return histogram


def _add_counts(target: dict[str, int], source: dict[str, int]) -> None:
    for key, number in source.items():
        target[key] = target.get(key, 0) + number


@dataclass
class RunStats:
    """Everything one load generator process measured."""

    messages_sent: int = 0
    messages_failed: int = 0
    # Octets of accepted messages as the client read them, before dot-stuffing.
    bytes_sent: int = 0
    # RCPT replies 250 or 251, also in transactions that failed later.
    recipients_accepted: int = 0
    recipients_rejected: int = 0
    # Accepted recipients of the messages sent, which is what a sink counts
    # as the recipients of the messages it accepted.
    recipients_sent: int = 0
    connections: int = 0
    elapsed: float = 0.0
    # The run was stopped by SIGINT (Ctrl-C) before its planned end.
    interrupted: bool = False
    # Reply code (as text, "250") to how many replies carried it, every stage.
    reply_codes: dict[str, int] = field(default_factory=dict)
    # Stage ("mail", "end_of_data", ...) to reply code to count.
    stage_codes: dict[str, dict[str, int]] = field(default_factory=dict)
    # Error kind ("connect_refused", "rcpt_5xx", "timeout", ...) to count.
    errors: dict[str, int] = field(default_factory=dict)
    latency: dict[str, Histogram] = field(default_factory=lambda: {kind: Histogram() for kind in LATENCY_KINDS})

    def count_reply(self, stage: str, code: int) -> None:
        """Count one reply with its code, overall and for its stage."""
        text = str(code)
        self.reply_codes[text] = self.reply_codes.get(text, 0) + 1
        codes = self.stage_codes.get(stage)
        if codes is None:
            codes = self.stage_codes[stage] = {}
        codes[text] = codes.get(text, 0) + 1

    def count_error(self, kind: str, number: int = 1) -> None:
        """Count ``number`` errors of the given kind."""
        self.errors[kind] = self.errors.get(kind, 0) + number

    def merge(self, other: RunStats) -> None:
        """Add other's counters and samples; the elapsed time is the longer one."""
        self.messages_sent += other.messages_sent
        self.messages_failed += other.messages_failed
        self.bytes_sent += other.bytes_sent
        self.recipients_accepted += other.recipients_accepted
        self.recipients_rejected += other.recipients_rejected
        self.recipients_sent += other.recipients_sent
        self.connections += other.connections
        self.elapsed = max(self.elapsed, other.elapsed)
        self.interrupted = self.interrupted or other.interrupted
        _add_counts(self.reply_codes, other.reply_codes)
        for stage, codes in other.stage_codes.items():
            _add_counts(self.stage_codes.setdefault(stage, {}), codes)
        _add_counts(self.errors, other.errors)
        for kind, histogram in other.latency.items():
            self.latency.setdefault(kind, Histogram()).merge(histogram)

    def to_state(self) -> dict[str, Any]:
        """Return a picklable form for passing from a worker process."""
        return {
            "messages_sent": self.messages_sent,
            "messages_failed": self.messages_failed,
            "bytes_sent": self.bytes_sent,
            "recipients_accepted": self.recipients_accepted,
            "recipients_rejected": self.recipients_rejected,
            "recipients_sent": self.recipients_sent,
            "connections": self.connections,
            "elapsed": self.elapsed,
            "interrupted": self.interrupted,
            "reply_codes": self.reply_codes,
            "stage_codes": self.stage_codes,
            "errors": self.errors,
            "latency": {kind: histogram.to_state() for kind, histogram in self.latency.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunStats:
        """Rebuild from ``to_state`` output."""
        fields = dict(state)
        fields["latency"] = {kind: Histogram.from_state(item) for kind, item in state["latency"].items()}
        return cls(**fields)

    def report(self) -> dict[str, Any]:
        """Return the result document that ``--json`` prints."""
        elapsed = self.elapsed if self.elapsed > 0 else float("nan")
        per_second = 0.0 if math.isnan(elapsed) else self.messages_sent / elapsed
        bytes_per_second = 0.0 if math.isnan(elapsed) else self.bytes_sent / elapsed
        latencies = {kind: histogram.summary_ms() for kind, histogram in self.latency.items()}
        return {
            "messages_sent": self.messages_sent,
            "messages_failed": self.messages_failed,
            "messages_per_s": round(per_second, 1),
            "bytes_sent": self.bytes_sent,
            "bytes_per_s": round(bytes_per_second, 1),
            "recipients_accepted": self.recipients_accepted,
            "recipients_rejected": self.recipients_rejected,
            "recipients_sent": self.recipients_sent,
            "connections": self.connections,
            "elapsed_s": round(self.elapsed, 3),
            "interrupted": self.interrupted,
            "latency_ms": latencies["end_of_data"],
            "latencies_ms": latencies,
            "reply_codes": dict(sorted(self.reply_codes.items())),
            "replies_by_stage": {
                stage: dict(sorted(codes.items())) for stage, codes in sorted(self.stage_codes.items())
            },
            "errors": dict(sorted(self.errors.items())),
        }


def format_report(report: dict[str, Any]) -> str:
    """Render a result document as the human-readable summary."""
    totals = (
        f"messages   {report['messages_sent']} sent, {report['messages_failed']} failed "
        f"in {report['elapsed_s']:.3f} s over {report['connections']} connections"
    )
    if report["interrupted"]:
        totals += ", interrupted by SIGINT"
    lines = []
    settings = report.get("settings")
    if settings is not None:
        lines.append(
            f"target     {settings['target']} with {settings['concurrency']} connections"
            f" in {settings['processes']} process{'es' if settings['processes'] != 1 else ''}"
        )
    lines += [
        totals,
        f"rate       {report['messages_per_s']:.1f} messages/s, {report['bytes_per_s'] / 1e6:.3f} MB/s",
        f"recipients {report['recipients_accepted']} accepted, {report['recipients_rejected']} rejected, "
        f"{report['recipients_sent']} in messages sent",
        "latency ms       count      mean       p50       p90       p99     p99.9       max",
    ]
    for kind, summary in report["latencies_ms"].items():
        lines.append(
            f"  {kind:<12} {int(summary['count']):>9} {summary['mean']:>9.3f} {summary['p50']:>9.3f} "
            f"{summary['p90']:>9.3f} {summary['p99']:>9.3f} {summary['p999']:>9.3f} {summary['max']:>9.3f}"
        )
    codes = " ".join(f"{code}={number}" for code, number in report["reply_codes"].items())
    lines.append(f"replies    {codes or '-'}")
    for stage, stage_codes in report["replies_by_stage"].items():
        text = " ".join(f"{code}={number}" for code, number in stage_codes.items())
        lines.append(f"  {stage:<12} {text}")
    errors = " ".join(f"{kind}={number}" for kind, number in report["errors"].items())
    lines.append(f"errors     {errors or 'none'}")
    return "\n".join(lines)
