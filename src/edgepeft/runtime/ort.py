"""The ONNX Runtime engine: every LoRA adapter of one base served from one exported graph, without torch.

The graph (:func:`edgepeft.runtime.onnx.export_lora_graph`, written on a machine with the training install:
``edgepeft export-onnx base.onnx``) is the base with each adapted Linear computing ``W x + b + B (A x)``, where
``A`` and ``B`` are *graph inputs*, the asset's channel tags an input too, and the scoring core's two predictions
(forecast and blind, one pass, linear in channels) its outputs. Its metadata names the base (name, weights
sha256, window and patch length, LoRA modules and shapes), so a device binds bundles to it exactly as to the torch
base. An adapter is only data: its tensors go into an ONNX Runtime adapter file (``onnxruntime.AdapterFormat``),
loaded as a ``LoraAdapter`` and activated per call with ``RunOptions.add_active_adapter``. Swapping adapters
never rebuilds a session, and the base weights exist once, inside the one session.

Details that keep it exact:
- LoRA's ``alpha / r`` scaling is folded into ``B`` when the adapter file is written, so adapters of any rank
  and alpha share the graph;
- modules the graph adapts but an adapter does not get zero ``A``/``B`` (rank 1), which adds exactly nothing.

This module imports numpy and onnxruntime only (a device install has no torch). Methods without an
adapter-as-input graph (DoRA, IA3, adapters, BitFit, prefix, full) are served by the torch engine where torch is
installed, and refused with a clear error where it is not.

Example:
    >>> graph = GraphBase.load("tiny.onnx", threads=1)                                    # doctest: +SKIP
    >>> engine = OnnxEngine(graph, Path("STATE/onnx"))                                     # doctest: +SKIP
    >>> served = engine.load(SavedDetector.from_directory("adapters/v1"), asset_id="pump-1", version="1",
    ...                      release=1)                                                    # doctest: +SKIP
    >>> served.score_all(rows)["score"].shape                                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.core.errors import ArtifactError, ModelError
from edgepeft.delta.pack import graph_refusal
from edgepeft.detect.core import ScoringCore
from edgepeft.runtime.serving import SavedDetector, ServingModel, as_saved, check_base, non_finite

GRAPH_OUTPUTS = ("forecast", "blind")
GRAPH_KIND = "edgepeft-scoring-graph/1"
TAGS_INPUT = "channel_tags"
TAGS_FILE = "channel_tags.safetensors"  # as the PEFT methods save it (edgepeft.peft.base.TAGS_FILE)
PEFT_PREFIX = "base_model.model."
# A served ONNX version is a LoraAdapter (its tensors, memory-mapped) plus a few small Python objects: the
# adapter_memory benchmark measured 22 KB of RSS per tiny-base LoRA adapter, against 66 KB of adapter tensors.
ORT_OVERHEAD_BYTES = 8 * 1024


def lora_input_names(modules: list[str]) -> list[str]:
    """Graph input names of the LoRA tensors of ``modules``: A then B per module."""
    return [f"{name}.{part}" for name in modules for part in ("lora_A", "lora_B")]


def graph_metadata(base: str, sha256: str, window_len: int, patch_len: int, d_channel: int,
                   modules: dict[str, list[int]]) -> dict[str, str]:
    """The metadata a scoring graph carries (ONNX ``metadata_props``): what a device checks bundles against."""
    return {
        "edgepeft.kind": GRAPH_KIND, "edgepeft.base": base, "edgepeft.base_sha256": sha256,
        "edgepeft.window_len": str(window_len), "edgepeft.patch_len": str(patch_len),
        "edgepeft.d_channel": str(d_channel), "edgepeft.lora_modules": json.dumps(modules),
    }


def make_session(path: str | Path, threads: int | None) -> Any:
    """An ONNX Runtime CPU session for ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The LoRA inputs have defaults, which ORT reports once per input at warning level.
    options.log_severity_level = 3
    # No memory pattern: planning one block for every intermediate of a run raised a 100-asset device's peak RSS by
    # 5 MB over allocating them from the arena as they come, for the same speed (measured on this graph).
    options.enable_mem_pattern = False
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        raise ArtifactError(f"cannot load ONNX graph {path} ({str(exc).splitlines()[0]})") from None


@dataclass
class GraphBase:
    """The resident base of a torch-free device: one scoring graph and its session, shared by every adapter.

    Attributes:
        name, sha256: the base it was exported from (bundles must name the same).
        window_len, patch_len, d_channel: its geometry.
        modules: the LoRA modules the graph takes as inputs, with their (in, out) features.
        session: the ONNX Runtime session.
        path: the graph file.
        precision: ``fp32``, or ``int8`` for a dynamically quantised graph (``edgepeft export-onnx --int8``).
    """

    name: str
    sha256: str
    window_len: int
    patch_len: int
    d_channel: int
    modules: dict[str, list[int]]
    session: Any
    path: Path
    precision: str = "fp32"

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> GraphBase:
        """Open a graph written by ``edgepeft export-onnx``; ArtifactError when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"ONNX graph {path} does not exist; write it with `edgepeft export-onnx` on a "
                                "machine with the training install")
        session = make_session(path, threads)
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("edgepeft.kind") != GRAPH_KIND:
            raise ArtifactError(f"{path} is not an edgepeft scoring graph ({meta.get('edgepeft.kind')!r}); export "
                                "it again with `edgepeft export-onnx`")
        outputs = [o.name for o in session.get_outputs()]
        if outputs != list(GRAPH_OUTPUTS):
            raise ArtifactError(f"{path} has outputs {outputs}, expected {list(GRAPH_OUTPUTS)}")
        try:
            return cls(meta["edgepeft.base"], meta["edgepeft.base_sha256"], int(meta["edgepeft.window_len"]),
                       int(meta["edgepeft.patch_len"]), int(meta["edgepeft.d_channel"]),
                       dict(json.loads(meta["edgepeft.lora_modules"])), session, path,
                       meta.get("edgepeft.precision", "fp32"))
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path} has malformed edgepeft metadata ({exc})") from None

    def current_sha256(self) -> str:
        """The base's weights hash: a session's weights cannot be written by an adapter, so always :attr:`sha256`."""
        return self.sha256

    def run(self, windows: np.ndarray, hidden: np.ndarray, adapter: Any, blind: bool
            ) -> tuple[np.ndarray, np.ndarray | None]:
        """(forecast, blind or None) of (b, L, C) windows with (b, C, N) hidden patches, under ``adapter``."""
        import onnxruntime as ort

        options = ort.RunOptions()  # per call: cheap, and never shared between concurrent runs
        options.add_active_adapter(adapter)
        feeds = {"x": np.ascontiguousarray(windows, dtype=np.float32), "hidden": np.ascontiguousarray(hidden)}
        outputs = self.session.run(list(GRAPH_OUTPUTS) if blind else ["forecast"], feeds, options)
        return outputs[0], (outputs[1] if blind else None)


def read_lora(saved: SavedDetector) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """An adapter's LoRA tensors by module name, as ``(A, scaling * B)`` float32, and its channel tags.

    Raises ModelError when the adapter is not plain LoRA (no adapter-as-input graph computes it).
    """
    try:
        config = json.loads(saved.texts["adapter_config.json"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"adapter_config.json in {saved.source} is missing or not JSON ({exc}); "
                            "reinstall the bundle") from exc
    refusal = graph_refusal(saved.method, config)
    if refusal is not None:
        raise ModelError(refusal)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    try:
        state = saved.tensors["adapter_model.safetensors"]
        tags = np.asarray(saved.tensors[TAGS_FILE]["channel_tags"], dtype=np.float32)
    except KeyError as exc:
        raise ArtifactError(f"the adapter in {saved.source} lacks {exc}; reinstall the bundle") from None
    lora: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        key_b = key.replace(".lora_A.weight", ".lora_B.weight")
        if key_b not in state:
            raise ArtifactError(f"adapter has {key} but no {key_b}; it is corrupt, reinstall the bundle")
        lora[module] = (np.asarray(state[key], np.float32), np.asarray(state[key_b], np.float32) * np.float32(scaling))
    unknown = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unknown:
        raise ModelError(f"adapter trains more than LoRA matrices ({unknown[:2]}); no adapter-as-input ONNX graph")
    if not lora:
        raise ArtifactError(f"{saved.source} holds no LoRA tensors; reinstall the bundle")
    return lora, tags


class OrtScorer(ScoringCore):
    """A saved detector scored through a :class:`GraphBase` session with its LoRA adapter active: the scoring core
    (:class:`~edgepeft.detect.core.ScoringCore`) with ONNX Runtime making the predictions."""

    graph_: GraphBase
    adapter_: Any

    def _check_fitted(self) -> None:
        if not hasattr(self, "adapter_"):
            raise ModelError("this OrtScorer has no adapter loaded; use OnnxEngine.load")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The saved detector's settings."""
        return dict(self.params_)

    def _geometry(self) -> tuple[int, int]:
        return self.graph_.window_len, self.graph_.patch_len

    def _predict(self, windows: np.ndarray, hidden: np.ndarray, blind: bool, one_pass: bool | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        return self.graph_.run(windows, hidden, self.adapter_, blind)


class OnnxEngine:
    """Serve LoRA adapters through one :class:`GraphBase` session; other methods through ``fallback`` (the torch
    engine, where torch is installed) or not at all.

    Args:
        graph: the resident scoring graph.
        workdir: where adapter files go (``STATE/onnx``); derived data, safe to delete.
        fallback: loads a version on the torch engine (``None`` on a torch-free device: such versions are refused).
        smoke_fallback: the torch engine's smoke test, for the versions it serves.
    """

    name = "onnx"

    def __init__(self, graph: GraphBase, workdir: str | Path, *,
                 fallback: Callable[..., ServingModel] | None = None,
                 smoke_fallback: Callable[[ServingModel], np.ndarray] | None = None) -> None:
        self.graph = graph
        self.workdir = Path(workdir)
        self.fallback = fallback
        self.smoke_fallback = smoke_fallback

    def idle(self) -> None:
        """Nothing to prepare: the one session is built at start-up."""

    def close(self) -> None:
        """Nothing runs in the background."""

    def load(self, source: Path | SavedDetector, *, asset_id: str, version: str, release: int) -> ServingModel:
        saved = as_saved(source)
        check_base(saved, self.graph.name, self.graph.sha256)
        try:
            lora, tags = read_lora(saved)
            unknown = sorted(set(lora) - set(self.graph.modules))
            if unknown:
                raise ModelError(f"adapter adapts {unknown[:2]}, which graph {self.graph.path.name} takes no LoRA "
                                 "input for (export one for these modules with `edgepeft export-onnx`)")
        except ModelError as exc:
            if self.fallback is None:
                raise ModelError(f"{exc}; this device has no torch to serve it (install edgepeft[train], or adapt "
                                 "with LoRA)") from None
            return self.fallback(saved, asset_id=asset_id, version=version, release=release,
                                 note=f"served by torch: {exc}")
        bad = non_finite(saved)
        if bad is not None:
            raise ModelError(f"adapter in {saved.source} has non-finite weights ({bad}); it was not loaded")
        scorer = OrtScorer.from_dict(saved.state, saved.source)
        if tags.shape != (scorer.n_channels_, self.graph.d_channel):
            raise ArtifactError(f"adapter has tags of shape {tags.shape} but the detector has {scorer.n_channels_} "
                                f"channels of {self.graph.d_channel} tag features; reinstall the bundle")
        scorer.graph_ = self.graph
        scorer.adapter_, nbytes = self._write_adapter(asset_id, version, lora, tags)
        trained_for = scorer.params_.get("base_precision", "fp32")
        note = "" if trained_for == self.graph.precision else (
            f"adapted for the {trained_for} base, served on the {self.graph.precision} graph: its threshold was "
            f"calibrated on {trained_for} scores")
        return ServingModel(asset_id=asset_id, version=version, release=release, method="lora", engine="onnx",
                            detector=scorer, private_bytes=nbytes + ORT_OVERHEAD_BYTES, note=note)

    def smoke(self, served: ServingModel) -> np.ndarray:
        """(1, L, C) forecast of a flat window (zeros, the asset's mean) whose last patch is forecast."""
        if served.engine != "onnx":
            if self.smoke_fallback is None:
                raise ModelError(f"version {served.version} is not served by ONNX Runtime")
            return self.smoke_fallback(served)
        window, patch, channels = self.graph.window_len, self.graph.patch_len, served.n_channels
        hidden = np.zeros((1, channels, window // patch), dtype=bool)
        hidden[..., -1] = True
        forecast, _ = self.graph.run(np.zeros((1, window, channels), np.float32), hidden, served.detector.adapter_,
                                     blind=False)
        return forecast

    def _write_adapter(self, asset_id: str, version: str, lora: dict[str, tuple[np.ndarray, np.ndarray]],
                       tags: np.ndarray) -> tuple[Any, int]:
        """Write this version's ONNX Runtime adapter file (rebuilt on every load, so never stale) and load it."""
        import onnxruntime as ort

        arrays: dict[str, np.ndarray] = {TAGS_INPUT: np.ascontiguousarray(tags, dtype=np.float32)}
        for name, (n_in, n_out) in self.graph.modules.items():
            if name in lora:
                lora_a, lora_b = lora[name]
            else:  # adapted by the graph, not by this adapter: a rank-1 zero update adds exactly nothing
                lora_a, lora_b = np.zeros((1, n_in), np.float32), np.zeros((n_out, 1), np.float32)
            arrays[f"{name}.lora_A"] = np.ascontiguousarray(lora_a, dtype=np.float32)
            arrays[f"{name}.lora_B"] = np.ascontiguousarray(lora_b, dtype=np.float32)
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        adapter_format = ort.AdapterFormat()
        adapter_format.set_adapter_version(1)
        adapter_format.set_model_version(1)
        adapter_format.set_parameters(values)
        path = self.workdir / "adapters" / asset_id / f"{version}.onnx_adapter"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            adapter_format.export_adapter(tmp)  # ``arrays`` and ``values`` are alive until here (they must be)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter, sum(a.nbytes for a in arrays.values())
