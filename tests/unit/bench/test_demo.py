"""The demo end to end on a small fleet: files written, keys present, numbers in sane ranges."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from edgepeft.bench.demo import (
    BASELINE_NAMES,
    MAX_HTML_ALERTS,
    TABLE_COLUMNS,
    Alert,
    DemoResult,
    _alerts,
    _html_alerts,
    _rich_tables,
    run_demo,
)
from edgepeft.core.errors import ConfigError, OutputError
from edgepeft.data.synthetic import make_pump_fleet
from edgepeft.detect.detector import AnomalyDetector

EVIDENCE_KINDS = {"dynamics", "level", "scale", "stuck", "relation"}

N_PUMPS = 2
STEPS = 10  # few steps keep this test fast; the numbers only have to be sane, not good


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, str]:
    out = io.StringIO()
    threads = torch.get_num_threads()
    # One thread: on a shared CI runner, two torch processes spinning two threads each on two cores run
    # 10-50x slower (measured), and the tiny model gains nothing from a second thread.
    torch.set_num_threads(1)
    try:
        result = run_demo(
            tmp_path_factory.mktemp("demo") / "out",
            base="tiny",
            n_pumps=N_PUMPS,
            steps=STEPS,
            console=Console(file=out, width=140),
        )
    finally:
        torch.set_num_threads(threads)
    return result, out.getvalue()


def test_result_holds_rows_and_paths(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    assert [row.pump for row in result.rows] == ["pump-01", "pump-02"]
    assert result.html_path == result.out_dir / "index.html"
    assert result.json_path == result.out_dir / "results.json"
    assert result.wall_seconds > 0


def test_html_is_self_contained_with_one_plot_per_pump(demo: tuple[DemoResult, str]) -> None:
    text = demo[0].html_path.read_text(encoding="utf-8")
    images = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(images) == N_PUMPS
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in text and "https://" not in text  # nothing to fetch: works offline
    for row in demo[0].rows:
        assert row.pump in text
    assert "mean" in text


def test_results_json_has_every_table_number(demo: tuple[DemoResult, str]) -> None:
    data = json.loads(demo[0].json_path.read_text())
    assert {"schema_version", "date", "command", "machine", "settings", "wall_seconds", "rows", "mean",
            "columns", "fault_kinds"} <= set(data)
    assert data["settings"] == {"base": "tiny", "method": "lora", "n_pumps": N_PUMPS, "steps": STEPS, "seed": 0}
    assert data["machine"]["cpu_count"] >= 1
    table_keys = {"pump", "fault_kinds"} | {attr for _, _, attr, _ in TABLE_COLUMNS}
    assert len(data["rows"]) == N_PUMPS
    for row in data["rows"]:
        assert table_keys <= set(row)
    assert {attr for _, _, attr, _ in TABLE_COLUMNS} <= set(data["mean"])
    f1s = [row["f1"] for row in data["rows"]]
    assert data["mean"]["f1"] == pytest.approx(sum(f1s) / len(f1s))


def test_numbers_are_in_sane_ranges(demo: tuple[DemoResult, str]) -> None:
    for row in demo[0].rows:
        assert set(row.baselines) == set(BASELINE_NAMES) == {"iforest", "pca"}
        for value in (row.f1, row.auc_pr, row.best_f1, row.vus_pr):
            assert 0.0 <= value <= 1.0
        for theirs in row.baselines.values():
            for value in (theirs.f1, theirs.auc_pr, theirs.best_f1, theirs.vus_pr):
                assert 0.0 <= value <= 1.0
            assert theirs.best_f1 >= theirs.f1 - 1e-12
            assert 0.0 <= theirs.far_pct <= 100.0
        assert row.best_f1 >= row.f1 - 1e-12  # the best threshold is at least as good as ours
        assert 0.0 <= row.far_pct <= 100.0 and 0.0 <= row.mar_pct <= 100.0
        assert 0.0 < row.trainable_share < 0.5  # an adapter, not a copy of the model
        assert 1_000 < row.adapter_bytes < 1_000_000
        assert row.adapt_seconds > 0 and row.fit_seconds >= row.adapt_seconds
        assert 2 <= len(row.faults) <= 4 and row.fault_kinds == [f.kind for f in row.faults]
        assert all(0.0 <= f.recall <= 1.0 for f in row.faults)
        assert all(set(f.baseline_recall) == {"iforest", "pca"} for f in row.faults)
        assert all(0.0 <= r <= 1.0 for f in row.faults for r in f.baseline_recall.values())


def test_adapters_are_saved_and_load(demo: tuple[DemoResult, str]) -> None:
    result = demo[0]
    for row in result.rows:
        folder = result.adapters_dir / row.pump
        det = AnomalyDetector.load(folder)
        assert det.threshold_ == pytest.approx(row.threshold)
        assert det.adapter_bytes(folder) == row.adapter_bytes


def test_console_shows_the_table(demo: tuple[DemoResult, str]) -> None:
    printed = demo[1]
    for name in ("pump-01", "pump-02", "mean", "AUC-PR", "FAR %", "IF F1", "PCA F1", "PCA AUC-PR", "index.html"):
        assert name in printed


@pytest.mark.parametrize("width", [80, 110, 140])
def test_console_table_never_cuts_numbers(demo: tuple[DemoResult, str], width: int) -> None:
    result = demo[0]
    out = io.StringIO()
    console = Console(file=out, width=width)
    for table in _rich_tables(console, result.rows, result.mean, title="demo"):
        console.print(table)
    printed = out.getvalue()
    assert "…" not in printed  # a cut cell or title would end in an ellipsis
    for _, _, attr, fmt in TABLE_COLUMNS:
        assert fmt.format(result.mean[attr]) in printed
    for row in result.rows:  # the fault lists are in a column or on lines of their own
        assert all(kind in printed for kind in row.fault_kinds)
    if width == 80:  # too narrow for every column: ours and the baselines in two tables
        assert "baselines on the same split" in printed


def test_console_shows_the_by_fault_table(demo: tuple[DemoResult, str]) -> None:
    printed = demo[1]
    by_fault = printed[printed.index("by fault kind"):]
    for name in ("fault kind", "ours", "IsolationForest", "PCA"):
        assert name in by_fault
    for row in demo[0].rows:
        for kind in row.fault_kinds:
            assert kind in by_fault


def test_pca_numbers_are_in_results_json_and_html(demo: tuple[DemoResult, str]) -> None:
    result = demo[0]
    data = json.loads(result.json_path.read_text())
    assert data["baselines"] == ["iforest", "pca"]
    assert {"iforest_f1", "iforest_auc_pr", "pca_f1", "pca_auc_pr"} <= set(data["columns"])
    assert "far_pct" in data["columns"]
    for row, json_row in zip(result.rows, data["rows"], strict=True):
        for name in ("iforest", "pca"):
            for key in ("f1", "far_pct", "auc_pr", "best_f1", "vus_pr"):
                assert json_row[f"{name}_{key}"] == pytest.approx(getattr(row.baselines[name], key))
        assert "baselines" not in json_row  # flattened to <name>_<number>
        for fault in json_row["faults"]:
            assert {"kind", "start", "end", "recall", "iforest_recall", "pca_recall"} <= set(fault)
    pca_f1s = [row["pca_f1"] for row in data["rows"]]
    assert data["mean"]["pca_f1"] == pytest.approx(sum(pca_f1s) / len(pca_f1s))
    text = result.html_path.read_text(encoding="utf-8")
    for title in ("false alarms %", "IsolationForest F1", "IsolationForest AUC-PR", "PCA F1", "PCA AUC-PR",
                  "T-squared + Q"):
        assert title in text
    for row in result.rows:
        assert f"PCA F1 {row.baselines['pca'].f1:.3f}" in text


def test_by_fault_table_has_three_recalls_and_explanations(demo: tuple[DemoResult, str]) -> None:
    result = demo[0]
    data = json.loads(result.json_path.read_text())
    kinds = {kind for row in result.rows for kind in row.fault_kinds}
    assert set(data["fault_kinds"]) == kinds
    alerts = [alert for row in result.rows for alert in row.alerts]
    for kind, values in data["fault_kinds"].items():
        assert {"count", "recall", "iforest_recall", "pca_recall", "explanations"} <= set(values)
        assert all(0.0 <= values[key] <= 1.0 for key in ("recall", "iforest_recall", "pca_recall"))
        on_kind = [a.explanation for a in alerts if a.fault == kind]
        # Each counted explanation is the main one of that many alerts overlapping this kind.
        for label, count in values["explanations"].items():
            assert count == on_kind.count(label) >= 1
        if on_kind:
            assert values["explanations"]
    text = result.html_path.read_text(encoding="utf-8")
    by_fault = text[text.index("<h3>By fault kind</h3>"):text.index("<h2>pump-01</h2>")]
    assert "(IsolationForest)" in by_fault and "(PCA)" in by_fault and "explanations of our alerts" in by_fault
    for values in data["fault_kinds"].values():
        for label, count in values["explanations"].items():
            assert f"{label} ({count})" in by_fault


def test_alerts_are_explained_with_real_channels(demo: tuple[DemoResult, str]) -> None:
    result = demo[0]
    data = json.loads(result.json_path.read_text())
    fleet = make_pump_fleet(N_PUMPS, seed=0)
    assert any(row.alerts for row in result.rows)  # the fleet has faults; something is flagged
    for pump, row, json_row in zip(fleet, result.rows, data["rows"], strict=True):
        channels = set(pump.channels)
        assert len(json_row["alerts"]) == len(row.alerts) == json_row["n_alerts"]
        assert json_row["n_false_alerts"] == sum(a.fault is None for a in row.alerts)
        previous_end = -1
        for alert, json_alert in zip(row.alerts, json_row["alerts"], strict=True):
            assert {"start", "end", "rows", "max_p_anomaly", "explanation", "channels", "fault"} <= set(json_alert)
            assert previous_end < alert.start < alert.end <= len(pump.test)
            assert 1 <= alert.rows <= alert.end - alert.start
            assert alert.start - previous_end > 10 + 1 or previous_end < 0  # a gap of > 10 rows split them
            previous_end = alert.end - 1
            assert 0.0 <= alert.max_p_anomaly <= 1.0
            channel, _, kind = alert.explanation.rpartition(":")
            assert channel in channels and kind in EVIDENCE_KINDS
            assert 1 <= len(alert.channels) <= 3 and set(alert.channels) <= channels
            assert channel in alert.channels or len(alert.channels) == 3
            overlapping = {k for s, e, k in pump.faults if s < alert.end and alert.start < e}
            assert (alert.fault in overlapping) if overlapping else alert.fault is None
    text = result.html_path.read_text(encoding="utf-8")
    assert text.count("<h3>Alerts</h3>") == N_PUMPS
    for row in result.rows:
        section = text[text.index(f"<h2>{row.pump}</h2>"):]
        for alert in row.alerts[:MAX_HTML_ALERTS]:
            assert f"<td>{alert.start}-{alert.end}</td>" in section
            assert alert.explanation in section
        if len(row.alerts) > MAX_HTML_ALERTS:
            assert f"{len(row.alerts) - MAX_HTML_ALERTS} more alert" in section


def test_alerts_split_at_gaps_over_ten_rows_and_the_report_caps_them() -> None:
    assert _alerts(np.zeros(50, dtype=np.int8), np.zeros(50), [""] * 50, []) == []
    flagged = np.zeros(400, dtype=np.int8)
    flagged[::12] = 1  # 11 unflagged rows between flagged ones: every flagged row is its own alert
    flagged[311] = 1  # 10 unflagged rows after row 300 (= 25 * 12): one alert
    labels = ["vib_rms:scale;flow:relation" if f else "" for f in flagged]
    alerts = _alerts(flagged, flagged * 0.8, labels, [(0, 30, "cavitation")])
    assert [(a.start, a.end) for a in alerts[:3]] == [(0, 1), (12, 13), (24, 25)]
    assert any((a.start, a.end, a.rows) == (300, 313, 3) for a in alerts)  # rows 300, 311 and 312 (= 26 * 12)
    assert [a.fault for a in alerts[:4]] == ["cavitation", "cavitation", "cavitation", None]
    assert all(a.explanation == "vib_rms:scale" and a.channels == ["vib_rms", "flow"] for a in alerts)
    text = _html_alerts(alerts)
    assert text.count("<td>0.80</td>") == MAX_HTML_ALERTS
    assert f"{len(alerts) - MAX_HTML_ALERTS} more alerts" in text
    one = Alert(start=5, end=9, rows=4, max_p_anomaly=0.7, explanation="flow:level", channels=["flow"], fault=None)
    assert "more alert" not in _html_alerts([one]) and "false" in _html_alerts([one])
    assert "No alerts" in _html_alerts([])


def test_unwritable_output_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create"):
        run_demo(blocker, base="tiny", n_pumps=1, steps=1, console=Console(file=io.StringIO()))


def test_bad_settings_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_pumps"):
        run_demo(tmp_path / "out", base="tiny", n_pumps=0, console=Console(file=io.StringIO()))
    assert not (tmp_path / "out").exists()
