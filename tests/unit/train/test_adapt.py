"""The batch adaptation loop: micro-batches give the same update with less activation memory."""

from __future__ import annotations

import copy

import pytest
import torch

from edgepeft.bench.costs import tensor_memory_probe
from edgepeft.core.errors import ConfigError
from edgepeft.peft import PeftConfig, get_method
from edgepeft.train.adapt import AdaptConfig, adapt
from tests.conftest import make_tiny_base, sine_series


def _model(method: str, adapt_last: int | None) -> torch.nn.Module:
    base = make_tiny_base()
    base.set_n_channels(3)
    torch.manual_seed(0)
    return get_method(method).attach(base, PeftConfig(method=method, rank=4, adapt_last=adapt_last))


@pytest.mark.parametrize(("method", "adapt_last"), [("lora", 1), ("lora", None), ("full", None)])
def test_micro_batches_give_the_same_training_as_one_pass(method: str, adapt_last: int | None) -> None:
    """Cached-feature path (LoRA in the last block), full path (LoRA everywhere), and full fine-tuning: the
    gradient of a step is accumulated over micro-batches, so the trained weights match to float rounding."""
    series = sine_series(300, 3)
    trained = {}
    for micro in (None, 4):
        model = _model(method, adapt_last)
        result = adapt(model, series, AdaptConfig(steps=6, batch_size=16, seed=0, micro_batch=micro), lr=3e-3)
        trained[micro] = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                          result.losses)
    (one, losses_one), (micro, losses_micro) = trained[None], trained[4]
    assert one.keys() == micro.keys() and one
    for name, value in one.items():
        if name.endswith("attn.k.bias"):
            # Attention ignores a shift of every key by the same vector, so this gradient is rounding noise,
            # and Adam scales noise up to full-size steps: its values depend on summation order. Not compared.
            continue
        torch.testing.assert_close(micro[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert losses_micro == pytest.approx(losses_one, rel=1e-5)
    changed = _model(method, adapt_last)
    assert any(not torch.equal(p, one[n]) for n, p in changed.named_parameters() if n in one), "it trained"


def test_micro_batches_hold_a_fraction_of_the_activations() -> None:
    series = sine_series(300, 3)
    model = _model("full", None)
    whole = tensor_memory_probe(copy.deepcopy(model), series, batch_size=16)
    parts = tensor_memory_probe(copy.deepcopy(model), series, batch_size=16, micro_batch=4)
    assert parts.activation_bytes < 0.4 * whole.activation_bytes
    assert parts.grad_bytes == whole.grad_bytes and parts.optimizer_bytes == whole.optimizer_bytes


def test_micro_batch_is_validated() -> None:
    with pytest.raises(ConfigError, match="micro_batch"):
        AdaptConfig(micro_batch=0)
    assert [s.stop - s.start for s in AdaptConfig(batch_size=10, micro_batch=4).chunks()] == [4, 4, 4]
    assert AdaptConfig(batch_size=10).chunks() == [slice(0, 10)]
