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

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ConfigError
from edgepeft.train.adapt import AdaptConfig, FeatureCache, blind_share, cached_windows, patch_loss
from edgepeft.train.masks import sample_hidden


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
    with warnings.catch_warnings():  # vmap falls back to a loop for CPU attention: slower, still exact
        warnings.filterwarnings("ignore", message=".*batching rule.*")
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


@dataclass(frozen=True)
class DpSgd:
    """DP-SGD's settings for one client, and its privacy spent (Opacus' RDP accountant for the sampled Gaussian
    mechanism: only its accountant, which needs no model; see the module docstring).

    The record is one training window: each step includes every window independently with probability
    ``sample_rate`` (Poisson sampling, as the accountant assumes). Rows overlap across windows, so one *row* is in up to
    ``window_len`` windows: by group privacy a row's epsilon is larger than a window's.
    """

    noise_multiplier: float
    max_norm: float
    sample_rate: float
    expected_batch: float
    delta: float

    @classmethod
    def for_target(cls, epsilon: float, delta: float, max_norm: float, batch_size: int, n_windows: int,
                   total_steps: int) -> DpSgd:
        """The smallest noise that keeps ``total_steps`` steps within ``(epsilon, delta)``."""
        from opacus.accountants.utils import get_noise_multiplier

        if n_windows < 1 or total_steps < 1:
            raise ConfigError(f"DP-SGD needs windows and steps, got {n_windows} windows and {total_steps} steps")
        rate = min(1.0, batch_size / n_windows)
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, just loose
            warnings.filterwarnings("ignore", message=".*largest alpha.*")
            sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate,
                                         steps=total_steps, accountant="rdp")
        return cls(float(sigma), max_norm, rate, rate * n_windows, delta)

    def epsilon(self, steps: int) -> float:
        """Epsilon spent after ``steps`` steps (at :attr:`delta`)."""
        from opacus.accountants import RDPAccountant

        if steps <= 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*largest alpha.*")
            return float(accountant.get_epsilon(self.delta))


class _Mixer(nn.Module):
    """The channel blocks and head of an encoder as a module of its own, for per-sample gradients on cached
    temporal features (what ``adapt`` trains on when nothing before the channel blocks trains)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, feat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return self.encoder.mix(feat, mean, std)


def dp_adapt(model: nn.Module, series: np.ndarray, dp: DpSgd, steps: int, lr: float, seed: int) -> float:
    """DP-SGD on the trainable parameters of ``model`` over the windows of ``series`` (already standardised), on the
    adaptation's scoring tasks. Every window of the series is in the population (Poisson-sampled each step); with
    nothing trainable before the channel blocks, the frozen temporal features are computed once
    (:class:`~edgepeft.train.adapt.FeatureCache`, as ``adapt`` does). Adam on the privatised gradient
    (post-processing: no privacy cost). Returns the mean loss of the sampled batches."""
    encoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    windows, pad = cached_windows(series, encoder.window_len, encoder.patch_len, 10**9)
    cache = FeatureCache.build(encoder, windows, pad) if getattr(encoder, "cacheable", False) else None
    net = _Mixer(encoder) if cache is not None else model
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    shares = AdaptConfig()
    share = blind_share(shares, pad.shape[1])
    losses = []

    def loss(out: torch.Tensor, target_windows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return patch_loss(out, target_windows, target)

    net.train()
    for _ in range(steps):
        chosen = np.flatnonzero(rng.random(len(windows)) < dp.sample_rate)
        if len(chosen) and cache is not None:
            feat, mean, std, target_windows, target = cache.batch(torch.from_numpy(chosen), rng, share)
            inputs, extras = [feat, mean, std], [target_windows, target]
        elif len(chosen):
            hidden, target = sample_hidden(pad[chosen], rng, shares.forecast_prob, shares.mask_ratio,
                                           shares.blind_prob)
            target_windows = torch.from_numpy(windows[chosen])
            inputs, extras = [target_windows, torch.from_numpy(hidden)], [target_windows, torch.from_numpy(target)]
        if len(chosen):
            per_sample = per_sample_gradients(net, lambda out, *sample: loss(out, *sample[-2:]), inputs, extras)
            with torch.no_grad():
                losses.append(float(loss(net(*inputs), *extras)))
        else:  # an empty Poisson batch still takes its (noise-only) step: skipping it would leak the draw
            per_sample = {name: torch.zeros((0, *p.shape)) for name, p in params.items()}
        noisy = clipped_noisy_sum(per_sample, dp.max_norm, dp.noise_multiplier, generator)
        optimizer.zero_grad(set_to_none=True)
        for name, param in params.items():
            param.grad = noisy[name] / dp.expected_batch
        optimizer.step()
    net.eval()
    return float(np.mean(losses)) if losses else math.nan
