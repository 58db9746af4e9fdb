"""Latency histogram of relay bench: accuracy, monotonic percentiles, exact merges."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from relay.bench.stats import PERCENTILES, Histogram, RunStats


def _exact_percentile(samples: list[int], fraction: float) -> int:
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def test_histogram_small_values_exact() -> None:
    histogram = Histogram()
    for value in range(1, 101):
        histogram.record(value)
    assert histogram.percentile(0.5) == 50
    assert histogram.percentile(0.9) == 90
    assert histogram.percentile(0.99) == 99
    assert histogram.max == 100
    assert histogram.min == 1


def test_histogram_within_relative_error() -> None:
    generator = random.Random(7)
    samples = [int(generator.lognormvariate(7, 1.5)) for _ in range(20_000)]
    histogram = Histogram()
    for value in samples:
        histogram.record(value)
    for _, fraction in PERCENTILES:
        exact = _exact_percentile(samples, fraction)
        measured = histogram.percentile(fraction)
        assert abs(measured - exact) <= exact / 64 + 1, (fraction, exact, measured)
    assert histogram.max == max(samples)


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=300))
def test_percentiles_monotonic(samples: list[int]) -> None:
    histogram = Histogram()
    for value in samples:
        histogram.record(value)
    values = [histogram.percentile(fraction) for _, fraction in PERCENTILES] + [histogram.max]
    assert values == sorted(values)
    assert values[0] >= min(samples)


def test_merge_equals_single_histogram() -> None:
    generator = random.Random(3)
    samples = [generator.randrange(0, 5_000_000) for _ in range(5_000)]
    whole = Histogram()
    first = Histogram()
    second = Histogram()
    for index, value in enumerate(samples):
        whole.record(value)
        (first if index % 3 else second).record(value)
    first.merge(Histogram.from_state(second.to_state()))
    assert first.counts == whole.counts
    assert first.summary_ms() == whole.summary_ms()


def test_run_stats_merge_adds_counters() -> None:
    one = RunStats(messages_sent=3, messages_failed=1, bytes_sent=300, recipients_sent=3, elapsed=1.0)
    one.count_reply("mail", 250)
    one.count_error("rcpt_4xx")
    two = RunStats(messages_sent=2, bytes_sent=200, recipients_sent=4, elapsed=2.0)
    two.count_reply("mail", 451)
    two.count_error("rcpt_4xx")
    one.merge(RunStats.from_state(two.to_state()))
    report = one.report()
    assert report["messages_sent"] == 5
    assert report["messages_failed"] == 1
    assert report["recipients_sent"] == 7
    assert report["elapsed_s"] == 2.0
    assert report["messages_per_s"] == 2.5
    assert report["reply_codes"] == {"250": 1, "451": 1}
    assert report["errors"] == {"rcpt_4xx": 2}


def test_empty_report_has_required_keys() -> None:
    report = RunStats().report()
    for key in ("messages_sent", "messages_failed", "messages_per_s", "bytes_per_s", "latency_ms", "reply_codes"):
        assert key in report
    assert set(report["latency_ms"]) >= {"p50", "p90", "p99", "p999", "max"}
