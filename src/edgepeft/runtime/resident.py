"""The resident base and the per-version models built on it without copying it.

A device serves many assets from one pretrained base. The base is loaded once (:class:`ResidentBase`); each
installed adapter version becomes an immutable :class:`ServingModel` whose frozen tensors *alias* the resident
base's storage, so a resident adapter costs only its own tensors, not another copy of the base.

Aliasing is safe only while nothing writes into the shared storage, and two kinds of method would:
- methods that train base tensors in place (BitFit trains the base biases; its ``load`` copies the saved biases
  *into* them): every trainable tensor that aliases the base gets a private clone *before* the adapter is
  loaded, so the copy lands in the clone;
- methods that rebuild the base (full fine-tuning and scratch; scratch re-initialises the weights inside
  ``attach``): they get a wholly private copy, since their delta is the whole model anyway.
Merging (``merge_adapter``) would also write into the base; the runtime never merges a served model.

The detector's numbers (scaler, channel weights, threshold, calibrator) come from its ``detector.json`` exactly
as :meth:`AnomalyDetector.load` reads them, so a served version scores bit-identically to the same detector
loaded offline. A version is read into a :class:`SavedDetector` first, from an unpacked folder or straight from
a verified bundle's bytes (what the device keeps on disk: one file per version, decoded in memory).

Example:
    >>> resident = ResidentBase.load("tiny")          # doctest: +SKIP
    >>> served = load_torch_version(resident, "STATE/assets/pump-1/3", asset_id="pump-1", version="3")  # doctest: +SKIP
    >>> served.score_all(rows)["score"].shape         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepeft.core.errors import ModelError
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.models.registry import load_base, state_sha256
from edgepeft.peft import PeftConfig, PeftMethod, get_method
from edgepeft.peft.base import DeltaLoader
from edgepeft.runtime.serving import SavedDetector, ServingModel, as_saved, check_base, non_finite

# What a resident torch model costs beyond its own tensors: the Python objects of its module tree (every nn.Module
# carries a dozen dicts) and peft's wrappers. `edgepeft.bench.runtime_bench.adapter_memory` measured 355 KB of RSS per
# LoRA adapter on the tiny base (410 KB once it has scored), of which 21 KB are tensors. The cache budget counts
# this, so that "256 MB" means roughly 256 MB of RSS rather than 256 MB of tensors.
MODEL_OVERHEAD_BYTES = 384 * 1024


class ResidentBase:
    """One pretrained base, loaded once, frozen, and shared by every served adapter.

    Attributes:
        name: registry name of the base (``tiny``, ``small`` or a registered one).
        module: the frozen base module; never written after load.
        sha256: :func:`~edgepeft.models.registry.state_sha256` of the weights at load time.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        module.requires_grad_(False)
        module.eval()
        self.name = name
        self.module = module
        self.sha256 = state_sha256(module)
        # Storage addresses of every base tensor: how a model's tensor is recognised as an alias of the base.
        self._storages = {
            t.untyped_storage().data_ptr() for t in module.state_dict().values() if t.numel() > 0
        }
        self._lock = threading.Lock()
        self._smoke: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def load(cls, name: str) -> ResidentBase:
        """Load base ``name`` from the registry (weights checked against its model card)."""
        return cls(name, load_base(name))

    @property
    def window_len(self) -> int:
        return int(self.module.window_len)

    @property
    def patch_len(self) -> int:
        return int(self.module.patch_len)

    def aliases(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` shares storage with a base tensor (writing it would change the base)."""
        return tensor.numel() > 0 and tensor.untyped_storage().data_ptr() in self._storages

    def smoke_input(self, n_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The smoke test's input: a flat window (zeros, the asset's mean) whose last patch is forecast."""
        window, patch = self.window_len, self.patch_len
        hidden = torch.zeros(1, n_channels, window // patch, dtype=torch.bool)
        hidden[..., -1] = True
        return torch.zeros(1, window, n_channels), hidden

    def smoke_features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base's temporal features of one channel of :meth:`smoke_input`, computed once.

        The temporal half is channel-independent and the input is the same in every channel, so these serve
        any channel count; a model whose temporal half is this base's computes exactly them.
        """
        if self._smoke is None:  # a race only computes the same constant twice
            x, hidden = self.smoke_input(1)
            with torch.inference_mode():
                self._smoke = self.module.temporal_features(x, hidden)
        return self._smoke

    def current_sha256(self) -> str:
        """Hash the weights now; equal to :attr:`sha256` unless something wrote into the shared base."""
        with self._lock:  # hashing is slow-ish; one at a time keeps health probes from piling up
            return state_sha256(self.module)

    def shared_copy(self) -> nn.Module:
        """A new module tree whose parameters and buffers alias this base's tensors (no tensor is copied).

        The parameters are new ``nn.Parameter`` objects over the same storage, so flags such as
        ``requires_grad`` set by a method's ``attach`` stay private to the copy.
        """
        memo: dict[int, Any] = {}
        for param in self.module.parameters():
            memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
        for buffer in self.module.buffers():
            memo[id(buffer)] = buffer.detach()
        return copy.deepcopy(self.module, memo)

    def private_copy(self) -> nn.Module:
        """A new module tree with its own copy of every tensor (for methods that rewrite the base)."""
        return copy.deepcopy(self.module)

    def private_bytes(self, module: nn.Module) -> int:
        """Bytes of ``module``'s tensors that are not the base's: what this model adds to the process."""
        seen: set[int] = set()
        total = 0
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if tensor.numel() == 0 or ptr in self._storages or ptr in seen:
                continue
            seen.add(ptr)
            total += storage.nbytes()
        return total


def torch_skeleton(resident: ResidentBase, config: PeftConfig, n_channels: int) -> nn.Module:
    """The adapted model's structure on the resident base, before any adapter weights are loaded.

    Building it (module-tree copy, method attach) is most of what loading a version costs, and it depends only
    on the method's config and the channel count, never on the weights: :class:`SkeletonPool` builds it ahead.
    """
    method = get_method(config.method)
    base = resident.private_copy() if method.trains_base else resident.shared_copy()
    base.set_n_channels(n_channels)  # a new, private tags tensor; the base's (empty) one is untouched
    model = method.attach(base, config)
    # Whatever the method will train (and so load into) must not be shared storage: BitFit's biases, or the
    # LayerNorm shifts of any future method. Cloning here, before ``load``, sends its in-place copy to the clone.
    for param in model.parameters():
        if param.requires_grad and resident.aliases(param):
            param.data = param.data.clone()
    return model


@dataclass
class Skeleton:
    """A model structure ready for one adapter's weights: the model, the loader prepared for it, and the bytes
    it adds to the process (loading copies into its tensors in place, so that does not change)."""

    model: nn.Module
    load: DeltaLoader
    private_bytes: int
    temporal_is_base: bool = False

    @classmethod
    def build(cls, resident: ResidentBase, config: PeftConfig, n_channels: int) -> Skeleton:
        model = torch_skeleton(resident, config, n_channels)
        load = get_method(config.method).loader(model)
        # Served models are frozen and in eval mode; both walk the module tree, so they happen here, ahead.
        model.requires_grad_(False)
        model.eval()
        return cls(model, load, resident.private_bytes(model), temporal_is_base(resident, model))


def temporal_is_base(resident: ResidentBase, model: nn.Module) -> bool:
    """True when every tensor of the model's temporal half aliases the resident base: the adapter changes only
    the channel blocks and the head (the default, ``adapt_last=1``). A method that adapts a temporal block adds
    or clones tensors there (LoRA matrices, prefixes, BitFit's biases, adapters), so it gets False."""
    tensors = [tensor for tensor in PeftMethod.encoder(model).temporal_tensors() if tensor.numel() > 0]
    return bool(tensors) and all(resident.aliases(tensor) for tensor in tensors)


def build_torch_model(
    resident: ResidentBase, saved: SavedDetector, config: PeftConfig, n_channels: int, skeleton: Skeleton | None = None
) -> Skeleton:
    """The adapted torch model of one saved detector, its frozen tensors aliasing the resident base.

    ``skeleton`` is an unused :class:`Skeleton` of the same config and channel count (from a pool); the adapter's
    weights are loaded into it. Without one, it is built here. Either way the result is the same; it is returned
    with the adapter loaded.
    """
    skeleton = skeleton or Skeleton.build(resident, config, n_channels)
    # They are the only tensors the load brings: everything else in the model is the checked base or the
    # method's own init.
    bad = non_finite(saved)
    if bad is not None:
        raise ModelError(f"adapter in {saved.source} has non-finite weights ({bad}); it was not loaded")
    skeleton.load({name: {key: torch.from_numpy(array) for key, array in arrays.items()}
                   for name, arrays in saved.tensors.items()})
    return skeleton


def skeleton_key(config: PeftConfig, n_channels: int) -> str:
    """What makes two skeletons interchangeable: the PEFT config and the channel count.

    The dataclass's ``repr`` names every field and value (the config holds only plain values), and is several
    times cheaper than encoding it as JSON, twice per install.
    """
    return f"{config!r}|{n_channels}"


class SkeletonPool:
    """Spare model skeletons built off the request path, so installing or re-loading a version only loads weights.

    After a version of some config has loaded, :meth:`refill` builds one spare of that config (and its method's
    prepared loader) in a background thread; the next install of the same kind (the usual case: a new version
    of the same asset) takes it instead of building one. Bounded: spares are kept for the ``max_configs`` most
    recently loaded configs only (about a resident adapter's size each). Only methods that share the base's
    tensors are pooled: a spare of full fine-tuning would be a whole base copy. Building runs the same code as
    the synchronous path, so a pooled model equals an unpooled one.

    Example:
        >>> pool = SkeletonPool(ResidentBase.load("tiny"))           # doctest: +SKIP
        >>> model = pool.take(det.peft_config_, det.n_channels_)     # None: nothing built yet  # doctest: +SKIP
        >>> pool.want(det.peft_config_, det.n_channels_)              # it loaded: keep a spare of it  # doctest: +SKIP
        >>> builds = pool.refill()                                    # builds one in the background  # doctest: +SKIP
    """

    def __init__(self, resident: ResidentBase, max_configs: int = 4) -> None:
        self.resident = resident
        self.max_configs = max_configs
        self._spares: dict[str, Skeleton] = {}
        self._wanted: dict[str, tuple[PeftConfig, int]] = {}  # insertion order = least recently loaded first
        self._building: set[str] = set()
        # One long-lived builder thread: starting a thread per refill cost about 0.2 ms of every install. The
        # executor's worker is joined at interpreter exit, so a build is never killed halfway (torch aborts the
        # process if that happens).
        self._builder = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgepeft-skeleton")
        self._closed = False
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.failures = 0
        self.last_error = ""

    def take(self, config: PeftConfig, n_channels: int) -> Skeleton | None:
        """A ready spare for this config (removed from the pool), or None."""
        key = skeleton_key(config, n_channels)
        with self._lock:
            spare = self._spares.pop(key, None)
            if spare is None:
                self.misses += 1
            else:
                self.hits += 1
        return spare

    def want(self, config: PeftConfig, n_channels: int) -> None:
        """Keep a spare of this config from now on: called once a version of it has loaded, never for one that
        failed (a rejected bundle must not leave a spare behind)."""
        if get_method(config.method).trains_base:
            return
        key = skeleton_key(config, n_channels)
        with self._lock:
            self._wanted.pop(key, None)
            self._wanted[key] = (config, n_channels)
            while len(self._wanted) > self.max_configs:
                oldest = next(iter(self._wanted))
                del self._wanted[oldest]
                self._spares.pop(oldest, None)

    def refill(self) -> list[futures.Future[None]]:
        """Start building a spare for every wanted config that has none ready or on its way.

        The runtime calls it once a write is done (committed), not inside the write: the builder competes for the
        interpreter lock, so starting it mid-install would slow the very install it is meant to speed up.
        """
        with self._lock:
            if self._closed:
                return []
            todo = [(key, cfg) for key, cfg in self._wanted.items()
                    if key not in self._spares and key not in self._building]
            self._building.update(key for key, _ in todo)
            return [self._builder.submit(self._build, key, config, n_channels) for key, (config, n_channels) in todo]

    def close(self) -> None:
        """Wait for builds in flight (they use torch's global random generator for the init that ``load``
        overwrites; waiting keeps them from overlapping whatever the process does next) and drop the spares."""
        with self._lock:
            self._closed = True
        self._builder.shutdown(wait=True)
        with self._lock:
            self._spares.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"spares": len(self._spares), "hits": self.hits, "misses": self.misses,
                    "failures": self.failures, "last_error": self.last_error}

    def _build(self, key: str, config: PeftConfig, n_channels: int) -> None:
        # Let the write that queued this build return first: once the builder holds the interpreter lock it keeps
        # it until the switch interval (5 ms) makes it yield, and the writer, waiting on that lock, would pay it.
        time.sleep(0.001)
        try:
            skeleton = Skeleton.build(self.resident, config, n_channels)
            with self._lock:
                if key in self._wanted:  # not evicted from the wanted set meanwhile
                    self._spares[key] = skeleton
        except Exception as exc:  # noqa: BLE001 - a failed spare only means the next load builds its own; counted
            with self._lock:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._building.discard(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._spares)


class FrozenModel:
    """A served torch model, callable as the detector calls its ``model_``, in eval mode for good.

    ``AnomalyDetector`` puts its model in eval mode on every scoring call; on a model that never leaves eval
    mode that walk over every submodule is pure overhead (about a tenth of a small request), so ``eval`` is a
    no-op here. Inference mode skips autograd bookkeeping that ``no_grad`` still does.
    """

    def __init__(self, model: nn.Module, *, temporal_is_base: bool = False) -> None:
        if model.training:  # a skeleton is put in eval mode when built; walking the tree again costs an install
            model.eval()
        self.model = model
        self.encoder = PeftMethod.encoder(model)
        self.temporal_is_base = temporal_is_base
        self._blank: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x, hidden)

    def hidden_channel_features(self) -> torch.Tensor:
        """The encoder's features of a fully hidden channel, computed once: the weights never change here."""
        if self._blank is None:  # a race only computes the same constant twice
            with torch.inference_mode():
                self._blank = self.encoder.hidden_channel_features()
        return self._blank

    def eval(self) -> FrozenModel:
        return self

    def get_base_model(self) -> nn.Module:
        return self.encoder


def load_torch_version(
    resident: ResidentBase,
    source: str | Path | SavedDetector,
    *,
    asset_id: str,
    version: str,
    release: int = 0,
    note: str = "",
    pool: SkeletonPool | None = None,
) -> ServingModel:
    """Build the serving model of a saved detector (a folder, or one read from a bundle) on the resident base."""
    saved = as_saved(source)
    check_base(saved, resident.name, resident.sha256)
    det = AnomalyDetector.from_state(saved.state, saved.source)
    skeleton = pool.take(det.peft_config_, det.n_channels_) if pool is not None else None
    loaded = build_torch_model(resident, saved, det.peft_config_, det.n_channels_, skeleton)
    if pool is not None:
        pool.want(det.peft_config_, det.n_channels_)
    det.model_ = FrozenModel(loaded.model, temporal_is_base=loaded.temporal_is_base)
    det.method_ = get_method(det.peft_config_.method)
    return ServingModel(
        asset_id=asset_id,
        version=version,
        release=release,
        method=det.peft_config_.method,
        engine="torch",
        detector=det,
        private_bytes=loaded.private_bytes + MODEL_OVERHEAD_BYTES,
        note=note,
    )


def smoke_forecast(resident: ResidentBase, served: ServingModel) -> torch.Tensor:
    """(1, L, C) forecast of a served model on :meth:`ResidentBase.smoke_input`: what an install's smoke test checks.

    A torch model whose temporal half is the resident base's (:func:`temporal_is_base`) starts from the base's
    cached features of that input and runs only its own half (channel blocks, head): the same numbers as the
    full forward pass, for a third of its cost. Any other model (ONNX, temporal adapters, full fine-tuning)
    runs the full forward pass.
    """
    model = served.detector.model_
    channels = served.n_channels
    if isinstance(model, FrozenModel) and model.temporal_is_base:
        seq, mean, std = resident.smoke_features()
        with torch.inference_mode():
            return model.encoder.mix(seq.expand(1, channels, -1, -1), mean.expand(1, channels),
                                     std.expand(1, channels))
    x, hidden = resident.smoke_input(channels)
    return model(x, hidden)
