"""Loaders for the public labelled benchmarks (SKAB, ASD). The package ships no data: every loader takes a path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.core.errors import ConfigError, DataError
from edgepeft.data.csvio import read_sensor_csv

SKAB_GROUPS = ("valve1", "valve2", "other")
SKAB_LABELS = ("anomaly", "changepoint")
ASD_LABEL = "label"


@dataclass
class LabelledRun:
    """One labelled asset run: normal(ish) training rows, test rows and per-row test labels.

    >>> run = LabelledRun("demo", ["a"], np.zeros((4, 1)), np.zeros((2, 1)), np.array([0, 1], np.int8), None)
    >>> run.name, run.test.shape, int(run.labels.sum())
    ('demo', (2, 1), 1)
    """

    name: str
    channels: list[str]
    train: np.ndarray  # (n_train, n_channels) float32
    test: np.ndarray  # (n_test, n_channels) float32
    labels: np.ndarray  # (n_test,) int8, 1 = anomalous row
    changepoints: np.ndarray | None  # (n_test,) int8 where the dataset marks changepoints


def load_skab(root: str | os.PathLike[str], *, n_train: int = 400) -> list[LabelledRun]:
    """The 34 SKAB runs (valve1/0..15, valve2/0..3, other/1..14), each split into its first ``n_train`` rows
    and the rest, as in SKAB's leaderboard protocol.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> rows = "".join(f"2020-03-09 10:14:{s:02d};{s}.5;0;0\\n" for s in range(6))
    >>> for name in ("valve1/0", "valve2/0", "other/1"):
    ...     (root / name).parent.mkdir()
    ...     _ = (root / f"{name}.csv").write_text("datetime;Current;anomaly;changepoint\\n" + rows)
    >>> runs = load_skab(root, n_train=4)
    >>> [run.name for run in runs], runs[0].train.shape, runs[0].labels.tolist()
    (['valve1/0', 'valve2/0', 'other/1'], (4, 1), [0, 0])
    """
    if n_train < 1:
        raise ConfigError(f"n_train must be >= 1, got {n_train}")
    root = _dataset_root(root, "SKAB", [f"{group}/" for group in SKAB_GROUPS])
    runs = []
    for group in SKAB_GROUPS:
        for path in _numbered_csvs(root / group, "SKAB"):
            table = read_sensor_csv(path, drop=SKAB_LABELS, min_rows=n_train + 1)
            missing = [name for name in SKAB_LABELS if name not in table.extra]
            if missing:
                raise DataError(f"{path} has no {' / '.join(missing)} column; is this the labelled SKAB data?")
            runs.append(
                LabelledRun(
                    name=f"{group}/{path.stem}",
                    channels=table.channels,
                    train=table.values[:n_train],
                    test=table.values[n_train:],
                    labels=_binary(table.extra["anomaly"][n_train:], path, "anomaly"),
                    changepoints=_binary(table.extra["changepoint"][n_train:], path, "changepoint"),
                )
            )
    return runs


def load_skab_anomaly_free(root: str | os.PathLike[str]) -> np.ndarray:
    """SKAB's normal-only recording ``anomaly-free/anomaly-free.csv`` as float32 ``(n_rows, 8)``.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "anomaly-free").mkdir()
    >>> _ = (root / "anomaly-free" / "anomaly-free.csv").write_text("datetime;Current\\n2020-02-08 13:30:47;2.1\\n")
    >>> load_skab_anomaly_free(root).tolist()
    [[2.0999999046325684]]
    """
    root = _dataset_root(root, "SKAB", ["anomaly-free/"])
    path = root / "anomaly-free" / "anomaly-free.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing; is {root} the SKAB data folder?")
    return read_sensor_csv(path, drop=SKAB_LABELS).values


def load_asd(root: str | os.PathLike[str]) -> list[LabelledRun]:
    """The 12 ASD servers omi-1..omi-12, each from its ``train.csv`` and labelled ``test.csv``.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "omi-1").mkdir()
    >>> _ = (root / "omi-1" / "train.csv").write_text("m0,m1\\n0.1,0.2\\n0.3,0.4\\n")
    >>> _ = (root / "omi-1" / "test.csv").write_text("m0,m1,label\\n0.1,0.2,0\\n0.9,0.9,1\\n")
    >>> [(run.name, run.train.shape, run.labels.tolist()) for run in load_asd(root)]
    [('omi-1', (2, 2), [0, 1])]
    """
    root = _dataset_root(root, "ASD", ["omi-1/ ... omi-12/"])
    folders = sorted(
        (path for path in root.glob("omi-*") if path.is_dir() and path.name[4:].isdigit()),
        key=lambda path: int(path.name[4:]),
    )
    if not folders:
        raise DataError(f"{root} has no omi-N folders; is it the ASD data folder?")
    runs = []
    for folder in folders:
        train_path, test_path = folder / "train.csv", folder / "test.csv"
        for path in (train_path, test_path):
            if not path.is_file():
                raise DataError(f"{path} is missing; every ASD folder holds train.csv and test.csv")
        train = read_sensor_csv(train_path, drop=[ASD_LABEL])
        test = read_sensor_csv(test_path, drop=[ASD_LABEL])
        if ASD_LABEL not in test.extra:
            raise DataError(f"{test_path} has no {ASD_LABEL!r} column; is this the labelled ASD data?")
        if test.channels != train.channels:
            raise DataError(f"{test_path} has other columns than {train_path}; the files do not belong together")
        runs.append(
            LabelledRun(
                name=folder.name,
                channels=train.channels,
                train=train.values,
                test=test.values,
                labels=_binary(test.extra[ASD_LABEL], test_path, ASD_LABEL),
                changepoints=None,
            )
        )
    return runs


def _dataset_root(root: str | os.PathLike[str], dataset: str, expected: list[str]) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; pass the {dataset} data folder (holding {', '.join(expected)})")
    return path


def _numbered_csvs(folder: Path, dataset: str) -> list[Path]:
    """``0.csv, 1.csv, ...`` in numeric order (so 10 comes after 9, not after 1)."""
    if not folder.is_dir():
        raise DataError(f"{folder} is missing; is {folder.parent} the {dataset} data folder?")
    files = [path for path in folder.glob("*.csv") if path.stem.isdigit()]
    if not files:
        raise DataError(f"{folder} holds no numbered .csv files; is {folder.parent} the {dataset} data folder?")
    return sorted(files, key=lambda path: int(path.stem))


def _binary(column: np.ndarray, path: Path, name: str) -> np.ndarray:
    """A 0/1 label column as int8, refusing anything else (a wrong column would silently skew every score)."""
    if column.dtype.kind not in "biuf" or not np.isin(column, (0, 1)).all():
        raise DataError(f"{path}: column {name!r} must hold only 0 and 1; check the file")
    return column.astype(np.int8)
