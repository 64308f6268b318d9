"""Per-asset adaptation: an explicit loop that trains a method's parameters on the asset's normal data.

Example:
    >>> import numpy as np
    >>> from edgepeft.models.patch_encoder import PatchEncoder, PatchEncoderConfig
    >>> from edgepeft.peft import PeftConfig, get_method
    >>> base = PatchEncoder(PatchEncoderConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32))
    >>> base.set_n_channels(2)
    >>> model = get_method("lora").attach(base, PeftConfig(rank=2))
    >>> series = np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32)
    >>> result = adapt(model, series, AdaptConfig(steps=3, batch_size=4), lr=1e-3)
    >>> result.steps
    3
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ConfigError
from edgepeft.data.windows import gather_windows, training_windows
from edgepeft.train.masks import sample_hidden


@dataclass
class AdaptConfig:
    """How an adapter is trained.

    Attributes:
        steps: optimiser steps.
        batch_size: windows per step.
        weight_decay: AdamW weight decay on the trained parameters.
        forecast_prob: share of windows trained on the forecast pattern (a scoring task).
        blind_prob: share trained on the blind pattern: one sensor predicted from the others (a scoring task).
        mask_ratio: share of patches hidden in the scattered pattern (the rest of the windows).
        grad_clip: gradient norm clip (stability on tiny data sets).
        seed: seeds window sampling, masks and any random init.
        cache_features: when nothing before the channel blocks trains (e.g. ``adapt_last=1``), compute
            the frozen temporal features of every training window once and train on the channel
            blocks only (forecast and blind patterns, exactly the two the detector scores with).
        max_cached_windows: at most this many windows are cached (evenly spaced over the series).
        micro_batch: windows per forward/backward pass. A step still uses the whole batch: its gradient is
            accumulated over passes of at most this many windows (the same gradient, up to float rounding),
            so the activations held for backward are those of one micro-batch. None: the whole batch in one
            pass. Trades a little speed for memory, and most for PEFT, whose training memory is almost all
            activations (full fine-tuning also holds gradients and optimizer state for every weight).
    """

    steps: int = 150
    batch_size: int = 32
    weight_decay: float = 0.0
    forecast_prob: float = 0.4
    blind_prob: float = 0.4
    mask_ratio: float = 0.3
    grad_clip: float = 1.0
    seed: int = 0
    cache_features: bool = True
    max_cached_windows: int = 2048
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ConfigError("steps must be >= 0 and batch_size >= 1")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1 (or None for the whole batch), got {self.micro_batch}")

    def chunks(self) -> list[slice]:
        """The windows of a batch, one slice per forward/backward pass."""
        size = self.batch_size if self.micro_batch is None else min(self.micro_batch, self.batch_size)
        return [slice(start, start + size) for start in range(0, self.batch_size, size)]


@dataclass
class AdaptResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def warmup_cosine(step: int, total: int, warmup_share: float = 0.1, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over the first 10 % of steps, then cosine decay to ``floor``.

    Written out rather than OneCycleLR, which divides by zero when the warm-up rounds to one step.

    >>> [round(warmup_cosine(s, 10), 2) for s in (0, 1, 9)]
    [1.0, 1.0, 0.08]
    """
    warmup = max(1, int(total * warmup_share))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def patch_loss(
    recon: torch.Tensor, windows: torch.Tensor, target: torch.Tensor, denominator: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over the target patches only. recon, windows (B, L, C); target (B, C, N).

    ``denominator`` is the target count of the whole batch when this is one micro-batch of it (see
    :func:`target_count`): the micro-batch losses then add up to the batch's loss, and so do their gradients.
    """
    batch, _, n_channels = windows.shape
    err = ((recon - windows) ** 2).transpose(1, 2).reshape(batch, n_channels, target.shape[-1], -1).mean(-1)
    weight = target.to(err.dtype)
    return (err * weight).sum() / (target_count(target) if denominator is None else denominator)


def target_count(target: torch.Tensor) -> torch.Tensor:
    """How many patches a batch's loss averages over (at least one)."""
    return target.to(torch.float32).sum().clamp(min=1.0)


def masked_mse(model: nn.Module, windows: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The model's reconstruction error on the target patches, with ``hidden`` patches hidden from it."""
    return patch_loss(model(windows, hidden), windows, target)


def adapt(
    model: nn.Module,
    series: np.ndarray,
    cfg: AdaptConfig,
    lr: float,
    progress: Callable[[int, float], None] | None = None,
) -> AdaptResult:
    """Train the trainable parameters of ``model`` on ``series`` (T, C), already asset-standardised."""
    params = [p for p in model.parameters() if p.requires_grad]
    encoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    window_len, patch_len = encoder.window_len, encoder.patch_len
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    if not params or cfg.steps == 0:
        return AdaptResult(steps=cfg.steps, seconds=0.0)
    if cfg.cache_features and getattr(encoder, "cacheable", False):
        return _adapt_cached(model, encoder, params, series, cfg, lr, rng, progress)

    def step_losses() -> Iterator[torch.Tensor]:
        windows, pad = training_windows(series, cfg.batch_size, window_len, patch_len, rng)
        hidden, target = sample_hidden(pad, rng, cfg.forecast_prob, cfg.mask_ratio, cfg.blind_prob)
        x, h, t = torch.from_numpy(windows), torch.from_numpy(hidden), torch.from_numpy(target)
        total = target_count(t)
        for part in cfg.chunks():
            yield patch_loss(model(x[part], h[part]), x[part], t[part], total)

    return _optimise(model, params, cfg, lr, step_losses, progress)


def _optimise(
    model: nn.Module,
    params: list[nn.Parameter],
    cfg: AdaptConfig,
    lr: float,
    step_losses: Callable[[], Iterator[torch.Tensor]],
    progress: Callable[[int, float], None] | None,
) -> AdaptResult:
    """The one optimisation loop: AdamW, warm-up + cosine, gradient clipping, one batch per step.

    ``step_losses()`` samples a step's batch and yields its loss one micro-batch at a time (parts that add up
    to the batch loss); each part is back-propagated before the next is computed, so only one micro-batch's
    activations are alive at once.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, cfg.steps))
    result = AdaptResult(steps=cfg.steps, seconds=0.0)
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part in step_losses():
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        result.losses.append(loss)
        if progress is not None:
            progress(step + 1, loss)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def window_count(n_rows: int, window_len: int, patch_len: int) -> int:
    """How many training windows a series of ``n_rows`` holds: one per start from ``2P - L`` to ``T - L``.

    >>> window_count(200, 64, 8)
    185
    """
    low = 2 * patch_len - window_len
    return max(n_rows - window_len, low) - low + 1


def cached_windows(
    series: np.ndarray, window_len: int, patch_len: int, max_windows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Windows at every start from ``2P - L`` to ``T - L`` (at most ``max_windows``, evenly spaced) and their pads."""
    low = 2 * patch_len - window_len
    starts = np.arange(low, low + window_count(series.shape[0], window_len, patch_len))
    if len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
    return gather_windows(series, starts, window_len, patch_len)


@dataclass
class FeatureCache:
    """The frozen temporal features of a set of windows, computed once (TinyTL-style feature caching).

    The temporal blocks are frozen and channel-independent, so under the forecast mask their output per window is
    fixed, and a blind (fully hidden) channel's output is one constant vector (``blank``): a training batch is then
    the channel blocks and head alone on cached rows (:meth:`batch`).
    """

    feats: torch.Tensor  # (W, C, N+1, D)
    mean: torch.Tensor
    std: torch.Tensor
    windows: torch.Tensor  # (W, L, C): the targets
    pad: torch.Tensor  # (W, C, N)
    blank: torch.Tensor  # (N+1, D)

    @classmethod
    def build(cls, encoder: nn.Module, windows: np.ndarray, pad: np.ndarray) -> FeatureCache:
        hidden = pad.copy()
        hidden[:, :, -1] = True
        with torch.no_grad():
            parts = [encoder.temporal_features(torch.from_numpy(windows[start : start + 256]),
                                               torch.from_numpy(hidden[start : start + 256]))
                     for start in range(0, len(windows), 256)]
            blank = encoder.hidden_channel_features()
        feats, means, stds = (torch.cat([part[i] for part in parts]) for i in range(3))
        return cls(feats, means, stds, torch.from_numpy(windows), torch.from_numpy(pad), blank)

    def __len__(self) -> int:
        return len(self.feats)

    def batch(self, index: torch.Tensor, rng: np.random.Generator, blind_share: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, means, stds, targets and target patches of windows ``index``: the last patch forecast, and
        for a ``blind_share`` of them one random channel hidden entirely (its blind prediction)."""
        size, n_channels, n_patches = len(index), self.pad.shape[1], self.pad.shape[2]
        feat, mean, std = self.feats[index].clone(), self.mean[index].clone(), self.std[index].clone()
        target = torch.zeros(size, n_channels, n_patches, dtype=torch.bool)
        target[:, :, -1] = True
        blind_rows = torch.from_numpy(np.flatnonzero(rng.random(size) < blind_share))
        blind_channels = torch.from_numpy(rng.integers(0, n_channels, size=len(blind_rows)))
        if len(blind_rows):
            feat[blind_rows, blind_channels] = self.blank
            mean[blind_rows, blind_channels] = 0.0
            std[blind_rows, blind_channels] = 1.0
            target[blind_rows, blind_channels] = True
        target &= ~self.pad[index]
        return feat, mean, std, self.windows[index], target


def blind_share(cfg: AdaptConfig, n_channels: int) -> float:
    """The share of cached training windows that train a blind prediction (none with a single channel)."""
    return cfg.blind_prob / max(cfg.blind_prob + cfg.forecast_prob, 1e-9) if n_channels > 1 else 0.0


def _adapt_cached(
    model: nn.Module,
    encoder: nn.Module,
    params: list[nn.Parameter],
    series: np.ndarray,
    cfg: AdaptConfig,
    lr: float,
    rng: np.random.Generator,
    progress: Callable[[int, float], None] | None,
) -> AdaptResult:
    """Train only the channel blocks on cached frozen temporal features (:class:`FeatureCache`)."""
    cache = FeatureCache.build(encoder, *cached_windows(series, encoder.window_len, encoder.patch_len,
                                                       cfg.max_cached_windows))
    share = blind_share(cfg, cache.pad.shape[1])

    def step_losses() -> Iterator[torch.Tensor]:
        index = torch.from_numpy(rng.integers(0, len(cache), size=cfg.batch_size))
        feat, mean, std, windows, target = cache.batch(index, rng, share)
        total = target_count(target)
        for part in cfg.chunks():
            yield patch_loss(encoder.mix(feat[part], mean[part], std[part]), windows[part], target[part], total)

    return _optimise(model, params, cfg, lr, step_losses, progress)
