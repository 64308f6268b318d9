"""`edgepeft federate`, `edgepeft adapt --init-adapter` and `edgepeft bench federated`: bad input is one line, exit 2,
before Flower or Ray start (and nothing is written)."""

from __future__ import annotations

import pytest

from tests.cli.test_usage_errors import assert_one_line_usage_error, run, write_csv


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["federate", "synthetic:x:10"], ["missing option", "--out"]),
        (["federate", "", "--out", "{out}"], ["no data spec"]),
        (["federate", "synthetic:x:300", "--out", "{out}"], ["integer"]),
        (["federate", "csv:{out}/none", "--out", "{out}"], ["not a folder"]),
        (["federate", "synthetic:3:300", "--out", "{out}", "--aggregation", "median"], ["aggregation"]),
        (["federate", "synthetic:3:300", "--out", "{out}", "--aggregation", "svd", "--secagg", "--min-clients", "3"],
         ["secagg", "ffa"]),
        (["federate", "synthetic:3:300", "--out", "{out}", "--secagg"], ["at least 3"]),
        (["federate", "synthetic:3:300", "--out", "{out}", "--clients", "5"], ["3 asset", "5 clients"]),
        (["federate", "synthetic:3:300", "--out", "{out}", "--dp-epsilon", "0"], ["dp_epsilon"]),
        (["federate", "synthetic:3:300", "--out", "{out}", "--rounds", "0"], ["--rounds"]),
        (["bench", "federated", "--suites", "skab"], ["unknown suites"]),
        (["bench", "federated", "--epsilons", "a,b"], ["--epsilons"]),
    ],
    ids=["missing-out", "empty-spec", "bad-rows", "missing-folder", "bad-aggregation", "svd-secagg",
         "secagg-two-clients", "too-many-clients", "zero-epsilon", "zero-rounds", "bench-suite", "bench-eps"],
)
def test_federate_usage_errors(tmp_path, args: list[str], needles: list[str]) -> None:
    out = tmp_path / "fed"
    assert_one_line_usage_error(run(*[a.replace("{out}", str(out)) for a in args]), *needles)
    assert not (out / "checkpoint.npz").exists()


def test_adapt_from_a_missing_or_foreign_global_adapter(tmp_path) -> None:
    train = write_csv(tmp_path / "train.csv", 600)
    missing = run("adapt", str(train), "--out", str(tmp_path / "a"), "--base", "tiny", "--steps", "2",
                  "--init-adapter", str(tmp_path / "nope.safetensors"))
    assert_one_line_usage_error(missing, "does not exist")
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"\x00" * 16)
    assert_one_line_usage_error(run("adapt", str(train), "--out", str(tmp_path / "b"), "--base", "tiny",
                                    "--steps", "2", "--init-adapter", str(foreign)), "safetensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "detector.json").exists()


def test_adapt_from_a_global_adapter(tmp_path) -> None:
    from edgepeft.federated.task import FederatedConfig, initial_state
    from edgepeft.peft.shared import save_global_adapter

    cfg = FederatedConfig()
    path = save_global_adapter(tmp_path / "global.safetensors", initial_state(cfg).tensors, cfg.base,
                               cfg.peft_config())
    train = write_csv(tmp_path / "train.csv", 600)
    result = run("adapt", str(train), "--out", str(tmp_path / "a"), "--base", "tiny", "--rank", "4", "--steps", "2",
                 "--init-adapter", str(path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a" / "detector.json").exists()
    wrong_rank = run("adapt", str(train), "--out", str(tmp_path / "b"), "--base", "tiny", "--steps", "2",
                     "--init-adapter", str(path))
    assert_one_line_usage_error(wrong_rank, "another PEFT config")
