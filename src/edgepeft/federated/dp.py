"""DP-SGD on the adapter's parameters: exact per-sample gradients, clipping and Gaussian noise.

Why not Opacus' ``GradSampleModule``: our encoder folds the batch with the channel and token axes before its
Linear layers (``(B*C, N+1, D)`` in the temporal blocks, ``(B*(N+1), C, D)`` in the channel block), and Opacus
attributes a layer's gradient to "samples" along the first axis of that layer's input. On our LoRA adapter its
per-sample gradients were 93 % to 170 % off a one-sample-at-a-time reference, in both its hooks and functorch modes,
and did not even add up to the batch gradient (``studies/federated/opacus_check.py``, Opacus 1.6.0, peft 0.21; the
failure mode of Opacus issue #820, silently). ``torch.func`` differentiates each sample's whole loss instead
(``vmap(grad(loss))``), which is exact for any model that treats samples independently: 5e-7 off the same
reference. The privacy accounting (RDP / PRV for the sampled Gaussian mechanism) needs no model and can come from
Opacus' accountants.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> loss = lambda out, target: ((out - target) ** 2).sum()
    >>> grads = per_sample_gradients(model, lambda out, x, y: loss(out, y), [torch.randn(5, 3)], [torch.randn(5, 1)])
    >>> grads["weight"].shape
    torch.Size([5, 1, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from edgepeft.core.errors import ConfigError


def per_sample_gradients(model: nn.Module, loss: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                         extras: Sequence[torch.Tensor] = ()) -> dict[str, torch.Tensor]:
    """Gradient of ``loss(model(*inputs_i), *inputs_i, *extras_i)`` for every sample i (each tensor's first axis),
    for the trainable parameters: ``{name: (B, *shape)}``. Each sample goes through the model as a batch of one,
    so layers that fold the batch with other axes stay exact."""
    from torch.func import functional_call, grad, vmap

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError("the model has no trainable parameters to differentiate")
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    n_inputs = len(inputs)

    def sample_loss(params: dict[str, torch.Tensor], *sample: torch.Tensor) -> torch.Tensor:
        one = tuple(tensor[None] for tensor in sample)
        out = functional_call(model, ({**frozen, **params}, buffers), one[:n_inputs])
        return loss(out, *one)

    tensors = (*inputs, *extras)
    return vmap(grad(sample_loss), in_dims=(None, *([0] * len(tensors))))(trainable, *tensors)


def clipped_noisy_sum(per_sample: dict[str, torch.Tensor], max_norm: float, noise_multiplier: float,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient (Abadi et al. 2016): each sample's gradient (all tensors together) clipped to L2 norm
    ``max_norm``, summed, plus Gaussian noise of standard deviation ``noise_multiplier * max_norm``. Divide by the
    expected batch size for the mean."""
    if not max_norm > 0 or noise_multiplier < 0:
        raise ConfigError(f"max_norm must be > 0 and noise_multiplier >= 0, got {max_norm} and {noise_multiplier}")
    names = list(per_sample)
    flat = torch.cat([per_sample[n].reshape(per_sample[n].shape[0], -1) for n in names], dim=1)
    norms = flat.norm(dim=1, keepdim=True)
    clipped = flat * torch.clamp(max_norm / (norms + 1e-12), max=1.0)
    total = clipped.sum(0)
    if noise_multiplier > 0:
        total = total + noise_multiplier * max_norm * torch.randn(total.shape, generator=generator)
    out, start = {}, 0
    for n in names:
        size = per_sample[n][0].numel()
        out[n] = total[start : start + size].reshape(per_sample[n].shape[1:])
        start += size
    return out
