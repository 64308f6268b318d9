"""PEFT methods peft cannot apply to a custom module, written here: bottleneck adapters, prefix tuning,
BitFit; and the two baselines in the same interface, full fine-tuning and training from scratch.

peft's prompt/prefix tuning needs a transformers model config, and it has no native BitFit, so these
are small modules of our own (see FIELD-NOTES).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from edgepeft.peft.base import PeftConfig, PeftMethod, adapted_blocks, register_method


class BottleneckAdapter(nn.Module):
    """Houlsby-style adapter after a block's MLP: ``y + up(gelu(down(y)))``, ``up`` zero-initialised so the
    adapted model starts exactly at the base."""

    def __init__(self, inner: nn.Module, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.inner = inner
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + self.up(torch.nn.functional.gelu(self.down(y)))


@register_method
class Adapter(PeftMethod):
    """Bottleneck adapters after every block's MLP."""

    name: ClassVar[str] = "adapter"

    def attach(self, base: nn.Module, cfg: PeftConfig) -> nn.Module:
        self.freeze_all(base)
        width = base.cfg.d_model
        for _, block in adapted_blocks(base, cfg):
            block.mlp = BottleneckAdapter(block.mlp, width, cfg.bottleneck)
        self.enable_channel_tags(base)
        return base


@register_method
class Prefix(PeftMethod):
    """Prefix tuning: ``n_prefix`` learned key/value vectors prepended in every attention layer."""

    name: ClassVar[str] = "prefix"
    default_lr: ClassVar[float] = 1e-2

    def attach(self, base: nn.Module, cfg: PeftConfig) -> nn.Module:
        self.freeze_all(base)
        width = base.cfg.d_model
        gen = torch.Generator().manual_seed(0)
        for _, block in adapted_blocks(base, cfg):
            # Small random prefixes: zeros would give every prefix slot identical attention weights.
            block.attn.prefix_k = nn.Parameter(0.02 * torch.randn(cfg.n_prefix, width, generator=gen))
            block.attn.prefix_v = nn.Parameter(torch.zeros(cfg.n_prefix, width))
        self.enable_channel_tags(base)
        return base


@register_method
class BitFit(PeftMethod):
    """BitFit: train only the biases (and LayerNorm shifts) of the base."""

    name: ClassVar[str] = "bitfit"
    default_lr: ClassVar[float] = 3e-3

    def attach(self, base: nn.Module, cfg: PeftConfig) -> nn.Module:
        self.freeze_all(base)
        blocks = adapted_blocks(base, cfg) if cfg.adapt_last is not None else [("", base)]
        for _, module in blocks:
            for name, param in module.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(True)
        self.enable_channel_tags(base)
        return base


@register_method
class Full(PeftMethod):
    """Baseline: fine-tune every weight of the pretrained base (the delta is the whole model)."""

    name: ClassVar[str] = "full"
    default_lr: ClassVar[float] = 3e-4
    trains_base: ClassVar[bool] = True

    def attach(self, base: nn.Module, cfg: PeftConfig) -> nn.Module:
        for param in base.parameters():
            param.requires_grad_(True)
        return base


@register_method
class Scratch(Full):
    """Baseline: same architecture, random initial weights, everything trained on the asset alone."""

    name: ClassVar[str] = "scratch"
    default_lr: ClassVar[float] = 1e-3

    def attach(self, base: nn.Module, cfg: PeftConfig) -> nn.Module:
        base.reset_parameters()
        return super().attach(base, cfg)
