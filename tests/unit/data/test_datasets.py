"""Benchmark loaders: the real SKAB and ASD folders when present, and small fake folders for the error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepeft.core.errors import DataError
from edgepeft.data.datasets import LabelledRun, load_asd, load_skab, load_skab_anomaly_free

DATASETS = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets"
needs_datasets = pytest.mark.skipif(
    not DATASETS.is_dir(), reason=f"shared benchmark data not found at {DATASETS} (kept outside the repository)"
)

SKAB_HEADER = "datetime;Current;Pressure;anomaly;changepoint\n"


def skab_rows(n_rows: int, anomalous_from: int | None = None) -> str:
    return "".join(
        f"2020-03-09 10:{i // 60:02d}:{i % 60:02d};{1 + i * 0.1:.2f};0.{i};"
        f"{int(anomalous_from is not None and i >= anomalous_from)};0\n"
        for i in range(n_rows)
    )


def fake_skab(root: Path, names: list[str], n_rows: int = 8) -> Path:
    for name in names:
        path = root / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SKAB_HEADER + skab_rows(n_rows, anomalous_from=6))
    return root


def fake_asd(root: Path, numbers: list[int]) -> Path:
    for number in numbers:
        folder = root / f"omi-{number}"
        folder.mkdir(parents=True)
        (folder / "train.csv").write_text("m0,m1\n0.1,0.2\n0.2,0.3\n0.3,0.4\n")
        (folder / "test.csv").write_text("m0,m1,label\n0.1,0.2,0\n0.9,0.9,1\n")
    return root


# --- real data ------------------------------------------------------------------------------------------------


@needs_datasets
def test_skab_totals_match_the_leaderboard_protocol() -> None:
    runs = load_skab(DATASETS / "skab")
    assert len(runs) == 34
    assert runs[0].name == "valve1/0" and runs[15].name == "valve1/15"
    assert runs[16].name == "valve2/0" and runs[20].name == "other/1" and runs[-1].name == "other/14"
    assert sum(len(run.test) for run in runs) == 23_801
    assert sum(int(run.labels.sum()) for run in runs) == 12_771
    for run in runs:
        assert isinstance(run, LabelledRun)
        assert run.train.shape == (400, 8) and run.test.shape[1] == 8
        assert run.labels.shape == (len(run.test),) and run.labels.dtype == np.int8
        assert run.changepoints is not None and run.changepoints.shape == run.labels.shape
    assert load_skab_anomaly_free(DATASETS / "skab").shape[1] == 8


@needs_datasets
def test_asd_has_twelve_servers() -> None:
    runs = load_asd(DATASETS / "asd")
    assert [run.name for run in runs] == [f"omi-{i}" for i in range(1, 13)]
    for run in runs:
        assert run.channels == [f"m{i}" for i in range(19)]
        assert run.test.shape == (4320, 19) and run.labels.shape == (4320,)
        assert run.changepoints is None
        assert 0 < run.labels.mean() < 0.2


# --- fake folders ---------------------------------------------------------------------------------------------


def test_skab_order_is_numeric(tmp_path: Path) -> None:
    names = ["valve1/0", "valve1/2", "valve1/10", "valve2/0", "other/1", "other/9", "other/11"]
    runs = load_skab(fake_skab(tmp_path, names), n_train=4)
    assert [run.name for run in runs] == names
    run = runs[0]
    assert run.channels == ["Current", "Pressure"]
    assert run.train.shape == (4, 2) and run.test.shape == (4, 2)
    assert run.labels.tolist() == [0, 0, 1, 1]
    assert run.changepoints is not None and run.changepoints.tolist() == [0, 0, 0, 0]


def test_skab_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        load_skab(tmp_path / "absent")


def test_skab_missing_group(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="valve2 is missing"):
        load_skab(fake_skab(tmp_path, ["valve1/0"]), n_train=4)


def test_skab_group_without_numbered_files(tmp_path: Path) -> None:
    fake_skab(tmp_path, ["valve1/0", "valve2/0"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.csv").write_text("a\n1\n")
    with pytest.raises(DataError, match="no numbered .csv files"):
        load_skab(tmp_path, n_train=4)


def test_skab_without_labels(tmp_path: Path) -> None:
    for name in ["valve1/0", "valve2/0", "other/1"]:
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / f"{name}.csv").write_text("datetime;Current\n2020-01-01;1\n2020-01-02;2\n")
    with pytest.raises(DataError, match="no anomaly / changepoint column"):
        load_skab(tmp_path, n_train=1)


def test_skab_run_shorter_than_training_part(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="series has 8 rows; at least 401 are needed"):
        load_skab(fake_skab(tmp_path, ["valve1/0", "valve2/0", "other/1"]))


def test_skab_anomaly_free_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="anomaly-free.csv is missing"):
        load_skab_anomaly_free(tmp_path)


def test_asd_order_is_numeric(tmp_path: Path) -> None:
    runs = load_asd(fake_asd(tmp_path, [1, 2, 10, 11]))
    assert [run.name for run in runs] == ["omi-1", "omi-2", "omi-10", "omi-11"]
    assert runs[0].train.shape == (3, 2) and runs[0].labels.tolist() == [0, 1]


def test_asd_not_the_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no omi-N folders"):
        load_asd(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        load_asd(tmp_path / "absent")


def test_asd_missing_test_file(tmp_path: Path) -> None:
    fake_asd(tmp_path, [1])
    (tmp_path / "omi-1" / "test.csv").unlink()
    with pytest.raises(DataError, match="test.csv is missing"):
        load_asd(tmp_path)


def test_asd_columns_differ(tmp_path: Path) -> None:
    fake_asd(tmp_path, [1])
    (tmp_path / "omi-1" / "test.csv").write_text("m0,m9,label\n0.1,0.2,0\n")
    with pytest.raises(DataError, match="other columns"):
        load_asd(tmp_path)


def test_asd_test_without_labels(tmp_path: Path) -> None:
    fake_asd(tmp_path, [1])
    (tmp_path / "omi-1" / "test.csv").write_text("m0,m1\n0.1,0.2\n")
    with pytest.raises(DataError, match="no 'label' column"):
        load_asd(tmp_path)


def test_asd_labels_must_be_binary(tmp_path: Path) -> None:
    fake_asd(tmp_path, [1])
    (tmp_path / "omi-1" / "test.csv").write_text("m0,m1,label\n0.1,0.2,0\n0.1,0.2,2\n")
    with pytest.raises(DataError, match="only 0 and 1"):
        load_asd(tmp_path)
