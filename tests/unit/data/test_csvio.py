"""CSV reading, array validation and the gap policy: every error path says what to do."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edgepeft.core.errors import ConfigError, DataError
from edgepeft.data.csvio import DataWarning, SensorTable, fill_gaps, read_sensor_csv, validate_array


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- read_sensor_csv: happy paths ---------------------------------------------------------------------------


def test_comma_file_without_time_column(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "a,b\n1,2\n3,4\n"))
    assert isinstance(table, SensorTable)
    assert table.channels == ["a", "b"]
    assert table.time is None
    assert table.values.dtype == np.float32
    np.testing.assert_array_equal(table.values, [[1, 2], [3, 4]])
    assert table.extra == {} and table.n_filled == 0


def test_semicolon_file_with_datetime_column(tmp_path: Path) -> None:
    text = "datetime;flow;pressure\n2020-03-09 10:14:33;1.5;2\n2020-03-09 10:14:34;1.6;2.1\n"
    table = read_sensor_csv(write(tmp_path, text))
    assert table.channels == ["flow", "pressure"]
    assert table.time is not None
    assert table.time.tolist() == ["2020-03-09 10:14:33", "2020-03-09 10:14:34"]


@pytest.mark.parametrize("name", ["Timestamp", "TIME", "date", "DateTime"])
def test_time_column_found_by_name_case_insensitive(tmp_path: Path, name: str) -> None:
    table = read_sensor_csv(write(tmp_path, f"x,{name}\n1,0\n2,1\n"))
    assert table.channels == ["x"]
    assert table.time is not None and table.time.tolist() == ["0", "1"]


def test_time_column_found_as_dates_in_first_column(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "when,x\n2024-01-01T00:00,1\n2024-01-01T00:05,2\n"))
    assert table.channels == ["x"]
    assert table.time is not None and table.time[0] == "2024-01-01T00:00"


def test_numeric_first_column_is_a_sensor_not_time(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "a,b\n1,2\n3,4\n"))
    assert table.time is None and table.channels == ["a", "b"]


def test_explicit_time_column(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "t_ms,x\n0,1\n10,2\n"), time_col="t_ms")
    assert table.channels == ["x"]
    assert table.time is not None and table.time.tolist() == ["0", "10"]


def test_explicit_time_column_absent(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="time column 'stamp' is not in the file"):
        read_sensor_csv(write(tmp_path, "a,b\n1,2\n"), time_col="stamp")


def test_drop_keeps_present_columns_as_float_extra(tmp_path: Path) -> None:
    path = write(tmp_path, "datetime;a;anomaly;changepoint\n2020-01-01;1;0;0\n2020-01-02;2;1;1\n")
    table = read_sensor_csv(path, drop=["anomaly", "changepoint", "not_in_this_file"])
    assert table.channels == ["a"]
    assert set(table.extra) == {"anomaly", "changepoint"}
    assert table.extra["anomaly"].dtype == np.float64
    assert table.extra["anomaly"].tolist() == [0.0, 1.0]


def test_drop_accepts_a_non_numeric_column(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "a,status\n1,ok\n2,alarm\n"), drop=["status"])
    assert table.channels == ["a"]
    assert table.extra["status"].tolist() == ["ok", "alarm"]


def test_tab_separated_file(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "a\tb\n1\t2\n"))
    assert table.channels == ["a", "b"]


def test_decimal_commas_in_semicolon_file(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "a;b\n1,5;2\n3,25;4\n"))
    np.testing.assert_allclose(table.values, [[1.5, 2], [3.25, 4]])


def test_trailing_separator_on_every_line(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "a;b;\n1;2;\n3;4;\n"))
    assert table.channels == ["a", "b"]
    assert table.values.shape == (2, 2)


def test_latin1_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("temp °C,x\n1,2\n".encode("latin-1"))
    assert read_sensor_csv(path).channels == ["temp °C", "x"]


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    table = read_sensor_csv(write(tmp_path, "a,b\n1,2\n\n3,4\n\n"))
    assert table.values.shape == (2, 2)


# --- read_sensor_csv: error paths ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_sensor_csv(tmp_path / "nope.csv")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder"):
        read_sensor_csv(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match="is empty"):
        read_sensor_csv(write(tmp_path, text))


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data rows"):
        read_sensor_csv(write(tmp_path, "a,b\n"))


def test_short_row_is_malformed_not_a_gap(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="row 3 .* has 1 fields but the header has 2"):
        read_sensor_csv(write(tmp_path, "a,b\n1,2\n3\n"))


def test_long_row_is_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="malformed"):
        read_sensor_csv(write(tmp_path, "a,b\n1,2\n3,4,5\n"))


def test_every_row_one_field_too_many_is_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="malformed"):
        read_sensor_csv(write(tmp_path, "a,b\n1,2,3\n4,5,6\n"))


def test_unparsable_quoting(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="malformed"):
        read_sensor_csv(write(tmp_path, 'a,b\n"1,2\n'))


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1\x00\x01\x02\xff\xfe" * 20)
    with pytest.raises(DataError, match="binary"):
        read_sensor_csv(path)


def test_non_numeric_column_names_column_and_value(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"column 'b' is not numeric \(e\.g\. 'broken'.*--drop.*--time-col"):
        read_sensor_csv(write(tmp_path, "a,b\n1,2\n3,broken\n"))


def test_no_sensor_columns_left(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no sensor columns left"):
        read_sensor_csv(write(tmp_path, "datetime,label\n2020-01-01,0\n"), drop=["label"])


def test_too_few_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"series has 2 rows; at least 10 are needed \(one window\)"):
        read_sensor_csv(write(tmp_path, "a\n1\n2\n"), min_rows=10)


def test_first_line_is_data_not_header(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looks like data, not a header"):
        read_sensor_csv(write(tmp_path, "1,2\n3,4\n"))


def test_duplicate_column_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'a' appears twice"):
        read_sensor_csv(write(tmp_path, "a,a\n1,2\n"))


def test_empty_column_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty column name"):
        read_sensor_csv(write(tmp_path, "a,,b\n1,2,3\n"))


def test_gaps_in_file_are_filled(tmp_path: Path) -> None:
    with pytest.warns(DataWarning, match="filled 2"):
        table = read_sensor_csv(write(tmp_path, "a,b\n1,2\n,nan\n3,4\n"))
    assert table.n_filled == 2
    np.testing.assert_allclose(table.values, [[1, 2], [2, 3], [3, 4]])


def test_long_gap_in_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'a' has 3 consecutive"):
        read_sensor_csv(write(tmp_path, "a\n1\nnan\nnan\nnan\n5\n"), max_gap=2)


# --- fill_gaps ------------------------------------------------------------------------------------------------


def test_fill_short_gap_interpolates_and_warns() -> None:
    values = np.array([[0.0, 1.0], [np.nan, 1.0], [np.nan, 1.0], [3.0, 1.0]])
    with pytest.warns(DataWarning, match=r"filled 2 .*a: 2"):
        filled, n_filled = fill_gaps(values, 5, ["a", "b"])
    np.testing.assert_allclose(filled[:, 0], [0, 1, 2, 3])
    assert n_filled == 2


def test_fill_edges_with_nearest_value() -> None:
    values = np.array([[np.nan], [2.0], [4.0], [np.inf]])
    with pytest.warns(DataWarning):
        filled, n_filled = fill_gaps(values, 1, ["a"])
    np.testing.assert_allclose(filled[:, 0], [2, 2, 4, 4])
    assert n_filled == 2


def test_fill_inf_and_minus_inf() -> None:
    values = np.array([[1.0], [np.inf], [3.0], [-np.inf], [5.0]])
    with pytest.warns(DataWarning):
        filled, n_filled = fill_gaps(values, 1, ["a"])
    np.testing.assert_allclose(filled[:, 0], [1, 2, 3, 4, 5])
    assert n_filled == 2


def test_fill_long_gap_names_channel_row_and_length() -> None:
    values = np.ones((10, 2))
    values[3:7, 1] = np.nan
    with pytest.raises(DataError, match=r"'b' has 4 consecutive .* starting at row 3 .*clean the file or split"):
        fill_gaps(values, 3, ["a", "b"])


def test_fill_all_nan_channel() -> None:
    values = np.ones((4, 2))
    values[:, 0] = np.nan
    with pytest.raises(DataError, match="'a' has no finite values"):
        fill_gaps(values, 100, ["a", "b"])


def test_fill_never_modifies_input() -> None:
    values = np.array([[1.0], [np.nan], [3.0]])
    with pytest.warns(DataWarning):
        fill_gaps(values, 5, ["a"])
    assert np.isnan(values[1, 0])


def test_fill_clean_data_is_silent_copy() -> None:
    values = np.arange(6.0).reshape(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filled, n_filled = fill_gaps(values, 5, ["a", "b"])
    assert n_filled == 0 and filled is not values
    np.testing.assert_array_equal(filled, values)


def test_fill_max_gap_zero_refuses_any_gap() -> None:
    with pytest.raises(DataError, match="1 consecutive"):
        fill_gaps(np.array([[1.0], [np.nan], [3.0]]), 0, ["a"])


def test_fill_negative_max_gap() -> None:
    with pytest.raises(ConfigError, match="max_gap"):
        fill_gaps(np.ones((2, 1)), -1, ["a"])


# --- validate_array -------------------------------------------------------------------------------------------


def test_validate_1d_is_one_channel() -> None:
    values, channels = validate_array(np.arange(5))
    assert values.shape == (5, 1) and values.dtype == np.float32
    assert channels == ["ch0"]


def test_validate_2d_with_trained_channels() -> None:
    values, channels = validate_array(np.ones((4, 3)), channels=["a", "b", "c"])
    assert values.shape == (4, 3) and channels == ["a", "b", "c"]


def test_validate_list_input() -> None:
    values, _ = validate_array([[1, 2], [3, 4]])
    assert values.shape == (2, 2)


def test_validate_channel_count_mismatch() -> None:
    trained = [f"s{i}" for i in range(8)]
    with pytest.raises(DataError, match=r"data has 5 channels but the detector was trained on 8 \(s0, s1"):
        validate_array(np.ones((10, 5)), channels=trained)


def test_validate_dataframe_names_become_channels() -> None:
    values, channels = validate_array(pd.DataFrame({"flow": [1.0, 2.0], "temp": [3, 4]}))
    assert channels == ["flow", "temp"]
    np.testing.assert_array_equal(values, [[1, 3], [2, 4]])


def test_validate_dataframe_reordered_to_trained_order() -> None:
    frame = pd.DataFrame({"b": [1.0, 2.0], "a": [3.0, 4.0]})
    values, channels = validate_array(frame, channels=["a", "b"])
    assert channels == ["a", "b"]
    np.testing.assert_array_equal(values, [[3, 1], [4, 2]])


def test_validate_dataframe_name_mismatch() -> None:
    frame = pd.DataFrame({"a": [1.0], "x": [2.0]})
    with pytest.raises(DataError, match=r"missing b, unexpected x"):
        validate_array(frame, channels=["a", "b"])


def test_validate_dataframe_count_mismatch() -> None:
    with pytest.raises(DataError, match="data has 1 channels but the detector was trained on 2"):
        validate_array(pd.DataFrame({"a": [1.0]}), channels=["a", "b"])


def test_validate_dataframe_non_numeric_column() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "status": ["ok", "bad"]})
    with pytest.raises(DataError, match="status"):
        validate_array(frame)


def test_validate_unnamed_dataframe() -> None:
    _, channels = validate_array(pd.DataFrame(np.ones((2, 2))))
    assert channels == ["ch0", "ch1"]


def test_validate_non_numeric_array() -> None:
    with pytest.raises(DataError, match="not numeric"):
        validate_array(np.array([["a", "b"]]))


def test_validate_3d_array() -> None:
    with pytest.raises(DataError, match="1-D or 2-D"):
        validate_array(np.ones((2, 3, 4)))


def test_validate_empty_array() -> None:
    with pytest.raises(DataError, match="no rows"):
        validate_array(np.ones((0, 3)))
    with pytest.raises(DataError, match="no channels"):
        validate_array(np.ones((3, 0)))


def test_validate_min_rows() -> None:
    with pytest.raises(DataError, match="series has 3 rows; at least 64 are needed"):
        validate_array(np.ones((3, 2)), min_rows=64)


def test_validate_fills_gaps_without_touching_input() -> None:
    data = np.array([[1.0], [np.nan], [3.0]])
    with pytest.warns(DataWarning):
        values, _ = validate_array(data)
    np.testing.assert_allclose(values[:, 0], [1, 2, 3])
    assert np.isnan(data[1, 0])


def test_validate_long_gap() -> None:
    data = np.ones((20, 1))
    data[5:15] = np.nan
    with pytest.raises(DataError, match="10 consecutive"):
        validate_array(data, max_gap=5)


def test_validate_float32_overflow() -> None:
    with pytest.raises(DataError, match="float32 range"):
        validate_array(np.array([1.0, 1e300]))
