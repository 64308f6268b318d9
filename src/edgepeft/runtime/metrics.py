"""Prometheus metrics in the text exposition format, without a client library.

A device runtime should not need another dependency for a dozen numbers; the text format is simple
(https://prometheus.io/docs/instrumenting/exposition_formats/). Counters and histograms are updated under one
lock; gauges are read from callbacks at scrape time so they are never stale.

Example:
    >>> metrics = Metrics()
    >>> metrics.observe_request("/v1/assets/{asset_id}/score", 200, 0.004)
    >>> text = metrics.render()
    >>> 'edgepeft_requests_total{route="/v1/assets/{asset_id}/score",status="200"} 1' in text
    True
"""

from __future__ import annotations

import bisect
import datetime
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Request latency buckets (seconds): scoring a batch takes milliseconds; installs take tens to hundreds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SWAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The device's plain counters: (attribute, metric name, help). Another server (the fleet) passes its own table.
DEVICE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("swaps", "edgepeft_swaps_total", "Active-version changes (install+activate, activate, rollback)."),
    ("installs", "edgepeft_installs_total", "Bundles installed."),
    ("rejected_bundles", "edgepeft_rejected_bundles_total", "Bundles refused (signature, base, release, format)."),
    ("load_failures", "edgepeft_load_failures_total", "Installed versions that failed to load at start-up (damaged "
     "on disk)."),
    ("unconfirmed_commits", "edgepeft_unconfirmed_commits_total", "State changes made live whose flush to disk "
     "failed (they may not survive a power cut)."),
    ("rows_scored", "edgepeft_rows_scored_total", "Rows scored."),
)


class Histogram:
    """Cumulative-bucket histogram per label value."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(buckets) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        self.counts[label][bisect.bisect_left(self.buckets, value)] += 1
        self.sums[label] += value

    def render(self, name: str, label_name: str | None) -> list[str]:
        lines = []
        for label, counts in sorted(self.counts.items()):
            prefix = f'{label_name}="{_escape(label)}",' if label_name else ""
            running = 0
            for bound, count in zip(self.buckets, counts, strict=False):
                running += count
                lines.append(f'{name}_bucket{{{prefix}le="{bound:g}"}} {running}')
            running += counts[-1]
            lines.append(f'{name}_bucket{{{prefix}le="+Inf"}} {running}')
            braces = f"{{{prefix[:-1]}}}" if prefix else ""
            lines.append(f"{name}_sum{braces} {self.sums[label]:.6f}")
            lines.append(f"{name}_count{braces} {running}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """The runtime's counters, histograms and scrape-time gauges.

    ``counters`` is the table of plain counters, ``(attribute, metric name, help)``; the device's by default.
    ``swap_histogram`` renders the swap-latency histogram (a device's; a server that never swaps leaves it out).
    """

    def __init__(self, counters: Sequence[tuple[str, str, str]] = DEVICE_COUNTERS, *,
                 swap_histogram: bool = True) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.swap_latency = Histogram(SWAP_BUCKETS)
        self.counters = tuple(counters)
        self.swap_histogram = swap_histogram
        self.swaps = 0  # observe_swap counts here even where no counter named swaps is rendered
        for attribute, _, _ in self.counters:
            setattr(self, attribute, 0)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._renderers: list[Callable[[], list[str]]] = []

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency.observe(route, seconds)
            if status >= 400:
                self.errors[(route, "client" if status < 500 else "server")] += 1

    def observe_swap(self, seconds: float) -> None:
        with self._lock:
            self.swaps += 1
            self.swap_latency.observe("", seconds)

    def count(self, name: str, amount: int = 1) -> None:
        """Increment one of the plain counters (the device's: ``installs``, ``rejected_bundles``,
        ``load_failures``, ``unconfirmed_commits``, ``rows_scored``)."""
        if not any(attribute == name for attribute, _, _ in self.counters):
            raise KeyError(f"no counter named {name!r}")
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self._gauges[name] = (help_text, read)

    def add_renderer(self, render: Callable[[], list[str]]) -> None:
        """Register more exposition lines, produced at scrape time (labelled families a gauge cannot express)."""
        self._renderers.append(render)

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            lines = [
                "# HELP edgepeft_requests_total HTTP requests by route template and status code.",
                "# TYPE edgepeft_requests_total counter",
            ]
            for (route, status), value in sorted(self.requests.items()):
                lines.append(f'edgepeft_requests_total{{route="{_escape(route)}",status="{status}"}} {value}')
            lines += [
                "# HELP edgepeft_request_errors_total HTTP requests answered with an error, by route and kind.",
                "# TYPE edgepeft_request_errors_total counter",
            ]
            for (route, kind), value in sorted(self.errors.items()):
                lines.append(f'edgepeft_request_errors_total{{route="{_escape(route)}",kind="{kind}"}} {value}')
            lines += [
                "# HELP edgepeft_request_duration_seconds Time to answer a request, by route template.",
                "# TYPE edgepeft_request_duration_seconds histogram",
                *self.latency.render("edgepeft_request_duration_seconds", "route"),
            ]
            if self.swap_histogram:
                lines += [
                    "# HELP edgepeft_swap_duration_seconds Time from an activation request to the new version live.",
                    "# TYPE edgepeft_swap_duration_seconds histogram",
                    *self.swap_latency.render("edgepeft_swap_duration_seconds", None),
                ]
            for attribute, name, help_text in self.counters:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {getattr(self, attribute)}"]
        for name, (help_text, read) in sorted(self._gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        for render in self._renderers:
            lines += render()
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """ASGI middleware: counts and times every HTTP request by its route *template* (bounded label values)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(route, status, time.perf_counter() - started)


# Scores kept per version for its quantiles: enough for a stable q99 (about 40 rows above it), small enough that
# a device with hundreds of versions spends a few MB at most (4096 float32 = 16 KB each).
STATS_RING = 4096


class _VersionStats:
    """One version's counters and its ring of recent score/threshold values; guarded by ScoreStats' lock."""

    __slots__ = ("rows", "alerts", "errors", "since", "ring", "filled", "cursor")

    def __init__(self, since: float) -> None:
        self.rows = 0
        self.alerts = 0
        self.errors = 0
        self.since = since
        self.ring = np.empty(STATS_RING, dtype=np.float32)
        self.filled = 0  # how many slots hold values
        self.cursor = 0  # where the next value goes

    def push(self, ratios: np.ndarray) -> None:
        if len(ratios) >= STATS_RING:  # one request larger than the ring: its last rows are the recent ones
            self.ring[:] = ratios[-STATS_RING:]
            self.cursor, self.filled = 0, STATS_RING
            return
        end = self.cursor + len(ratios)
        if end <= STATS_RING:
            self.ring[self.cursor:end] = ratios
        else:
            split = STATS_RING - self.cursor
            self.ring[self.cursor:] = ratios[:split]
            self.ring[:end - STATS_RING] = ratios[split:]
        self.cursor = end % STATS_RING
        self.filled = min(STATS_RING, self.filled + len(ratios))


class ScoreStats:
    """How each (asset, version) has scored in this process: what a fleet's health gate compares.

    Per version, since it first became active here: rows scored, rows flagged (``alerts``), failed score calls
    (``errors``), and the quantiles of score/threshold over its most recent ``STATS_RING`` rows (1.0 is the
    alarm line, so versions with different thresholds compare on one scale). Rows a detector holds back while it
    warms up are counted but left out of the quantiles: their scores come from too little history.
    Recording costs one lock and a numpy copy, so it stays on the scoring path.

    Example:
        >>> import numpy as np
        >>> stats = ScoreStats()
        >>> stats.activated("pump-1", "v2")
        >>> stats.record("pump-1", "v2", np.array([0.5, 1.0, 3.0]), threshold=2.0, alerts=1)
        >>> stats.failed("pump-1", "v2")
        >>> row = stats.versions("pump-1")[0]
        >>> row["version"], row["rows"], row["alerts"], row["errors"], row["score_q50"]
        ('v2', 3, 1, 1, 0.5)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], _VersionStats] = {}

    def _entry(self, asset_id: str, version: str) -> _VersionStats:
        entry = self._versions.get((asset_id, version))
        if entry is None:
            entry = self._versions[(asset_id, version)] = _VersionStats(time.time())
        return entry

    def activated(self, asset_id: str, version: str) -> None:
        """Start counting for a version that just became active (a no-op if it was counted before)."""
        with self._lock:
            self._entry(asset_id, version)

    def record(self, asset_id: str, version: str, scores: np.ndarray, *, threshold: float, alerts: int,
               skip: int = 0) -> None:
        """One successful score call: ``scores`` per row, ``alerts`` rows flagged; the first ``skip`` rows (the
        detector's warm-up) are counted but not used for quantiles."""
        ratios = np.asarray(scores[skip:], dtype=np.float32) / np.float32(threshold) if threshold > 0 else \
            np.asarray(scores[skip:], dtype=np.float32)
        ratios = ratios[np.isfinite(ratios)]
        with self._lock:
            entry = self._entry(asset_id, version)
            entry.rows += len(scores)
            entry.alerts += int(alerts)
            entry.push(ratios)

    def failed(self, asset_id: str, version: str) -> None:
        """One score call that raised after its version was chosen."""
        with self._lock:
            self._entry(asset_id, version).errors += 1

    def render(self) -> list[str]:
        """Per version counters in the Prometheus text format (labels: asset, version)."""
        with self._lock:
            rows = sorted((asset, version, entry.rows, entry.alerts, entry.errors)
                          for (asset, version), entry in self._versions.items())
        lines = []
        for index, (name, help_text) in enumerate((
                ("edgepeft_version_rows_total", "Rows scored per active version since start-up."),
                ("edgepeft_version_alerts_total", "Rows flagged per active version since start-up."),
                ("edgepeft_version_score_errors_total", "Failed score calls per version since start-up."))):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines += [f'{name}{{asset="{_escape(asset)}",version="{_escape(version)}"}} {row[index]}'
                      for asset, version, *row in rows]
        return lines

    def versions(self, asset_id: str) -> list[dict[str, Any]]:
        """The asset's versions counted in this process, oldest first: rows, alerts, score/threshold quantiles
        (None before any row), errors, since (ISO 8601, UTC)."""
        with self._lock:
            entries = [(version, entry.rows, entry.alerts, entry.errors, entry.since, entry.ring[:entry.filled].copy())
                       for (asset, version), entry in self._versions.items() if asset == asset_id]
        out = []
        for version, rows, alerts, errors, since, ring in sorted(entries, key=lambda item: item[4]):
            quantiles = ([float(q) for q in np.quantile(ring, (0.5, 0.95, 0.99))] if len(ring)
                         else [None, None, None])
            out.append({"version": version, "rows": rows, "alerts": alerts,
                        "score_q50": quantiles[0], "score_q95": quantiles[1], "score_q99": quantiles[2],
                        "errors": errors, "since": _iso(since)})
        return out


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
