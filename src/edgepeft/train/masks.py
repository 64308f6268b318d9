"""Which patches to hide during training: the self-supervised objective.

Three patterns, mixed per window, each teaching something the detector relies on:
- forecast: the last patch of every channel hidden, exactly what scoring asks (causal prediction);
- random: scattered patches hidden across channels and time, the masked-modelling objective that
  teaches the shape of normal signals;
- blind: one channel hidden entirely and the last patch of every channel hidden, so the model must
  predict that sensor's next patch from the *other* sensors' history alone: a learned virtual sensor
  (what MSET and T²+Q exploit), and still causal. A fault that breaks the relation between sensors
  shows up here even when each sensor on its own looks normal and forecastable.
Padding patches (no history) are always hidden and never scored.
"""

from __future__ import annotations

import numpy as np


def sample_hidden(
    pad: np.ndarray,
    rng: np.random.Generator,
    forecast_prob: float = 0.4,
    mask_ratio: float = 0.3,
    blind_prob: float = 0.3,
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
    blind = (choice >= forecast_prob) & (choice < forecast_prob + blind_prob) & (n_channels > 1)
    hidden[blind, :, -1] = True
    hidden[np.flatnonzero(blind), rng.integers(n_channels, size=int(blind.sum())), :] = True
    scattered = ~(forecast | blind)
    hidden[scattered] = rng.random((int(scattered.sum()), n_channels, n_patches)) < mask_ratio
    target = hidden & ~pad
    # A window whose random draw hid nothing real still gets one target: its last patch.
    empty = ~target.any(axis=(1, 2))
    hidden[empty, :, -1] = True
    target = hidden & ~pad
    return hidden | pad, target
