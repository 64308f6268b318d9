"""Which patches to hide during training: the self-supervised objective.

Three patterns, mixed per window, each teaching something the detector relies on:
- forecast: the last patch of every channel hidden, exactly what scoring asks (causal prediction);
- random: scattered patches hidden across channels and time, the masked-modelling objective that
  teaches the shape of normal signals;
- channel-out: the last patches of one channel hidden while the others stay visible, so the
  cross-channel block learns to predict a sensor from its neighbours (what MSET and T²+Q exploit).
Padding patches (no history) are always hidden and never scored.
"""

from __future__ import annotations

import numpy as np


def sample_hidden(
    pad: np.ndarray, rng: np.random.Generator, forecast_prob: float = 0.5, mask_ratio: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Return (hidden, target) masks, both (K, C, N) bool: what the model cannot see, and where the loss is.

    Example:
        >>> pad = np.zeros((3, 2, 4), bool)
        >>> hidden, target = sample_hidden(pad, np.random.default_rng(0))
        >>> bool(target.any(axis=(1, 2)).all())
        True
    """
    n_windows, n_channels, n_patches = pad.shape
    choice = rng.random(n_windows)
    hidden = np.zeros_like(pad)
    forecast = choice < forecast_prob
    hidden[forecast, :, -1] = True
    channel_out = (choice >= forecast_prob) & (choice < forecast_prob + (1 - forecast_prob) / 3) & (n_channels > 1)
    for k in np.flatnonzero(channel_out):
        channel = rng.integers(n_channels)
        span = rng.integers(1, max(2, n_patches // 2))
        hidden[k, channel, n_patches - span :] = True
    scattered = ~(forecast | channel_out)
    hidden[scattered] = rng.random((int(scattered.sum()), n_channels, n_patches)) < mask_ratio
    target = hidden & ~pad
    # A window whose random draw hid nothing real still gets one target: its last patch.
    empty = ~target.any(axis=(1, 2))
    hidden[empty, :, -1] = True
    target = hidden & ~pad
    return hidden | pad, target
