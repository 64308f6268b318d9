"""Shared fixtures: tiny seeded models and synthetic series keep the suite fast."""

from __future__ import annotations

import os
from pathlib import Path

# One thread: small models gain little from more, and on a shared machine OpenMP spinning makes more
# threads far slower (see cli._limit_threads). Subprocesses started by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from edgepeft.models.patch_encoder import PatchEncoder, PatchEncoderConfig

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
TINY_CFG = PatchEncoderConfig(
    window_len=32, patch_len=8, d_model=32, n_heads=2, n_layers=1, n_channel_layers=1, d_ff=64
)


def make_tiny_base(seed: int = 0) -> PatchEncoder:
    torch.manual_seed(seed)
    return PatchEncoder(TINY_CFG)


def sine_series(n_rows: int = 600, n_channels: int = 3, seed: int = 0) -> np.ndarray:
    """Coupled sines with noise: channel k is a phase-shifted, scaled copy of a shared driver."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_rows)
    driver = np.sin(2 * np.pi * t / 25) + 0.5 * np.sin(2 * np.pi * t / 7)
    cols = [(k + 1) * np.roll(driver, 2 * k) + 0.05 * rng.normal(size=n_rows) for k in range(n_channels)]
    return np.stack(cols, axis=1).astype(np.float32)


@pytest.fixture
def tiny_base() -> PatchEncoder:
    return make_tiny_base()
