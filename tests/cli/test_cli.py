"""The command line through a real subprocess: the happy path and every bad-input case.

Each bad input must give one clear line on stderr, a non-zero exit, no traceback, and must leave any
existing output untouched.
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


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgepeft.cli", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr
    for needle in needles:
        assert needle.lower() in result.stderr.lower(), result.stderr


def write_csv(path: Path, values: np.ndarray, sep: str = ",", with_time: bool = True, labels: bool = False) -> Path:
    frame = pd.DataFrame(values, columns=[f"s{i}" for i in range(values.shape[1])])
    if with_time:
        frame.insert(0, "timestamp", pd.date_range("2026-01-01", periods=len(frame), freq="s").astype(str))
    if labels:
        frame["anomaly"] = 0
    frame.to_csv(path, sep=sep, index=False)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    series = sine_series(1200, 3)
    train = write_csv(root / "train.csv", series[:800], sep=";", labels=True)
    test = write_csv(root / "test.csv", series[800:], sep=";", labels=True)
    result = run("adapt", str(train), "--out", str(root / "adapter"), "--base", "tiny", "--steps", "20",
                 "--drop", "anomaly")
    assert result.returncode == 0, result.stderr
    return {"root": root, "train": train, "test": test, "adapter": root / "adapter"}


def test_adapt_score_info_happy_path(workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "scores.csv"
    result = run("score", str(workspace["adapter"]), str(workspace["test"]), "--out", str(out), "--drop", "anomaly")
    assert result.returncode == 0, result.stderr
    scores = pd.read_csv(out)
    assert len(scores) == 400  # one row per input row, none dropped
    assert {"score", "p_anomaly", "anomaly"} <= set(scores.columns)
    assert scores["p_anomaly"].between(0, 1).all()
    assert set(scores["anomaly"].unique()) <= {0, 1}
    info = run("info", str(workspace["adapter"]))
    assert info.returncode == 0, info.stderr
    for field in ("lora", "tiny", "trainable", "adapter bytes", "threshold"):
        assert field in info.stdout


def test_short_file_is_scored_without_dropping_rows(workspace: dict[str, Path]) -> None:
    short = write_csv(workspace["root"] / "short.csv", sine_series(10, 3))
    out = workspace["root"] / "short-scores.csv"
    result = run("score", str(workspace["adapter"]), str(short), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(out)) == 10


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "empty"),
        ("a,b,c\n", "no data rows"),
        ("a,b,c\n1,2\n3,4,5,6,7\n", "malformed"),
        ("a,b,c\n1,x,3\n4,y,6\n", "not numeric"),
    ],
    ids=["empty", "header-only", "ragged", "non-numeric"],
)
def test_bad_training_files(workspace: dict[str, Path], content: str, needle: str) -> None:
    path = workspace["root"] / "bad.csv"
    path.write_text(content)
    result = run("adapt", str(path), "--out", str(workspace["root"] / "never"), "--base", "tiny", "--steps", "1")
    assert_clean_failure(result, needle)
    assert not (workspace["root"] / "never").exists()


def test_missing_file(workspace: dict[str, Path]) -> None:
    result = run("adapt", str(workspace["root"] / "nope.csv"), "--out", str(workspace["root"] / "x"))
    assert_clean_failure(result, "nope.csv")


def test_long_nan_gap_is_rejected_short_gap_filled(workspace: dict[str, Path]) -> None:
    values = sine_series(800, 3)
    values[100:160, 1] = np.nan
    result = run("adapt", str(write_csv(workspace["root"] / "gap.csv", values)), "--out",
                 str(workspace["root"] / "gap-adapter"), "--base", "tiny", "--steps", "1")
    assert_clean_failure(result, "s1")
    values = sine_series(800, 3)
    values[100:102, 1] = np.inf
    result = run("adapt", str(write_csv(workspace["root"] / "smallgap.csv", values)), "--out",
                 str(workspace["root"] / "smallgap-adapter"), "--base", "tiny", "--steps", "1")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr.lower()


def test_too_short_training_series(workspace: dict[str, Path]) -> None:
    path = write_csv(workspace["root"] / "tiny.csv", sine_series(30, 3))
    result = run("adapt", str(path), "--out", str(workspace["root"] / "t"), "--base", "tiny")
    assert_clean_failure(result, "rows")


def test_channel_mismatch_and_existing_output_is_kept(workspace: dict[str, Path]) -> None:
    wrong = write_csv(workspace["root"] / "wrong.csv", sine_series(300, 2))
    out = workspace["root"] / "keep.csv"
    out.write_text("precious\n")
    result = run("score", str(workspace["adapter"]), str(wrong), "--out", str(out))
    assert_clean_failure(result, "channels")
    assert out.read_text() == "precious\n"


def test_unknown_method_and_base(workspace: dict[str, Path]) -> None:
    result = run("adapt", str(workspace["train"]), "--out", str(workspace["root"] / "m"), "--method", "magic",
                 "--drop", "anomaly")
    assert_clean_failure(result, "unknown method")
    result = run("adapt", str(workspace["train"]), "--out", str(workspace["root"] / "m"), "--base", "huge",
                 "--drop", "anomaly")
    assert_clean_failure(result, "unknown base")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the permission check cannot fail as root")
def test_unwritable_output_as_user(workspace: dict[str, Path]) -> None:
    locked = workspace["root"] / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result = run("score", str(workspace["adapter"]), str(workspace["test"]), "--out", str(locked / "s.csv"),
                 "--drop", "anomaly")
    assert_clean_failure(result, "cannot write")


def test_unwritable_output_path(workspace: dict[str, Path]) -> None:
    # Works for root too: a regular file where a directory is needed cannot be written through.
    blocker = workspace["root"] / "blocker"
    blocker.write_text("file, not a folder")
    result = run("score", str(workspace["adapter"]), str(workspace["test"]), "--out", str(blocker / "s.csv"),
                 "--drop", "anomaly")
    assert_clean_failure(result, "cannot write")
    assert blocker.read_text() == "file, not a folder"


def test_not_an_adapter_directory(workspace: dict[str, Path]) -> None:
    result = run("score", str(workspace["root"]), str(workspace["test"]), "--out", str(workspace["root"] / "o.csv"))
    assert_clean_failure(result, "not an edgepeft detector")


@pytest.mark.skipif(not (SHARED / "skab" / "valve1" / "0.csv").exists(), reason="needs ../shared/datasets/skab")
def test_skab_file_adapt_and_score(tmp_path: Path) -> None:
    data = SHARED / "skab" / "valve1" / "0.csv"
    result = run("adapt", str(data), "--rows", "400", "--out", str(tmp_path / "a"), "--base", "tiny", "--steps", "20",
                 "--drop", "anomaly,changepoint")
    assert result.returncode == 0, result.stderr
    result = run("score", str(tmp_path / "a"), str(data), "--out", str(tmp_path / "s.csv"),
                 "--drop", "anomaly,changepoint")
    assert result.returncode == 0, result.stderr
    n_rows = len(pd.read_csv(data, sep=";"))
    scores = pd.read_csv(tmp_path / "s.csv")
    assert len(scores) == n_rows
    assert "time" in scores.columns


def test_alarm_persistence_options(workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "held"
    result = run("adapt", str(workspace["train"]), "--out", str(out), "--base", "tiny", "--steps", "5",
                 "--drop", "anomaly", "--raise-after", "3", "--clear-after", "5")
    assert result.returncode == 0, result.stderr
    info = run("info", str(out))
    assert info.returncode == 0, info.stderr
    assert "raise after 3 rows over, clear after 5 rows under" in info.stdout
    assert "off (every row" in run("info", str(workspace["adapter"])).stdout
    bad = run("adapt", str(workspace["train"]), "--out", str(workspace["root"] / "bad"), "--base", "tiny",
              "--drop", "anomaly", "--raise-after", "0")
    assert_clean_failure(bad, "raise_after")
    assert not (workspace["root"] / "bad").exists()
