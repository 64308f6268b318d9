"""The device side without torch: bundles installed and scored through the ONNX scoring graph, in processes where
torch and the other training libraries cannot be imported, and in a fresh virtual environment with the device
install alone (`pip install edgepeft`, no extras). Scores equal the training side's on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest

from edgepeft.bench.device_bench import TRAINING_ONLY, device_environment
from edgepeft.bench.loadtest import ServerProcess, series
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.runtime.onnx import export_lora_graph
from edgepeft.runtime.resident import ResidentBase

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a subprocess in which the training-only libraries (and pandas) cannot be imported."""
    return device_environment(tmp_path_factory.mktemp("device-python"), extra_blocked=("pandas",))


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_lora_graph(ResidentBase.load("tiny"), tmp_path_factory.mktemp("graph") / "tiny.onnx")


def _asset(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(normal training rows, rows to score) of a synthetic, a SKAB or an ASD asset."""
    if kind == "synthetic":
        rows = series(900, seed=3)
        return rows[:600], rows
    if kind == "skab":
        from edgepeft.data.datasets import load_skab

        run = load_skab(SHARED / "skab")[7]
        return run.train, np.concatenate([run.train, run.test])
    from edgepeft.data.datasets import load_asd

    run = load_asd(SHARED / "asd")[0]
    return run.train[:1500], run.test[:1200]


def _needs(kind: str) -> pytest.MarkDecorator:
    folder = {"skab": "skab", "asd": "asd"}.get(kind)
    return pytest.mark.skipif(folder is not None and not (SHARED / folder).is_dir(),
                              reason=f"../shared/datasets/{folder} is not beside the repository")


def _fitted_bundle(kind: str, root: Path, keys: dict[str, object]) -> tuple[AnomalyDetector, Path, np.ndarray]:
    from tests.unit.runtime.conftest import bundle

    train, rows = _asset(kind)
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=20, seed=0).fit(train)
    directory = det.save(root / f"{kind}-detector")
    path = root / f"{kind}.edelta"
    path.write_bytes(bundle(directory, keys["trusted"], "1", 1, asset_id=kind))
    return det, path, rows


@pytest.mark.parametrize("kind", [pytest.param(k, marks=_needs(k)) for k in ("synthetic", "skab", "asd")])
def test_device_runtime_without_torch_scores_like_the_training_side(
    kind: str, tmp_path: Path, graph: Path, blocked: dict[str, str], keys: dict[str, object]
) -> None:
    det, bundle_path, rows = _fitted_bundle(kind, tmp_path, keys)
    np.save(tmp_path / "rows.npy", rows)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from edgepeft.runtime.service import DeviceRuntime, RuntimeConfig

        config = RuntimeConfig(state_dir={str(tmp_path / "state")!r}, engine="onnx", graph={str(graph)!r},
                               trusted_keys=[{str(keys["public"])!r}], threads=1)
        with DeviceRuntime.open(config) as runtime:
            runtime.install_bundle(open({str(bundle_path)!r}, "rb").read())
            served, out = runtime.score({kind!r}, np.load({str(tmp_path / "rows.npy")!r}), explain=True)
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({(*TRAINING_ONLY, "pandas")!r}))
        json.dump({{"score": out["score"].tolist(), "anomaly": out["anomaly"].tolist(), "engine": served.engine,
                   "top": out["top_channels"], "loaded": loaded}}, open({str(tmp_path / "out.json")!r}, "w"))
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **blocked}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    want = det.score_all(rows, explain=True)
    assert got["engine"] == "onnx" and got["loaded"] == []
    # Scores are O(1) (the threshold is about 1): equal within 1e-5, float32 arithmetic in another library aside.
    assert np.max(np.abs(np.asarray(got["score"]) - want["score"])) < 1e-5
    assert got["anomaly"] == want["anomaly"].tolist()
    assert got["top"] == want["top_channels"]


def test_serve_without_torch_over_http(
    tmp_path: Path, graph: Path, blocked: dict[str, str], keys: dict[str, object], every_method: dict[str, Path]
) -> None:
    """`edgepeft serve --engine onnx --graph` as a real process without torch: installs a signed bundle over HTTP,
    scores as the training side does, and refuses a method it cannot serve with a clear 4xx, changing nothing."""
    import httpx

    from tests.unit.runtime.conftest import bundle

    det, bundle_path, rows = _fitted_bundle("synthetic", tmp_path, keys)
    args = ["--engine", "onnx", "--graph", str(graph), "--trusted-key", str(keys["public"])]
    with ServerProcess(tmp_path / "state", args=args, env=blocked) as server:
        installed = httpx.post(f"{server.url}/v1/bundles", content=bundle_path.read_bytes(), headers=server.auth)
        assert installed.status_code == 200, installed.text
        answer = httpx.post(f"{server.url}/v1/assets/synthetic/score", json={"rows": rows.tolist()}).json()
        assert answer["engine"] == "onnx"
        np.testing.assert_allclose(answer["score"], det.score_all(rows)["score"], rtol=0, atol=1e-5)
        dora = bundle(every_method["dora"], keys["trusted"], "1", 1, asset_id="other")
        refused = httpx.post(f"{server.url}/v1/bundles", content=dora, headers=server.auth)
        assert 400 <= refused.status_code < 500, refused.text
        assert "no torch" in refused.json()["detail"]
        assert [a["asset_id"] for a in httpx.get(f"{server.url}/v1/assets").json()] == ["synthetic"]
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_training_commands_on_a_device_install_say_what_is_missing(tmp_path: Path, blocked: dict[str, str]) -> None:
    train = tmp_path / "train.csv"
    np.savetxt(train, series(300), delimiter=",", header="a,b,c", comments="")
    done = subprocess.run([sys.executable, "-m", "edgepeft.cli", "adapt", str(train), "--out", str(tmp_path / "d")],
                          env={**os.environ, **blocked}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the training install" in lines[0] and "edgepeft[train]" in lines[0]


def test_fresh_device_venv_has_no_torch_and_serves(
    tmp_path: Path, graph: Path, keys: dict[str, object]
) -> None:
    """`pip install edgepeft` (no extras) in a new virtual environment: no torch, and it serves the same bundles."""
    import httpx

    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    env_dir = tmp_path / "device-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q", str(source)], capture_output=True, text=True,
                         timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "edgepeft" in installed and not installed & {"torch", "peft", "scikit-learn", "scipy", "onnx"}
    det, bundle_path, rows = _fitted_bundle("synthetic", tmp_path, keys)
    args = ["--engine", "onnx", "--graph", str(graph), "--trusted-key", str(keys["public"])]
    clean_env = {"PYTHONPATH": ""}  # only the device venv's own packages
    with ServerProcess(tmp_path / "state", args=args, python=python, env=clean_env) as server:
        installed_bundle = httpx.post(f"{server.url}/v1/bundles", content=bundle_path.read_bytes(),
                                      headers=server.auth)
        assert installed_bundle.status_code == 200, installed_bundle.text
        answer = httpx.post(f"{server.url}/v1/assets/synthetic/score", json={"rows": rows.tolist()}).json()
        np.testing.assert_allclose(answer["score"], det.score_all(rows)["score"], rtol=0, atol=1e-5)


def test_pack_torch_free_refuses_what_a_device_without_torch_cannot_serve(
    tmp_path: Path, every_method: dict[str, Path], keys: dict[str, object]
) -> None:
    from edgepeft.delta import save_keypair

    key = tmp_path / "k"
    save_keypair(keys["trusted"], key)
    common = ["--key", str(key), "--asset", "a", "--version", "1", "--release", "1", "--torch-free"]
    for method, ok in (("lora", True), ("dora", False), ("bitfit", False)):
        done = subprocess.run([sys.executable, "-m", "edgepeft.cli", "pack", str(every_method[method]), "--out",
                               str(tmp_path / f"{method}.edelta"), *common], capture_output=True, text=True,
                              timeout=120)
        assert (done.returncode == 0) == ok, done.stderr
        if not ok:
            assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
            assert "--torch-free" in done.stderr and not (tmp_path / f"{method}.edelta").exists()


def test_stream_scorer_scores_row_by_row_as_the_batch_does(tmp_path: Path, graph: Path) -> None:
    """StreamScorer, torch-free with the device's ONNX scorer and with the torch detector: every row's score,
    p_anomaly, alarm and explanation equal the batch path's."""
    from edgepeft.detect.core import StreamScorer
    from edgepeft.runtime.ort import GraphBase, OnnxEngine
    from edgepeft.runtime.serving import SavedDetector

    train, rows = _asset("synthetic")
    rows = rows.copy()
    rows[700:760, 1] += 3.0  # a fault, so that alarms and explanations are compared too
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=20, seed=0, raise_after=2, clear_after=3).fit(train)
    folder = det.save(tmp_path / "det")
    served = OnnxEngine(GraphBase.load(graph, 1), tmp_path / "onnx").load(
        SavedDetector.from_directory(folder), asset_id="a", version="1", release=1)
    for scorer in (det, served.detector):
        batch = scorer.score_all(rows, explain=True)
        stream = StreamScorer(scorer)
        got = [stream.score_one(row, explain=True) for row in rows]
        # One window per pass instead of many: float32 sums in another order, 1e-6 apart at most.
        np.testing.assert_allclose([g["score"] for g in got], batch["score"], rtol=0, atol=1e-5)
        np.testing.assert_allclose([g["p_anomaly"] for g in got], batch["p_anomaly"], rtol=0, atol=1e-5)
        assert [g["anomaly"] for g in got] == batch["anomaly"].tolist() and sum(batch["anomaly"]) > 0
        assert [g["top_channels"] for g in got] == batch["top_channels"]
