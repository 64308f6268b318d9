"""Quantisation-aware adaptation: train and calibrate an adapter against the int8 base it will run on.

The device's int8 graph (:func:`edgepeft.runtime.onnx.quantize_int8`, ONNX Runtime dynamic quantisation) stores
every base weight matrix as int8 (symmetric, one scale per matrix) and quantises each matrix product's input on
the fly (uint8, asymmetric, one scale per call); the LoRA products, whose matrices are graph inputs, stay float.
:func:`simulate_int8_base` makes a torch model compute the same: the frozen base weights are replaced by their
int8 round trip (they never train, so no gradient passes through the rounding), and a forward pre-hook rounds
each base Linear's input as the dynamic quantiser would, with a straight-through gradient so the adapter's
parameters upstream still learn. An adapter trained this way absorbs the quantisation error instead of meeting it
for the first time on the device, and its threshold is calibrated on the scores the device will compute.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 3)
    >>> handles = simulate_int8_base(nn.Sequential(layer))
    >>> bool(torch.allclose(layer.weight, int8_weight(layer.weight)))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "int8")


def int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight's symmetric int8 round trip, one scale per matrix (ONNX Runtime's ``QInt8`` weights)."""
    scale = weight.detach().abs().max().clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def uint8_dynamic(x: torch.Tensor) -> torch.Tensor:
    """An activation's asymmetric uint8 round trip over the whole tensor (ONNX Runtime's dynamic quantisation of a
    MatMul input), with a straight-through gradient."""
    low = torch.clamp(x.detach().min(), max=0.0)
    high = torch.clamp(x.detach().max(), min=0.0)
    scale = torch.clamp((high - low) / 255.0, min=1e-12)
    zero = torch.round(-low / scale)
    rounded = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
    return x + (rounded - x).detach()


def _quantised_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (uint8_dynamic(args[0]), *args[1:])


def simulate_int8_base(model: nn.Module) -> list[Any]:
    """Make every frozen base ``nn.Linear`` of ``model`` compute as in the int8 graph (weights rounded in place,
    inputs rounded per call). LoRA's own matrices (``lora_A`` / ``lora_B``) stay float, as on the device. Call it on
    a private copy of the base, never on a shared one. Returns the hook handles."""
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lora_" in name:
            continue
        with torch.no_grad():
            module.weight.copy_(int8_weight(module.weight))
        handles.append(module.register_forward_pre_hook(_quantised_input))
    return handles
