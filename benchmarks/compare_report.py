"""Render ``compare.py`` results: a section of RESULTS.md and an SVG bar chart.

The section sits between ``SECTION_BEGIN`` and ``SECTION_END`` in
RESULTS.md and is replaced on each run.  The rest of the file, which other
benchmarks write, is kept.  Ratios divide medians measured in the same run.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

SECTION_BEGIN = "<!-- compare.py: begin -->"
SECTION_END = "<!-- compare.py: end -->"

CLIENT_LABELS = {"smtp-source": "smtp-source", "relay-bench": "relay bench"}

# (numerator, denominator, target as text); the targets are the project's goals.
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("relay-serve", "aiosmtpd-fsync-best", ">= 3"),
    ("relay-serve", "aiosmtpd-null", ">= 1.5 on W1-W4"),
    ("relay-serve", "postfix", "> 1, >= 1.5 on W3"),
    ("relay-sink", "smtp-sink", ">= 0.8 on W1-W2, >= 1 on W3"),
)

COLORS = {
    "relay-serve": "#1f5fa8",
    "relay-sink": "#6aa6e8",
    "relay-serve-sink": "#9cc3ea",
    "aiosmtpd-null": "#e0892c",
    "aiosmtpd-fsync": "#b35806",
    "aiosmtpd-fsync-loop": "#8c4a06",
    "smtp-sink": "#4d9a4d",
    "postfix": "#8c6bb1",
}


def _median(summary: dict[str, Any], server: str, workload: str, client: str) -> float | None:
    cell = summary.get(server, {}).get(workload, {}).get(client)
    return None if cell is None else float(cell["median"])


def _rate_cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "failed"
    return f"{cell['median']:,.0f} ({cell['min']:,.0f}-{cell['max']:,.0f})"


def _ratio_text(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}"


def _with_best_fsync(summary: dict[str, Any], servers: dict[str, str]) -> None:
    """Add "aiosmtpd-fsync-best": per workload and client, the better of the two fsync handlers."""
    handlers = [name for name in ("aiosmtpd-fsync", "aiosmtpd-fsync-loop") if name in summary]
    if not handlers:
        return
    best: dict[str, dict[str, Any]] = {}
    for name in handlers:
        for workload, cells in summary[name].items():
            for client, cell in cells.items():
                current = best.setdefault(workload, {}).get(client)
                if current is None or float(cell["median"]) > float(current["median"]):
                    best[workload][client] = cell
    summary["aiosmtpd-fsync-best"] = best
    servers["aiosmtpd-fsync-best"] = "aiosmtpd write+fsync (better handler)"


def render_section(document: dict[str, Any]) -> str:
    """Return the Markdown section for one comparison run."""
    summary: dict[str, Any] = dict(document["summary"])
    servers: dict[str, str] = dict(document["servers"])
    _with_best_fsync(summary, servers)
    workloads = list(document["workloads"])
    machine = document["machine"]
    measured = [name for name in servers if name in summary and name != "aiosmtpd-fsync-best"]
    clients = sorted({client for by_workload in summary.values() for cells in by_workload.values() for client in cells})

    lines = [
        SECTION_BEGIN,
        "## SMTP servers side by side (`compare.py`)",
        "",
        "Command (from the repository root, with the compiled core built):",
        "",
        f"    .venv/bin/python {document['command']}",
        "",
        f"Each figure is messages per second accepted by the server: the median of {document['runs']} runs, "
        "with min-max in brackets.  relay bench sends for "
        f"{document['seconds']:g} s per run with {document['bench_processes']} processes (one for W5), and "
        "smtp-source then sends as many messages as relay bench managed in that time.  Postfix and "
        "relay serve relay what they accept to an smtp-sink during the run; Postfix's figure is its "
        "accepting rate, and its queue is drained between runs.",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), Linux {machine['kernel']}; "
        + ", ".join(f"{name} {version}" for name, version in machine.items() if name not in ("cpu", "cores", "kernel"))
        + f".  The whole comparison took {document['elapsed_s']:.0f} s.  The clients share the server's "
        "cores, and other work may too, so compare ratios within this run rather than absolute figures across runs.",
        "",
        "Workloads: " + "; ".join(f"{name}: {text}" for name, text in document["workloads"].items()) + ".",
        "",
    ]
    for name, reason in document["unavailable"].items():
        lines.append(f"- {servers[name]}: not measured: {reason}")
    if document["unavailable"]:
        lines.append("")

    for client in clients:
        lines.append(f"### Client: {CLIENT_LABELS.get(client, client)}")
        lines.append("")
        lines.append("| server | " + " | ".join(workloads) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in workloads) + " |")
        for server in measured:
            cells = [_rate_cell(summary[server].get(workload, {}).get(client)) for workload in workloads]
            lines.append(f"| {servers[server]} | " + " | ".join(cells) + " |")
        lines.append("")

    lines.append("### Ratios of medians")
    lines.append("")
    lines.append("| ratio | client | target | " + " | ".join(workloads) + " |")
    lines.append("| --- | --- | --- | " + " | ".join("---:" for _ in workloads) + " |")
    for numerator, denominator, target in RATIOS:
        if numerator not in summary or denominator not in summary:
            continue
        for client in clients:
            values = [
                _ratio_text(
                    _median(summary, numerator, workload, client), _median(summary, denominator, workload, client)
                )
                for workload in workloads
            ]
            label = f"{servers[numerator]} / {servers[denominator]}"
            lines.append(f"| {label} | {CLIENT_LABELS.get(client, client)} | {target} | " + " | ".join(values) + " |")
    if "smtp-sink" in summary and {"relay-bench", "smtp-source"} <= set(clients):
        values = [
            _ratio_text(
                _median(summary, "smtp-sink", workload, "relay-bench"),
                _median(summary, "smtp-sink", workload, "smtp-source"),
            )
            for workload in workloads
        ]
        lines.append(
            "| relay bench / smtp-source, against smtp-sink | - | >= 1 on W1-W2 | " + " | ".join(values) + " |"
        )
    lines.append("")
    lines.append("![messages per second by server and workload](compare.svg)")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def render_svg(document: dict[str, Any]) -> str:
    """Return a grouped bar chart (log scale) of the median rates for one client."""
    summary: dict[str, Any] = document["summary"]
    servers: dict[str, str] = document["servers"]
    workloads = list(document["workloads"])
    measured = [name for name in servers if name in summary and name != "aiosmtpd-fsync-best"]
    clients = {client for by_workload in summary.values() for cells in by_workload.values() for client in cells}
    client = "smtp-source" if "smtp-source" in clients else "relay-bench"

    width, height = 960, 460
    left, right, top, bottom = 70, 200, 40, 50
    plot_width = width - left - right
    plot_height = height - top - bottom
    values = [
        value
        for server in measured
        for workload in workloads
        if (value := _median(summary, server, workload, client)) is not None and value > 0
    ]
    low = 10 ** math.floor(math.log10(min(values))) if values else 1.0
    high = 10 ** math.ceil(math.log10(max(values))) if values else 10.0

    def y_of(value: float) -> float:
        fraction = (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low))
        return top + plot_height * (1 - fraction)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="15">Messages per second (median, log scale), '
        f"client {escape(CLIENT_LABELS.get(client, client))}</text>",
    ]
    decade = low
    while decade <= high:
        y = y_of(decade)
        parts.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{decade:,.0f}</text>')
        decade *= 10
    group_width = plot_width / max(len(workloads), 1)
    bar_width = group_width * 0.8 / max(len(measured), 1)
    for group, workload in enumerate(workloads):
        x0 = left + group * group_width + group_width * 0.1
        for index, server in enumerate(measured):
            value = _median(summary, server, workload, client)
            if value is None or value <= 0:
                continue
            x = x0 + index * bar_width
            y = y_of(value)
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_width - 2:.1f}" height="{top + plot_height - y:.1f}" '
                f'fill="{COLORS.get(server, "#999")}"><title>{escape(servers[server])} {workload}: '
                f"{value:,.0f}/s</title></rect>"
            )
        label_x = left + group * group_width + group_width / 2
        parts.append(f'<text x="{label_x:.1f}" y="{height - bottom + 20}" text-anchor="middle">{workload}</text>')
    for index, server in enumerate(measured):
        y = top + 10 + index * 20
        parts.append(
            f'<rect x="{width - right + 15}" y="{y - 10}" width="12" height="12" fill="{COLORS.get(server, "#999")}"/>'
        )
        parts.append(f'<text x="{width - right + 33}" y="{y}">{escape(servers[server])}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_results(document: dict[str, Any], results: Path, svg: Path) -> None:
    """Replace (or append) this script's section of RESULTS.md and write the chart."""
    section = render_section(document)
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        before = text[: text.index(SECTION_BEGIN)]
        after = text[text.index(SECTION_END) + len(SECTION_END) :].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)
    svg.write_text(render_svg(document))
