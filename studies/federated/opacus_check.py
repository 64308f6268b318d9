"""Does Opacus compute correct per-sample gradients for our LoRA adapter? (Opacus issue #820 reports silently
corrupted LoRA updates with recent peft.) Compares Opacus' per-sample gradients, in its "hooks" and "functorch"
modes, with a hand-computed reference: one backward pass per sample.

python studies/federated/opacus_check.py
"""
import warnings

import numpy as np
import torch

from edgepeft.data.windows import training_windows
from edgepeft.models.registry import load_base
from edgepeft.peft import PeftConfig, get_method
from edgepeft.train.adapt import patch_loss, target_count
from edgepeft.train.masks import sample_hidden

torch.manual_seed(0)
torch.set_num_threads(1)
rng = np.random.default_rng(0)
series = np.sin(np.arange(2000)[:, None] / (5 + np.arange(3))) + 0.1 * rng.normal(size=(2000, 3))
base = load_base("tiny")
base.set_n_channels(3)
model = get_method("lora").attach(base, PeftConfig(method="lora", rank=4, adapt_last=1))
with torch.no_grad():  # a LoRA update that is not zero, so that every factor gets a gradient
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(0.0, 0.05)
batch = 6
windows, pad = training_windows(series.astype(np.float32), batch, 64, 8, rng)
hidden, target = sample_hidden(pad, rng, 0.4, 0.3, 0.4)
x, h, t = torch.from_numpy(windows), torch.from_numpy(hidden), torch.from_numpy(target)
trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
print("trainable tensors:", len(trainable), sum(p.numel() for p in trainable.values()), "values")


def per_sample_reference() -> dict[str, torch.Tensor]:
    out = {n: torch.zeros((batch, *p.shape)) for n, p in trainable.items()}
    for i in range(batch):
        model.zero_grad()
        loss = patch_loss(model(x[i : i + 1], h[i : i + 1]), x[i : i + 1], t[i : i + 1], target_count(t[i : i + 1]))
        loss.backward()
        for n, p in trainable.items():
            out[n][i] = p.grad.detach().clone()
    return out


reference = per_sample_reference()
for mode in ("hooks", "functorch"):
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False,
                                       force_functorch=mode == "functorch")
        except Exception as exc:  # noqa: BLE001 - report what Opacus says
            print(mode, "refused:", type(exc).__name__, str(exc).splitlines()[0][:160])
            continue
        model.zero_grad()
        try:
            out = wrapped(x, h)  # one forward pass of the whole batch
            losses = torch.stack([patch_loss(out[i : i + 1], x[i : i + 1], t[i : i + 1], target_count(t[i : i + 1]))
                                  for i in range(batch)])
            losses.sum().backward()
        except Exception as exc:  # noqa: BLE001
            print(mode, "failed:", type(exc).__name__, str(exc).splitlines()[0][:160])
            wrapped._close()
            continue
    worst = 0.0
    for n, p in trainable.items():
        got = getattr(p, "grad_sample", None)
        if got is None:
            print(mode, n, "no grad_sample")
            worst = float("inf")
            continue
        if got.shape != reference[n].shape:
            print(mode, n, "grad_sample shape", tuple(got.shape), "expected", tuple(reference[n].shape))
            worst = float("inf")
            continue
        rel = float((got - reference[n]).norm() / reference[n].norm().clamp(min=1e-12))
        summed = float((got.sum(0) - reference[n].sum(0)).norm() / reference[n].sum(0).norm().clamp(min=1e-12))
        print(f"  {mode} {n.split('model.')[-1]}: per-sample relative error {rel:.2e} (their sum: {summed:.2e})")
        worst = max(worst, rel)
    print(f"{mode}: worst relative error of per-sample gradients {worst:.2e}")
    wrapped._close()
    for p in trainable.values():
        p.grad_sample = None

# Which side is wrong? The per-sample gradients must add up to the batch gradient.
model.zero_grad()
total = sum(patch_loss(model(x[i : i + 1], h[i : i + 1]), x[i : i + 1], t[i : i + 1], target_count(t[i : i + 1]))
            for i in range(batch))
total.backward()
for n, p in trainable.items():
    print("reference sums to the batch gradient:", n.split("model.")[-1],
          f"{float((reference[n].sum(0) - p.grad).norm() / p.grad.norm()):.1e}")
    break

# The exact alternative: per-sample gradients of the whole model's loss with torch.func (vmap over the batch).
from torch.func import functional_call, grad, vmap  # noqa: E402

frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
buffers = dict(model.named_buffers())


def sample_loss(params: dict[str, torch.Tensor], xi: torch.Tensor, hi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
    out = functional_call(model, ({**frozen, **params}, buffers), (xi[None], hi[None]))
    return patch_loss(out, xi[None], ti[None], target_count(ti[None]))


try:
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))({n: p.detach() for n, p in trainable.items()}, x, h, t)
    worst = max(float((per_sample[n] - reference[n]).norm() / reference[n].norm()) for n in trainable)
    print(f"torch.func vmap(grad): worst relative error of per-sample gradients {worst:.2e}")
except Exception as exc:  # noqa: BLE001
    print("torch.func vmap(grad) failed:", type(exc).__name__, str(exc).splitlines()[0][:200])
