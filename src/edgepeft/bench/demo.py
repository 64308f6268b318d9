"""The product demo (``edgepeft demo``): one shared base, one tiny adapter per simulated pump, honest scores.

For every pump of a simulated fleet the demo trains an adapter on the pump's normal data, saves it (to
measure what would travel to the device), scores the pump's faulty test part, and flags rows at the
threshold calibrated for a 1 % false-alarm rate on held-out normal rows. An IsolationForest baseline runs
on the same split with the same calibration. Metrics are point-wise, with no point adjustment
(FIELD-NOTES "Detection quality").

Outputs in ``out_dir``: ``adapters/<pump>/`` (the saved detectors), ``index.html`` (a self-contained
report with plots) and ``results.json`` (every number in the table, plus machine, date and command).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepeft.bench.baselines import IsolationForestDetector
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
# The table's columns: (terminal title, report title, PumpResult attribute, format). One list so the terminal,
# the HTML and the JSON can never disagree about what the table holds.
TABLE_COLUMNS: list[tuple[str, str, str, str]] = [
    ("train %", "trainable %", "trainable_pct", "{:.2f}"),
    ("KB", "adapter KB", "adapter_kb", "{:.1f}"),
    ("adapt s", "adapt s", "adapt_seconds", "{:.1f}"),
    ("F1", "F1", "f1", "{:.3f}"),
    ("AUC-PR", "AUC-PR", "auc_pr", "{:.3f}"),
    ("IF F1", "IsolationForest F1", "iforest_f1", "{:.3f}"),
    ("IF AUC-PR", "IsolationForest AUC-PR", "iforest_auc_pr", "{:.3f}"),
]


@dataclass
class FaultResult:
    """One injected fault: where it is and what share of its rows each detector flagged.

    >>> FaultResult("stuck_sensor", start=2400, end=2580, recall=0.0, iforest_recall=0.1).end
    2580
    """

    kind: str
    start: int  # first row, test coordinates
    end: int  # one past the last row
    recall: float  # share of the fault's rows we flagged
    iforest_recall: float


@dataclass
class PumpResult:
    """One pump's row of the table, plus the secondary numbers that go into results.json.

    >>> zeros = {f.name: 0 for f in dataclasses.fields(PumpResult) if f.name not in ("pump", "fault_kinds", "faults")}
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
    iforest_f1: float
    iforest_far_pct: float
    iforest_auc_pr: float
    iforest_best_f1: float
    iforest_vus_pr: float
    faults: list[FaultResult] = field(default_factory=list)

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
    """Adapt one detector per simulated pump, compare with IsolationForest, write the report and JSON."""
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
    # Below ~110 columns (a pipe or CI log gets 80) the fault lists go under the table instead of being folded
    # into a column a few characters wide.
    wide = console.width >= 110
    console.print(_rich_table(rows, mean, base=base, method=method, steps=steps, faults=wide))
    if not wide:
        for row in rows:
            console.print(f"{row.pump} faults: {', '.join(row.fault_kinds)}", highlight=False)
    settings = {"base": base, "method": method, "n_pumps": n_pumps, "steps": steps, "seed": seed}
    meta = _run_metadata(settings)
    html_path = out_dir / "index.html"
    json_path = out_dir / "results.json"
    try:
        html_path.write_text(_html_report(rows, mean, traces, meta), encoding="utf-8")
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
            "fault_kinds": _per_kind(rows),
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
    det.fit(pump.train, progress=on_step)
    fit_seconds = time.perf_counter() - fit_started
    saved = det.save(adapters_dir / pump.name)
    info = det.info(saved)

    # The test stream follows the training stream on the same pump, so it is scored with that history
    # (scoring is causal: a row's score never sees later rows) instead of starting cold at row 0.
    history = len(pump.train)
    stream = np.concatenate([pump.train, pump.test])
    score_started = time.perf_counter()
    ours = {key: value[history:] for key, value in det.score_all(stream).items()}
    score_seconds = time.perf_counter() - score_started

    # Same split and the same calibration recipe, so the two differ only in the scoring model.
    forest = IsolationForestDetector(
        target_far=det.target_far, threshold=det.threshold, smoothing=det.smoothing,
        calib_fraction=det.calib_fraction, seed=seed,
    ).fit(pump.train)
    theirs = {key: value[history:] for key, value in forest.score_all(stream).items()}

    labels = pump.labels
    f1, far, mar = f1_far_mar(confusion(labels, ours["anomaly"]))
    iforest_f1, iforest_far, _ = f1_far_mar(confusion(labels, theirs["anomaly"]))
    faults = [
        FaultResult(kind, start, end, float(ours["anomaly"][start:end].mean()),
                    float(theirs["anomaly"][start:end].mean()))
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
        iforest_f1=iforest_f1,
        iforest_far_pct=iforest_far,
        iforest_auc_pr=auc_pr(labels, theirs["score"]),
        iforest_best_f1=best_f1(labels, theirs["score"])[0],
        iforest_vus_pr=vus_pr(labels, theirs["score"]),
        faults=faults,
    )
    return row, _Trace(pump, ours["score"], ours["anomaly"], float(det.threshold_), _fault_channels(pump))


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
    out = dataclasses.asdict(row)
    out["trainable_pct"] = row.trainable_pct
    out["adapter_kb"] = row.adapter_kb
    return out


def _mean_row(rows: list[PumpResult]) -> dict[str, float]:
    """Mean over pumps of every number in the table (and of the secondary numbers)."""
    dicts = [_row_dict(row) for row in rows]
    numeric = [name for name, value in dicts[0].items() if isinstance(value, int | float)]
    return {name: float(np.mean([d[name] for d in dicts])) for name in numeric}


def _per_kind(rows: list[PumpResult]) -> dict[str, dict[str, float]]:
    """Mean recall per fault kind over the fleet: which faults we catch and which we miss."""
    kinds: dict[str, list[FaultResult]] = {}
    for row in rows:
        for fault in row.faults:
            kinds.setdefault(fault.kind, []).append(fault)
    return {
        kind: {
            "count": len(faults),
            "recall": float(np.mean([f.recall for f in faults])),
            "iforest_recall": float(np.mean([f.iforest_recall for f in faults])),
        }
        for kind, faults in sorted(kinds.items())
    }


def _rich_table(
    rows: list[PumpResult], mean: dict[str, float], *, base: str, method: str, steps: int, faults: bool = True
) -> Any:
    from rich.table import Table

    table = Table(
        title=f"edgepeft demo: base {base!r}, {method}, {steps} steps",
        caption="F1 point-wise at the calibrated threshold (1 % target false alarms), no point adjustment; "
        "IF = IsolationForest on the same split",
    )
    table.add_column("pump", no_wrap=True)
    if faults:
        table.add_column("faults", overflow="fold")
    for title, _, _, _ in TABLE_COLUMNS:
        # Numbers never wrap or get cut; the fault list takes what width is left.
        table.add_column(title, justify="right", no_wrap=True)
    for index, row in enumerate(rows):
        cells = [fmt.format(getattr(row, attr)) for _, _, attr, fmt in TABLE_COLUMNS]
        fault_cells = [", ".join(row.fault_kinds)] if faults else []
        table.add_row(row.pump, *fault_cells, *cells, end_section=index == len(rows) - 1)
    means = [fmt.format(mean[attr]) for _, _, attr, fmt in TABLE_COLUMNS]
    table.add_row("mean", *([""] if faults else []), *means, style="bold")
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


def _html_report(rows: list[PumpResult], mean: dict[str, float], traces: list[_Trace], meta: dict[str, Any]) -> str:
    esc = html.escape
    settings = meta["settings"]
    head = ["pump", "faults", *[title for _, title, _, _ in TABLE_COLUMNS]]
    body = []
    for row in rows:
        cells = [fmt.format(getattr(row, attr)) for _, _, attr, fmt in TABLE_COLUMNS]
        body.append(f"<tr><td>{esc(row.pump)}</td><td class='text'>{esc(', '.join(row.fault_kinds))}</td>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    mean_cells = "".join(f"<td>{fmt.format(mean[attr])}</td>" for _, _, attr, fmt in TABLE_COLUMNS)
    body.append(f"<tr class='mean'><td>mean</td><td></td>{mean_cells}</tr>")
    summary = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")

    kind_rows = "".join(
        f"<tr><td>{esc(kind)}</td><td>{v['count']}</td><td>{v['recall']:.2f}</td><td>{v['iforest_recall']:.2f}</td></tr>"
        for kind, v in _per_kind(rows).items()
    )
    kinds = ("<table><tr><th>fault kind</th><th>faults</th><th>share of rows flagged (ours)</th>"
             f"<th>(IsolationForest)</th></tr>{kind_rows}</table>")

    sections = []
    for row, trace in zip(rows, traces, strict=True):
        png = base64.b64encode(_plot_png(trace)).decode("ascii")
        fault_rows = "".join(
            f"<tr><td>{esc(f.kind)}</td><td>{f.start}-{f.end}</td><td>{f.recall:.2f}</td>"
            f"<td>{f.iforest_recall:.2f}</td></tr>"
            for f in row.faults
        )
        sections.append(
            f"<h2>{esc(row.pump)}</h2>"
            f"<p>F1 {row.f1:.3f} (false alarms {row.far_pct:.1f} %, missed {row.mar_pct:.1f} %), AUC-PR "
            f"{row.auc_pr:.3f}, VUS-PR {row.vus_pr:.3f}; IsolationForest F1 {row.iforest_f1:.3f}, AUC-PR "
            f"{row.iforest_auc_pr:.3f}. Adapter {row.adapter_kb:.1f} KB, {row.trainable_parameters} trainable "
            f"parameters ({row.trainable_pct:.2f} % of the base), adapted in {row.adapt_seconds:.1f} s.</p>"
            f"<img alt='{esc(row.pump)}: signals, score and threshold' src='data:image/png;base64,{png}'>"
            "<table><tr><th>fault</th><th>test rows</th><th>flagged (ours)</th><th>(IsolationForest)</th></tr>"
            f"{fault_rows}</table>"
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
every row. IsolationForest runs on the same split with the same calibration.</p>
<h2>Summary</h2>
{summary}
<h3>By fault kind</h3>
{kinds}
<p>In the plots: for each fault the sensor that changes most at it, our score (black), the threshold
(dashed), the rows we flag (orange) and the true faults (red).</p>
{"".join(sections)}
<p class="meta">{esc(meta["date"])} &middot; {esc(meta["command"])} &middot; {esc(machine["platform"])},
{machine["cpu_count"]} CPUs, torch {esc(machine["torch"])} ({machine["torch_threads"]} threads)</p>
</body></html>
"""
