"""The product demo (``edgepeft demo``): one shared base, one tiny adapter per simulated pump, honest scores.

For every pump of a simulated fleet the demo trains an adapter on the pump's normal data, saves it (to
measure what would travel to the device), scores the pump's faulty test part, and flags rows at the
threshold calibrated for a 1 % false-alarm rate on held-out normal rows. Two classical baselines,
IsolationForest and PCA (T-squared + Q), run on the same split with the same calibration
(:data:`BASELINE_NAMES`). Metrics are point-wise, with no point adjustment (FIELD-NOTES "Detection quality").
Per fault kind, the share of its rows each detector flags shows which faults each one catches.

Every flagged row is explained (``score_all(explain=True)``: its strongest sensors with their kind of evidence,
e.g. ``vib_rms:scale``); flagged rows separated by at most :data:`ALERT_GAP_ROWS` unflagged rows form one alert,
which keeps its most frequent explanation, its three most named sensors and the true fault it overlaps, if any.

Outputs in ``out_dir``: ``adapters/<pump>/`` (the saved detectors), ``index.html`` (a self-contained
report with plots, the by-fault table and each pump's alerts) and ``results.json`` (every number in the
tables, the alerts, plus machine, date and command).

Usage (the CLI's ``edgepeft demo`` calls this; a full default run takes minutes, so it is not a doctest)::

    from edgepeft.bench.demo import run_demo
    result = run_demo(Path("edgepeft-demo"))  # small base, LoRA, 6 pumps, 150 steps
    result.html_path  # open in a browser
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import io
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from edgepeft.bench.baselines import BASELINES
from edgepeft.core.config import write_json
from edgepeft.core.errors import OutputError
from edgepeft.data.synthetic import PumpAsset, make_pump_fleet
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.metrics import auc_pr, best_f1, confusion, f1_far_mar, vus_pr

if TYPE_CHECKING:
    from rich.console import Console

# How many sensor channels each pump's plot shows: the one that changes most at each fault, at least 3.
MIN_PLOT_CHANNELS = 3
MAX_PLOT_CHANNELS = 4
# The classical baselines beside ours (keys of edgepeft.bench.baselines.BASELINES), with (short, long) titles.
# Each one is fitted and scored exactly like ours; its numbers go into results.json as "<name>_<number>".
BASELINE_NAMES: tuple[str, ...] = ("iforest", "pca")
BASELINE_TITLES: dict[str, tuple[str, str]] = {"iforest": ("IF", "IsolationForest"), "pca": ("PCA", "PCA")}
# Flagged rows more than this many unflagged rows apart belong to different alerts.
ALERT_GAP_ROWS = 10
# The report lists at most this many alerts per pump (results.json has them all).
MAX_HTML_ALERTS = 15
# The table's columns: (terminal title, report title, key in a row's results.json dict, format). One list so
# the terminal, the HTML and the JSON can never disagree about what the table holds.
TABLE_COLUMNS: list[tuple[str, str, str, str]] = [
    ("train %", "trainable %", "trainable_pct", "{:.2f}"),
    ("KB", "adapter KB", "adapter_kb", "{:.1f}"),
    ("adapt s", "adapt s", "adapt_seconds", "{:.1f}"),
    ("F1", "F1", "f1", "{:.3f}"),
    ("FAR %", "false alarms %", "far_pct", "{:.1f}"),
    ("AUC-PR", "AUC-PR", "auc_pr", "{:.3f}"),
    *[
        (f"{BASELINE_TITLES[name][0]} {metric}", f"{BASELINE_TITLES[name][1]} {metric}", f"{name}_{key}", "{:.3f}")
        for name in BASELINE_NAMES
        for metric, key in (("F1", "f1"), ("AUC-PR", "auc_pr"))
    ],
]


@dataclass
class FaultResult:
    """One injected fault: where it is and what share of its rows each detector flagged.

    >>> FaultResult("stuck_sensor", start=2400, end=2580, recall=0.0, baseline_recall={"iforest": 0.1}).end
    2580
    """

    kind: str
    start: int  # first row, test coordinates
    end: int  # one past the last row
    recall: float  # share of the fault's rows we flagged
    baseline_recall: dict[str, float] = field(default_factory=dict)  # the same, per baseline name


@dataclass
class BaselineResult:
    """One baseline's numbers on one pump, computed exactly like ours (:class:`PumpResult`)."""

    f1: float
    far_pct: float
    auc_pr: float
    best_f1: float
    vus_pr: float


@dataclass
class Alert:
    """Consecutive flagged rows of one pump (gaps of at most :data:`ALERT_GAP_ROWS`) and why they were flagged.

    >>> Alert(start=10, end=40, rows=25, max_p_anomaly=0.97, explanation="flow:relation",
    ...       channels=["flow", "pressure_out"], fault="impeller_wear").end
    40
    """

    start: int  # first flagged row, test coordinates
    end: int  # one past the last flagged row
    rows: int  # flagged rows inside [start, end)
    max_p_anomaly: float
    explanation: str  # the most frequent strongest "channel:kind" of its rows
    channels: list[str]  # up to 3 sensors, most often named in its rows' explanations first
    fault: str | None  # kind of the true fault it overlaps most, None for a false alert


@dataclass
class PumpResult:
    """One pump's row of the table, plus the secondary numbers that go into results.json.

    >>> required = [f.name for f in dataclasses.fields(PumpResult) if f.default_factory is dataclasses.MISSING]
    >>> zeros = {name: 0 for name in required if name not in ("pump", "fault_kinds")}
    >>> row = PumpResult(**{**zeros, "pump": "pump-01", "fault_kinds": [], "adapter_bytes": 35168,
    ...                     "trainable_share": 0.0607})
    >>> round(row.adapter_kb, 1), round(row.trainable_pct, 2)
    (34.3, 6.07)
    """

    pump: str
    fault_kinds: list[str]
    trainable_parameters: int
    trainable_share: float  # of the base's parameters, 0..1
    adapter_bytes: int
    adapt_seconds: float  # the training loop alone
    fit_seconds: float  # adapt + scoring the training rows + calibration
    score_seconds: float  # scoring the test part
    threshold: float
    f1: float  # point-wise, at the calibrated threshold, no point adjustment
    far_pct: float
    mar_pct: float
    auc_pr: float
    best_f1: float  # best point-wise F1 over all thresholds (an upper bound, needs labels)
    vus_pr: float
    baselines: dict[str, BaselineResult] = field(default_factory=dict)  # by name, as in BASELINE_NAMES
    faults: list[FaultResult] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)  # ours, explained

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_share

    @property
    def adapter_kb(self) -> float:
        return self.adapter_bytes / 1024.0


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: one row per pump, their mean, and where the files are.

    >>> out = Path("edgepeft-demo")
    >>> DemoResult([], {}, out, out / "index.html", out / "results.json", out / "adapters", 0.0).html_path.name
    'index.html'
    """

    rows: list[PumpResult]
    mean: dict[str, float]
    out_dir: Path
    html_path: Path
    json_path: Path
    adapters_dir: Path
    wall_seconds: float


@dataclass
class _Trace:
    """What one pump's plot needs (kept out of PumpResult: arrays do not belong in the table)."""

    pump: PumpAsset
    score: np.ndarray
    anomaly: np.ndarray
    threshold: float
    channels: list[int]


def run_demo(
    out_dir: Path = Path("edgepeft-demo"),
    *,
    base: str = "small",
    method: str = "lora",
    n_pumps: int = 6,
    steps: int = 150,
    seed: int = 0,
    console: Console | None = None,
) -> DemoResult:
    """Adapt one detector per simulated pump, compare with the baselines, explain its alerts, write the report
    and JSON."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console if console is not None else Console()
    started = time.perf_counter()
    fleet = make_pump_fleet(n_pumps, seed=seed)  # first: a bad setting fails before anything is written
    out_dir = Path(out_dir)
    adapters_dir = out_dir / "adapters"
    try:
        adapters_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {adapters_dir} ({exc.strerror or exc}); choose another --out folder") from exc

    rows: list[PumpResult] = []
    traces: list[_Trace] = []
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        pumps_task = progress.add_task("pumps", total=len(fleet))
        steps_task = progress.add_task("adapting", total=max(steps, 1))

        def on_step(step: int, loss: float) -> None:
            progress.update(steps_task, completed=step)

        for pump in fleet:
            progress.reset(steps_task, total=max(steps, 1), description=f"adapting {pump.name}")
            row, trace = _run_pump(pump, adapters_dir, base=base, method=method, steps=steps, seed=seed,
                                   on_step=on_step)
            rows.append(row)
            traces.append(trace)
            progress.advance(pumps_task)
        progress.update(steps_task, visible=False)

    mean = _mean_row(rows)
    per_kind = _per_kind(rows)
    for table in _rich_tables(console, rows, mean, title=f"edgepeft demo: base {base!r}, {method}, {steps} steps"):
        console.print(table)
    console.print(_rich_kind_table(per_kind))
    settings = {"base": base, "method": method, "n_pumps": n_pumps, "steps": steps, "seed": seed}
    meta = _run_metadata(settings)
    html_path = out_dir / "index.html"
    json_path = out_dir / "results.json"
    try:
        html_path.write_text(_html_report(rows, mean, per_kind, traces, meta), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {html_path} ({exc.strerror or exc})") from exc
    # The wall time includes writing the report.
    wall_seconds = time.perf_counter() - started
    try:
        write_json(json_path, {
            **meta,
            "wall_seconds": wall_seconds,
            "columns": [attr for _, _, attr, _ in TABLE_COLUMNS],
            "rows": [_row_dict(row) for row in rows],
            "mean": mean,
            "baselines": list(BASELINE_NAMES),
            "fault_kinds": per_kind,
        })
    except OSError as exc:
        raise OutputError(f"cannot write {json_path} ({exc.strerror or exc})") from exc
    console.print(f"report: {html_path}   numbers: {json_path}   adapters: {adapters_dir}   ({wall_seconds:.0f} s)")
    return DemoResult(rows, mean, out_dir, html_path, json_path, adapters_dir, wall_seconds)


# ---------------------------------------------------------------------------------------------------------
# One pump


def _run_pump(
    pump: PumpAsset,
    adapters_dir: Path,
    *,
    base: str,
    method: str,
    steps: int,
    seed: int,
    on_step: Callable[[int, float], None],
) -> tuple[PumpResult, _Trace]:
    det = AnomalyDetector(base=base, method=method, steps=steps, seed=seed)
    fit_started = time.perf_counter()
    # Named columns: the saved detector and its explanations then name the pump's real sensors, not ch0, ch1, ...
    det.fit(pd.DataFrame(pump.train, columns=pump.channels), progress=on_step)
    fit_seconds = time.perf_counter() - fit_started
    saved = det.save(adapters_dir / pump.name)
    info = det.info(saved)

    # The test stream follows the training stream on the same pump, so it is scored with that history
    # (scoring is causal: a row's score never sees later rows) instead of starting cold at row 0.
    history = len(pump.train)
    stream = np.concatenate([pump.train, pump.test])
    score_started = time.perf_counter()
    # explain=True: the same scores and alarms, plus the strongest sensors of every flagged row.
    ours = {key: value[history:] for key, value in det.score_all(stream, explain=True).items()}
    score_seconds = time.perf_counter() - score_started

    # Same split, the same calibration recipe and the same alarm persistence, so ours and each baseline differ
    # only in the scoring model.
    calibration = {
        "target_far": det.target_far, "threshold": det.threshold, "smoothing": det.smoothing,
        "calib_fraction": det.calib_fraction, "seed": seed, "raise_after": det.raise_after,
        "clear_after": det.clear_after,
    }
    theirs = {}
    for name in BASELINE_NAMES:
        baseline = BASELINES[name](**calibration).fit(pump.train)
        theirs[name] = {key: value[history:] for key, value in baseline.score_all(stream).items()}

    labels = pump.labels
    f1, far, mar = f1_far_mar(confusion(labels, ours["anomaly"]))
    baselines = {}
    for name, scored in theirs.items():
        their_f1, their_far, _ = f1_far_mar(confusion(labels, scored["anomaly"]))
        baselines[name] = BaselineResult(
            f1=their_f1, far_pct=their_far, auc_pr=auc_pr(labels, scored["score"]),
            best_f1=best_f1(labels, scored["score"])[0], vus_pr=vus_pr(labels, scored["score"]),
        )
    faults = [
        FaultResult(kind, start, end, float(ours["anomaly"][start:end].mean()),
                    {name: float(scored["anomaly"][start:end].mean()) for name, scored in theirs.items()})
        for start, end, kind in pump.faults
    ]
    row = PumpResult(
        pump=pump.name,
        fault_kinds=[kind for _, _, kind in pump.faults],
        trainable_parameters=int(info["trainable_parameters"]),
        trainable_share=float(info["trainable_share"]),
        adapter_bytes=int(info["adapter_bytes"]),
        adapt_seconds=float(info["adapt_seconds"]),
        fit_seconds=fit_seconds,
        score_seconds=score_seconds,
        threshold=float(det.threshold_),
        f1=f1,
        far_pct=far,
        mar_pct=mar,
        auc_pr=auc_pr(labels, ours["score"]),
        best_f1=best_f1(labels, ours["score"])[0],
        vus_pr=vus_pr(labels, ours["score"]),
        baselines=baselines,
        faults=faults,
        alerts=_alerts(ours["anomaly"], ours["p_anomaly"], ours["top_channels"], pump.faults),
    )
    return row, _Trace(pump, ours["score"], ours["anomaly"], float(det.threshold_), _fault_channels(pump))


def _alerts(
    anomaly: np.ndarray,
    p_anomaly: np.ndarray,
    top_channels: Sequence[str],
    faults: Sequence[tuple[int, int, str]],
    gap: int = ALERT_GAP_ROWS,
) -> list[Alert]:
    """Group flagged rows into alerts (a run of more than ``gap`` unflagged rows starts a new one) and explain each.

    >>> flagged = np.array([0, 1, 1, 0, 1] + [0] * 12 + [1, 0])
    >>> labels = ["" if not f else "flow:relation;vib_rms:scale" for f in flagged]
    >>> labels[2] = "vib_rms:scale;flow:relation;pressure_out:level"
    >>> alerts = _alerts(flagged, flagged * 0.9, labels, [(0, 6, "cavitation")], gap=10)
    >>> [(a.start, a.end, a.rows, a.explanation, a.fault) for a in alerts]
    [(1, 5, 3, 'flow:relation', 'cavitation'), (17, 18, 1, 'flow:relation', None)]
    >>> alerts[0].channels
    ['flow', 'vib_rms', 'pressure_out']
    """
    flagged = np.flatnonzero(np.asarray(anomaly))
    if flagged.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(flagged) - 1 > gap) + 1
    alerts = []
    for group in np.split(flagged, breaks):
        start, end = int(group[0]), int(group[-1]) + 1
        parts = [label.split(";") for label in (top_channels[i] for i in group) if label]
        firsts = Counter(part[0] for part in parts)
        names = Counter(item.rpartition(":")[0] for part in parts for item in part)
        overlaps = [(min(end, f_end) - max(start, f_start), kind) for f_start, f_end, kind in faults]
        overlap, kind = max(overlaps, key=lambda item: item[0], default=(0, None))
        alerts.append(Alert(
            start=start,
            end=end,
            rows=len(group),
            max_p_anomaly=float(np.max(p_anomaly[start:end])),
            explanation=firsts.most_common(1)[0][0] if firsts else "",
            channels=[name for name, _ in names.most_common(3)],
            fault=kind if overlap > 0 else None,
        ))
    return alerts


def _fault_channels(pump: PumpAsset, context_rows: int = 150) -> list[int]:
    """Channel indices to plot: for each true fault, the channel that changes most at it.

    Computed from the data, not the model: a second scoring pass to ask the model would cost as much as
    scoring the test part again. "Change" is the level shift against the normal rows just before the
    fault, in training standard deviations, plus the log ratio of row-to-row noise (a frozen sensor has
    none, cavitation has lots); differences ignore the slow operating-level changes a plain std would see.
    """
    eps = 1e-6
    train_std = pump.train.std(axis=0) + eps
    total = np.zeros(len(pump.channels))
    picks: list[int] = []
    for start, end, _ in pump.faults:
        lo = max(0, start - context_rows)
        before = pump.test[lo:start][pump.labels[lo:start] == 0].astype(np.float64)
        inside = pump.test[start:end].astype(np.float64)
        if len(before) < 3 or len(inside) < 3:
            continue
        shift = np.abs(inside.mean(axis=0) - before.mean(axis=0)) / train_std
        noise_ratio = (np.diff(inside, axis=0).std(axis=0) + eps * train_std) / (
            np.diff(before, axis=0).std(axis=0) + eps * train_std
        )
        change = shift + np.abs(np.log(noise_ratio))
        total += change
        best = int(np.argmax(change))
        if best not in picks:
            picks.append(best)
    for channel in np.argsort(-total):  # a pump whose faults share a channel still shows a few
        if len(picks) >= MIN_PLOT_CHANNELS:
            break
        if int(channel) not in picks:
            picks.append(int(channel))
    return sorted(picks[:MAX_PLOT_CHANNELS])


# ---------------------------------------------------------------------------------------------------------
# Summaries


def _row_dict(row: PumpResult) -> dict[str, Any]:
    """A pump's row as results.json holds it: the baselines' numbers flattened to ``<name>_<number>``
    (``iforest_f1``, ``pca_auc_pr``, ...; per fault ``iforest_recall``, ...), so every table key is top level."""
    out = dataclasses.asdict(row)
    for name, numbers in out.pop("baselines").items():
        out.update({f"{name}_{key}": value for key, value in numbers.items()})
    for fault in out["faults"]:
        fault.update({f"{name}_recall": value for name, value in fault.pop("baseline_recall").items()})
    out["trainable_pct"] = row.trainable_pct
    out["adapter_kb"] = row.adapter_kb
    out["n_alerts"] = len(row.alerts)
    out["n_false_alerts"] = sum(alert.fault is None for alert in row.alerts)
    return out


def _mean_row(rows: list[PumpResult]) -> dict[str, float]:
    """Mean over pumps of every number in the table (and of the secondary numbers)."""
    dicts = [_row_dict(row) for row in rows]
    numeric = [name for name, value in dicts[0].items() if isinstance(value, int | float)]
    return {name: float(np.mean([d[name] for d in dicts])) for name in numeric}


def _per_kind(rows: list[PumpResult], top: int = 5) -> dict[str, dict[str, Any]]:
    """Per fault kind over the fleet: how many, the mean share of their rows each detector flagged (which faults
    each one catches and which it misses), and the ``top`` explanations of our alerts on them, with counts."""
    kinds: dict[str, list[FaultResult]] = {}
    explained: dict[str, Counter[str]] = {}
    for row in rows:
        for fault in row.faults:
            kinds.setdefault(fault.kind, []).append(fault)
        for alert in row.alerts:
            if alert.fault is not None and alert.explanation:
                explained.setdefault(alert.fault, Counter())[alert.explanation] += 1
    return {
        kind: {
            "count": len(faults),
            "recall": float(np.mean([f.recall for f in faults])),
            **{f"{name}_recall": float(np.mean([f.baseline_recall[name] for f in faults])) for name in BASELINE_NAMES},
            "explanations": dict(explained.get(kind, Counter()).most_common(top)),
        }
        for kind, faults in sorted(kinds.items())
    }


def _explanation_text(counts: dict[str, int]) -> str:
    """``{"vib_rms:scale": 4, "flow:relation": 1}`` -> ``"vib_rms:scale (4), flow:relation (1)"``, most first.

    >>> _explanation_text({"flow:relation": 1, "vib_rms:scale": 4})
    'vib_rms:scale (4), flow:relation (1)'
    """
    return ", ".join(f"{label} ({n})" for label, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# The terminal table gets a fault-list column only when at least this many characters are left for it.
MIN_FAULTS_WIDTH = 30
_CAPTION = ("F1 point-wise at the calibrated threshold (1 % target false alarms), no point adjustment; "
            "IF = IsolationForest, PCA = PCA T-squared + Q, both on the same split with the same calibration")


def _rich_tables(console: Console, rows: list[PumpResult], mean: dict[str, float], *, title: str) -> list[Any]:
    """The table for ``console``'s width: with the fault lists on a wide console; without them (they follow as
    lines) on a narrower one; split into our columns and the baselines' on one too narrow for both (a pipe or CI
    log gets 80 characters). Numbers are never cut."""
    from rich.text import Text

    def natural_width(table: Any) -> int:  # measured unclamped: console.measure alone stops at the console width
        return console.measure(table, options=console.options.update(width=10_000)).maximum

    def fault_lines() -> list[Any]:
        return [Text(f"{row.pump} faults: {', '.join(row.fault_kinds)}") for row in rows]

    full = _rich_table(rows, mean, TABLE_COLUMNS, title=title, caption=_CAPTION)
    if natural_width(full) + MIN_FAULTS_WIDTH <= console.width:
        return [_rich_table(rows, mean, TABLE_COLUMNS, title=title, caption=_CAPTION, faults=True)]
    if natural_width(full) <= console.width:
        return [full, *fault_lines()]
    theirs = [column for column in TABLE_COLUMNS if column[2].startswith(tuple(f"{n}_" for n in BASELINE_NAMES))]
    ours = [column for column in TABLE_COLUMNS if column not in theirs]
    return [
        _rich_table(rows, mean, ours, title=title),
        _rich_table(rows, mean, theirs, title="baselines on the same split", caption=_CAPTION),
        *fault_lines(),
    ]


def _rich_table(
    rows: list[PumpResult],
    mean: dict[str, float],
    columns: list[tuple[str, str, str, str]],
    *,
    title: str,
    caption: str | None = None,
    faults: bool = False,
) -> Any:
    """``columns`` (some of :data:`TABLE_COLUMNS`) per pump and their mean, optionally with the fault lists."""
    from rich.table import Table

    table = Table(title=title, caption=caption)
    table.add_column("pump", no_wrap=True)
    if faults:
        table.add_column("faults", overflow="fold")
    for terminal_title, _, _, _ in columns:
        # Numbers never wrap or get cut; the fault list takes what width is left.
        table.add_column(terminal_title, justify="right", no_wrap=True)
    for index, row in enumerate(rows):
        values = _row_dict(row)
        cells = [fmt.format(values[attr]) for _, _, attr, fmt in columns]
        fault_cells = [", ".join(row.fault_kinds)] if faults else []
        table.add_row(row.pump, *fault_cells, *cells, end_section=index == len(rows) - 1)
    means = [fmt.format(mean[attr]) for _, _, attr, fmt in columns]
    table.add_row("mean", *([""] if faults else []), *means, style="bold")
    return table


def _rich_kind_table(per_kind: dict[str, dict[str, Any]]) -> Any:
    """The by-fault table: per fault kind, the share of its rows each detector flagged."""
    from rich.table import Table

    table = Table(title="share of fault rows flagged, by fault kind")
    table.add_column("fault kind", no_wrap=True)
    table.add_column("faults", justify="right")
    table.add_column("ours", justify="right")
    for name in BASELINE_NAMES:
        table.add_column(BASELINE_TITLES[name][1], justify="right")
    for kind, values in per_kind.items():
        recalls = [values["recall"], *[values[f"{name}_recall"] for name in BASELINE_NAMES]]
        table.add_row(kind, str(values["count"]), *[f"{r:.2f}" for r in recalls])
    return table


def _run_metadata(settings: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "settings": settings,
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }


# ---------------------------------------------------------------------------------------------------------
# HTML report


def _plot_png(trace: _Trace) -> bytes:
    """One pump: the blamed channels, our score with the threshold, true faults shaded. PNG bytes."""
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pump = trace.pump
    n_axes = len(trace.channels) + 1
    fig = Figure(figsize=(11, 1.3 * n_axes + 0.6), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_axes, 1, sharex=True)
    rows = np.arange(len(pump.test))
    for ax, col in zip(axes[:-1], trace.channels, strict=True):
        ax.plot(rows, pump.test[:, col], lw=0.6, color="tab:blue")
        ax.set_ylabel(pump.channels[col], fontsize=8)
    score_ax = axes[-1]
    score_ax.plot(rows, trace.score, lw=0.7, color="black", label="score")
    score_ax.axhline(trace.threshold, color="tab:orange", ls="--", lw=1.0, label="threshold")
    flagged = trace.anomaly.astype(bool)
    score_ax.fill_between(rows, 0, 1, where=flagged, transform=score_ax.get_xaxis_transform(),
                          color="tab:orange", alpha=0.25, lw=0, label="flagged")
    positive = trace.score[trace.score > 0]
    # Fault scores can be orders of magnitude above normal ones; a log axis keeps the threshold visible.
    if positive.size and positive.max() / max(np.median(positive), 1e-12) > 50:
        score_ax.set_yscale("log")
    score_ax.set_ylabel("score", fontsize=8)
    score_ax.set_xlabel("test row", fontsize=8)
    score_ax.legend(loc="upper left", fontsize=7, ncols=3)
    for ax in axes:
        ax.tick_params(labelsize=7)
        for start, end, _ in pump.faults:
            ax.axvspan(start, end, color="tab:red", alpha=0.12, lw=0)
    for start, end, kind in pump.faults:
        axes[0].text((start + end) / 2, 1.02, kind, transform=axes[0].get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=7, color="tab:red")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1000px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
tr.mean td { font-weight: bold; border-top: 2px solid #444; }
img { max-width: 100%; }
.meta { color: #666; font-size: 0.85em; }
"""


def _html_alerts(alerts: list[Alert]) -> str:
    """One pump's alerts as an HTML table (the first :data:`MAX_HTML_ALERTS`, then how many more)."""
    esc = html.escape
    if not alerts:
        return "<h3>Alerts</h3><p>No alerts.</p>"
    body = "".join(
        f"<tr><td>{a.start}-{a.end}</td><td>{a.rows}</td><td>{a.max_p_anomaly:.2f}</td>"
        f"<td class='text'>{esc(a.explanation)}</td><td class='text'>{esc(', '.join(a.channels))}</td>"
        f"<td class='text'>{esc(a.fault) if a.fault is not None else 'none (false alert)'}</td></tr>"
        for a in alerts[:MAX_HTML_ALERTS]
    )
    more = len(alerts) - MAX_HTML_ALERTS
    note = f"<p>... and {more} more alert{'s' if more > 1 else ''} (all in results.json).</p>" if more > 0 else ""
    false_alerts = sum(a.fault is None for a in alerts)
    return (
        f"<h3>Alerts</h3><p>{len(alerts)} alert{'s' if len(alerts) != 1 else ''}: {len(alerts) - false_alerts} "
        f"on a true fault, {false_alerts} false (on no fault).</p>"
        "<table><tr><th>test rows</th><th>flagged rows</th><th>max p_anomaly</th><th>explanation</th>"
        f"<th>sensors</th><th>true fault</th></tr>{body}</table>{note}"
    )


def _html_report(
    rows: list[PumpResult],
    mean: dict[str, float],
    per_kind: dict[str, dict[str, Any]],
    traces: list[_Trace],
    meta: dict[str, Any],
) -> str:
    esc = html.escape
    settings = meta["settings"]
    head = ["pump", "faults", *[title for _, title, _, _ in TABLE_COLUMNS]]
    body = []
    for row in rows:
        values = _row_dict(row)
        cells = [fmt.format(values[attr]) for _, _, attr, fmt in TABLE_COLUMNS]
        body.append(f"<tr><td>{esc(row.pump)}</td><td class='text'>{esc(', '.join(row.fault_kinds))}</td>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    mean_cells = "".join(f"<td>{fmt.format(mean[attr])}</td>" for _, _, attr, fmt in TABLE_COLUMNS)
    body.append(f"<tr class='mean'><td>mean</td><td></td>{mean_cells}</tr>")
    summary = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")

    baseline_heads = "".join(f"<th>({esc(BASELINE_TITLES[name][1])})</th>" for name in BASELINE_NAMES)
    kind_rows = "".join(
        f"<tr><td>{esc(kind)}</td><td>{v['count']}</td><td>{v['recall']:.2f}</td>"
        + "".join(f"<td>{v[f'{name}_recall']:.2f}</td>" for name in BASELINE_NAMES)
        + f"<td class='text'>{esc(_explanation_text(v['explanations']))}</td></tr>"
        for kind, v in per_kind.items()
    )
    kinds = (f"<table><tr><th>fault kind</th><th>faults</th><th>share of rows flagged (ours)</th>{baseline_heads}"
             f"<th>explanations of our alerts on it (number of alerts)</th></tr>{kind_rows}</table>")

    sections = []
    for row, trace in zip(rows, traces, strict=True):
        png = base64.b64encode(_plot_png(trace)).decode("ascii")
        fault_rows = "".join(
            f"<tr><td>{esc(f.kind)}</td><td>{f.start}-{f.end}</td><td>{f.recall:.2f}</td>"
            + "".join(f"<td>{f.baseline_recall[name]:.2f}</td>" for name in BASELINE_NAMES)
            + "</tr>"
            for f in row.faults
        )
        theirs = "; ".join(
            f"{esc(BASELINE_TITLES[name][1])} F1 {row.baselines[name].f1:.3f}, AUC-PR {row.baselines[name].auc_pr:.3f}"
            for name in BASELINE_NAMES
        )
        sections.append(
            f"<h2>{esc(row.pump)}</h2>"
            f"<p>F1 {row.f1:.3f} (false alarms {row.far_pct:.1f} %, missed {row.mar_pct:.1f} %), AUC-PR "
            f"{row.auc_pr:.3f}, VUS-PR {row.vus_pr:.3f}; {theirs}. Adapter {row.adapter_kb:.1f} KB, "
            f"{row.trainable_parameters} trainable parameters ({row.trainable_pct:.2f} % of the base), adapted in "
            f"{row.adapt_seconds:.1f} s.</p>"
            f"<img alt='{esc(row.pump)}: signals, score and threshold' src='data:image/png;base64,{png}'>"
            f"<table><tr><th>fault</th><th>test rows</th><th>flagged (ours)</th>{baseline_heads}</tr>"
            f"{fault_rows}</table>"
            + _html_alerts(row.alerts)
        )

    machine = meta["machine"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgepeft demo</title><style>{_CSS}</style></head>
<body>
<h1>edgepeft demo: one shared base, one adapter per pump</h1>
<p>Base <b>{esc(str(settings["base"]))}</b>, method <b>{esc(str(settings["method"]))}</b>,
{settings["steps"]} adaptation steps, {settings["n_pumps"]} simulated pumps (seed {settings["seed"]}).
Each pump's adapter is trained on its normal data only; the threshold is calibrated on held-out normal rows
for a 1&nbsp;% false-alarm rate. F1 is point-wise at that threshold, with no point adjustment; AUC-PR ranks
every row. Two classical baselines, IsolationForest and PCA (T-squared + Q), run on the same split with the
same calibration.</p>
<h2>Summary</h2>
{summary}
<h3>By fault kind</h3>
<p>The share of each kind's fault rows that each detector flags, and how our alerts on that kind were
explained: the most frequent strongest sensor of each alert with its kind of evidence (dynamics: the
forecast or virtual sensor missed; level; scale: variance up; stuck: variance collapsed; relation: the
sensors left their normal relations).</p>
{kinds}
<p>In the plots: for each fault the sensor that changes most at it, our score (black), the threshold
(dashed), the rows we flag (orange) and the true faults (red). Under each plot, our alerts (flagged rows
separated by at most {ALERT_GAP_ROWS} unflagged rows), each with its explanation, the sensors its rows name
most often, and the true fault it overlaps.</p>
{"".join(sections)}
<p class="meta">{esc(meta["date"])} &middot; {esc(meta["command"])} &middot; {esc(machine["platform"])},
{machine["cpu_count"]} CPUs, torch {esc(machine["torch"])} ({machine["torch_threads"]} threads)</p>
</body></html>
"""
