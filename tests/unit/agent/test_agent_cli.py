"""``edgepeft agent`` refusals through a real subprocess: one line, exit 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_usage_errors import assert_one_line_usage_error, run


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {"credential": tmp_path / "credential", "token": tmp_path / "token", "root": tmp_path / "root.json"}
    out["credential"].write_text("efd_not-a-real-one\n")
    out["token"].write_text("runtime-token-0123456789abcdef\n")
    out["root"].write_text("{}")
    return out


def _args(files: dict[str, Path], tmp_path: Path, **change: str) -> list[str]:
    options = {"--server": "http://127.0.0.1:9", "--device-id": "pump-7", "--credential-file": str(files["credential"]),
               "--image-root": str(files["root"]), "--director-root": str(files["root"]),
               "--runtime-token-file": str(files["token"]), "--state": str(tmp_path / "agent"), **change}
    return ["agent", *[part for pair in options.items() for part in pair if part != ""]]


@pytest.mark.parametrize(("change", "needles"), [
    ({"--device-id": ""}, ["missing option", "--device-id", "edgepeft agent --help"]),
    ({"--poll-seconds": "soon"}, ["--poll-seconds", "edgepeft agent --help"]),
    ({"--poll-seconds": "0"}, ["--poll-seconds"]),
    ({"--credential-file": "/nonexistent/credential"}, ["--credential-file", "/nonexistent/credential"]),
    ({"--image-root": "/nonexistent/root.json"}, ["--image-root", "edgepeft fleet tuf roots"]),
    ({"--log-level": "loud"}, ["log level"]),
], ids=["missing-option", "bad-number", "zero-poll", "no-credential", "no-root", "bad-log-level"])
def test_refusals_are_one_line(files: dict[str, Path], tmp_path: Path, change: dict[str, str],
                               needles: list[str]) -> None:
    args = _args(files, tmp_path, **change)
    if change.get("--device-id") == "":
        args.remove("--device-id")
    assert_one_line_usage_error(run(*args), *needles)
    assert not (tmp_path / "agent").exists(), "a refused start writes nothing"


def test_module_entry_point_has_the_same_command() -> None:
    result = run("--help", module="edgepeft.agent")
    assert result.returncode == 0, result.stderr
    assert "--director-root" in result.stdout and "--once" in result.stdout


def test_runs_on_a_device_install(files: dict[str, Path], tmp_path: Path) -> None:
    """Where torch, the training libraries and the fleet server's database stack cannot be imported, the agent
    still runs: one cycle with nothing answering ends in one line and exit code 1, its state folder written."""
    import os
    import subprocess
    import sys

    from edgepeft.bench.device_bench import device_environment

    env = {**os.environ, **device_environment(tmp_path / "device-python", extra_blocked=("sqlalchemy", "alembic"))}
    args = _args(files, tmp_path, **{"--runtime": "http://127.0.0.1:9", "--poll-seconds": "1"})
    result = subprocess.run([sys.executable, "-m", "edgepeft.agent", *args[1:], "--once"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "did not answer" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "agent" / "agent.json").exists()
