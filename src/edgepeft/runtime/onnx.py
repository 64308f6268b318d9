"""ONNX Runtime path: one exported base graph shared by every LoRA adapter, swapped per call.

The base is exported once with each adapted Linear computing ``W x + b + B (A x)`` where ``A`` and ``B`` are
*graph inputs* (``<module>.lora_A`` (r, in), ``<module>.lora_B`` (out, r), rank dynamic), and the asset's channel
identity tags are an input too (``channel_tags`` (C, d_channel)). An adapter is then only data: its tensors go
into an ONNX Runtime adapter file (``onnxruntime.AdapterFormat``), loaded as a ``LoraAdapter`` and activated per
call with ``RunOptions.add_active_adapter``. Swapping adapters never rebuilds a session (milliseconds each), and
the base weights exist once, inside the one session.

Details that keep it exact:
- LoRA's ``alpha / r`` scaling is folded into ``B`` when the adapter file is written, so adapters of any rank
  and alpha share the graph;
- graphs are keyed by the set of adapted module names (``q``/``v`` by default); modules a graph adapts but an
  adapter does not get zero ``A``/``B`` (rank 1), which adds exactly nothing;
- inputs are ``x`` (B, L, C) float32 and ``hidden`` (B, C, N) bool with batch and channels dynamic; ``L`` is
  fixed to the base's window length, as in the detector.

DoRA, IA3 and the non-LoRA methods have no adapter-as-input graph: the engine serves them with torch and says
so (``engine`` and ``note`` in the asset listing). :func:`export_merged` writes a standalone per-asset model of
any method (adapter merged into the weights where the method can merge). :func:`quantize_int8` applies dynamic
int8 quantisation (weights of the base graph; the LoRA inputs stay float).

Example:
    >>> engine = OnnxEngine(ResidentBase.load("tiny"), Path("STATE/onnx"))          # doctest: +SKIP
    >>> served = engine.load(Path("adapters/v1"), asset_id="pump-1", version="1", release=1)  # doctest: +SKIP
    >>> served.engine, served.score_all(rows)["score"].shape                         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
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

from edgepeft.core.errors import ArtifactError, ModelError, OutputError
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.peft import get_method
from edgepeft.runtime.resident import (
    ResidentBase,
    SavedDetector,
    ServingModel,
    as_saved,
    check_compatible,
    load_torch_version,
)

OPSET = 17  # scaled_dot_product_attention exports from 14; 17 has LayerNormalization as one node
PEFT_PREFIX = "base_model.model."
TAGS_INPUT = "channel_tags"
# A served ONNX version is a LoraAdapter (its tensors, memory-mapped) plus a few small Python objects: the
# adapter_memory benchmark measured 22 KB of RSS per tiny-base LoRA adapter, against 66 KB of adapter tensors.
ORT_OVERHEAD_BYTES = 8 * 1024
# peft LoRA settings the adapter-as-input graph computes exactly; anything else falls back to torch.
_PLAIN_LORA = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False}


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
    """The encoder with LoRA A/B of ``modules`` taken from the forward arguments, for tracing."""

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
                *lora: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            layer.lora = (lora[2 * index], lora[2 * index + 1])
        return self.encoder(x, hidden, channel_tags)


def lora_input_names(modules: list[str]) -> list[str]:
    """Graph input names of the LoRA tensors of ``modules``: A then B per module."""
    return [f"{name}.{part}" for name in modules for part in ("lora_A", "lora_B")]


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
           dynamic_axes: dict[str, dict[int, str]]) -> bytes:
    """Trace ``module`` to ONNX bytes."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy and that the window-length check is traced as a
        # constant; both are expected (L is fixed per base by design, and onnxscript is not installed).
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=["recon"], dynamic_axes=dynamic_axes, do_constant_folding=True)
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
    """Export the shared base graph with LoRA A/B inputs for ``modules`` (default: every attention q and v).

    The LoRA and tag inputs get zero defaults (overridable initializers: rank-1 zero A/B, one zero tag row that
    broadcasts over channels), so the graph runs as the bare base when no adapter is active, and ONNX Runtime
    treats them as optional inputs that an active ``LoraAdapter`` supplies.
    """
    import onnx
    from onnx import numpy_helper

    encoder = resident.private_copy()  # the graph wrapper replaces submodules; never touch the resident tree
    if modules is None:
        modules = default_lora_modules(encoder)
    graph = _LoraGraph(encoder, modules).eval()
    batch, n_channels = 2, 3
    x = torch.randn(batch, resident.window_len, n_channels)
    hidden = encoder.forecast_mask(batch, n_channels)
    tags = torch.randn(n_channels, encoder.cfg.d_channel)
    lora: list[torch.Tensor] = []
    defaults: dict[str, np.ndarray] = {TAGS_INPUT: np.zeros((1, encoder.cfg.d_channel), np.float32)}
    for name, layer in zip(modules, graph.layers, strict=True):
        rank = 2  # any rank: the axis is dynamic
        lora += [torch.randn(rank, layer.base.in_features), torch.randn(layer.base.out_features, rank)]
        defaults[f"{name}.lora_A"] = np.zeros((1, layer.base.in_features), np.float32)
        defaults[f"{name}.lora_B"] = np.zeros((layer.base.out_features, 1), np.float32)
    names = lora_input_names(modules)
    axes: dict[str, dict[int, str]] = {
        "x": {0: "batch", 2: "channels"}, "hidden": {0: "batch", 1: "channels"}, TAGS_INPUT: {0: "channels"},
        "recon": {0: "batch", 2: "channels"},
    }
    for name in names:
        axes[name] = {0: "rank"} if name.endswith("lora_A") else {1: "rank"}
    model = onnx.load_from_string(_trace(graph, (x, hidden, tags, *lora), ["x", "hidden", TAGS_INPUT, *names], axes))
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in defaults.items())
    return _write(Path(out), model.SerializeToString())


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
            os.replace(staged, out)
    finally:
        root.setLevel(level)
    return out


# ---------------------------------------------------------------------------------------------- adapters
def read_lora(saved: SavedDetector) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """An adapter's LoRA tensors by module name, as ``(A, scaling * B)`` float32, and its channel tags.

    Raises ModelError when the adapter is not plain LoRA (the caller falls back to torch).
    """
    from edgepeft.peft.base import TAGS_FILE

    try:
        config = json.loads(saved.texts["adapter_config.json"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"adapter_config.json in {saved.source} is missing or not JSON ({exc}); "
                            "reinstall the bundle") from exc
    if config.get("peft_type") != "LORA":
        raise ModelError(f"peft type {config.get('peft_type')!r} has no adapter-as-input ONNX graph")
    for key, plain in _PLAIN_LORA.items():
        if config.get(key, plain) != plain:
            raise ModelError(f"LoRA with {key}={config.get(key)!r} has no adapter-as-input ONNX graph")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("modules_to_save"):
        raise ModelError("LoRA with per-module ranks or extra trained modules has no adapter-as-input ONNX graph")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    try:
        state = saved.tensors["adapter_model.safetensors"]
        tags = saved.tensors[TAGS_FILE]["channel_tags"].float().numpy()
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
        lora[module] = (state[key].float().numpy(), (state[key_b].float() * scaling).numpy())
    unknown = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unknown:
        raise ModelError(f"adapter trains more than LoRA matrices ({unknown[:2]}); no adapter-as-input ONNX graph")
    if not lora:
        raise ArtifactError(f"{saved.source} holds no LoRA tensors; reinstall the bundle")
    return lora, tags


class OrtModel:
    """The detector-facing model of one adapter version: the shared session plus this version's adapter.

    Called like the torch model (``model(x, hidden)`` on (B, L, C) / (B, C, N) tensors); ``eval`` and
    ``get_base_model`` exist because :class:`AnomalyDetector` calls them.
    """

    def __init__(self, session: Any, adapter: Any, window_len: int, patch_len: int) -> None:
        self.session = session
        self.adapter = adapter
        self.window_len = window_len
        self.patch_len = patch_len

    def __call__(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        import onnxruntime as ort

        options = ort.RunOptions()  # per call: cheap, and never shared between concurrent runs
        options.add_active_adapter(self.adapter)
        (recon,) = self.session.run(["recon"], {"x": x.numpy(), "hidden": hidden.numpy()}, options)
        return torch.from_numpy(recon)

    def eval(self) -> OrtModel:
        return self

    def get_base_model(self) -> OrtModel:
        return self


class OnnxEngine:
    """Serve LoRA adapters through one ONNX Runtime session per graph; other methods through torch.

    Args:
        resident: the resident base (exported once per set of adapted modules, cached under ``workdir``).
        workdir: where graphs and adapter files go (``STATE/onnx``); derived data, safe to delete.
        int8: run the dynamically int8-quantised graph.
        threads: ONNX Runtime intra-op threads (None: its default).
    """

    name = "onnx"

    def __init__(self, resident: ResidentBase, workdir: str | Path, *, int8: bool = False,
                 threads: int | None = None) -> None:
        self.resident = resident
        self.workdir = Path(workdir)
        self.int8 = int8
        self.threads = threads
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def idle(self) -> None:
        """Nothing to prepare: sessions are built once per graph and reused."""

    def close(self) -> None:
        """Nothing runs in the background."""

    def graph_path(self, modules: tuple[str, ...]) -> Path:
        key = hashlib.sha256((self.resident.sha256 + "|" + ",".join(modules)).encode()).hexdigest()[:16]
        return self.workdir / f"{self.resident.name}-lora-{key}{'.int8' if self.int8 else ''}.onnx"

    def session(self, modules: tuple[str, ...]) -> Any:
        """The session of the graph adapting ``modules``, exported and created on first use."""
        with self._lock:
            if modules not in self._sessions:
                import onnxruntime as ort

                path = self.graph_path(modules)
                if not path.exists():
                    fp32 = export_lora_graph(self.resident, path.with_suffix(".fp32.tmp.onnx") if self.int8 else path,
                                             list(modules))
                    if self.int8:
                        quantize_int8(fp32, path)
                        fp32.unlink()
                options = ort.SessionOptions()
                # The LoRA inputs have defaults, which ORT reports once per input at warning level.
                options.log_severity_level = 3
                if self.threads is not None:
                    options.intra_op_num_threads = self.threads
                    options.inter_op_num_threads = 1
                self._sessions[modules] = ort.InferenceSession(str(path), options,
                                                               providers=["CPUExecutionProvider"])
            return self._sessions[modules]

    def load(self, source: Path | SavedDetector, *, asset_id: str, version: str, release: int) -> ServingModel:
        saved = as_saved(source)
        det = saved.detector
        check_compatible(det, self.resident, saved.source)
        try:
            lora, tags = read_lora(saved) if det.peft_config_.method == "lora" else (None, None)
            if lora is None:
                raise ModelError(f"method {det.peft_config_.method!r} has no adapter-as-input ONNX graph "
                                 "(LoRA only)")
        except ModelError as exc:
            return load_torch_version(self.resident, saved, asset_id=asset_id, version=version,
                                      release=release, note=f"served by torch: {exc}")
        if not all(np.isfinite(a).all() and np.isfinite(b).all() for a, b in lora.values()) or \
                not np.isfinite(tags).all():
            raise ModelError(f"adapter in {saved.source} has non-finite weights; it was not loaded")
        if tags.shape[0] != det.n_channels_:
            raise ArtifactError(f"adapter has tags for {tags.shape[0]} channels but the detector has "
                                f"{det.n_channels_}; reinstall the bundle")
        modules = self._graph_modules(sorted(lora))
        session = self.session(modules)
        adapter, nbytes = self._write_adapter(asset_id, version, modules, lora, tags)
        det.model_ = OrtModel(session, adapter, self.resident.window_len, self.resident.patch_len)
        det.method_ = get_method("lora")
        return ServingModel(asset_id=asset_id, version=version, release=release, method="lora", engine="onnx",
                            detector=det, private_bytes=nbytes + ORT_OVERHEAD_BYTES)

    def _graph_modules(self, adapted: list[str]) -> tuple[str, ...]:
        """The graph to use: the default q/v one when it covers ``adapted``, else one for exactly these."""
        default = tuple(default_lora_modules(self.resident.module))
        return default if set(adapted) <= set(default) else tuple(adapted)

    def _write_adapter(self, asset_id: str, version: str, modules: tuple[str, ...],
                       lora: dict[str, tuple[np.ndarray, np.ndarray]], tags: np.ndarray) -> tuple[Any, int]:
        """Write this version's ONNX Runtime adapter file (rebuilt on every load, so never stale) and load it."""
        import onnxruntime as ort

        arrays: dict[str, np.ndarray] = {TAGS_INPUT: np.ascontiguousarray(tags, dtype=np.float32)}
        encoder = self.resident.module
        for name in modules:
            if name in lora:
                lora_a, lora_b = lora[name]
            else:  # adapted by the graph, not by this adapter: a rank-1 zero update adds exactly nothing
                linear = encoder.get_submodule(name)
                lora_a = np.zeros((1, linear.in_features), np.float32)
                lora_b = np.zeros((linear.out_features, 1), np.float32)
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
