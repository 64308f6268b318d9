"""edgepeft bench channels: the one-pass blind prediction against the C copies, and the v2 vs v1 SKAB ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepeft.bench.scaling import measure_skab_throughput, run_channel_scaling

SKAB = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "skab"


def test_channel_scaling_writes_results_with_ratios_and_targets(tmp_path: Path) -> None:
    results = run_channel_scaling(tmp_path / "out", channels=[2, 6], rows=200, repeats=1, skab=tmp_path / "none")
    rows = results["rows"]
    assert [r["channels"] for r in rows] == [2, 6] and rows[0]["cost_per_value_vs_first"] == 1.0
    assert all(r["values_per_s"] > 0 and r["copies_values_per_s"] > 0 for r in rows)
    assert results["skab_throughput"] is None  # no data there: the ratio is skipped, not invented
    assert results["targets"][0]["status"] in ("met", "missed")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["suite"] == "channels" and saved["commit"]
    assert "Cost per value" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.skipif(not SKAB.exists(),
                    reason="real data: ../shared/datasets/skab beside the repository (CI has it; a bare clone may not)")
def test_skab_throughput_ratio_on_real_files() -> None:
    out = measure_skab_throughput(SKAB, files=1, repeats=1, steps=0)
    assert out is not None and out["v2_over_v1"] > 0 and out["values"] > 1000


def test_bad_channel_list_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "edgepeft.cli", "bench", "channels", "--channels", "8,x",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--channels" in lines[0]


def test_explanation_hit_rates_count_rows_of_faults_that_name_their_channel() -> None:
    import numpy as np

    from edgepeft.bench.suites import AssetOutput, explanation_hit_rates
    from edgepeft.data.datasets import LabelledRun
    from edgepeft.data.synthetic import PumpAsset

    pump = PumpAsset("p", ["a", "b", "c"], np.zeros((4, 3)), np.zeros((6, 3)), np.ones(6, np.int8),
                     faults=[(0, 4, "stuck_sensor"), (4, 6, "imbalance")], params={"fault_0_channel": 1.0})
    run = LabelledRun("p", pump.channels, pump.train, pump.test, pump.labels, None)
    top = [[1, 0, 2], [0, 1, 2], [0, 2, 1], [2, 0, 1], [0, 1, 2], [0, 1, 2]]
    flagged = np.array([1, 1, 0, 0, 1, 1])
    out = explanation_hit_rates([pump], [run], {"ours": [AssetOutput(np.zeros(6), flagged, {}, top)],
                                                "plain": [AssetOutput(np.zeros(6), flagged, {}, None)]})
    assert list(out) == ["ours"]  # a detector without explanations is not scored
    hits = out["ours"]
    assert hits["rows"] == 4 and hits["hit_rate_1"] == 0.25 and hits["hit_rate_3"] == 1.0  # imbalance rows ignored
    assert hits["flagged_rows"] == 2 and hits["flagged_hit_rate_1"] == 0.5
