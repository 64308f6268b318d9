"""The demo end to end on a small fleet: files written, keys present, numbers in sane ranges."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from edgepeft.bench.demo import TABLE_COLUMNS, DemoResult, run_demo
from edgepeft.core.errors import ConfigError, OutputError
from edgepeft.detect.detector import AnomalyDetector

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
        for value in (row.f1, row.auc_pr, row.best_f1, row.vus_pr, row.iforest_f1, row.iforest_auc_pr):
            assert 0.0 <= value <= 1.0
        assert row.best_f1 >= row.f1 - 1e-12  # the best threshold is at least as good as ours
        assert 0.0 <= row.far_pct <= 100.0 and 0.0 <= row.mar_pct <= 100.0
        assert 0.0 < row.trainable_share < 0.5  # an adapter, not a copy of the model
        assert 1_000 < row.adapter_bytes < 1_000_000
        assert row.adapt_seconds > 0 and row.fit_seconds >= row.adapt_seconds
        assert 2 <= len(row.faults) <= 4 and row.fault_kinds == [f.kind for f in row.faults]
        assert all(0.0 <= f.recall <= 1.0 for f in row.faults)


def test_adapters_are_saved_and_load(demo: tuple[DemoResult, str]) -> None:
    result = demo[0]
    for row in result.rows:
        folder = result.adapters_dir / row.pump
        det = AnomalyDetector.load(folder)
        assert det.threshold_ == pytest.approx(row.threshold)
        assert det.adapter_bytes(folder) == row.adapter_bytes


def test_console_shows_the_table(demo: tuple[DemoResult, str]) -> None:
    printed = demo[1]
    for name in ("pump-01", "pump-02", "mean", "AUC-PR", "index.html"):
        assert name in printed


def test_unwritable_output_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot create"):
        run_demo(blocker, base="tiny", n_pumps=1, steps=1, console=Console(file=io.StringIO()))


def test_bad_settings_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_pumps"):
        run_demo(tmp_path / "out", base="tiny", n_pumps=0, console=Console(file=io.StringIO()))
    assert not (tmp_path / "out").exists()
