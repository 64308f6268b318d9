"""Reading sensor CSV files and validating arrays: the one gate every input passes through.

Whatever reaches the models is a finite float32 ``(n_rows, n_channels)`` array with named channels; every
way a file or array can fail to be that is a :class:`~edgepeft.core.errors.DataError` that says what to do.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgepeft.core.errors import ConfigError, DataError

if TYPE_CHECKING:  # imported where used: a device install scores JSON rows without loading pandas
    import pandas as pd

TIME_NAMES = ("datetime", "timestamp", "time", "date")
_BINARY_PROBE_BYTES = 8192


class DataWarning(UserWarning):
    """Input data was usable only after a repair (for example short gaps were interpolated)."""


@dataclass
class SensorTable:
    """A sensor file as arrays: finite float32 values, channel names, optional timestamps and extra columns.

    >>> table = SensorTable(np.zeros((3, 2), np.float32), ["a", "b"], None, {}, 0)
    >>> table.values.shape, table.channels
    ((3, 2), ['a', 'b'])
    """

    values: np.ndarray  # (n_rows, n_channels) float32, all finite
    channels: list[str]
    time: np.ndarray | None  # timestamp strings, None when the file has no time column
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # dropped columns kept for evaluation
    n_filled: int = 0  # non-finite cells repaired by the gap policy


def read_sensor_csv(
    path: str | os.PathLike[str],
    *,
    time_col: str | None = None,
    drop: Sequence[str] = (),
    max_gap: int = 5,
    min_rows: int = 1,
) -> SensorTable:
    """Read a ``,``-, ``;``- or tab-separated sensor file into a :class:`SensorTable`.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "pump.csv"
    >>> _ = path.write_text("time;flow;label\\n2024-01-01 00:00;1.5;0\\n2024-01-01 00:01;2.25;1\\n")
    >>> table = read_sensor_csv(path, drop=["label"])
    >>> table.channels, table.values.tolist(), table.extra["label"].tolist()
    (['flow'], [[1.5], [2.25]], [0.0, 1.0])
    """
    path = Path(path)
    text = _read_text(path)
    header, sep = _header_and_separator(text, path)
    frame = _parse(text, sep, header, path)

    time_name = _find_time_column(frame) if time_col is None else time_col
    if time_name is not None and time_name not in frame.columns:
        raise DataError(
            f"{path}: time column {time_name!r} is not in the file (columns: {_preview(list(frame.columns))}); "
            "check --time-col"
        )
    time = None if time_name is None else frame[time_name].astype(str).to_numpy(dtype=str)

    drop_set = {str(name) for name in drop}
    extra = {name: _extra_column(frame[name]) for name in frame.columns if name in drop_set and name != time_name}
    channels = [name for name in frame.columns if name != time_name and name not in drop_set]
    if not channels:
        raise DataError(
            f"{path}: no sensor columns left after removing the time column and --drop columns "
            f"(columns: {_preview(list(frame.columns))})"
        )
    _check_rows(len(frame), min_rows, str(path))

    columns = [_numeric_column(frame[name], name, path, sep) for name in channels]
    raw = np.column_stack(columns)  # (n_rows, n_channels) float64
    values, n_filled = fill_gaps(raw, max_gap, channels)
    return SensorTable(_to_float32(values, str(path)), channels, time, extra, n_filled)


def validate_array(
    X: np.ndarray | pd.DataFrame | Sequence[float],
    *,
    channels: list[str] | None = None,
    max_gap: int = 5,
    min_rows: int = 1,
) -> tuple[np.ndarray, list[str]]:
    """Check an in-memory series and return ``(float32 values, channel names)`` after the gap policy.

    ``channels`` is what a detector was trained on: the data must match it (a DataFrame is reordered when only
    the column order differs). Unnamed arrays get ``ch0, ch1, ...`` unless ``channels`` names them.

    >>> import pandas as pd
    >>> values, names = validate_array(pd.DataFrame({"b": [1.0, 2.0], "a": [3.0, 4.0]}), channels=["a", "b"])
    >>> values.tolist(), names
    ([[3.0, 1.0], [4.0, 2.0]], ['a', 'b'])
    >>> validate_array(np.arange(3.0))[1]
    ['ch0']
    """
    if type(X).__module__.startswith("pandas") and hasattr(X, "columns"):  # a DataFrame, without importing pandas
        values, names = _frame_values(X, channels)
    else:
        values, names = _array_values(X, channels)
    if values.shape[1] == 0:
        raise DataError("data has no channels; pass an array of shape (n_rows, n_channels)")
    _check_rows(values.shape[0], min_rows, "data")
    filled, _ = fill_gaps(values, max_gap, names)
    return _to_float32(filled, "data"), names


def fill_gaps(values: np.ndarray, max_gap: int, channels: list[str]) -> tuple[np.ndarray, int]:
    """Linearly interpolate runs of at most ``max_gap`` non-finite cells per channel; refuse longer runs.

    Returns a repaired copy and the number of cells filled; the input is never modified.

    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DataWarning)
    ...     filled, n_filled = fill_gaps(np.array([[1.0], [np.nan], [3.0]]), 5, ["flow"])
    >>> filled.ravel().tolist(), n_filled
    ([1.0, 2.0, 3.0], 1)
    """
    if max_gap < 0:
        raise ConfigError(f"max_gap must be >= 0, got {max_gap}")
    if values.ndim != 2:
        raise DataError(f"expected a 2-D (n_rows, n_channels) array, got shape {values.shape}")
    out = values.astype(np.result_type(values.dtype, np.float32), copy=True)
    bad = ~np.isfinite(out)
    if not bad.any():
        return out, 0

    rows = np.arange(out.shape[0])
    filled_per_channel: dict[str, int] = {}
    for col in np.flatnonzero(bad.any(axis=0)):
        name = channels[col] if col < len(channels) else f"ch{col}"
        mask = bad[:, col]
        if mask.all():
            raise DataError(f"channel {name!r} has no finite values; remove it (--drop {name}) or fix the file")
        start, length = _longest_run(mask)
        if length > max_gap:
            raise DataError(
                f"channel {name!r} has {length} consecutive missing/non-finite values starting at row {start} "
                f"(data rows counted from 0; at most {max_gap} are interpolated); clean the file or split it "
                "at the gap"
            )
        # np.interp clamps outside the known range, which is exactly "nearest finite value" at the edges.
        out[mask, col] = np.interp(rows[mask], rows[~mask], out[~mask, col])
        filled_per_channel[name] = int(mask.sum())

    n_filled = sum(filled_per_channel.values())
    detail = ", ".join(f"{name}: {count}" for name, count in filled_per_channel.items())
    warnings.warn(
        f"filled {n_filled} missing/non-finite cell(s) by linear interpolation ({detail})",
        DataWarning,
        stacklevel=2,
    )
    return out, n_filled


def _read_text(path: Path) -> str:
    """The file as text, refusing missing, empty and binary files."""
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a CSV file; pass the file inside it")
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror}); check its permissions") from exc
    if not payload.strip():
        raise DataError(f"{path} is empty; expected a header line and at least one data row")
    # Text files never hold NUL bytes; binary formats (parquet, xlsx, zip) almost always do early on.
    if b"\x00" in payload[:_BINARY_PROBE_BYTES]:
        raise DataError(f"{path} looks like a binary file, not CSV text; export it as CSV first")
    try:
        return payload.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Old loggers write latin-1; it decodes any byte, so this cannot fail.
        return payload.decode("latin-1")


def _header_and_separator(text: str, path: Path) -> tuple[list[str], str]:
    """The header fields and the separator, chosen from the header line."""
    header_line = next(line for line in text.splitlines() if line.strip())
    sep = max((",", ";", "\t"), key=header_line.count)  # ties (one column) go to ","
    try:
        header = [name.strip() for name in next(csv.reader([header_line], delimiter=sep))]
    except csv.Error as exc:
        raise DataError(f"{path}: the header line cannot be parsed ({exc}); check the file") from exc
    if all(_is_number(name) for name in header):
        raise DataError(f"{path}: the first line looks like data, not a header; add a line of column names")
    # Some loggers end every line with the separator; that trailing empty column is dropped after parsing.
    if any(not name for name in header[:-1]) or header == [""]:
        raise DataError(f"{path}: the header has an empty column name; name every column")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header; rename one of them")
        seen.add(name)
    return header, sep


def _parse(text: str, sep: str, header: list[str], path: Path) -> pd.DataFrame:
    """Parse with pandas, turning every pandas failure and every ragged row into a DataError."""
    import pandas as pd

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            # index_col=False: otherwise rows with one extra field silently turn the first column into an index.
            frame = pd.read_csv(io.StringIO(text), sep=sep, skipinitialspace=True, index_col=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} has no columns; expected a header line and data rows") from exc
    except (pd.errors.ParserError, ValueError, OverflowError) as exc:
        raise DataError(f"{path} is malformed ({_first_line(exc)}); every row needs one value per column") from exc
    if frame.empty:
        raise DataError(f"{path} has a header but no data rows")
    # pandas pads short rows with NaN and truncates long ones with only a warning; re-reading the rows tells a
    # ragged row (a malformed file) from an empty cell (a gap the gap policy may fill), and costs only then.
    truncated = any(issubclass(w.category, pd.errors.ParserWarning) for w in caught)
    if truncated or frame.shape[1] != len(header) or frame.isna().to_numpy().any():
        _check_ragged(text, sep, len(header), path)
    if frame.shape[1] != len(header):
        raise DataError(f"{path} is malformed: the rows do not split into the {len(header)} header columns")
    frame.columns = header
    if header[-1] == "":
        if frame[""].notna().any():
            raise DataError(f"{path}: the last column has values but no name; name every column")
        frame = frame.drop(columns=[""])
    return frame


def _check_ragged(text: str, sep: str, n_columns: int, path: Path) -> None:
    rows = (row for row in csv.reader(io.StringIO(text), delimiter=sep) if row)
    try:
        for line_no, row in enumerate(rows, start=1):
            if len(row) != n_columns:
                raise DataError(
                    f"{path} is malformed: row {line_no} (header is row 1) has {len(row)} fields but the "
                    f"header has {n_columns}; every row needs one value per column"
                )
    except csv.Error as exc:
        raise DataError(f"{path} is malformed ({exc}); check the file") from exc


def _find_time_column(frame: pd.DataFrame) -> str | None:
    """A column named like a timestamp, or a non-numeric first column that parses as dates."""
    import pandas as pd

    for name in frame.columns:
        if name.strip().lower() in TIME_NAMES:
            return str(name)
    first = frame.columns[0]
    column = frame[first]
    if pd.api.types.is_numeric_dtype(column) or len(frame.columns) < 2:
        return None
    sample = column.dropna().astype(str).head(50)
    if sample.empty or sample.map(_is_number).any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = pd.to_datetime(sample, errors="coerce", format="mixed")
    return str(first) if parsed.notna().all() else None


def _numeric_column(column: pd.Series, name: str, path: Path, sep: str) -> np.ndarray:
    """A sensor column as float64, or a DataError showing a value that is not a number."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64)
    text = column.astype("string").str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    if sep == ";" and numbers.isna().sum() > column.isna().sum():
        # ';' files from European spreadsheets write decimal commas ("1,5").
        numbers = pd.to_numeric(text.str.replace(",", ".", regex=False), errors="coerce")
    bad = numbers.isna() & column.notna()
    if bad.any():
        example = column[bad].iloc[0]
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}: column {name!r} is not numeric (e.g. {example!r} at data row {row}); "
            f"exclude it with --drop {name!r}, or name it with --time-col if it holds timestamps"
        )
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan)


def _extra_column(column: pd.Series) -> np.ndarray:
    """A dropped column kept for evaluation: floats when it is numeric, its strings otherwise."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64)
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.isna().sum() == column.isna().sum():
        return numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    return column.astype(str).to_numpy(dtype=str)


def _frame_values(frame: pd.DataFrame, channels: list[str] | None) -> tuple[np.ndarray, list[str]]:
    import pandas as pd

    names = [str(name) for name in frame.columns]
    unnamed = isinstance(frame.columns, pd.RangeIndex)
    non_numeric = [str(name) for name in frame.columns if not pd.api.types.is_numeric_dtype(frame[name])]
    if non_numeric:
        raise DataError(
            f"column(s) {_preview(non_numeric)} are not numeric; drop them (or the time column) before passing "
            "the DataFrame"
        )
    if len(set(names)) != len(names):
        raise DataError(f"the DataFrame has duplicate column names ({_preview(names)}); rename them")
    if channels is not None:
        _check_count(len(names), channels)
        if not unnamed and names != list(channels):
            if set(names) != set(channels):
                missing = sorted(set(channels) - set(names))
                unexpected = sorted(set(names) - set(channels))
                raise DataError(
                    f"data columns do not match the channels the detector was trained on: missing "
                    f"{_preview(missing)}, unexpected {_preview(unexpected)}; rename or select the columns"
                )
            frame = frame[list(channels)]
        names = list(channels)
    elif unnamed:
        names = [f"ch{i}" for i in range(len(names))]
    return frame.to_numpy(dtype=np.float64, na_value=np.nan), names


def _array_values(X: np.ndarray | Sequence[float], channels: list[str] | None) -> tuple[np.ndarray, list[str]]:
    array = np.asarray(X)
    if array.dtype.kind not in "biuf":
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"data has dtype {array.dtype} and is not numeric; pass numbers of shape (n_rows, n_channels)"
            ) from exc
    if array.ndim == 1:
        array = array.reshape(-1, 1)  # one channel
    if array.ndim != 2:
        raise DataError(f"expected a 1-D or 2-D (n_rows, n_channels) array, got shape {array.shape}")
    if channels is not None:
        _check_count(array.shape[1], channels)
        names = list(channels)
    else:
        names = [f"ch{i}" for i in range(array.shape[1])]
    return array, names


def _check_count(n_channels: int, channels: list[str]) -> None:
    if n_channels != len(channels):
        raise DataError(
            f"data has {n_channels} channels but the detector was trained on {len(channels)} "
            f"({_preview(list(channels))}); pass the same sensors in the same order"
        )


def _check_rows(n_rows: int, min_rows: int, where: str) -> None:
    if n_rows == 0:
        raise DataError(f"{where} has no rows; pass at least one row")
    if n_rows < min_rows:
        raise DataError(
            f"{where}: series has {n_rows} rows; at least {min_rows} are needed (one window); "
            "pass a longer recording or a shorter window"
        )


def _to_float32(values: np.ndarray, where: str) -> np.ndarray:
    if values.size and np.abs(values).max() > np.finfo(np.float32).max:
        raise DataError(f"{where}: values exceed the float32 range (about 3.4e38); rescale the data")
    return values.astype(np.float32)


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in a 1-D boolean mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    longest = int(np.argmax(ends - starts))
    return int(starts[longest]), int(ends[longest] - starts[longest])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
