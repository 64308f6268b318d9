"""keygen / pack / verify / inspect through typer's CliRunner on a small app built here (the real CLI mounts
the same functions as top-level commands)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgepeft.core.errors import OutputError
from edgepeft.delta import BundleError, read_bundle
from edgepeft.delta.commands import inspect, keygen, pack, verify
from edgepeft.models.registry import load_card

app = typer.Typer(pretty_exceptions_enable=False)
for command in (keygen, pack, verify, inspect):
    app.command()(command)

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def test_keygen_pack_verify_inspect(cli: CliRunner, detector_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "fleet.key"
    result = cli.invoke(app, ["keygen", "--out", str(key)], env=ENV)
    assert result.exit_code == 0, result.output
    assert os.stat(key).st_mode & 0o777 == 0o600 and (tmp_path / "keys" / "fleet.key.pub").is_file()
    assert "key id" in result.stderr

    bundle = tmp_path / "pump-7-2.edelta"
    args = ["pack", str(detector_dir), "--key", str(key), "--out", str(bundle), "--asset", "pump-7",
            "--version", "2.0.0", "--release", "12", "--parent", "1.9.0", "--expires-days", "7", "--int8", "--zstd"]
    result = cli.invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    manifest = read_bundle(bundle.read_bytes()).manifest
    assert (manifest["release"], manifest["parent_version"]) == (12, "1.9.0")
    assert (manifest["payload"]["tensors"], manifest["payload"]["compression"]) == ("int8", "zstd")

    base = load_card("tiny")["state_sha256"]
    result = cli.invoke(app, ["verify", str(bundle), "--pubkey", f"{key}.pub", "--base-sha256", base], env=ENV)
    assert result.exit_code == 0, result.output
    assert "verified" in result.stderr and "release 12" in result.stderr

    result = cli.invoke(app, ["inspect", str(bundle)], env=ENV)  # no key needed
    assert result.exit_code == 0, result.output
    for needle in ("pump-7", "2.0.0", "1.9.0", "int8", "zstd", base, "signature not checked"):
        assert needle in result.stdout


def test_commands_fail_with_our_errors(cli: CliRunner, detector_dir: Path, tmp_path: Path) -> None:
    key, stranger = tmp_path / "a.key", tmp_path / "b.key"
    for path in (key, stranger):
        assert cli.invoke(app, ["keygen", "--out", str(path)]).exit_code == 0
    result = cli.invoke(app, ["keygen", "--out", str(key)])
    assert isinstance(result.exception, OutputError)  # never overwrite a key by accident

    bundle = tmp_path / "x.edelta"
    ok = cli.invoke(app, ["pack", str(detector_dir), "--key", str(key), "--out", str(bundle), "--asset", "a",
                          "--version", "1", "--release", "1"])
    assert ok.exit_code == 0, ok.output
    failures = {
        "not trusted here": ["verify", str(bundle), "--pubkey", f"{stranger}.pub"],
        "resident base": ["verify", str(bundle), "--pubkey", f"{key}.pub", "--base-sha256", "0" * 64],
        "that is a private key": ["verify", str(bundle), "--pubkey", str(key)],
        "does not exist": ["inspect", str(tmp_path / "missing.edelta")],
        "is a directory": ["inspect", str(tmp_path)],
        "not a detector directory": ["pack", str(tmp_path), "--key", str(key), "--out", str(tmp_path / "y.edelta"),
                                     "--asset", "a", "--version", "1", "--release", "1"],
    }
    for needle, args in failures.items():
        result = cli.invoke(app, args)
        assert result.exit_code != 0
        assert isinstance(result.exception, BundleError), (needle, result.exception)
        assert needle in str(result.exception)
    (tmp_path / "junk.edelta").write_bytes(b"hello")
    result = cli.invoke(app, ["inspect", str(tmp_path / "junk.edelta")])
    assert isinstance(result.exception, BundleError) and "truncated" in str(result.exception)
    assert not (tmp_path / "y.edelta").exists()
