"""``edgepeft stream`` through a real subprocess: SKAB, a single-column file, resume, and clean failures.

Runs as ``edgepeft stream`` once the CLI registers the command, and through the stand-alone module entry point
(the same function, the same error handling) until then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SHARED, sine_series

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
SKAB_FILE = SHARED / "skab" / "other" / "9.csv"
FAST = ["--base", "tiny", "--method", "bitfit", "--update-every", "32"]


def _entry() -> list[str]:
    from edgepeft import cli

    registered = any(c.name == "stream" or getattr(c.callback, "__name__", "") == "stream"
                     for c in cli.app.registered_commands)
    return ["-m", "edgepeft.cli" if registered else "edgepeft.bench.stream_commands"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *_entry(), "stream", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr
    for needle in needles:
        assert needle.lower() in result.stderr.lower(), result.stderr


@pytest.mark.skipif(not SKAB_FILE.exists(), reason="SKAB is not in ../shared/datasets")
def test_skab_file_streams_and_a_rerun_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    out, checkpoints = tmp_path / "scores.csv", tmp_path / "ckpt"
    args = [str(SKAB_FILE), "--warmup", "400", "--drop", "anomaly,changepoint", "--out", str(out),
            "--checkpoint-dir", str(checkpoints), *FAST]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    scores = pd.read_csv(out)
    source = pd.read_csv(SKAB_FILE, sep=";")
    assert len(scores) == len(source)
    assert list(scores.columns) == ["time", "score", "p_anomaly", "anomaly", "probation"]
    assert scores["time"].tolist() == source["datetime"].tolist()
    assert scores["probation"][:400].all() and not scores["anomaly"][:400].any()
    assert scores["p_anomaly"].between(0, 1).all() and np.isfinite(scores["score"]).all()
    assert "peak memory: training" in result.stderr and "scoring" in result.stderr
    rerun = run(*args)  # the checkpoint is at the end: nothing to recompute, the same output
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from the checkpoint at row 1144" in " ".join(rerun.stderr.split())
    assert pd.read_csv(out).equals(scores)


def test_single_column_file(tmp_path: Path) -> None:
    data = tmp_path / "flow.csv"
    pd.DataFrame({"flow": sine_series(300, 1)[:, 0]}).to_csv(data, index=False)
    out = tmp_path / "scores.csv"
    result = run(str(data), "--warmup", "150", "--out", str(out), "--budget-mb", "8", *FAST)
    assert result.returncode == 0, result.stderr
    scores = pd.read_csv(out)
    assert list(scores.columns) == ["score", "p_anomaly", "anomaly", "probation"] and len(scores) == 300
    assert "(budget 8.00 MB)" in " ".join(result.stderr.split())


def test_clean_failures(tmp_path: Path) -> None:
    data = tmp_path / "two.csv"
    pd.DataFrame(sine_series(200, 2), columns=["a", "b"]).to_csv(data, index=False)
    out = tmp_path / "scores.csv"
    out.write_text("keep me\n")
    assert_clean_failure(run(str(data), "--warmup", "400", "--out", str(out), *FAST), "--warmup")
    assert_clean_failure(run(str(data), "--warmup", "100", "--out", str(out), "--budget-mb", "0.001", *FAST),
                         "--budget-mb")
    assert_clean_failure(run(str(tmp_path / "missing.csv"), "--out", str(out), *FAST), "does not exist")
    assert out.read_text() == "keep me\n"  # a failed run never touches the output
    checkpoints = tmp_path / "ckpt"
    assert run(str(data), "--warmup", "100", "--out", str(out), "--checkpoint-dir", str(checkpoints),
               *FAST).returncode == 0
    assert_clean_failure(run(str(data), "--warmup", "120", "--out", str(out), "--checkpoint-dir", str(checkpoints),
                             *FAST), "other settings")
