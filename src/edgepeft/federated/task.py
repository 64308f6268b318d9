"""What one federated client does with its asset, in one module (the layout of Flower's own examples).

A client is one asset. Per round it loads the global shared tensors into a fresh adapter on the frozen base, trains
them on its own normal rows for ``local_steps`` (the explicit loop of :mod:`edgepeft.train.adapt`, or DP-SGD with
:func:`edgepeft.federated.dp.dp_adapt`), and returns the shared tensors. Its channel tags (which channel is which)
stay on the asset across rounds and are never sent: the FedSA-style split of :mod:`edgepeft.peft.shared`. At the end
each asset personalises the global adapter with a short local fine-tune and calibrates its own threshold (an
``AnomalyDetector`` with ``init_adapter``), because alarms are per asset.

Aggregation schemes (:data:`AGGREGATIONS`), all weighted by the client's number of training windows:

- ``fedavg``: the naive reference: every tensor averaged, LoRA's A and B separately (not the average of the updates);
- ``ffa``: FFA-LoRA (Sun et al., ICLR 2024): A frozen at its seeded initialisation on every client, only B trains and
  travels, so FedAvg of B is exactly the average of the updates B A; half the bytes; also the scheme that works under
  secure aggregation (the server only ever sees a sum);
- ``svd``: every client trains A and B; the server takes the exact weighted average of the products B_i A_i and
  re-factorises it at rank r (:func:`~edgepeft.federated.aggregate.aggregate_lora_svd`).

Methods without LoRA factors (BitFit, IA3, bottleneck adapters) aggregate with the plain weighted average whatever
the scheme.

Example:
    >>> import numpy as np
    >>> cfg = FederatedConfig(local_steps=2, batch_size=4)
    >>> state = initial_state(cfg)
    >>> sorted(state.wire)[0].endswith("lora_B.default.weight")
    True
    >>> series = np.sin(np.arange(600)[:, None] / (4 + np.arange(2))).astype(np.float32)
    >>> result = local_update(cfg, state, prepare_asset("a", series), server_round=1)
    >>> sorted(result.tensors) == sorted(state.wire), result.n_windows > 0
    (True, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ConfigError
from edgepeft.data.scaler import ChannelScaler
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.models.registry import load_base, state_sha256
from edgepeft.peft import PeftConfig, get_method
from edgepeft.peft.shared import is_local, load_shared, shared_state
from edgepeft.train.adapt import AdaptConfig, adapt, window_count

AGGREGATIONS = ("fedavg", "ffa", "svd")


@dataclass
class FederatedConfig:
    """How a federation trains (sent to every client in each round's instructions).

    Attributes:
        base / method / rank: the frozen base and the PEFT method, as for :class:`AnomalyDetector`.
        aggregation: ``fedavg`` (naive), ``ffa`` (A frozen, exact) or ``svd`` (exact average, re-factorised).
        rounds: federated rounds.
        local_steps: optimiser steps per client per round.
        batch_size: windows per local step (the expected batch under DP-SGD's Poisson sampling).
        lr: local learning rate; None means the method's default.
        calib_fraction: the share of an asset's rows held out for its calibration (never trained on).
        max_update_norm: a client update whose L2 distance from the global tensors exceeds this is rejected.
        dp_epsilon: with a value, every client trains with DP-SGD so that after all rounds it has spent at most
            this epsilon (record = one training window), at ``dp_delta``; None: no DP.
        dp_max_norm: DP-SGD's per-window gradient clipping norm.
        seed: seeds the adapter's initialisation (and with it FFA's frozen A) and the local sampling.

    Example:
        >>> cfg = FederatedConfig(aggregation="svd", dp_epsilon=4.0)
        >>> cfg.lora, FederatedConfig.from_record(cfg.to_record()) == cfg
        (True, True)
    """

    base: str = "tiny"
    method: str = "lora"
    rank: int = 4
    aggregation: str = "ffa"
    rounds: int = 5
    local_steps: int = 20
    batch_size: int = 32
    lr: float | None = None
    calib_fraction: float = 0.2
    max_update_norm: float = 10.0
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_max_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.rounds < 1 or self.local_steps < 1 or self.batch_size < 1 or self.rank < 1:
            raise ConfigError("rounds, local_steps, batch_size and rank must be >= 1")
        if not self.max_update_norm > 0:
            raise ConfigError(f"max_update_norm must be > 0, got {self.max_update_norm}")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise ConfigError(f"dp_epsilon must be > 0 (or None for no DP), got {self.dp_epsilon}")
        if not 0 < self.dp_delta < 1 or not self.dp_max_norm > 0:
            raise ConfigError("dp_delta must be in (0, 1) and dp_max_norm > 0")
        if not 0 < self.calib_fraction < 1:
            raise ConfigError(f"calib_fraction must be in (0, 1), got {self.calib_fraction}")

    def detector(self, **overrides: Any) -> AnomalyDetector:
        """An unfitted detector with this federation's base, method, rank and seed (its adapter has the same
        tensors as a client's, so a global adapter loads into it)."""
        return AnomalyDetector(base=self.base, method=self.method, rank=self.rank, seed=self.seed,
                               calib_fraction=self.calib_fraction, **overrides)

    def peft_config(self) -> PeftConfig:
        return self.detector().peft_config()

    def to_record(self) -> dict[str, int | float | str | bool]:
        """As flat config values (Flower's ConfigRecord holds no None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FederatedConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    @property
    def lora(self) -> bool:
        return self.method in ("lora", "dora")


@dataclass
class GlobalState:
    """The global adapter: every shared tensor, and which of them travel each round (``wire``)."""

    tensors: dict[str, np.ndarray]
    wire: list[str]
    frozen_digest: str  # sha256 of the frozen shared tensors (FFA's A): every client must hold the same

    def wire_tensors(self) -> list[np.ndarray]:
        return [self.tensors[name] for name in self.wire]

    def with_wire(self, arrays: list[np.ndarray]) -> GlobalState:
        return GlobalState({**self.tensors, **dict(zip(self.wire, arrays, strict=True))}, self.wire,
                           self.frozen_digest)


@dataclass
class Asset:
    """One client's data: its standardised normal rows, of which the first ``n_fit`` train (the rest calibrate)."""

    name: str
    scaled: np.ndarray
    n_fit: int
    values: np.ndarray = field(repr=False)


@dataclass
class LocalResult:
    tensors: dict[str, np.ndarray]
    n_windows: int
    loss: float
    seconds: float
    epsilon: float | None = None
    tags: np.ndarray | None = None


def prepare_asset(name: str, values: np.ndarray, calib_fraction: float = 0.2) -> Asset:
    """Standardise an asset's normal rows by its own scaler (as its detector will) and split off calibration."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or len(values) < 100 or not np.isfinite(values).all():
        raise ConfigError(f"asset {name}: need a finite (rows >= 100, channels) array, got shape {values.shape}")
    scaled = ChannelScaler().fit(values).transform(values)
    n_calib = max(int(round(len(values) * calib_fraction)), 1)
    return Asset(name, scaled, len(values) - n_calib, values)


def build_model(cfg: FederatedConfig, n_channels: int) -> nn.Module:
    """A fresh adapter on the frozen base, initialised exactly as the asset's detector would be."""
    base = load_base(cfg.base)
    base.set_n_channels(n_channels, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = get_method(cfg.method).attach(base, cfg.peft_config())
    if cfg.aggregation == "ffa" and cfg.lora:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return model


def _frozen_names(cfg: FederatedConfig, names: list[str]) -> list[str]:
    return [n for n in names if ".lora_A." in n] if cfg.aggregation == "ffa" and cfg.lora else []


def _digest(tensors: Mapping[str, np.ndarray], names: list[str]) -> str:
    sha = hashlib.sha256()
    for name in names:
        sha.update(name.encode())
        sha.update(np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes())
    return sha.hexdigest()


def initial_state(cfg: FederatedConfig) -> GlobalState:
    """The server's round-0 adapter: the seeded initialisation every client would make itself."""
    model = build_model(cfg, n_channels=1)
    everything = {name: p.detach().numpy().astype(np.float32, copy=True)
                  for name, p in sorted(model.named_parameters()) if not is_local(name)
                  and (p.requires_grad or ".lora_A." in name)}
    names = sorted(everything)
    frozen = _frozen_names(cfg, names)
    return GlobalState(everything, [n for n in names if n not in frozen], _digest(everything, frozen))


def base_sha256(cfg: FederatedConfig) -> str:
    return state_sha256(load_base(cfg.base))


def local_update(cfg: FederatedConfig, state: GlobalState, asset: Asset, server_round: int,
                 tags: np.ndarray | None = None) -> LocalResult:
    """One client's round: global tensors in, ``local_steps`` of training on the asset's fit rows, wire tensors out.

    ``tags`` are the asset's channel tags from its previous round (None in its first)."""
    n_channels = asset.scaled.shape[1]
    model = build_model(cfg, n_channels)
    own = dict(model.named_parameters())
    frozen = _frozen_names(cfg, sorted(state.tensors))
    mine = _digest({n: own[n].detach().numpy() for n in frozen}, frozen)
    if mine != state.frozen_digest:
        raise ConfigError("this client's frozen LoRA A differs from the server's (another base, seed or config); "
                          "FFA-LoRA's average would not be exact")
    load_shared(model, state.tensors)
    encoder = get_method(cfg.method).encoder(model)
    if tags is not None and getattr(encoder, "channel_tags", None) is not None:
        if tags.shape != tuple(encoder.channel_tags.shape):
            raise ConfigError(f"asset {asset.name}: kept channel tags {tags.shape} do not fit "
                              f"{tuple(encoder.channel_tags.shape)}")
        with torch.no_grad():
            encoder.channel_tags.copy_(torch.from_numpy(tags))
    series = asset.scaled[: asset.n_fit]
    seed = cfg.seed * 100_003 + server_round
    lr = cfg.lr if cfg.lr is not None else get_method(cfg.method).default_lr
    n_windows = window_count(len(series), encoder.window_len, encoder.patch_len)
    started = time.perf_counter()
    epsilon = None
    if cfg.dp_epsilon is None:
        # A round sees local_steps * batch_size windows: caching the features of more would cost more than it saves.
        adapt_cfg = AdaptConfig(steps=cfg.local_steps, batch_size=cfg.batch_size, seed=seed,
                                max_cached_windows=cfg.local_steps * cfg.batch_size)
        result = adapt(model, series, adapt_cfg, lr)
        loss = float(np.mean(result.losses)) if result.losses else float("nan")
    else:
        from edgepeft.federated.dp import DpSgd, dp_adapt

        dp = DpSgd.for_target(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_max_norm, cfg.batch_size, n_windows,
                              cfg.rounds * cfg.local_steps)
        loss = dp_adapt(model, series, dp, cfg.local_steps, lr, seed)
        epsilon = dp.epsilon(server_round * cfg.local_steps)
    tensors = shared_state(model)
    kept = getattr(encoder, "channel_tags", None)
    return LocalResult(
        tensors={name: tensors[name] for name in state.wire},
        n_windows=n_windows,
        loss=loss,
        seconds=time.perf_counter() - started,
        epsilon=epsilon,
        tags=None if kept is None else kept.detach().numpy().copy(),
    )


def personalise(cfg: FederatedConfig, global_path: str | None, values: np.ndarray, steps: int,
                **detector_options: Any) -> AnomalyDetector:
    """The asset's own detector from the global adapter: ``steps`` of local fine-tuning (0: the global adapter as
    is), then its own calibration and threshold on its held-out normal rows. ``global_path=None``: from the base."""
    return cfg.detector(init_adapter=global_path, steps=steps, **detector_options).fit(values)


def wire_bytes(state: GlobalState) -> int:
    """Bytes of the tensors that travel per round in one direction (float32)."""
    return int(sum(state.tensors[name].nbytes for name in state.wire))

