"""`edgepeft bench channels`: scoring cost per value as the channel count grows, measured side by side in one run.

For each channel count a detector is fitted on a synthetic asset (``generate_series``) and the same rows are scored
twice, alternately and repeatedly: with the one-pass blind prediction (``PatchEncoder.blind_mix``, the default) and
with the C copies it replaced (one model pass per hidden channel). What is reported: values (rows x channels) per
second, the cost per value relative to 8 channels, and the copies' cost over the one pass's. Wall times drift on a
shared machine; the ratios, taken inside one run, are the result (brief: "report ratios measured side by side").

Example (a tiny run; the default measures 8, 16, 32 and 64 channels on 2,000 rows):
    >>> result = measure_channels([2, 4], rows=200, repeats=1, steps=0)
    >>> [r["channels"] for r in result["rows"]], result["rows"][0]["cost_per_value_vs_first"]
    ([2, 4], 1.0)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.bench.docs import markdown_table, provenance_lines
from edgepeft.bench.harness import run_info, write_results

TARGET_RATIO = 2.0  # cost per value at 64 channels within 2x of 8 channels' (issue "Detector v2")


def _best_seconds(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure_channels(
    channels: list[int], *, rows: int = 2000, repeats: int = 3, base: str = "tiny", steps: int = 20, seed: int = 0
) -> dict[str, Any]:
    """Values per second of scoring (best of ``repeats``), one pass and C copies, per channel count."""
    from edgepeft.data.synthetic import generate_series
    from edgepeft.detect.detector import AnomalyDetector

    out = []
    for n_channels in channels:
        series = generate_series(np.random.default_rng(seed + n_channels), 2 * rows, n_channels)
        det = AnomalyDetector(base=base, method="lora", rank=8, steps=steps, seed=seed).fit(series[:rows])
        scaled = det._prepare(series[rows:])
        det._row_errors(scaled[:200])  # warm-up
        one = _best_seconds(lambda det=det, scaled=scaled: det.score_errors(scaled, det._row_errors(scaled)), repeats)
        copies = _best_seconds(
            lambda det=det, scaled=scaled: det.score_errors(scaled, det._row_errors(scaled, one_pass=False)), repeats)
        out.append({"channels": n_channels, "rows": rows, "seconds": one, "copies_seconds": copies,
                    "values_per_s": rows * n_channels / one, "copies_values_per_s": rows * n_channels / copies})
    first = out[0]
    for row in out:
        row["cost_per_value_vs_first"] = round(first["values_per_s"] / row["values_per_s"], 3)
        row["copies_cost_per_value_vs_first"] = round(first["values_per_s"] / row["copies_values_per_s"], 3)
        row["copies_over_one_pass"] = round(row["copies_seconds"] / row["seconds"], 3)
    return {"rows": out}


def measure_skab_throughput(data_dir: str | Path, *, files: int = 6, repeats: int = 3, base: str = "tiny",
                            steps: int = 20, seed: int = 0) -> dict[str, Any] | None:
    """Scoring throughput on SKAB files, this scoring core against the first version's in the same run: the same
    fitted adapter scores each whole file (a) as v2 does (one-pass blind prediction, state evidence, fusion) and
    (b) as v1 did (blind predictions from C copies of the cross-channel half, dynamics only). None without data."""
    from edgepeft.core.errors import DataError
    from edgepeft.data.datasets import load_skab
    from edgepeft.detect.detector import AnomalyDetector

    try:
        runs = load_skab(data_dir)[:files]
    except DataError:
        return None
    v2_seconds = v1_seconds = 0.0
    values = 0
    for run in runs:
        det = AnomalyDetector(base=base, method="lora", rank=8, steps=steps, seed=seed).fit(run.train)
        series = np.vstack([run.train, run.test])
        fusion = det.fusion_

        def v2(det: Any = det, series: np.ndarray = series) -> None:
            scaled = det._prepare(series)
            det.score_errors(scaled, det._row_errors(scaled))

        def v1(det: Any = det, series: np.ndarray = series, fusion: Any = fusion) -> None:
            det.fusion_ = None  # the schema 1 scoring rule
            try:
                scaled = det._prepare(series)
                det.score_errors(scaled, det._row_errors(scaled, one_pass=False))
            finally:
                det.fusion_ = fusion

        v2()
        v2_seconds += _best_seconds(v2, repeats)
        v1_seconds += _best_seconds(v1, repeats)
        values += series.size
    return {"files": [run.name for run in runs], "values": values, "v2_values_per_s": values / v2_seconds,
            "v1_values_per_s": values / v1_seconds, "v2_over_v1": round(v1_seconds / v2_seconds, 3)}


def run_channel_scaling(
    out_dir: str | Path, *, channels: list[int] | None = None, rows: int = 2000, repeats: int = 3, base: str = "tiny",
    skab: str | Path | None = None,
) -> dict[str, Any]:
    """Measure, write ``results.json`` and ``results.md`` in ``out_dir``, return the results."""
    channels = channels or [8, 16, 32, 64]
    measured = measure_channels(channels, rows=rows, repeats=repeats, base=base)
    throughput = None if skab is None else measure_skab_throughput(skab, repeats=repeats, base=base)
    last = measured["rows"][-1]
    ratio = last["cost_per_value_vs_first"]
    target = {
        "target": f"Scoring cost per value {channels[0]} -> {channels[-1]} channels within {TARGET_RATIO:.0f}x",
        "status": "met" if ratio <= TARGET_RATIO else "missed",
        "measured": f"{ratio:.2f}x with the one-pass blind prediction ({last['copies_cost_per_value_vs_first']:.2f}x "
                    "with the C copies it replaced)",
    }
    settings = {"base": base, "steps": 20, "seed": 0, "n_assets": len(channels), "rows": rows, "repeats": repeats,
                "channels": channels}
    targets = [target]
    if throughput is not None:
        speed = throughput["v2_over_v1"]
        targets.append({
            "target": "Scoring throughput on SKAB not below the first version's by more than 20 % (same run)",
            "status": "met" if speed >= 0.8 else "missed",
            "measured": f"v2 {throughput['v2_values_per_s']:,.0f} values/s, v1 {throughput['v1_values_per_s']:,.0f} "
                        f"values/s: {speed:.2f}x",
        })
    results = {"suite": "channels", **run_info(), "settings": settings,
               **measured, "skab_throughput": throughput, "targets": targets}
    folder = Path(out_dir)
    write_results(folder, results)
    (folder / "results.md").write_text(render(results))
    return results


def render(results: dict[str, Any]) -> str:
    """The suite's Markdown section."""
    lines = ["# Scoring cost versus channel count", "", *provenance_lines(results), ""]
    lines += ["Same detector, same rows, scored alternately with the one-pass blind prediction and with one model "
              "pass per hidden channel (the C copies it replaced); best of the repeats.", ""]
    header = ["Channels", "Values/s (one pass)", "Cost per value vs first", "Values/s (C copies)",
              "Cost per value vs first (copies)", "Copies / one pass"]
    table = [[str(r["channels"]), f"{r['values_per_s']:,.0f}", f"{r['cost_per_value_vs_first']:.2f}x",
              f"{r['copies_values_per_s']:,.0f}", f"{r['copies_cost_per_value_vs_first']:.2f}x",
              f"{r['copies_over_one_pass']:.2f}x"] for r in results["rows"]]
    lines += markdown_table(header, table)
    skab = results.get("skab_throughput")
    if skab:
        lines += [f"SKAB ({', '.join(skab['files'])}; whole files, the adapter fitted on the first 400 rows): "
                  f"v2 scoring {skab['v2_values_per_s']:,.0f} values/s, the first version's scoring rule with its "
                  f"C-copies blind pass {skab['v1_values_per_s']:,.0f} values/s, ratio {skab['v2_over_v1']:.2f}x.", ""]
    for target in results["targets"]:
        lines.append(f"- **{target['status'].upper()}** {target['target']}: {target['measured']}")
    return "\n".join(lines) + "\n"
