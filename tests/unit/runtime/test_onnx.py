"""ONNX Runtime path: the shared scoring graph equals torch, adapters swap per call, merged export, int8, fallback,
and a device without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgepeft.bench.loadtest import payloads
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.runtime.onnx import export_merged, open_onnx_engine, quantize_int8
from edgepeft.runtime.ort import GraphBase, OnnxEngine
from edgepeft.runtime.resident import ResidentBase, load_torch_version

ROWS = payloads(2, 160)[1]


@pytest.fixture(scope="module")
def resident() -> ResidentBase:
    return ResidentBase.load("tiny")


@pytest.fixture(scope="module")
def engine(resident: ResidentBase, tmp_path_factory: pytest.TempPathFactory) -> OnnxEngine:
    return open_onnx_engine(resident, tmp_path_factory.mktemp("onnx"), threads=1)


def _windows(encoder: torch.nn.Module, batch: int, n_channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, encoder.window_len, n_channels, generator=gen)
    hidden = torch.rand(batch, n_channels, encoder.cfg.n_patches, generator=gen) < 0.3
    hidden[:, :, -1] = True
    return x, hidden


def test_shared_graph_matches_torch_and_swaps_adapters_per_call(
    engine: OnnxEngine, resident: ResidentBase, versions: list[Path]
) -> None:
    served = [engine.load(d, asset_id="pump-1", version=str(i), release=i) for i, d in enumerate(versions, 1)]
    reference = [load_torch_version(resident, d, asset_id="pump-1", version=str(i)) for i, d in enumerate(versions, 1)]
    assert {s.engine for s in served} == {"onnx"}
    assert len({id(s.detector.graph_.session) for s in served}) == 1, "one session serves every LoRA adapter"
    encoder = reference[0].detector.model_.encoder
    for seed, (batch, n_channels) in enumerate([(1, 3), (5, 3), (12, 3)]):
        x, hidden = _windows(encoder, batch, n_channels, seed)
        for ort_version, torch_version in zip(served * 2, reference * 2, strict=True):  # interleaved: per-call swap
            got = ort_version.detector._predict(x.numpy(), hidden.numpy(), True, None)
            want = torch_version.detector._predict(x.numpy(), hidden.numpy(), True, None)
            for ours, theirs in zip(got, want, strict=True):  # forecast, then the one-pass blind predictions
                assert np.max(np.abs(ours - theirs)) < 1e-4
    # The LoRA inputs matter (versions differ by more than the tolerance), and detector scores agree.
    x, hidden = _windows(encoder, 4, 3, 9)
    first, second = (s.detector._predict(x.numpy(), hidden.numpy(), False, None)[0] for s in served[:2])
    assert np.max(np.abs(first - second)) > 1e-2
    for ort_version, directory in zip(served, versions, strict=True):
        offline = AnomalyDetector.load(directory).score_all(ROWS, explain=True)
        got = ort_version.score_all(ROWS, explain=True)
        np.testing.assert_allclose(got["score"], offline["score"], rtol=1e-5, atol=1e-6)
        assert got["top_channels"] == offline["top_channels"]
    assert resident.current_sha256() == resident.sha256


def test_graph_names_its_base_and_refuses_other_bases(engine: OnnxEngine, resident: ResidentBase,
                                                      versions: list[Path], tmp_path: Path) -> None:
    graph = engine.graph
    assert (graph.name, graph.sha256, graph.window_len) == (resident.name, resident.sha256, resident.window_len)
    assert set(graph.modules) == {name for name in graph.modules if name.endswith((".q", ".v"))}
    from edgepeft.core.errors import ArtifactError, ModelError
    from edgepeft.runtime.serving import SavedDetector

    saved = SavedDetector.from_directory(versions[0])
    other = SavedDetector({**saved.state, "base_sha256": "0" * 64}, saved.tensors, saved.texts, "other")
    with pytest.raises(ModelError, match="trained on base"):
        engine.load(other, asset_id="x", version="1", release=1)
    merged = export_merged(versions[0], tmp_path / "merged.onnx")
    with pytest.raises(ArtifactError, match="not an edgepeft scoring graph"):
        GraphBase.load(merged)
    with pytest.raises(ArtifactError, match="does not exist"):
        GraphBase.load(tmp_path / "missing.onnx")


def test_other_methods_fall_back_to_torch(engine: OnnxEngine, every_method: dict[str, Path]) -> None:
    for method in ("dora", "ia3", "bitfit"):
        served = engine.load(every_method[method], asset_id=f"a-{method}", version="1", release=1)
        assert served.engine == "torch" and "served by torch" in served.note


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_merged_per_asset_export_matches_torch(
    method: str, tmp_path: Path, every_method: dict[str, Path], versions: list[Path]
) -> None:
    directory = versions[0] if method == "lora" else every_method[method]
    path = export_merged(directory, tmp_path / f"{method}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    det = AnomalyDetector.load(directory)
    x, hidden = _windows(det.method_.encoder(det.model_), 6, det.n_channels_, 3)
    with torch.no_grad():
        want = det.model_(x, hidden).numpy()
    (got,) = session.run(["recon"], {"x": x.numpy(), "hidden": hidden.numpy()})
    assert np.max(np.abs(got - want)) < 1e-4


def test_int8_graph_scores_close_to_float(
    resident: ResidentBase, versions: list[Path], engine: OnnxEngine, tmp_path: Path
) -> None:
    int8 = open_onnx_engine(resident, engine.workdir, int8=True, threads=1)
    fp32 = engine.load(versions[0], asset_id="pump-1", version="1", release=1).score_all(ROWS)["score"]
    quantised = int8.load(versions[0], asset_id="pump-1", version="1", release=1).score_all(ROWS)["score"]
    assert int8.graph.path.name.endswith(".int8.onnx")
    assert np.all(np.isfinite(quantised))
    assert np.corrcoef(fp32, quantised)[0, 1] > 0.99
    assert np.median(np.abs(quantised - fp32) / fp32) < 0.05
    smaller = quantize_int8(export_merged(versions[0], tmp_path / "m.onnx"), tmp_path / "m.int8.onnx")
    assert smaller.stat().st_size < (tmp_path / "m.onnx").stat().st_size


def test_serve_with_onnx_engine(tmp_path: Path, resident: ResidentBase, versions: list[Path]) -> None:
    """``serve --engine onnx`` answers from the shared graph, tags answers with engine and version, swaps."""
    import httpx

    from edgepeft.bench.loadtest import ServerProcess
    from edgepeft.runtime.service import DeviceRuntime, RuntimeConfig

    state = tmp_path / "state"
    with DeviceRuntime.open(RuntimeConfig(state_dir=state, warm=False), resident=resident) as runtime:
        for release, directory in enumerate(versions[:2], start=1):
            runtime.install_directory(directory, asset_id="pump-1", version=str(release), release=release)
    offline = [AnomalyDetector.load(d).score_all(ROWS)["score"] for d in versions[:2]]
    with ServerProcess(state, args=["--engine", "onnx", "--threads", "1"]) as server:
        for version in ("2", "1"):
            if version == "1":
                swapped = httpx.post(f"{server.url}/v1/assets/pump-1/rollback", headers=server.auth)
                assert swapped.status_code == 200, swapped.text
            answer = httpx.post(f"{server.url}/v1/assets/pump-1/score", json={"rows": ROWS.tolist()}).json()
            assert answer["engine"] == "onnx" and answer["version"] == version
            np.testing.assert_allclose(answer["score"], offline[int(version) - 1], rtol=1e-4)
        listing = httpx.get(f"{server.url}/v1/assets").json()[0]
        assert {v["engine"] for v in listing["versions"] if v["loaded"]} == {"onnx"}


def test_quantisation_aware_adapter_scores_as_the_int8_graph(resident: ResidentBase, tmp_path: Path) -> None:
    """An adapter trained and calibrated against the simulated int8 base scores on the int8 graph almost exactly as
    on its training side, much closer than an fp32 adapter moved onto that graph; the device says which is which."""
    from edgepeft.bench.loadtest import series
    from edgepeft.runtime.serving import SavedDetector

    int8 = open_onnx_engine(resident, tmp_path / "onnx", int8=True, threads=1)
    assert int8.graph.precision == "int8"
    train = series(700, seed=4)
    rows = np.concatenate([train, payloads(2, 300)[1]])
    gaps = {}
    for precision in ("fp32", "int8"):
        det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=20, seed=0, base_precision=precision).fit(train)
        folder = det.save(tmp_path / precision)
        np.testing.assert_array_equal(AnomalyDetector.load(folder).score(rows), det.score(rows))  # reloads as int8
        served = int8.load(SavedDetector.from_directory(folder), asset_id=precision, version="1", release=1)
        assert ("calibrated on fp32" in served.note) == (precision == "fp32")
        gaps[precision] = float(np.max(np.abs(served.score_all(rows)["score"] - det.score(rows))))
    assert gaps["int8"] < 0.25 * gaps["fp32"], gaps


def test_int8_base_needs_lora() -> None:
    from edgepeft.core.errors import ConfigError

    with pytest.raises(ConfigError, match="LoRA adapters only"):
        AnomalyDetector(base="tiny", method="bitfit", base_precision="int8").fit(np.zeros((300, 2)))
    with pytest.raises(ConfigError, match="base_precision"):
        AnomalyDetector(base="tiny", base_precision="fp16").fit(np.zeros((300, 2)))
