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
    """Causal mean over the last ``window`` rows along axis 0; the first rows average over what exists.

    >>> trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist()
    [1.0, 2.0, 4.0, 6.0]
    """
    values = np.asarray(values, dtype=np.float64)
    if window <= 1:
        return values.copy()
    cumsum = np.concatenate([np.zeros((1, *values.shape[1:])), np.cumsum(values, axis=0)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    counts = (idx - lo).reshape(-1, *([1] * (values.ndim - 1)))
    return (cumsum[idx] - cumsum[lo]) / counts


def channel_evidence(errors: np.ndarray, channel_error: np.ndarray, blind_weight: float) -> np.ndarray:
    """(T, C) per-channel evidence: normalised forecast and blind errors, mixed."""
    normalised = errors / channel_error  # (T, C, 2)
    return (1 - blind_weight) * normalised[..., 0] + blind_weight * normalised[..., 1]


def combine_errors(errors: np.ndarray, channel_error: np.ndarray, blind_weight: float, smoothing: int) -> np.ndarray:
    """(T, C, 2) squared errors -> (T,) scores.

    Mean of ``log1p`` over channels: evidence from several sensors adds up, while one sensor that
    wandered far out of its training range (thermal drift) cannot outvote all the others. Chosen while
    studying SKAB, where one drifting temperature sensor caused most false alarms of a plain mean.
    """
    raw = np.log1p(channel_evidence(errors, channel_error, blind_weight)).mean(axis=1)
    return trailing_mean(raw, smoothing)
