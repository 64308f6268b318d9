"""DP-SGD pieces: per-sample gradients of our LoRA adapter equal one backward pass per sample; clipping and noise."""

from __future__ import annotations

import numpy as np
import torch

from edgepeft.data.windows import training_windows
from edgepeft.federated.dp import clipped_noisy_sum, per_sample_gradients
from edgepeft.models.registry import load_base
from edgepeft.peft import PeftConfig, get_method
from edgepeft.train.adapt import patch_loss, target_count
from edgepeft.train.masks import sample_hidden


def _loss(out: torch.Tensor, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return patch_loss(out, x, t, target_count(t))


def test_per_sample_gradients_of_the_lora_adapter_are_exact() -> None:
    """The case Opacus gets wrong for this model (studies/federated/opacus_check.py): the encoder folds the batch
    with channels and tokens. Reference: one backward pass per sample."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    series = (np.sin(np.arange(1500)[:, None] / (5 + np.arange(3))) + 0.1 * rng.normal(size=(1500, 3))).astype(
        np.float32)
    base = load_base("tiny")
    base.set_n_channels(3)
    model = get_method("lora").attach(base, PeftConfig(method="lora", rank=4, adapt_last=1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    windows, pad = training_windows(series, 5, 64, 8, rng)
    hidden, target = sample_hidden(pad, rng, 0.4, 0.3, 0.4)
    x, h, t = torch.from_numpy(windows), torch.from_numpy(hidden), torch.from_numpy(target)
    got = per_sample_gradients(model, _loss, [x, h], [t])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(trainable) and len(got) >= 4
    for i in range(len(x)):
        model.zero_grad()
        _loss(model(x[i : i + 1], h[i : i + 1]), x[i : i + 1], h[i : i + 1], t[i : i + 1]).backward()
        for name, param in trainable.items():
            torch.testing.assert_close(got[name][i], param.grad, rtol=1e-4, atol=1e-7)


def test_clipping_bounds_each_sample_and_noise_has_the_promised_scale() -> None:
    per_sample = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.zeros(2, 1)}
    summed = clipped_noisy_sum(per_sample, max_norm=1.0, noise_multiplier=0.0)
    torch.testing.assert_close(summed["a"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]))  # the first is scaled to norm 1
    zeros = {"a": torch.zeros(4000, 5)}
    noisy = clipped_noisy_sum(zeros, max_norm=2.0, noise_multiplier=1.5, generator=torch.Generator().manual_seed(0))
    assert noisy["a"].shape == (5,)
    draws = torch.stack([clipped_noisy_sum(zeros, 2.0, 1.5, torch.Generator().manual_seed(s))["a"] for s in range(200)])
    assert abs(float(draws.std()) - 3.0) < 0.2
