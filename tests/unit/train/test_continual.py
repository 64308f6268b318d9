"""Replay reservoir and EWC: uniform keeping, state round trips, a penalty that pulls back to the anchor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.core.errors import ArtifactError, ConfigError
from edgepeft.train.continual import EWC, ContinualConfig, Reservoir


def test_reservoir_keeps_a_uniform_sample() -> None:
    rng = np.random.default_rng(0)
    kept = np.zeros(100)
    for _ in range(300):
        reservoir = Reservoir(capacity=10, window_len=1, n_channels=1, n_patches=1)
        windows = np.arange(100, dtype=np.float32).reshape(100, 1, 1)
        reservoir.offer(windows, np.zeros((100, 1, 1), bool), rng)
        kept[reservoir.windows[:, 0, 0].astype(int)] += 1
    # Each of the 100 windows is kept with probability 10 / 100: 30 times in 300 draws on average.
    assert kept.sum() == 3000
    assert kept[:50].sum() == pytest.approx(kept[50:].sum(), rel=0.15)


def test_reservoir_state_round_trip() -> None:
    rng = np.random.default_rng(1)
    reservoir = Reservoir(capacity=4, window_len=8, n_channels=2, n_patches=2)
    reservoir.offer(rng.normal(size=(6, 8, 2)).astype(np.float32), np.zeros((6, 2, 2), bool), rng)
    other = Reservoir(capacity=4, window_len=8, n_channels=2, n_patches=2)
    other.load_state_dict(reservoir.state_dict())
    assert other.seen == 6 and other.size == 4
    assert np.array_equal(other.windows, reservoir.windows)
    with pytest.raises(ArtifactError, match="do not fit"):
        Reservoir(capacity=2, window_len=8, n_channels=2, n_patches=2).load_state_dict(reservoir.state_dict())


def _penalty(ewc: EWC, weight: torch.nn.Parameter) -> float:
    return float(ewc.penalty({"w": weight}).detach())


def test_ewc_penalty_is_zero_at_the_anchor_and_weights_important_parameters() -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    ewc = EWC(strength=1.0, decay=0.5)
    assert not ewc.active
    ewc.consolidate({"w": weight}, {"w": torch.tensor([3.0, 1.0])})
    assert _penalty(ewc, weight) == 0.0
    with torch.no_grad():
        weight.copy_(torch.tensor([1.0, 0.0]))
    important = _penalty(ewc, weight)
    with torch.no_grad():
        weight.copy_(torch.tensor([0.0, 1.0]))
    assert important == pytest.approx(3 * _penalty(ewc, weight))
    clone = EWC(strength=1.0)
    clone.load_state_dict(ewc.state_dict())
    assert _penalty(clone, weight) == _penalty(ewc, weight)


def test_config_validation() -> None:
    assert ContinualConfig("replay").uses_replay and not ContinualConfig("replay").uses_ewc
    with pytest.raises(ConfigError, match="strategy"):
        ContinualConfig("magic")
    with pytest.raises(ConfigError):
        ContinualConfig("replay", replay_share=1.0)
