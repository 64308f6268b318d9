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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ConfigError
from edgepeft.data.windows import training_windows
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
    """

    steps: int = 150
    batch_size: int = 32
    weight_decay: float = 0.0
    forecast_prob: float = 0.4
    blind_prob: float = 0.4
    mask_ratio: float = 0.3
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ConfigError("steps must be >= 0 and batch_size >= 1")


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


def masked_mse(model: nn.Module, windows: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the target patches only. windows (B, L, C); masks (B, C, N)."""
    recon = model(windows, hidden)  # (B, L, C)
    batch, length, n_channels = windows.shape
    n_patches = hidden.shape[-1]
    err = ((recon - windows) ** 2).transpose(1, 2).reshape(batch, n_channels, n_patches, -1).mean(-1)
    weight = target.to(err.dtype)
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


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
    result = AdaptResult(steps=cfg.steps, seconds=0.0)
    if not params or cfg.steps == 0:
        return result
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, cfg.steps))
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        windows, pad = training_windows(series, cfg.batch_size, window_len, patch_len, rng)
        hidden, target = sample_hidden(pad, rng, cfg.forecast_prob, cfg.mask_ratio, cfg.blind_prob)
        loss = masked_mse(model, torch.from_numpy(windows), torch.from_numpy(hidden), torch.from_numpy(target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        if progress is not None:
            progress(step + 1, loss.item())
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
