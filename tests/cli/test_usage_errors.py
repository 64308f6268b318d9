"""Usage mistakes, long error lines and ``--rows`` past the end of the file, through a real subprocess.

A usage mistake (missing argument, bad value, unknown command or option) must give ONE line on stderr naming
the problem, exit code 2 and no traceback; an error or warning line must never wrap, whatever the width.
The subprocesses run without ``COLUMNS`` and without a terminal (rich's default width is then 80).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import sine_series

ENV = {key: value for key, value in os.environ.items() if key not in {"COLUMNS", "LINES"}} | {"NO_COLOR": "1"}


def run(*args: str, module: str = "edgepeft.cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV,
                          stdin=subprocess.DEVNULL, timeout=300)


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "unexpected" not in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), line
    return line


def write_csv(path: Path, n_rows: int) -> Path:
    pd.DataFrame(sine_series(n_rows, 2), columns=["s0", "s1"]).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["adapt"], ["missing argument", "train", "edgepeft adapt --help"]),
        (["adapt", "x.csv"], ["missing option", "--out"]),
        (["adapt", "x.csv", "--out", "o", "--rank", "abc"], ["--rank", "integer", "edgepeft adapt --help"]),
        (["adapt", "x.csv", "--out", "o", "--rows", "0"], ["--rows"]),
        (["frobnicate"], ["no such command", "frobnicate", "edgepeft --help"]),
        (["bench", "frobnicate"], ["no such command", "frobnicate", "edgepeft bench --help"]),
        (["adapt", "x.csv", "--out", "o", "--frobnicate"], ["no such option", "--frobnicate"]),
        (["score", "adapter"], ["missing argument", "data"]),
    ],
    ids=["missing-argument", "missing-option", "bad-int", "rows-below-1", "unknown-command",
         "unknown-subcommand", "unknown-option", "missing-second-argument"],
)
def test_usage_mistakes_are_one_line_and_exit_2(args: list[str], needles: list[str]) -> None:
    assert_one_line_usage_error(run(*args), *needles)


def test_help_still_exits_0() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "adapt" in result.stdout
    result = run("adapt", "--help")
    assert result.returncode == 0, result.stderr
    assert "--rows" in result.stdout
    assert "error" not in result.stderr


def test_no_arguments_shows_the_help() -> None:
    result = run()
    assert result.returncode == 2
    assert "Usage" in result.stdout + result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr


def test_standalone_stream_entry_usage_mistake_is_one_line() -> None:
    result = run("stream", module="edgepeft.bench.stream_commands")
    assert_one_line_usage_error(result, "missing argument", "data")


def test_long_error_line_is_not_wrapped(tmp_path: Path) -> None:
    missing = tmp_path / ("d" * 90) / ("e" * 90) / ("f" * 90 + ".csv")
    result = run("adapt", str(missing), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0]
    assert len(lines[0]) > 250


def test_error_text_is_not_read_as_markup(tmp_path: Path) -> None:
    missing = tmp_path / "[red]pump[/].csv"
    result = run("adapt", str(missing), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr, result.stderr


def test_rows_beyond_the_file_warns_once(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", 400)
    result = run("adapt", str(train), "--out", str(tmp_path / "a"), "--base", "tiny", "--steps", "1",
                 "--rows", "5000")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "only 400 rows" in warnings[0] and "--rows 5000" in warnings[0] and "all 400" in warnings[0]
    assert (tmp_path / "a").is_dir()
    result = run("adapt", str(train), "--out", str(tmp_path / "b"), "--base", "tiny", "--steps", "1",
                 "--rows", "300")
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr, result.stderr
