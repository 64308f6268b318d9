"""The int8 simulation used by quantisation-aware adaptation: ONNX Runtime's dynamic quantisation arithmetic."""

from __future__ import annotations

import torch
from torch import nn

from edgepeft.train.quant import int8_weight, simulate_int8_base, uint8_dynamic


def test_weights_round_to_127_levels_of_one_scale() -> None:
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    rounded = int8_weight(weight)
    scale = weight.abs().max() / 127
    levels = rounded / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127 + 1e-4
    assert (rounded - weight).abs().max() <= scale / 2 + 1e-7


def test_activations_round_on_a_uint8_grid_with_a_straight_through_gradient() -> None:
    x = torch.linspace(-1.0, 3.0, 101, requires_grad=True)
    y = uint8_dynamic(x)
    step = 4.0 / 255
    assert (y - x).abs().max() <= step / 2 + 1e-6
    assert not torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the rounding passes the gradient straight through


def test_only_base_linears_are_quantised_and_lora_matrices_stay_float() -> None:
    model = nn.ModuleDict({"base": nn.Linear(4, 4), "lora_A": nn.Linear(4, 2, bias=False)})
    lora_before = model["lora_A"].weight.detach().clone()
    handles = simulate_int8_base(model)
    assert len(handles) == 1
    assert torch.equal(model["lora_A"].weight, lora_before)
    assert torch.equal(model["base"].weight, int8_weight(model["base"].weight))
