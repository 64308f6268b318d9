"""Cutting series into model windows.

Two cuts, both patch-aligned so that left padding always fills whole patches, which the model then
sees as hidden ("no history"), never as fake values:
- ``scoring_windows``: one window per patch of the series, its last patch hidden. The prediction for
  rows ``s..s+P-1`` uses only rows before ``s``, so the error at row t depends on rows <= t (causal).
- ``training_windows``: random windows for adaptation, including some that start before the series so
  that short-history windows (the first rows of a file) are seen in training too.

Example:
    >>> import numpy as np
    >>> windows, hidden = scoring_windows(np.zeros((20, 2), np.float32), window_len=16, patch_len=4)
    >>> windows.shape, hidden.shape
    ((5, 16, 2), (5, 2, 4))
"""

from __future__ import annotations

import numpy as np


def gather_windows(
    values: np.ndarray, starts: np.ndarray, window_len: int, patch_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Windows starting at ``starts`` (may be negative or run past the end), plus the padding mask per patch."""
    n_rows, n_channels = values.shape
    rows = starts[:, None] + np.arange(window_len)[None, :]  # (K, L)
    valid = (rows >= 0) & (rows < n_rows)
    windows = values[np.clip(rows, 0, n_rows - 1)]  # (K, L, C)
    windows = np.where(valid[..., None], windows, 0.0).astype(np.float32)
    n_patches = window_len // patch_len
    pad_patch = ~valid.reshape(len(starts), n_patches, patch_len).all(axis=2)  # (K, N) any padding
    hidden = np.repeat(pad_patch[:, None, :], n_channels, axis=1)  # (K, C, N)
    return windows, hidden


def scoring_windows(values: np.ndarray, window_len: int, patch_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One window per target patch; returns windows (K, L, C) and hidden (K, C, N) with the last patch hidden.

    Target patch k covers rows ``k*P .. k*P+P-1`` (the last one may run past the end of the series).
    """
    n_rows = values.shape[0]
    n_targets = -(-n_rows // patch_len)
    starts = np.arange(n_targets) * patch_len + patch_len - window_len
    windows, hidden = gather_windows(values, starts, window_len, patch_len)
    hidden[:, :, -1] = True
    return windows, hidden


def training_windows(
    values: np.ndarray, n_windows: int, window_len: int, patch_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_windows`` random windows (K, L, C) and their padding mask (K, C, N).

    Starts range from ``2P - L`` (only two real patches) to ``T - L``; most windows are full because
    most start positions are.
    """
    n_rows = values.shape[0]
    low = 2 * patch_len - window_len
    high = max(n_rows - window_len, low)
    starts = rng.integers(low, high + 1, size=n_windows)
    return gather_windows(values, starts, window_len, patch_len)
