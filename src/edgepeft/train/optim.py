"""Optimizers for on-device training, selectable by name, with their state measured in bytes.

- ``sgd``: SGD with momentum 0.9; one state tensor per parameter (momentum).
- ``adamw``: AdamW; two state tensors per parameter (first and second moments).
- ``adafactor``: the memory-light choice. Adafactor's factored second moments (Shazeer & Stern, 2018): a
  matrix of shape (rows, cols) keeps one running mean of squared gradients per row and one per column
  instead of one per entry, and there is no first moment; updates are RMS-clipped. Unlike
  ``torch.optim.Adafactor`` the learning rate is absolute (Adam-like), not relative to each parameter's
  RMS: a relative step multiplies by the parameter's own size, which stalls LoRA's zero-initialised B
  matrices for hundreds of steps.

For a rank-8 LoRA matrix on a 64-wide layer, AdamW keeps 2 x 512 numbers and the factored optimizer 64 + 8
(plus a step counter each).

Example:
    >>> import torch
    >>> weight = torch.nn.Parameter(torch.ones(64, 8))
    >>> optimizers = {name: make_optimizer(name, [weight], lr=1e-3) for name in OPTIMIZERS}
    >>> for optimizer in optimizers.values():
    ...     weight.grad = torch.ones_like(weight)
    ...     optimizer.step()
    >>> {name: state_bytes(optimizer) for name, optimizer in optimizers.items()}
    {'sgd': 2048, 'adamw': 4100, 'adafactor': 292}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from edgepeft.core.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw", "adafactor")

# Multiplies a method's default (AdamW-tuned) learning rate: plain SGD steps are not normalised by the
# gradient's scale, and adapter gradients are small, so SGD needs a larger rate to move at all.
LR_SCALE = {"sgd": 10.0, "adamw": 1.0, "adafactor": 1.0}


class FactoredAdam(torch.optim.Optimizer):
    """Adam without a first moment and with factored second moments for matrices (Adafactor's memory trick).

    Args:
        params: parameters to optimise.
        lr: absolute learning rate (the same scale as AdamW's).
        beta2: decay of the running mean of squared gradients.
        eps: added to the second-moment estimate before the square root.
        clip: updates whose RMS exceeds ``clip`` are scaled down to it (Adafactor's update clipping), which
            keeps the first steps stable without a first moment or warm-up.
        weight_decay: decoupled weight decay, as in AdamW.

    >>> p = torch.nn.Parameter(torch.zeros(3, 2))
    >>> opt = FactoredAdam([p], lr=0.1)
    >>> p.grad = torch.ones(3, 2)
    >>> opt.step()
    >>> [round(v, 6) for v in p.detach().flatten().tolist()]  # a first step moves every entry by lr
    [-0.1, -0.1, -0.1, -0.1, -0.1, -0.1]
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        beta2: float = 0.999,
        eps: float = 1e-16,
        clip: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or not 0.0 < beta2 < 1.0 or clip <= 0 or weight_decay < 0:
            raise ConfigError("FactoredAdam needs lr > 0, 0 < beta2 < 1, clip > 0 and weight_decay >= 0")
        super().__init__(params, {"lr": lr, "beta2": beta2, "eps": eps, "clip": clip, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401 - the torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta2, eps = group["lr"], group["beta2"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    if grad.dim() >= 2:
                        # A matrix (rows, cols) and anything wider folded into rows: one mean per row and column.
                        state["row"] = torch.zeros(grad.shape[:-1], dtype=grad.dtype)
                        state["col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], dtype=grad.dtype)
                    else:
                        state["var"] = torch.zeros_like(grad)
                state["step"] += 1
                step = float(state["step"])
                squared = grad * grad + eps
                if "row" in state:
                    state["row"].mul_(beta2).add_(squared.mean(dim=-1), alpha=1 - beta2)
                    state["col"].mul_(beta2).add_(squared.mean(dim=-2), alpha=1 - beta2)
                    row, col = state["row"], state["col"]
                    # Rank-1 reconstruction: V[i, j] ~ row[i] * col[j] / mean(row) (Adafactor, eq. 4).
                    var = row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(dim=-1, keepdim=True).unsqueeze(-1)
                else:
                    state["var"].mul_(beta2).add_(squared, alpha=1 - beta2)
                    var = state["var"]
                var = var / (1 - beta2**step)  # bias correction, as in Adam
                update = grad / var.sqrt()
                rms = update.pow(2).mean().sqrt()
                update = update / torch.clamp(rms / group["clip"], min=1.0)
                if group["weight_decay"]:
                    param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr)
        return loss


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """A fresh optimizer ``name`` (sgd, adamw, adafactor) over ``params``; ``lr`` is used as given."""
    params = list(params)
    if not params:
        raise ConfigError("nothing to optimise: the model has no trainable parameters")
    if lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return FactoredAdam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def default_lr(name: str, method_lr: float) -> float:
    """The learning rate for optimizer ``name`` given a PEFT method's AdamW-tuned default.

    >>> default_lr("sgd", 3e-3)
    0.03
    """
    if name not in LR_SCALE:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return method_lr * LR_SCALE[name]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps (its state, not the parameters)."""
    return sum(
        value.numel() * value.element_size()
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if torch.is_tensor(value)
    )
