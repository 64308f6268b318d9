"""One conformance table: every registered PEFT method goes through the same checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgepeft.core.errors import ArtifactError, ConfigError
from edgepeft.data.windows import training_windows
from edgepeft.peft import PeftConfig, get_method, list_methods, parameter_report
from edgepeft.train.adapt import AdaptConfig, adapt, masked_mse
from tests.conftest import make_tiny_base, sine_series

METHODS = list_methods()


def _base_name(name: str) -> str:
    """Map a (possibly peft-wrapped) parameter name back to the base module's name."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".").replace(".inner.", ".")


def _adapted(method_name: str, steps: int = 8):
    base = make_tiny_base()
    base.set_n_channels(3)
    reference = copy.deepcopy(base.state_dict())
    method = get_method(method_name)
    model = method.attach(base, PeftConfig(method=method_name, rank=4))
    series = sine_series()
    adapt(model, series, AdaptConfig(steps=steps, batch_size=8, seed=0), lr=method.default_lr * 3)
    return method, model, reference


def _forecast(model, seed: int = 1) -> torch.Tensor:
    encoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    x = torch.from_numpy(sine_series(200, 3, seed=seed)[None, : encoder.window_len].repeat(4, 0))
    with torch.no_grad():
        model.eval()
        return model(x, encoder.forecast_mask(4, 3))


def test_registry_has_every_documented_method() -> None:
    assert set(METHODS) >= {"lora", "dora", "ia3", "adapter", "prefix", "bitfit", "full", "scratch"}
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("method_name", METHODS)
def test_only_adapter_parameters_change(method_name: str) -> None:
    method, model, reference = _adapted(method_name)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "a method must train something"
    changed = 0
    for name, param in model.named_parameters():
        base_name = _base_name(name)
        if name in trainable:
            if base_name in reference and not torch.equal(param, reference[base_name]):
                changed += 1
            elif base_name not in reference:
                changed += 1  # a new adapter tensor
            continue
        # Frozen: bit-identical to the pretrained base.
        assert torch.equal(param, reference[base_name]), f"{method_name}: frozen {name} changed"
    assert changed > 0
    if not method.trains_base:
        encoder = method.encoder(model)
        frozen_base = [n for n, p in encoder.named_parameters() if not p.requires_grad]
        assert frozen_base, "PEFT methods must keep base weights frozen"


@pytest.mark.parametrize("method_name", [m for m in METHODS if not get_method(m).trains_base])
def test_base_weights_bit_identical_after_training(method_name: str) -> None:
    method, model, reference = _adapted(method_name)
    state = {_base_name(k): v for k, v in method.encoder(model).state_dict().items()}
    delta = {_base_name(k) for k in method.delta_state(model)}
    for name, tensor in reference.items():
        if name in delta or name == "channel_tags":
            continue
        assert torch.equal(state[name], tensor), f"{method_name}: base tensor {name} changed"


@pytest.mark.parametrize("method_name", METHODS)
def test_save_load_gives_identical_outputs(method_name: str, tmp_path) -> None:
    method, model, _ = _adapted(method_name)
    cfg = PeftConfig(method=method_name, rank=4)
    files = method.save(model, cfg, tmp_path / "adapter")
    assert all(f.exists() for f in files)
    fresh = make_tiny_base()
    fresh.set_n_channels(3, seed=99)  # different tags: the loaded delta must overwrite them
    loaded = method.attach(fresh, cfg)
    method.load(loaded, tmp_path / "adapter")
    assert torch.equal(_forecast(model), _forecast(loaded))


@pytest.mark.parametrize("method_name", [m for m in METHODS if get_method(m).mergeable])
def test_merge_equals_unmerged(method_name: str) -> None:
    method, model, _ = _adapted(method_name)
    before = _forecast(model)
    method.merge(model)
    merged = _forecast(model)
    assert torch.allclose(before, merged, atol=1e-5), (before - merged).abs().max()
    method.unmerge(model)
    assert torch.allclose(before, _forecast(model), atol=1e-5)


@pytest.mark.parametrize("method_name", [m for m in METHODS if not get_method(m).mergeable])
def test_non_mergeable_methods_say_so(method_name: str) -> None:
    method, model, _ = _adapted(method_name, steps=1)
    with pytest.raises(ConfigError, match="cannot be merged"):
        method.merge(model)


@pytest.mark.parametrize("method_name", METHODS)
def test_trainable_share_reported_correctly(method_name: str) -> None:
    method, model, reference = _adapted(method_name, steps=1)
    base_parameters = sum(t.numel() for k, t in reference.items() if k != "channel_tags")
    report = parameter_report(model, base_parameters)
    delta_numel = sum(t.numel() for t in method.delta_state(model).values())
    assert report["trainable_parameters"] == delta_numel
    assert report["trainable_share"] == pytest.approx(delta_numel / base_parameters)
    if method.trains_base:
        assert report["trainable_share"] >= 1.0
    else:
        assert 0 < report["trainable_share"] < 0.5


def test_lora_rank_changes_size_as_expected() -> None:
    sizes = {}
    for rank in (2, 4):
        base = make_tiny_base()
        base.set_n_channels(3)
        model = get_method("lora").attach(base, PeftConfig(rank=rank))
        sizes[rank] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # q and v in both blocks: 2 * rank * (in + out) each.
    assert sizes[4] == 2 * sizes[2] == 2 * (2 * 2 * 2 * (32 + 32))


def test_adaptation_is_deterministic() -> None:
    _, first, _ = _adapted("lora")
    _, second, _ = _adapted("lora")
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert np.isfinite(_forecast(first).numpy()).all()


@pytest.mark.parametrize("method_name", [m for m in METHODS if not get_method(m).trains_base])
def test_adapt_last_keeps_early_blocks_frozen_and_trains_cached(method_name: str) -> None:
    base = make_tiny_base()
    base.set_n_channels(3)
    method = get_method(method_name)
    model = method.attach(base, PeftConfig(method=method_name, rank=4, adapt_last=1))
    encoder = method.encoder(model)
    assert encoder.cacheable  # nothing before the channel block trains
    assert not any(p.requires_grad for p in encoder.blocks.parameters())
    series = sine_series()
    windows, pad = training_windows(series, 64, 32, 8, np.random.default_rng(5))
    hidden = pad.copy()
    hidden[:, :, -1] = True
    args = [torch.from_numpy(a) for a in (windows, hidden, hidden & ~pad)]
    with torch.no_grad():
        before = masked_mse(model, *args).item()
    adapt(model, series, AdaptConfig(steps=60, batch_size=32, seed=0), lr=method.default_lr * 3)
    with torch.no_grad():
        after = masked_mse(model, *args).item()
    assert after < before  # the cached loop learns: held-out forecast error goes down


HF_METHODS = [m for m in METHODS if "channel_tags.safetensors" in get_method(m).tensor_files]


@pytest.mark.parametrize("method_name", HF_METHODS)
def test_prepared_loader_matches_peft_loading_and_refuses_partial_adapters(method_name: str, tmp_path) -> None:
    """The loader prepared ahead copies tensors in place of peft's set_peft_model_state_dict: same weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    method, model, _ = _adapted(method_name, steps=3)
    cfg = PeftConfig(method=method_name, rank=4)
    method.save(model, cfg, tmp_path / "adapter")
    files = {name: load_file(str(tmp_path / "adapter" / name)) for name in method.tensor_files}

    def fresh():
        base = make_tiny_base()
        base.set_n_channels(3, seed=99)
        return method.attach(base, cfg)

    ours, reference = fresh(), fresh()
    method.loader(ours)(files)
    set_peft_model_state_dict(reference, files["adapter_model.safetensors"])
    with torch.no_grad():
        method.encoder(reference).channel_tags.copy_(files["channel_tags.safetensors"]["channel_tags"])
    mine, theirs = dict(ours.named_parameters()), dict(reference.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        assert torch.equal(value, theirs[name]), name
    partial = {**files, "adapter_model.safetensors": dict(list(files["adapter_model.safetensors"].items())[1:])}
    with pytest.raises(ArtifactError, match="lacks tensors"):
        method.loader(fresh())(partial)
    with pytest.raises(ArtifactError, match="has no channel_tags.safetensors"):
        method.loader(fresh())({"adapter_model.safetensors": files["adapter_model.safetensors"]})
