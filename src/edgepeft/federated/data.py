"""Where a federated client finds its asset's normal rows: one spec string, one partition per client.

Specs (each client opens only its own partition; a process caches what it loaded):

- ``csv:DIR``: every ``*.csv`` in DIR (sorted by name) is one asset's normal data;
- a path to one CSV file: the asset of a SuperNode that holds its own file (deployment mode, ``data`` node config);
- ``asd:DIR``: ASD's servers (``omi-1`` ... ``omi-12``), their training rows;
- ``fleet:N`` or ``fleet:N:SEED``: the simulated pump fleet (:func:`~edgepeft.data.synthetic.make_pump_fleet`),
  each pump's normal rows;
- ``synthetic:N:ROWS``: N synthetic 4-channel assets of ROWS rows (scale tests).

Example:
    >>> partition_count("synthetic:3:200"), load_partition("synthetic:3:200", 2)[1].shape
    (3, (200, 4))
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from edgepeft.core.errors import ConfigError, DataError
from edgepeft.data.csvio import read_sensor_csv
from edgepeft.data.datasets import load_asd
from edgepeft.data.synthetic import generate_series, make_pump_fleet

FLEET_ROWS = 3000  # the fleet benchmark's training rows per pump


def _split(spec: str) -> tuple[str, list[str]]:
    if not spec:
        raise ConfigError("no data spec: give csv:DIR, asd:DIR, fleet:N, synthetic:N:ROWS or a CSV file")
    kind, _, rest = spec.partition(":")
    if kind in ("csv", "asd", "fleet", "synthetic"):
        return kind, rest.split(":") if rest else []
    return "file", [spec]


def _int(text: str, what: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{what} must be an integer, got {text!r}") from None
    if value < low:
        raise ConfigError(f"{what} must be >= {low}, got {value}")
    return value


@lru_cache(maxsize=4)
def _csv_files(folder: str) -> tuple[Path, ...]:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of asset CSV files")
    files = tuple(sorted(root.glob("*.csv")))
    if not files:
        raise DataError(f"{root} holds no .csv files (one per asset)")
    return files


@lru_cache(maxsize=2)
def _asd(folder: str) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((run.name, run.train) for run in load_asd(folder))


@lru_cache(maxsize=2)
def _fleet(n_pumps: int, seed: int) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((pump.name, pump.train) for pump in make_pump_fleet(n_pumps, n_train=FLEET_ROWS, seed=seed))


def partition_count(spec: str) -> int:
    """How many assets (clients) a spec holds."""
    kind, args = _split(spec)
    if kind == "csv":
        return len(_csv_files(args[0] if args else ""))
    if kind == "asd":
        return len(_asd(args[0] if args else ""))
    if kind in ("fleet", "synthetic"):
        return _int(args[0] if args else "", f"the number of assets in {spec!r}", 1)
    return 1


def load_partition(spec: str, index: int) -> tuple[str, np.ndarray]:
    """Asset ``index`` of a spec: its name and its normal rows (float32, rows x channels)."""
    kind, args = _split(spec)
    count = partition_count(spec)
    if not 0 <= index < count:
        raise ConfigError(f"partition {index} does not exist: {spec!r} holds {count} asset(s)")
    if kind == "csv":
        path = _csv_files(args[0])[index]
        return path.stem, read_sensor_csv(path).values
    if kind == "file":
        table = read_sensor_csv(args[0])
        return Path(args[0]).stem, table.values
    if kind == "asd":
        return _asd(args[0])[index]
    if kind == "fleet":
        seed = _int(args[1], "the fleet seed", 0) if len(args) > 1 else 0
        return _fleet(count, seed)[index]
    rows = _int(args[1] if len(args) > 1 else "", "ROWS in synthetic:N:ROWS", 100)
    return f"synthetic-{index:04d}", generate_series(np.random.default_rng(index), rows, 4)
