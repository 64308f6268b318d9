"""The streaming edge loop's training side: rolling buffer, online updates, encoder fast paths, checkpoints.

- ``RowBuffer``: the last ``capacity`` raw rows with a per-row "learnable" flag (a row judged normal and not
  followed by an alert within the quarantine), and optionally the frozen features computed while scoring.
- ``StreamEncoder``: runs a PatchEncoder for the stream. The temporal blocks are channel-independent, so a
  sensor's temporal features are the same in the forecast pass and in every blind pass that hides another
  sensor, and a fully hidden sensor's features do not depend on the data at all. Scoring therefore runs the
  temporal blocks once per patch (C sequences) and every blind prediction in one cross-channel pass
  (``PatchEncoder.blind_mix``, the batch detector's own path), and can hand the output of the frozen blocks to
  training (frozen-feature caching).
- ``OnlineTrainer``: one update = one batch of windows drawn from learnable rows (plus replay), one optimizer
  step; optional EWC; optional memory measurement of the step; its whole state is checkpointable.
- ``write_checkpoint`` / ``read_checkpoint``: one file per checkpoint, written to a temporary file, fsynced
  and renamed (``core.config.atomic_write_bytes``), carrying its own sha256, so a reader sees a complete
  checkpoint or none; the newest one that verifies wins.

Example (a buffer of 8 rows keeps the last 8):
    >>> import numpy as np
    >>> buffer = RowBuffer(capacity=8, n_channels=2)
    >>> for t in range(20):
    ...     buffer.append(np.full(2, t, np.float32), learnable=True)
    >>> buffer.count, buffer.oldest, buffer.rows(17, 20)[:, 0].tolist()
    (20, 12, [17.0, 18.0, 19.0])
    >>> scale_windows(np.ones((1, 4, 1), np.float32), np.array([[[True, False]]]), lambda v: v * 2)[0, :, 0].tolist()
    [0.0, 0.0, 2.0, 2.0]
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import ArtifactError, ConfigError
from edgepeft.models.patch_encoder import PatchEncoder
from edgepeft.train.adapt import masked_mse
from edgepeft.train.budget import StepMemory, measure_step
from edgepeft.train.continual import EWC, ContinualConfig, Reservoir
from edgepeft.train.masks import sample_hidden
from edgepeft.train.optim import make_optimizer, state_bytes

CHECKPOINT_MAGIC = b"EDGEPEFT-STREAM-CHECKPOINT-1\n"
CHECKPOINT_KEEP = 2  # the newest two: one to resume from, one in reserve
PREFIX_CHUNK_SEQUENCES = 32  # channel sequences per chunk through the frozen blocks when training
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{12})\.pt$")


@dataclass
class StreamTrainConfig:
    """How the streaming loop trains its adapter.

    Attributes:
        batch_size: windows per update (a budget plan may lower it).
        update_every: rows between online updates; None disables online updates (probation still trains).
        warmup_steps: updates in one go at the end of probation, on the probation's fit rows.
        optimizer: sgd, adamw or adafactor (factored second moments: the memory-light one).
        lr: learning rate; None means the method's default scaled for the optimizer.
        weight_decay: decoupled weight decay.
        grad_clip: gradient norm clip.
        forecast_prob / blind_prob / mask_ratio: the training patterns (see ``train.masks``).
        quarantine: rows a row must wait, with no alert after it, before it may be learned: the onset of a
            fault often scores normal until the alert, and must not be learned either.
        buffer_rows: raw rows kept for history and for drawing training windows.
        measure_every: measure the memory of every N-th update (and the first two); 0 never.
        seed: seeds window sampling, masks and initial adapter weights.
        continual: replay and EWC settings.
    """

    batch_size: int = 16
    update_every: int | None = 16
    warmup_steps: int = 100
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    forecast_prob: float = 0.4
    blind_prob: float = 0.4
    mask_ratio: float = 0.3
    quarantine: int = 32
    buffer_rows: int = 1024
    measure_every: int = 100
    seed: int = 0
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def __post_init__(self) -> None:
        if isinstance(self.continual, dict):
            self.continual = ContinualConfig(**self.continual)
        if self.batch_size < 1 or self.warmup_steps < 0 or self.quarantine < 0 or self.measure_every < 0:
            raise ConfigError("batch_size must be >= 1; warmup_steps, quarantine and measure_every >= 0")
        if self.update_every is not None and self.update_every < 1:
            raise ConfigError(f"update_every must be >= 1 row (or None to disable updates), got {self.update_every}")
        if self.buffer_rows < 64:
            raise ConfigError(f"buffer_rows must be >= 64, got {self.buffer_rows}")


# ---------------------------------------------------------------------------------------------- rolling buffer


class RowBuffer:
    """Ring buffer of the last ``capacity`` raw rows, their learnable flags and (optionally) the frozen
    features of the last ``feature_slots`` patches.

    Rows are addressed by their absolute stream index; only ``oldest <= index < count`` are held.
    """

    def __init__(self, capacity: int, n_channels: int, feature_shape: tuple[int, ...] | None = None,
                 feature_slots: int = 0) -> None:
        self.capacity = capacity
        self.values = np.zeros((capacity, n_channels), np.float32)  # (R, C) raw units
        self.flags = np.zeros(capacity, np.int8)  # 1: learnable
        self.count = 0
        self.features: np.ndarray | None = None
        self.feature_patch = np.zeros(0, np.int64)
        if feature_shape is not None and feature_slots > 0:
            # Features of the most recent ``feature_slots`` patches only: they cost far more than raw rows.
            self.features = np.zeros((feature_slots, *feature_shape), np.float32)  # (S, C, N+1, D)
            self.feature_patch = np.full(feature_slots, -1, np.int64)

    @property
    def oldest(self) -> int:
        return max(0, self.count - self.capacity)

    @property
    def nbytes(self) -> int:
        features = 0 if self.features is None else self.features.nbytes
        return int(self.values.nbytes + self.flags.nbytes + features)

    def append(self, row: np.ndarray, learnable: bool) -> None:
        slot = self.count % self.capacity
        self.values[slot] = row
        self.flags[slot] = int(learnable)
        self.count += 1

    def _slots(self, start: int, stop: int) -> np.ndarray:
        if start < self.oldest or stop > self.count:
            raise IndexError(f"rows {start}..{stop} are not in the buffer ({self.oldest}..{self.count})")
        return np.arange(start, stop) % self.capacity

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.values[self._slots(start, stop)]

    def flag_range(self, start: int, stop: int) -> np.ndarray:
        return self.flags[self._slots(start, stop)]

    def set_flags(self, start: int, stop: int, learnable: bool) -> None:
        start, stop = max(start, self.oldest), min(stop, self.count)
        if stop > start:
            self.flags[self._slots(start, stop)] = int(learnable)

    def put_features(self, patch: int, features: np.ndarray) -> None:
        if self.features is not None:
            slot = patch % len(self.feature_patch)
            self.features[slot] = features
            self.feature_patch[slot] = patch

    def has_features(self, patches: np.ndarray) -> np.ndarray:
        """Which of these patch indices have cached features (bool per patch)."""
        if self.features is None:
            return np.zeros(len(patches), bool)
        return self.feature_patch[patches % len(self.feature_patch)] == patches

    def features_of(self, patches: np.ndarray) -> np.ndarray | None:
        """Cached features of these patch indices, or None if any is missing."""
        if self.features is None:
            return None
        slots = patches % len(self.feature_patch)
        if not np.array_equal(self.feature_patch[slots], patches):
            return None
        return self.features[slots]

    def windows(self, ends: np.ndarray, window_len: int, patch_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw windows ending (exclusive) at ``ends``: (K, L, C), and their padding (K, C, N).

        Rows before the stream start are padding (whole patches, hidden), as in ``data.windows``.
        """
        rows = ends[:, None] - window_len + np.arange(window_len)[None, :]  # (K, L) absolute
        valid = rows >= 0
        raw = self.values[np.where(valid, rows, self.oldest) % self.capacity]  # (K, L, C)
        n_patches = window_len // patch_len
        pad_patch = ~valid.reshape(len(ends), n_patches, patch_len).all(axis=2)  # (K, N)
        pad = np.repeat(pad_patch[:, None, :], raw.shape[-1], axis=1)  # (K, C, N)
        return raw, pad

    def state_dict(self) -> dict[str, Any]:
        slots = np.arange(self.oldest, self.count) % self.capacity
        state: dict[str, Any] = {"values": torch.from_numpy(self.values[slots].copy()),
                                 "flags": torch.from_numpy(self.flags[slots].copy()), "count": self.count}
        if self.features is not None:
            held = np.flatnonzero(self.feature_patch >= 0)
            state["features"] = torch.from_numpy(self.features[held].copy())
            state["feature_patch"] = torch.from_numpy(self.feature_patch[held].copy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values, flags, count = state["values"].numpy(), state["flags"].numpy(), int(state["count"])
        if values.shape[1:] != self.values.shape[1:] or len(values) > self.capacity:
            raise ArtifactError(f"checkpointed buffer has shape {values.shape}; this detector holds "
                                f"{self.values.shape}")
        self.count = count
        slots = np.arange(self.oldest, count) % self.capacity
        self.values[slots], self.flags[slots] = values, flags
        if self.features is not None and "features" in state:
            patches = state["feature_patch"].numpy()
            slots = patches % len(self.feature_patch)
            self.features[slots] = state["features"].numpy()
            self.feature_patch[slots] = patches


def scale_windows(raw: np.ndarray, pad: np.ndarray, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Raw windows (K, L, C) to asset-standardised units; padding patches (K, C, N) become zeros."""
    n_windows, window_len, n_channels = raw.shape
    scaled = transform(raw.reshape(-1, n_channels)).reshape(raw.shape)
    patch_len = window_len // pad.shape[-1]
    pad_rows = np.repeat(pad.transpose(0, 2, 1), patch_len, axis=1)  # (K, L, C)
    return np.where(pad_rows, 0.0, scaled).astype(np.float32)


# ---------------------------------------------------------------------------------------------- encoder stages


@contextlib.contextmanager
def _swap_blocks(encoder: PatchEncoder, modules: list[nn.Module]) -> Iterator[None]:
    """Temporarily replace the temporal blocks (restored even if the forward pass fails)."""
    original = encoder.blocks
    encoder.blocks = nn.ModuleList(modules)
    try:
        yield
    finally:
        encoder.blocks = original


class _Capture(nn.Module):
    """Stands in for the temporal blocks to record their input sequence."""

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        self.seq = seq
        return seq


class _RecordingTemporal(nn.Module):
    """Scoring stand-in for the temporal blocks: runs them, keeping the features after ``record_after`` blocks
    (K, C, N+1, D) for the training cache."""

    def __init__(self, blocks: nn.ModuleList, n_channels: int, record_after: int | None) -> None:
        super().__init__()
        self.inner = list(blocks)  # a plain list: not registered, the real blocks stay where they are
        self.n_channels, self.record_after = n_channels, record_after
        self.recorded: torch.Tensor | None = None

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        tokens, width = seq.shape[-2:]
        shape = (-1, self.n_channels, tokens, width)
        for index, block in enumerate(self.inner):
            if index == self.record_after:
                self.recorded = seq.view(shape)
            seq = block(seq)
        if self.record_after == len(self.inner):
            self.recorded = seq.view(shape)
        return seq


class _CachedPrefix(nn.Module):
    """Training stand-in for the frozen temporal blocks: returns their output cached while scoring."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features  # (B, C, N+1, D)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.features.reshape(seq.shape)


class _ChunkedPrefix(nn.Module):
    """Training stand-in for the frozen temporal blocks: runs them (without autograd) a few sequences at a time.

    Nothing of them is stored for backward anyway; chunking bounds their temporaries (attention and MLP
    intermediates of every sequence at once were the largest tensors of a LoRA step on the last blocks).
    """

    def __init__(self, blocks: list[nn.Module], chunk: int) -> None:
        super().__init__()
        self.inner, self.chunk = blocks, chunk

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, seq.shape[0], self.chunk):
            part = seq[start : start + self.chunk]
            for block in self.inner:
                part = block(part)
            parts.append(part)
        return torch.cat(parts)


class StreamEncoder:
    """Causal patch predictions and training losses of a (PEFT-wrapped) base for the streaming loop.

    A base that is not a :class:`PatchEncoder` is run plainly: one forecast pass and one blind pass per channel.
    """

    def __init__(self, model: nn.Module, encoder: nn.Module) -> None:
        self.model = model
        self.encoder = encoder
        self.window_len, self.patch_len = encoder.window_len, encoder.patch_len
        self.n_patches = self.window_len // self.patch_len
        self.fast = isinstance(encoder, PatchEncoder)
        self._hidden: dict[int, torch.Tensor] = {}
        self._modules = list(model.modules())

    def set_training(self, training: bool) -> None:
        """Switch train/eval mode. ``Module.train()`` walks the tree through Python on every call, which cost
        more than the scoring itself when toggled per patch; the flags are set directly instead."""
        if self.model.training != training:
            for module in self._modules:
                module.training = training

    @property
    def prefix_len(self) -> int:
        """Leading temporal blocks that no update changes (their outputs can be cached)."""
        if not self.fast:
            return 0
        with torch.enable_grad():
            # The encoder's own rule for which blocks run without autograd.
            return int(self.encoder._first_trainable_block())

    def feature_shape(self, n_channels: int) -> tuple[int, int, int]:
        return (n_channels, self.n_patches + 1, int(self.encoder.cfg.d_model))

    def invalidate(self) -> None:
        """Forget derived constants after an update (adapted temporal blocks change them)."""
        self._hidden = {k: v for k, v in self._hidden.items() if k <= self.prefix_len}

    @torch.no_grad()
    def hidden_features(self, n_channels: int, upto: int) -> torch.Tensor:
        """(N+1, D) features after ``upto`` temporal blocks of a channel whose patches are all hidden."""
        if upto not in self._hidden:
            capture = _Capture()
            window = torch.zeros(1, self.window_len, n_channels)
            hidden = torch.ones(1, n_channels, self.n_patches, dtype=torch.bool)
            with _swap_blocks(self.encoder, [capture]):
                self.model(window, hidden)
            seq = capture.seq[:1]  # (1, N+1, D): every hidden channel looks the same
            for block in list(self.encoder.blocks)[:upto]:
                seq = block(seq)
            self._hidden[upto] = seq[0].clone()
        return self._hidden[upto]

    @torch.no_grad()
    def predict(
        self, windows: np.ndarray, hidden: np.ndarray, blind: bool, record: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Predictions of the hidden last patch: (K, P, C, 2) [forecast, blind], and the features after
        ``record`` temporal blocks of each forecast window (K, C, N+1, D) if asked.

        windows (K, L, C) scaled; hidden (K, C, N) with the last patch hidden.
        """
        self.set_training(False)
        n_windows, _, n_channels = windows.shape
        patch_len = self.patch_len
        x, mask = torch.from_numpy(windows), torch.from_numpy(hidden)
        out = np.zeros((n_windows, patch_len, n_channels, 2), np.float32)
        blind = blind and n_channels > 1
        if self.fast:
            # The scoring core's arithmetic (AnomalyDetector._row_errors): temporal features once, the forecast,
            # and every blind prediction in one pass (PatchEncoder.blind_mix). The stage only records features.
            stage = _RecordingTemporal(self.encoder.blocks, n_channels, record)
            with _swap_blocks(self.encoder, [stage]):
                feats, mean, std = self.encoder.temporal_features(x, mask)
            out[..., 0] = self.encoder.mix(feats, mean, std)[:, -patch_len:, :].numpy()
            if blind:
                blank = self.hidden_features(n_channels, len(self.encoder.blocks))
                out[..., 1] = self.encoder.blind_mix(feats, blank)[:, -patch_len:, :].numpy()
            else:
                out[..., 1] = out[..., 0]
            return out, None if stage.recorded is None else stage.recorded.numpy().copy()
        if blind:
            eye = torch.eye(n_channels, dtype=torch.bool)[:, :, None]  # (C, C, 1): copy c hides channel c
            blind_mask = mask.unsqueeze(1) | eye.unsqueeze(0)  # (K, C, C, N)
            x = x.unsqueeze(1).expand(-1, 1 + n_channels, -1, -1).reshape(-1, self.window_len, n_channels)
            mask = torch.cat([mask.unsqueeze(1), blind_mask], dim=1).reshape(-1, n_channels, self.n_patches)
        recon = self.model(x, mask)[:, -patch_len:, :]
        recorded = None
        if blind:
            recon = recon.reshape(n_windows, 1 + n_channels, patch_len, n_channels)
            out[..., 0] = recon[:, 0].numpy()
            index = torch.arange(n_channels)
            out[..., 1] = recon[:, 1 + index, :, index].permute(1, 2, 0).numpy()  # (K, P, C)
        else:
            out[..., 0] = recon.numpy()
            out[..., 1] = out[..., 0]
        return out, recorded

    def loss(self, windows: np.ndarray, hidden: np.ndarray, target: np.ndarray,
             features: torch.Tensor | None = None) -> torch.Tensor:
        """Masked reconstruction loss; ``features`` (B, C, N+1, D) replace the frozen temporal blocks, which
        otherwise run in chunks of sequences (see :class:`_ChunkedPrefix`)."""
        args = (self.model, torch.from_numpy(windows), torch.from_numpy(hidden), torch.from_numpy(target))
        prefix_len = self.prefix_len
        if features is None and prefix_len == 0:
            return masked_mse(*args)
        blocks = list(self.encoder.blocks)
        chunk = max(windows.shape[-1], PREFIX_CHUNK_SEQUENCES)
        prefix = _CachedPrefix(features) if features is not None else _ChunkedPrefix(blocks[:prefix_len], chunk)
        with _swap_blocks(self.encoder, [prefix, *blocks[prefix_len:]]):
            return masked_mse(*args)


# ---------------------------------------------------------------------------------------------- online trainer


@dataclass
class _Group:
    windows: np.ndarray  # (B, L, C) scaled
    pad: np.ndarray  # (B, C, N) patches with no data
    hidden: np.ndarray  # (B, C, N)
    target: np.ndarray  # (B, C, N)
    features: torch.Tensor | None = None  # (B, C, N+1, D) cached frozen features
    raw: np.ndarray | None = None  # (B, L, C) the windows in raw units (what replay keeps)


class OnlineTrainer:
    """Online adapter updates from a :class:`RowBuffer`, with optional replay, EWC and memory measurement.

    Args:
        stages: the model to train, wrapped for the stream.
        cfg: training settings.
        lr: the learning rate actually used.
        batch_size: windows per update (the plan's).
        cache_features: train the adapted blocks on cached frozen features where the buffer has them.
        n_channels: channels of the asset.
        micro_batch: windows through the model at once (gradients accumulate over the batch); None: all.
    """

    def __init__(self, stages: StreamEncoder, cfg: StreamTrainConfig, lr: float, batch_size: int,
                 cache_features: bool, n_channels: int, micro_batch: int | None = None) -> None:
        self.stages, self.cfg, self.lr, self.batch_size = stages, cfg, lr, batch_size
        self.micro_batch = batch_size if micro_batch is None else max(1, min(micro_batch, batch_size))
        self.cache_features = cache_features and stages.prefix_len > 0
        self.n_channels = n_channels
        self.named = {n: p for n, p in stages.model.named_parameters() if p.requires_grad}
        self.params = list(self.named.values())
        self.weights = [*stages.model.parameters(), *stages.model.buffers()]
        self.optimizer = make_optimizer(cfg.optimizer, self.params, lr, cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)
        self.updates = 0
        continual = cfg.continual
        self.reservoir = (Reservoir(continual.reservoir_windows, stages.window_len, n_channels, stages.n_patches)
                          if continual.uses_replay else None)
        self.ewc = EWC(continual.ewc_strength, continual.ewc_decay) if continual.uses_ewc else None
        self.last_loss: float | None = None
        self.latencies: deque[float] = deque(maxlen=100_000)  # seconds per update (not checkpointed)
        self.memory: StepMemory | None = None  # the largest measured step

    # -- sampling --------------------------------------------------------------------------------
    def eligible_ends(self, buffer: RowBuffer, upto: int, aligned: bool = False) -> np.ndarray:
        """Window ends (exclusive) whose real rows are all learnable and older than ``upto``."""
        window_len, patch_len = self.stages.window_len, self.stages.patch_len
        lo = 2 * patch_len if buffer.oldest == 0 else buffer.oldest + window_len
        hi = min(upto, buffer.count)
        if hi < lo:
            return np.zeros(0, np.int64)
        first = max(lo - window_len, 0)
        bad = np.concatenate([[0], np.cumsum(1 - buffer.flag_range(first, hi).astype(np.int64))])
        ends = np.arange(lo, hi + 1)
        starts = np.maximum(ends - window_len, 0)
        clean = bad[ends - first] - bad[starts - first] == 0
        if aligned:
            clean &= ends % patch_len == 0
        return ends[clean]

    def _patterns(self, pad: np.ndarray, cached: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hidden, target, blind channel or -1) for each window."""
        cfg = self.cfg
        if not cached:
            hidden, target = sample_hidden(pad, self.rng, cfg.forecast_prob, cfg.mask_ratio, cfg.blind_prob)
            return hidden, target, np.full(len(pad), -1)
        # Cached features exist for the forecast pattern only (and blind, derived from it).
        n_windows, n_channels, _ = pad.shape
        share = cfg.forecast_prob + cfg.blind_prob
        blind = (self.rng.random(n_windows) >= cfg.forecast_prob / share if share > 0 else
                 np.zeros(n_windows, bool)) & (n_channels > 1)
        channel = np.where(blind, self.rng.integers(n_channels, size=n_windows), -1)
        hidden = pad.copy()
        hidden[:, :, -1] = True
        rows = np.flatnonzero(blind)
        hidden[rows, channel[rows], :] = True
        return hidden, hidden & ~pad, channel

    def _recent(self, buffer: RowBuffer, upto: int, n: int,
                transform: Callable[[np.ndarray], np.ndarray]) -> _Group | None:
        stages = self.stages
        if self.cache_features:
            ends = self.eligible_ends(buffer, upto, aligned=True)
            ends = ends[buffer.has_features(ends // stages.patch_len - 1)]  # window ending at patch k+1's start
            if len(ends):
                picked = ends[self.rng.integers(len(ends), size=n)]
                features = buffer.features_of(picked // stages.patch_len - 1)
                if features is not None:
                    raw, pad = buffer.windows(picked, stages.window_len, stages.patch_len)
                    hidden, target, channel = self._patterns(pad, cached=True)
                    feats = torch.from_numpy(features.copy())
                    rows = np.flatnonzero(channel >= 0)
                    if len(rows):
                        feats[rows, channel[rows]] = stages.hidden_features(self.n_channels, stages.prefix_len)
                    return _Group(scale_windows(raw, pad, transform), pad, hidden, target, feats, raw)
        ends = self.eligible_ends(buffer, upto)
        if not len(ends):
            return None
        picked = ends[self.rng.integers(len(ends), size=n)]
        raw, pad = buffer.windows(picked, stages.window_len, stages.patch_len)
        hidden, target, _ = self._patterns(pad, cached=False)
        return _Group(scale_windows(raw, pad, transform), pad, hidden, target, None, raw)

    def _batch(self, buffer: RowBuffer, upto: int, transform: Callable[[np.ndarray], np.ndarray]) -> list[_Group]:
        n_replay = 0
        if self.reservoir is not None and self.reservoir.size:
            n_replay = min(self.batch_size - 1, int(round(self.batch_size * self.cfg.continual.replay_share)))
        recent = self._recent(buffer, upto, self.batch_size - n_replay, transform)
        if recent is None:
            return []
        groups = [recent]
        if self.reservoir is not None:
            if n_replay:
                raw, pad = self.reservoir.sample(n_replay, self.rng)
                hidden, target, _ = self._patterns(pad, cached=False)
                groups.append(_Group(scale_windows(raw, pad, transform), pad, hidden, target))
            # Offer after drawing, so a window is not replayed in the batch that first saw it. Raw rows are
            # kept: they are scaled when replayed, by the scaler of that moment.
            if recent.raw is not None:
                self.reservoir.offer(recent.raw, recent.pad, self.rng)
        return groups

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, groups: list[_Group]) -> float:
        """Forward and backward a micro-batch at a time (gradients accumulate), then one optimizer step."""
        self.stages.set_training(True)
        total = sum(len(g.windows) for g in groups)
        micro = self.micro_batch
        loss_value = 0.0
        for g in groups:
            for start in range(0, len(g.windows), micro):
                part = slice(start, start + micro)
                features = None if g.features is None else g.features[part]
                loss = self.stages.loss(g.windows[part], g.hidden[part], g.target[part], features)
                # Each window weighs the same in the update however the batch is cut into micro-batches.
                loss = loss * (len(g.windows[part]) / total)
                loss.backward()
                loss_value += float(loss.detach())
        if self.ewc is not None and self.ewc.active:
            penalty = self.ewc.penalty(self.named)
            penalty.backward()
            loss_value += float(penalty.detach())
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        # Gradients are freed at once: between updates the device holds only the optimizer state.
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def state_nbytes(self) -> int:
        """Persistent training state besides the optimizer: replay reservoir and EWC."""
        replay = self.reservoir.nbytes if self.reservoir is not None else 0
        ewc = self.ewc.nbytes if self.ewc is not None else 0
        return replay + ewc

    def update(self, buffer: RowBuffer, upto: int, transform: Callable[[np.ndarray], np.ndarray],
               extra_state_bytes: int = 0) -> float | None:
        """One online update from rows older than ``upto``; None when no window is learnable yet."""
        started = time.perf_counter()
        groups = self._batch(buffer, upto, transform)
        if not groups:
            return None
        measure = self.cfg.measure_every and (self.updates < 2 or self.updates % self.cfg.measure_every == 0)
        if measure:
            result: list[float] = []
            memory = measure_step(lambda: result.append(self._step(groups)), self.params, self.weights,
                                  lambda: state_bytes(self.optimizer), self.state_nbytes() + extra_state_bytes)
            if self.memory is None or memory.peak_bytes > self.memory.peak_bytes:
                self.memory = memory
            loss = result[0]
        else:
            loss = self._step(groups)
        self.updates += 1
        self.stages.invalidate()
        self.last_loss = loss
        self.latencies.append(time.perf_counter() - started)
        return loss

    def probe(self, batch_size: int, extra_state_bytes: int = 0, cached: bool = False) -> StepMemory:
        """Memory of one update on synthetic windows of ``batch_size`` (for planning; changes the weights).

        ``cached``: the step on cached frozen features (otherwise the full forward, which probation uses)."""
        stages, rng = self.stages, np.random.default_rng(0)
        pad = np.zeros((batch_size, self.n_channels, stages.n_patches), bool)
        windows = rng.normal(size=(batch_size, stages.window_len, self.n_channels)).astype(np.float32)
        cached = cached and self.cache_features
        hidden, target, channel = self._patterns(pad, cached=cached)
        features = None
        if cached:
            shape = stages.feature_shape(self.n_channels)
            features = torch.from_numpy(rng.normal(size=(batch_size, *shape)).astype(np.float32))
        groups = [_Group(windows, pad, hidden, target, features)]
        return measure_step(lambda: self._step(groups), self.params, self.weights,
                            lambda: state_bytes(self.optimizer), self.state_nbytes() + extra_state_bytes)

    def fisher(self, buffer: RowBuffer, upto: int, transform: Callable[[np.ndarray], np.ndarray]) -> None:
        """EWC consolidation: Fisher diagonal from a few batches of learnable windows, anchored here."""
        if self.ewc is None:
            return
        squares = {n: torch.zeros_like(p) for n, p in self.named.items()}
        n_batches = 0
        self.stages.set_training(True)
        for _ in range(self.cfg.continual.fisher_batches):
            group = self._recent(buffer, upto, self.batch_size, transform)
            if group is None:
                break
            # The batch's gradient, accumulated a micro-batch at a time (the same memory as an update).
            for start in range(0, len(group.windows), self.micro_batch):
                part = slice(start, start + self.micro_batch)
                features = None if group.features is None else group.features[part]
                loss = self.stages.loss(group.windows[part], group.hidden[part], group.target[part], features)
                (loss * (len(group.windows[part]) / len(group.windows))).backward()
            for name, param in self.named.items():
                if param.grad is not None:
                    squares[name] += param.grad.detach() ** 2
            self.optimizer.zero_grad(set_to_none=True)
            n_batches += 1
        if n_batches:
            self.ewc.consolidate(self.named, {n: s / n_batches for n, s in squares.items()})

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().clone() for n, p in self.named.items()},
            # A copy: load_state_dict keeps the tensors it is given, and the optimizer updates them in place.
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": json.dumps(self.rng.bit_generator.state),
            "updates": self.updates,
            "last_loss": self.last_loss,
            "reservoir": self.reservoir.state_dict() if self.reservoir is not None else None,
            "ewc": self.ewc.state_dict() if self.ewc is not None else None,
            "memory": self.memory.to_dict() if self.memory is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if set(params) != set(self.named):
            raise ArtifactError("checkpointed adapter names different parameters than this detector trains; "
                                "was it written with other --method/--rank settings?")
        with torch.no_grad():
            for name, value in params.items():
                if value.shape != self.named[name].shape:
                    raise ArtifactError(f"checkpointed tensor {name} has shape {tuple(value.shape)}, expected "
                                        f"{tuple(self.named[name].shape)}")
                self.named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.updates = int(state["updates"])
        self.last_loss = state["last_loss"]
        if self.reservoir is not None and state.get("reservoir") is not None:
            self.reservoir.load_state_dict(state["reservoir"])
        if self.ewc is not None and state.get("ewc") is not None:
            self.ewc.load_state_dict(state["ewc"])
        memory = state.get("memory")
        self.memory = None if memory is None else StepMemory(**{k: v for k, v in memory.items() if k != "peak_bytes"})
        self.stages.invalidate()


# ---------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_path(directory: Path, position: int) -> Path:
    return directory / f"checkpoint-{position:012d}.pt"


def write_checkpoint(directory: str | os.PathLike[str], position: int, state: dict[str, Any]) -> Path:
    """Write the checkpoint for stream ``position`` atomically; keep only the newest ``CHECKPOINT_KEEP``."""
    directory = Path(directory)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path = _checkpoint_path(directory, position)
    atomic_write_bytes(path, CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)
    for old in checkpoint_files(directory)[CHECKPOINT_KEEP:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def checkpoint_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files in ``directory``, newest (largest stream position) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if _CHECKPOINT_NAME.match(p.name)]
    return sorted(files, key=lambda p: p.name, reverse=True)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify one checkpoint file; :class:`ArtifactError` if it is not complete and intact."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read checkpoint {path} ({exc.strerror or exc})") from exc
    head = len(CHECKPOINT_MAGIC)
    if not blob.startswith(CHECKPOINT_MAGIC) or len(blob) < head + 32:
        raise ArtifactError(f"{path} is not an edgepeft stream checkpoint")
    digest, payload = blob[head : head + 32], blob[head + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"checkpoint {path} is corrupt (sha256 mismatch)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ArtifactError(f"checkpoint {path} cannot be loaded ({exc})") from exc


def latest_checkpoint(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that verifies, or None; leftovers of killed writes are removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for leftover in directory.glob(".checkpoint-*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    for path in checkpoint_files(directory):
        try:
            return path, read_checkpoint(path)
        except ArtifactError:
            continue
    return None
