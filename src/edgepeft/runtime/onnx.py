"""Exporting ONNX models (the training side: needs torch). Serving them is :mod:`edgepeft.runtime.ort`.

- :func:`export_lora_graph`: the shared scoring graph of a base, with LoRA A/B and channel tags as inputs and
  the forecast and blind predictions as outputs; every LoRA adapter of that base is served from it, on a device
  with or without torch (``edgepeft export-onnx base.onnx``, then ``edgepeft serve --graph base.onnx``).
  Inputs are ``x`` (B, L, C) float32 and ``hidden`` (B, C, N) bool with batch and channels dynamic; ``L`` is fixed
  to the base's window length, as in the detector.
- :func:`export_merged`: a standalone per-asset model of any method (adapter merged into the weights where the
  method can merge), ``recon`` = the model's forward pass.
- :func:`quantize_int8`: dynamic int8 quantisation (weights of the base graph; the LoRA inputs stay float).
- :func:`open_onnx_engine`: the ONNX engine of a torch install (graph exported on first use; DoRA, IA3 and the
  non-LoRA methods, which have no adapter-as-input graph, served by torch and noted in the asset listing).

Example:
    >>> engine = open_onnx_engine(ResidentBase.load("tiny"), Path("STATE/onnx"))        # doctest: +SKIP
    >>> served = engine.load(Path("adapters/v1"), asset_id="pump-1", version="1", release=1)  # doctest: +SKIP
    >>> served.engine, served.score_all(rows)["score"].shape                         # doctest: +SKIP
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ModelError, OutputError
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.runtime.ort import (
    GRAPH_OUTPUTS,
    TAGS_INPUT,
    GraphBase,
    OnnxEngine,
    graph_metadata,
    lora_input_names,
)
from edgepeft.runtime.resident import ResidentBase, load_torch_version, smoke_forecast
from edgepeft.runtime.serving import SavedDetector, ServingModel

OPSET = 17  # scaled_dot_product_attention exports from 14; 17 has LayerNormalization as one node


# ---------------------------------------------------------------------------------------------- export
class _InputLoraLinear(nn.Module):
    """A frozen Linear plus a LoRA update whose A and B arrive as forward-time tensors (graph inputs)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.lora is not None, "set by _LoraGraph.forward before the encoder runs"
        lora_a, lora_b = self.lora  # (r, in), (out, r); B already carries the alpha/r scaling
        return self.base(x) + (x @ lora_a.t()) @ lora_b.t()


class _LoraGraph(nn.Module):
    """The encoder with LoRA A/B of ``modules`` taken from the forward arguments, for tracing. It computes the
    scoring core's two predictions in one pass (forecast and blind), so the ONNX engine is linear in channels
    like the torch one."""

    def __init__(self, encoder: nn.Module, modules: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.modules_ = modules
        self.layers: list[_InputLoraLinear] = []
        for name in modules:
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            linear = getattr(parent, child)
            if not isinstance(linear, nn.Linear):
                raise ModelError(f"{name} is not a Linear layer; LoRA inputs can only be added to Linear layers")
            wrapped = _InputLoraLinear(linear)
            setattr(parent, child, wrapped)
            self.layers.append(wrapped)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor, channel_tags: torch.Tensor,
                *lora: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two predictions the scoring core reads, as :meth:`AnomalyDetector._predict` makes them: the
        forecast (B, L, C) and every channel's blind prediction (B, L, C), from one temporal pass."""
        for index, layer in enumerate(self.layers):
            layer.lora = (lora[2 * index], lora[2 * index + 1])
        feats, mean, std = self.encoder.temporal_features(x, hidden)
        forecast = self.encoder.mix(feats, mean, std, channel_tags)
        blank = self.encoder.temporal_features(torch.zeros_like(x[:1, :, :1]), torch.ones_like(hidden[:1, :1]))[0]
        return forecast, self.encoder.blind_mix(feats, blank[0, 0], channel_tags)


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
           dynamic_axes: dict[str, dict[int, str]], output_names: tuple[str, ...] = ("recon",)) -> bytes:
    """Trace ``module`` to ONNX bytes."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy and that the window-length check is traced as a
        # constant; both are expected (L is fixed per base by design, and onnxscript is not installed).
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    """Write a model atomically: a reader never sees half a model."""
    from edgepeft.core.config import atomic_write_bytes

    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from exc
    return path


def export_lora_graph(resident: ResidentBase, out: str | Path, modules: list[str] | None = None) -> Path:
    """Export the shared base graph with LoRA A/B inputs for ``modules`` (default: every attention q and v): the
    scoring graph a device serves every LoRA adapter of this base with, torch-free (:mod:`edgepeft.runtime.ort`).

    Inputs ``x`` (B, L, C), ``hidden`` (B, C, N), ``channel_tags`` (C, d) and the LoRA tensors; outputs
    ``forecast`` and ``blind`` (B, L, C). The LoRA and tag inputs get zero defaults (overridable initializers:
    rank-1 zero A/B, one zero tag row that broadcasts over channels), so the graph runs as the bare base when no
    adapter is active, and ONNX Runtime treats them as optional inputs that an active ``LoraAdapter`` supplies.
    The graph names its base in its metadata (name, weights sha256, window and patch length, LoRA modules and
    their shapes): a device binds bundles to it exactly as it would to the torch base.
    """
    import onnx
    from onnx import numpy_helper

    encoder = resident.private_copy()  # the graph wrapper replaces submodules; never touch the resident tree
    if modules is None:
        modules = default_lora_modules(encoder)
    if len(encoder.channel_blocks) != 1:
        raise ModelError(f"base {resident.name!r} has {len(encoder.channel_blocks)} cross-channel blocks; the "
                         "one-pass scoring graph needs exactly one")
    graph = _LoraGraph(encoder, modules).eval()
    batch, n_channels = 2, 3
    x = torch.randn(batch, resident.window_len, n_channels)
    hidden = encoder.forecast_mask(batch, n_channels)
    tags = torch.randn(n_channels, encoder.cfg.d_channel)
    lora: list[torch.Tensor] = []
    defaults: dict[str, np.ndarray] = {TAGS_INPUT: np.zeros((1, encoder.cfg.d_channel), np.float32)}
    shapes: dict[str, list[int]] = {}
    for name, layer in zip(modules, graph.layers, strict=True):
        rank = 2  # any rank: the axis is dynamic
        lora += [torch.randn(rank, layer.base.in_features), torch.randn(layer.base.out_features, rank)]
        defaults[f"{name}.lora_A"] = np.zeros((1, layer.base.in_features), np.float32)
        defaults[f"{name}.lora_B"] = np.zeros((layer.base.out_features, 1), np.float32)
        shapes[name] = [layer.base.in_features, layer.base.out_features]
    names = lora_input_names(modules)
    axes: dict[str, dict[int, str]] = {
        "x": {0: "batch", 2: "channels"}, "hidden": {0: "batch", 1: "channels"}, TAGS_INPUT: {0: "channels"},
        "forecast": {0: "batch", 2: "channels"}, "blind": {0: "batch", 2: "channels"},
    }
    for name in names:
        axes[name] = {0: "rank"} if name.endswith("lora_A") else {1: "rank"}
    model = onnx.load_from_string(_trace(graph, (x, hidden, tags, *lora), ["x", "hidden", TAGS_INPUT, *names], axes,
                                         output_names=GRAPH_OUTPUTS))
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in defaults.items())
    _inline_weight_identities(model)
    metadata = graph_metadata(resident.name, resident.sha256, resident.window_len, resident.patch_len,
                              encoder.cfg.d_channel, shapes)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return _write(Path(out), model.SerializeToString())


def _inline_weight_identities(model: Any) -> None:
    """Drop the ``Identity`` nodes the exporter puts between a weight and its second, third... use (the forward and
    the blind pass share the channel block), so every MatMul reads its weight as an initializer: the dynamic int8
    quantiser only quantises MatMuls whose weight is one, and left the shared ones float (and kept both copies)."""
    weights = {init.name for init in model.graph.initializer}
    outputs = {out.name for out in model.graph.output}
    alias = {node.output[0]: node.input[0] for node in model.graph.node
             if node.op_type == "Identity" and node.input[0] in weights and node.output[0] not in outputs}
    if not alias:
        return
    keep = [node for node in model.graph.node if not (node.op_type == "Identity" and node.output[0] in alias)]
    for node in keep:
        for index, name in enumerate(node.input):
            if name in alias:
                node.input[index] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def default_lora_modules(encoder: nn.Module) -> list[str]:
    """Every attention query and value projection: what LoRA adapts by default."""
    return [name for name, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("q", "v")]


class _Standalone(nn.Module):
    """An adapted model with its own channel tags, as ``forward(x, hidden)`` for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(x, hidden)


def export_merged(detector_dir: str | Path, out: str | Path) -> Path:
    """Export one asset's standalone model: the adapter merged into the base weights (LoRA, DoRA, IA3), or the
    adapted model as is (bottleneck adapters, prefix, BitFit, full). Batch is dynamic; channels are the asset's.

    The detector is loaded with its own copy of the base, so merging never touches a resident base.
    """
    det = AnomalyDetector.load(detector_dir)
    if det.method_.mergeable:
        det.merge()
    encoder = det.method_.encoder(det.model_)
    batch, n_channels = 2, det.n_channels_
    x = torch.randn(batch, encoder.window_len, n_channels)
    hidden = encoder.forecast_mask(batch, n_channels)
    axes = {"x": {0: "batch"}, "hidden": {0: "batch"}, "recon": {0: "batch"}}
    return _write(Path(out), _trace(_Standalone(det.model_).eval(), (x, hidden), ["x", "hidden"], axes))


def quantize_int8(source: str | Path, out: str | Path) -> Path:
    """Dynamic int8 quantisation of an exported model's weights (activations stay float, quantised per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    # The quantiser logs a generic "consider pre-processing" advice on the root logger at every call; shape
    # inference pre-processing changes nothing for these small MatMul graphs.
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            staged = Path(tmp) / out.name
            quantize_dynamic(model_input=str(source), model_output=str(staged), weight_type=QuantType.QInt8)
            import onnx

            model = onnx.load(str(staged))
            if any(prop.key == "edgepeft.kind" for prop in model.metadata_props):  # a scoring graph says it is int8
                entry = model.metadata_props.add()
                entry.key, entry.value = "edgepeft.precision", "int8"
                onnx.save(model, str(staged))
            os.replace(staged, out)
    finally:
        root.setLevel(level)
    return out


# ---------------------------------------------------------------------------------------------- engine
_EXPORT_LOCK = threading.Lock()  # one export per graph file, whichever thread asks first


def graph_path(resident: ResidentBase, workdir: str | Path, int8: bool = False) -> Path:
    """Where a torch install keeps the scoring graph it exported for ``resident`` (derived data, keyed by the
    base's weights hash)."""
    return Path(workdir) / f"{resident.name}-{resident.sha256[:16]}{'.int8' if int8 else ''}.onnx"


def open_onnx_engine(resident: ResidentBase, workdir: str | Path, *, int8: bool = False,
                     threads: int | None = None) -> OnnxEngine:
    """The ONNX engine of a torch install: the scoring graph of ``resident`` (exported on first use, int8
    quantised when asked), and the torch engine for the methods the graph cannot serve."""
    path = graph_path(resident, workdir, int8)
    with _EXPORT_LOCK:
        if not path.exists():
            fp32 = export_lora_graph(resident, path.with_suffix(".fp32.tmp.onnx") if int8 else path)
            if int8:
                quantize_int8(fp32, path)
                fp32.unlink()
    graph = GraphBase.load(path, threads)

    def fallback(saved: SavedDetector, **kwargs: Any) -> ServingModel:
        return load_torch_version(resident, saved, **kwargs)

    return OnnxEngine(graph, workdir, fallback=fallback,
                      smoke_fallback=lambda served: smoke_forecast(resident, served).numpy())

