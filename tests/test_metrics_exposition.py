"""The /metrics text of a live relay, checked against the exposition format 0.0.4.

``check_exposition`` is stricter than ``prometheus_client``'s parser, which
accepts a sample before its TYPE line, a counter without ``_total``, a
repeated series and a histogram without a ``+Inf`` bucket.
"""

from __future__ import annotations

import math
import re
import smtplib
import urllib.request
from pathlib import Path

import pytest
from delivery_peers import run_upstream
from server_helpers import RelayProcess, wait_until

from conftest import free_port
from relay import metrics

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# One name="value" pair; inside the quotes only \\, \" and \n are escapes.
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
# In a HELP text only \\ and \n are escapes.
HELP_TEXT = re.compile(r"(?:[^\\\n]|\\[\\n])*")
SAMPLE_LINE = re.compile(r"([^{ ]+)(?:\{(.*)\})? (\S+)(?: (-?\d+))?")
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda match: "\n" if match.group(1) == "n" else match.group(1), value)


def _parse_labels(text: str, line: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = LABEL_PAIR.match(text, position)
        assert match, f"invalid label set in {line!r}"
        name = match.group(1)
        assert not name.startswith("__"), f"reserved label name {name!r} in {line!r}"
        assert name not in labels, f"label {name!r} repeated in {line!r}"
        labels[name] = _unescape(match.group(2))
        position = match.end()
        if position < len(text):
            assert text[position] == ",", f"expected a comma after {name} in {line!r}"
            position += 1
    return labels


def _parse_value(text: str, line: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text)
    assert FLOAT.fullmatch(text), f"invalid value {text!r} in {line!r}"
    return float(text)


def _check_comment(line: str, current: str, helps: dict[str, str], types: dict[str, str], samples: Series) -> str:
    """Check a HELP or TYPE line and return the metric family it starts or continues."""
    parts = line.split(" ", 3)
    if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
        return current  # a plain comment
    name = parts[2]
    assert METRIC_NAME.fullmatch(name), f"invalid metric name {name!r}"
    if name != current:
        # The HELP and TYPE lines and the samples of one family are adjacent.
        assert name not in helps, f"{name} is split into two groups"
        assert name not in types, f"{name} is split into two groups"
    if parts[1] == "HELP":
        assert name not in helps, f"second HELP line for {name}"
        help_text = parts[3] if len(parts) > 3 else ""
        assert HELP_TEXT.fullmatch(help_text), f"invalid escape in the HELP text of {name}"
        helps[name] = help_text
    else:
        assert name not in types, f"second TYPE line for {name}"
        assert len(parts) == 4, f"invalid TYPE line {line!r}"
        assert parts[3] in TYPES, f"invalid TYPE line {line!r}"
        assert not any(sample.startswith(name) for sample in samples), f"TYPE of {name} after its samples"
        types[name] = parts[3]
    return name


def _check_sample_name(name: str, family: str, kind: str, value: float, labels: dict[str, str], line: str) -> None:
    if kind == "histogram":
        assert name in (f"{family}_bucket", f"{family}_sum", f"{family}_count"), f"{name} outside {family}"
        if name.endswith("_bucket"):
            assert "le" in labels, f"bucket without le in {line!r}"
            _parse_value(labels["le"], line)
        return
    assert name == family, f"sample {name} under the TYPE line of {family}"
    if kind == "counter":
        assert name.endswith("_total"), f"counter {name} does not end in _total"
        assert value >= 0, f"negative counter in {line!r}"


def _check_histogram(family: str, samples: Series) -> None:
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for key, value in samples.get(f"{family}_bucket", {}).items():
        labels = dict(key)
        bound = float(labels.pop("le"))
        buckets.setdefault(tuple(sorted(labels.items())), []).append((bound, value))
    counts = samples.get(f"{family}_count", {})
    assert set(buckets) == set(counts), f"{family}: _bucket and _count have different label sets"
    assert set(counts) == set(samples.get(f"{family}_sum", {})), f"{family}: _count and _sum differ"
    for key, rows in buckets.items():
        rows.sort()
        assert rows[-1][0] == math.inf, f"{family}{dict(key)} has no +Inf bucket"
        values = [count for _, count in rows]
        assert values == sorted(values), f"{family}{dict(key)} buckets are not cumulative"
        assert rows[-1][1] == counts[key], f"{family}{dict(key)}: the +Inf bucket differs from _count"


def check_exposition(text: str) -> Series:
    """Check ``text`` against the text format 0.0.4; return {sample name: {sorted labels: value}}."""
    assert text.endswith("\n"), "the exposition does not end with a line feed"
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: Series = {}
    family = ""
    for line in text[:-1].split("\n"):
        assert line, "empty line in the exposition"
        if line.startswith("#"):
            family = _check_comment(line, family, helps, types, samples)
            continue
        match = SAMPLE_LINE.fullmatch(line)
        assert match, f"invalid sample line {line!r}"
        name = match.group(1)
        assert METRIC_NAME.fullmatch(name), f"invalid metric name {name!r}"
        labels = _parse_labels(match.group(2) or "", line)
        value = _parse_value(match.group(3), line)
        _check_sample_name(name, family, types.get(family, "untyped"), value, labels, line)
        series = samples.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        assert key not in series, f"duplicate series {line!r}"
        series[key] = value
    for name, kind in types.items():
        if kind == "histogram":
            _check_histogram(name, samples)
    return samples


def test_checker_rejects_format_errors() -> None:
    valid = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 1\n'
    assert check_exposition(valid) == {"a_total": {(("x", "1"),): 1.0}}
    broken = {
        "raw newline in a label": '# TYPE a_total counter\na_total{x="1\n2"} 1\n',
        "unknown escape": '# TYPE a_total counter\na_total{x="\\t"} 1\n',
        "counter without _total": "# TYPE a counter\na 1\n",
        "duplicate series": '# TYPE a_total counter\na_total{x="1"} 1\na_total{x="1"} 2\n',
        "no +Inf bucket": '# TYPE h histogram\nh_bucket{le="1.0"} 1\nh_count 1\nh_sum 1\n',
        "TYPE after samples": "a 1\n# TYPE a gauge\n",
        "no final line feed": "# TYPE a gauge\na 1",
        "unknown escape in HELP": "# HELP a A \\t.\n# TYPE a gauge\na 1\n",
    }
    for case, text in broken.items():
        with pytest.raises(AssertionError):
            check_exposition(text)
            pytest.fail(f"accepted: {case}")


def test_registry_escapes_label_values() -> None:
    registry = metrics.Registry()
    counter = registry.counter("relay_test_total", "A help text with a backslash \\ and\na line feed.", ["reason"])
    values = ["back\\slash", 'double "quote"', "line\nfeed", '\\n is not "\n"']
    for value in values:
        counter.inc(reason=value)

    samples = check_exposition(registry.render())

    assert sorted(samples["relay_test_total"]) == sorted((("reason", value),) for value in values)


def _send(port: int, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail("sender@example.org", recipients, b"Subject: metrics\r\n\r\nbody\r\n")


def _scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_live_metrics_are_valid(tmp_path: Path) -> None:
    admin_port = free_port()
    upstream_port = free_port()
    closed_port = free_port()  # nothing listens here, so delivery to it is deferred
    extra = f"""
[delivery]
nameservers = ["127.0.0.1:{free_port()}"]
[delivery.transport]
"sunk.test" = "smtp:[127.0.0.1]:{upstream_port}"
"deferred.test" = "smtp:[127.0.0.1]:{closed_port}"
"""
    relay = RelayProcess(
        tmp_path, deliver=True, admin_address=f"127.0.0.1:{admin_port}", extra=extra,
        policy='relay_domains = ["sunk.test", "deferred.test"]',
    )
    with run_upstream("127.0.0.1", upstream_port) as upstream, relay:
        refused = _send(relay.port, ["rcpt@example.net", "to@sunk.test", "to@deferred.test", "nobody@example.net"])
        assert list(refused) == ["nobody@example.net"]

        def seen() -> bool:
            samples = check_exposition(_scrape(admin_port)[1])
            return (
                samples["relay_recipients_delivered_total"][()] == 2
                and samples["relay_recipients_deferred_total"][()] >= 1
            )

        assert wait_until(seen, 30), relay.log()[-3000:]
        content_type, text = _scrape(admin_port)
        assert len(upstream.messages) == 1

    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = check_exposition(text)
    assert samples["relay_messages_received_total"][()] == 1
    assert samples["relay_messages_rejected_total"][(("command", "RCPT"), ("status", "5.1.1"))] == 1
    destinations = samples["relay_destination_attempts_total"]
    assert destinations[(("destination", "example.net"), ("result", "delivered"))] == 1
    assert destinations[(("destination", "sunk.test"), ("result", "delivered"))] == 1
    assert destinations[(("destination", "deferred.test"), ("result", "deferred"))] >= 1
    assert samples["relay_delivery_latency_seconds_count"][()] == 2
    assert samples["relay_queue_recipients"][(("state", "deferred"),)] == 1
