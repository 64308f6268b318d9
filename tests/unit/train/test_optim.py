"""Optimizers of the edge loop: each one trains, the factored one keeps far less state, states round-trip."""

from __future__ import annotations

import copy

import pytest
import torch

from edgepeft.core.errors import ConfigError
from edgepeft.train.optim import OPTIMIZERS, FactoredAdam, default_lr, make_optimizer, state_bytes


def _fit(name: str, steps: int = 200) -> tuple[float, float, torch.optim.Optimizer]:
    """Fit a rank-2 matrix to a target from zero (like LoRA's B); return (first loss, last loss, optimizer)."""
    torch.manual_seed(0)
    target = torch.randn(32, 2) @ torch.randn(2, 16)
    weight = torch.nn.Parameter(torch.zeros(32, 16))
    optimizer = make_optimizer(name, [weight], lr=default_lr(name, 1e-2))
    losses = []
    for _ in range(steps):
        loss = ((weight - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1], optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_reduces_the_loss(name: str) -> None:
    first, last, _ = _fit(name)
    assert last < 0.2 * first


def test_factored_state_is_a_fraction_of_adamw() -> None:
    adamw, factored = _fit("adamw", 3)[2], _fit("adafactor", 3)[2]
    # AdamW: two 32x16 moments; factored: 32 + 16 numbers (plus a step counter each).
    assert state_bytes(adamw) == 2 * 32 * 16 * 4 + 4
    assert state_bytes(factored) == (32 + 16) * 4 + 4
    assert state_bytes(_fit("sgd", 3)[2]) == 32 * 16 * 4


def test_state_round_trip_continues_identically() -> None:
    weight = torch.nn.Parameter(torch.ones(4, 3))
    opt = FactoredAdam([weight], lr=0.1)
    for _ in range(3):
        weight.grad = torch.full_like(weight, 0.5)
        opt.step()
    clone = torch.nn.Parameter(weight.detach().clone())
    other = FactoredAdam([clone], lr=0.1)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared tensors
    for param, optimizer in ((weight, opt), (clone, other)):
        param.grad = torch.arange(12.0).reshape(4, 3)
        optimizer.step()
    assert torch.equal(weight, clone)


def test_bad_choices_are_refused() -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigError, match="unknown optimizer"):
        make_optimizer("lion", [weight], lr=1e-3)
    with pytest.raises(ConfigError, match="nothing to optimise"):
        make_optimizer("adamw", [], lr=1e-3)
    with pytest.raises(ConfigError, match="learning rate"):
        make_optimizer("sgd", [weight], lr=0.0)
