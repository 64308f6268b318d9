"""The benchmark harness end to end on tiny subsets: every suite writes results.json, results.md and plots with
the promised keys; the memory probe sees activations; BENCHMARKS.md regenerates from result folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import SHARED
from typer.testing import CliRunner

from edgepeft.bench.commands import bench_app
from edgepeft.bench.costs import TensorMemory, training_tensor_memory, window_latency
from edgepeft.bench.docs import BENCHMARKS_FILE, REGENERATE_COMMAND, regenerate_benchmarks, render_benchmarks
from edgepeft.bench.harness import ALL_CONTENDERS, default_contenders, git_commit, read_results
from edgepeft.bench.suites import SuiteOptions, run_asd, run_fleet, run_skab
from edgepeft.core.errors import ArtifactError, ConfigError

needs_datasets = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared benchmark data not found at {SHARED} (kept outside the repository)"
)
# steps=5: a few optimiser steps are enough to exercise the loop; the numbers are not the point here.
SMOKE = {"base": "tiny", "steps": 5, "methods": ["lora", "pca"], "latency_calls": 3, "progress": False,
         "threads": 1, "command": "pytest smoke"}
RUN_KEYS = {"suite", "machine", "date", "commit", "command", "settings", "protocol", "contenders", "assets",
            "summary", "costs", "targets", "plots"}
COST_KEYS = {"trainable_parameters", "trainable_share", "adapter_bytes", "train_tensor_bytes", "train_rss",
             "infer_rss", "latency", "fit_seconds_mean", "fit_seconds_max", "adapt_seconds_mean",
             "throughput_values_per_s", "measured_on"}


def check_written(results: dict, out: Path, n_assets: int) -> dict:
    """The files exist, results.json round-trips, and the keys every suite promises are there."""
    assert (out / "results.md").read_text().startswith("# ")
    for plot in results["plots"]:
        assert (out / plot).stat().st_size > 1000
    saved = read_results(out)
    assert set(saved) >= RUN_KEYS
    assert {"cpu_model", "cores_usable", "ram_bytes", "python", "torch"} <= set(saved["machine"])
    assert saved["command"] == "pytest smoke"
    assert set(saved["summary"]) == set(saved["costs"]) == {"lora", "pca"}
    for name in ("lora", "pca"):
        assert set(saved["costs"][name]) >= COST_KEYS
        assert len(saved["assets"][name]) == n_assets
    lora = saved["costs"]["lora"]
    assert 0 < lora["trainable_share"] < 1 and lora["adapter_bytes"] > 0
    assert lora["train_tensor_bytes"]["activation_bytes"] > 0
    assert lora["latency"]["p99_ms"] >= lora["latency"]["p50_ms"] > 0
    assert saved["costs"]["pca"]["trainable_parameters"] is None  # a baseline has no base to share
    assert all(t["status"] in {"met", "missed", "not evaluated"} for t in saved["targets"])
    json.dumps(saved, allow_nan=False)  # strict JSON: no NaN anywhere
    return saved


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A docs/ folder: the suites write into docs/results/<suite>, as the committed results are laid out."""
    return tmp_path_factory.mktemp("docs")


@pytest.fixture(scope="module")
def skab_out(docs_dir: Path) -> Path:
    # Only used by tests marked @needs_datasets, which skip (with a reason) when the data is absent.
    out = docs_dir / "results" / "skab"
    run_skab(SHARED / "skab", SuiteOptions(limit=2, rss=True, **SMOKE), out)
    return out


@pytest.fixture(scope="module")
def asd_out(docs_dir: Path) -> Path:
    # Only used by tests marked @needs_datasets, which skip (with a reason) when the data is absent.
    out = docs_dir / "results" / "asd"
    # omi-1's first anomaly starts at test row 760: 800 rows keep 40 anomalous ones.
    run_asd(SHARED / "asd", SuiteOptions(limit=1, max_rows=800, rss=False, **SMOKE), out)
    return out


@needs_datasets
def test_skab_suite_writes_protocol_numbers(skab_out: Path) -> None:
    saved = check_written(read_results(skab_out), skab_out, n_assets=2)
    lora = saved["summary"]["lora"]
    assert {"tp", "fp", "fn", "tn", "f1", "far", "mar", "changepoint"} <= set(lora)
    assert set(lora["changepoint"]) == {"standard", "low_fp", "low_fn"}
    rows = saved["assets"]["lora"]
    assert lora["tp"] == sum(r["tp"] for r in rows)  # counts summed over files (micro average)
    assert all(r["n_train"] == 400 for r in rows)
    # RSS is measured in fresh processes, and the peak counter could be reset on this kernel.
    assert saved["costs"]["lora"]["train_rss"]["peak_reset"] is True
    assert saved["costs"]["lora"]["infer_rss"]["increase_bytes"] > 0
    text = (skab_out / "results.md").read_text()
    assert "Conv-AE" in text and "anomaly-free.csv" in text and "keeps rows 400+" in text
    assert "SUBSET RUN" in text


@needs_datasets
def test_asd_suite_reports_honest_and_secondary_metrics(asd_out: Path) -> None:
    saved = check_written(read_results(asd_out), asd_out, n_assets=1)
    row = saved["assets"]["lora"][0]
    assert row["asset"] == "omi-1" and row["n_test"] == 800
    assert {"best_f1", "f1", "auc_pr", "vus_pr", "pa_best_f1"} <= set(row)
    assert row["pa_best_f1"] >= row["best_f1"]  # point adjustment only ever inflates
    assert "INFLATES" in (asd_out / "results.md").read_text()


def test_fleet_suite_runs_on_generated_pumps(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    # The commit recorded is the one the run started on (the code it imported), even if HEAD moves meanwhile.
    results = run_fleet(SuiteOptions(rss=False, commit="0" * 40, **SMOKE), out, n_pumps=2, n_train=400, n_test=600)
    saved = check_written(results, out, n_assets=2)
    assert saved["settings"]["n_pumps"] == 2
    assert saved["summary"]["pca"]["n_assets_ranked"] == 2
    assert saved["commit"] == "0" * 40 and saved["commit_at_end"] != saved["commit"]
    assert "HEAD had moved" in (out / "results.md").read_text()


def test_tensor_probe_sees_activations_of_full_but_not_of_a_frozen_model() -> None:
    train = np.random.default_rng(0).normal(size=(400, 3)).astype(np.float32)
    full, zeroshot = default_contenders("tiny", steps=5, methods=["full", "zeroshot"])
    probed = {c.name: training_tensor_memory(c.make(), train, c.trains) for c in (full, zeroshot)}
    assert isinstance(probed["full"], TensorMemory)
    assert probed["full"].activation_bytes > probed["zeroshot"].activation_bytes == 0
    assert probed["full"].grad_bytes == probed["full"].trainable_bytes > 0
    assert probed["full"].optimizer_bytes >= 2 * probed["full"].grad_bytes  # AdamW: two moments per weight


def test_window_latency_times_each_call() -> None:
    det = default_contenders("tiny", steps=5, methods=["sqdiff"])[0].make()
    det.fit(np.random.default_rng(0).normal(size=(300, 2)))
    latency = window_latency(det, np.zeros((100, 2)), n_calls=20)
    assert latency["calls"] == 20 and latency["window_rows"] == 64


def test_contenders_cover_the_issue_and_refuse_unknown_names() -> None:
    names = [c.name for c in default_contenders("tiny", steps=5)]
    assert names == list(ALL_CONTENDERS)
    assert {"lora", "full", "scratch", "zeroshot", "iforest", "pca", "movvar", "sqdiff"} <= set(names)
    with pytest.raises(ConfigError, match="unknown method"):
        default_contenders("tiny", steps=5, methods=["magic"])


def test_git_commit_outside_a_repository_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"


@needs_datasets
def test_benchmarks_md_regenerates_from_result_folders(docs_dir: Path, skab_out: Path, asd_out: Path) -> None:
    docs = docs_dir
    text = regenerate_benchmarks(docs).read_text()
    assert text.startswith(f"<!-- Generated by `{REGENERATE_COMMAND}`")
    assert text.index("## SKAB") < text.index("## ASD")  # suite order, whatever the folder order
    assert "(results/skab/quality_vs_share.png)" in text  # image links relative to docs/
    assert render_benchmarks([skab_out, asd_out], relative_to=docs) == text
    assert (docs / BENCHMARKS_FILE).exists()


def test_cli_runs_a_suite_and_reports_errors_as_our_types(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "fleet"
    result = runner.invoke(bench_app, ["fleet", "--pumps", "1", "--train-rows", "300", "--test-rows", "400",
                                       "--methods", "sqdiff", "--no-rss", "--no-progress", "--latency-calls", "3",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "results ->" in result.output and (out / "results.json").exists()
    bad = runner.invoke(bench_app, ["fleet", "--methods", "magic", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, ConfigError)
    missing = runner.invoke(bench_app, ["docs", "--docs", str(tmp_path / "nothing")])
    assert isinstance(missing.exception, ArtifactError)
