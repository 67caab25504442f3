"""Targets, medians, the printed table and the JSON results."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Check = Callable[[float | None, float | None], bool | None]


def ratio_at_least(factor: float) -> Check:
    """Pass when ours / anchor ≥ factor."""
    return lambda anchor, ours: (
        None if not (anchor and ours) else ours / anchor >= factor
    )


def ratio_at_most(factor: float) -> Check:
    """Pass when ours / anchor ≤ factor."""
    return lambda anchor, ours: (
        None if not (anchor and ours) else ours / anchor <= factor
    )


def ours_below(limit: float) -> Check:
    """Pass when our figure is below a limit."""
    return lambda anchor, ours: None if ours is None else ours < limit


def ours_at_most(limit: float) -> Check:
    """Pass when our figure is at most a limit."""
    return lambda anchor, ours: None if ours is None else ours <= limit


def ours_true(anchor: float | None, ours: float | None) -> bool | None:
    """Pass when our yes/no figure is yes."""
    return None if ours is None else ours >= 1.0


def info(anchor: float | None, ours: float | None) -> bool | None:
    """No target: shown for context."""
    return None


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    key: str
    label: str
    unit: str
    target: str
    check: Check


METRICS = [
    Metric("cold_set_s", "cold pull of the set", "s", "≤ 0.5×", ratio_at_most(0.5)),
    Metric(
        "warm_images_per_s",
        "warm image pulls, 16 clients",
        "img/s",
        "≥ 3×",
        ratio_at_least(3.0),
    ),
    Metric("warm_requests_per_s", "warm requests", "req/s", "", info),
    Metric("warm_p50_ms", "warm pull latency p50", "ms", "", info),
    Metric("warm_p99_ms", "warm pull latency p99", "ms", "", info),
    Metric(
        "warm_cpu_per_1000",
        "server CPU per 1,000 warm pulls",
        "s",
        "≤ 0.3×",
        ratio_at_most(0.3),
    ),
    Metric("warm_server_cpu_use", "warm: server CPU use", "cores", "", info),
    Metric("warm_server_processes", "warm: server processes", "", "", info),
    Metric("warm_client_cpu_use", "warm: load generator CPU use", "cores", "", info),
    Metric(
        "warm_peak_rss_mb", "peak RSS, warm run", "MB", "ours < 100", ours_below(100)
    ),
    Metric(
        "manifest_head_tag_rps",
        "HEAD manifest by tag",
        "req/s",
        "≥ 10×",
        ratio_at_least(10.0),
    ),
    Metric(
        "manifest_get_tag_rps",
        "GET manifest by tag",
        "req/s",
        "≥ 10×",
        ratio_at_least(10.0),
    ),
    Metric("manifest_head_digest_rps", "HEAD manifest by digest", "req/s", "", info),
    Metric("manifest_get_digest_rps", "GET manifest by digest", "req/s", "", info),
    Metric(
        "big_warm_mbps", "512 MiB blob GET, warm", "MB/s", "≥ 1.0×", ratio_at_least(1.0)
    ),
    Metric("big_cold_s", "512 MiB image pull, cold", "s", "≤ 1.1×", ratio_at_most(1.1)),
    Metric("big_cold_first_byte_s", "cold: first layer byte at", "s", "", info),
    Metric("big_cold_landed_s", "cold: layer on disk at", "s", "", info),
    Metric(
        "big_first_byte_before_disk",
        "cold: first byte before on disk",
        "yes=1",
        "ours = 1",
        ours_true,
    ),
    Metric(
        "big_parallel_peak_rss_mb",
        "peak RSS, 10 clients on 512 MiB",
        "MB",
        "ours < 100",
        ours_below(100),
    ),
    Metric("big_parallel_mbps", "10 clients on 512 MiB, total", "MB/s", "", info),
    Metric(
        "herd_upstream_gets_per_blob",
        "20 clients, 1 un-cached image: upstream GETs",
        "max/blob",
        "ours = 1",
        ours_at_most(1),
    ),
    Metric(
        "startup_s",
        "start-up with cached manifests",
        "s",
        "ours ≤ 2",
        ours_at_most(2.0),
    ),
]


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """Return the median of each figure's repetitions, ignoring NaNs."""
    result = {}
    for key, values in samples.items():
        clean = [value for value in values if not math.isnan(value)]
        if clean:
            result[key] = statistics.median(clean)
    return result


def rows(anchor: dict[str, float], ours: dict[str, float]) -> list[dict[str, Any]]:
    """Return the table rows for the figures both servers produced."""
    table = []
    for metric in METRICS:
        a, o = anchor.get(metric.key), ours.get(metric.key)
        if a is None and o is None:
            continue
        verdict = metric.check(a, o)
        table.append(
            {
                "key": metric.key,
                "scenario": metric.label,
                "unit": metric.unit,
                "anchor": a,
                "ours": o,
                "ratio": o / a if a and o is not None else None,
                "target": metric.target,
                "pass": verdict,
            }
        )
    return table


def format_number(value: float | None) -> str:
    """Format a figure with about three significant digits."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_table(table: list[dict[str, Any]]) -> str:
    """Return the table as aligned text."""
    header = ("scenario", "unit", "anchor", "ours", "ratio", "target", "result")
    lines = [header]
    for row in table:
        verdict = {True: "PASS", False: "FAIL", None: ""}[row["pass"]]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        lines.append(
            (
                row["scenario"],
                row["unit"],
                format_number(row["anchor"]),
                format_number(row["ours"]),
                ratio,
                row["target"],
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for number, line in enumerate(lines):
        cells = [
            cell.ljust(width) if i < 2 or i >= 5 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
        if number == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write the results, samples included, as JSON."""
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
