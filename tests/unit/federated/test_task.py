"""The federated task: FFA-LoRA's frozen, shared A; what a client sends; the global adapter file; DP-SGD pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepeft.core.errors import ArtifactError, ConfigError
from edgepeft.federated.aggregate import fedavg, lora_delta
from edgepeft.federated.data import load_partition, partition_count
from edgepeft.federated.dp import DpSgd, _Mixer, per_sample_gradients
from edgepeft.federated.task import (
    FederatedConfig,
    build_model,
    initial_state,
    local_update,
    personalise,
    prepare_asset,
)
from edgepeft.peft.shared import read_global_adapter, save_global_adapter, shared_state
from edgepeft.train.adapt import FeatureCache, cached_windows, patch_loss

CFG = FederatedConfig(local_steps=3, batch_size=8)


def _series(seed: int, n_channels: int = 3, rows: int = 600) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)[:, None]
    return (np.sin(t / (4 + np.arange(n_channels) + seed)) + 0.1 * rng.normal(size=(rows, n_channels))).astype(
        np.float32)


def test_ffa_sends_only_b_and_every_client_holds_the_same_a() -> None:
    state = initial_state(CFG)
    assert state.wire and all(".lora_B." in name for name in state.wire)
    results = [local_update(CFG, state, prepare_asset(f"a{i}", _series(i, 2 + i)), server_round=1) for i in range(3)]
    for result in results:
        assert sorted(result.tensors) == sorted(state.wire)
        assert not any(np.array_equal(result.tensors[n], state.tensors[n]) for n in state.wire)  # it trained
    # A never moved, so the plain average of B is the exact average of the updates B_i A (FFA-LoRA).
    model = build_model(CFG, 5)
    a_names = [n for n, p in model.named_parameters() if ".lora_A." in n]
    assert a_names and not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    updates = [{**{a: state.tensors[a] for a in a_names}, **r.tensors} for r in results]
    averaged = fedavg(updates, [r.n_windows for r in results])
    for a_name in a_names:
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        exact = lora_delta(updates, [r.n_windows for r in results], a_name)
        np.testing.assert_allclose(averaged[b_name] @ averaged[a_name], exact, atol=1e-6)


def test_a_client_with_another_frozen_a_is_refused() -> None:
    state = initial_state(CFG)
    other = initial_state(FederatedConfig(local_steps=3, batch_size=8, seed=1))
    assert other.frozen_digest != state.frozen_digest
    with pytest.raises(ConfigError, match="frozen LoRA A"):
        local_update(CFG, other, prepare_asset("a", _series(0)), server_round=1)


def test_fedavg_and_svd_send_both_factors() -> None:
    for aggregation in ("fedavg", "svd"):
        state = initial_state(FederatedConfig(aggregation=aggregation))
        assert any(".lora_A." in n for n in state.wire) and any(".lora_B." in n for n in state.wire)
        assert state.frozen_digest == initial_state(FederatedConfig(aggregation=aggregation, seed=5)).frozen_digest


def test_the_global_adapter_starts_a_detector_and_is_refused_elsewhere(tmp_path) -> None:
    state = initial_state(CFG)
    result = local_update(CFG, state, prepare_asset("a", _series(0)), server_round=1)
    tensors = {**state.tensors, **result.tensors}
    path = save_global_adapter(tmp_path / "global.safetensors", tensors, CFG.base, CFG.peft_config())
    det = personalise(CFG, str(path), _series(1, 4), steps=0)  # the global adapter as is, calibrated locally
    got = shared_state(det.model_)
    assert sorted(got) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(got[name], value)
    assert np.isfinite(det.score(_series(2, 4))).all()
    with pytest.raises(ArtifactError, match="another PEFT config"):
        read_global_adapter(path, CFG.base, FederatedConfig(rank=8).peft_config())
    with pytest.raises(ArtifactError, match="base"):
        read_global_adapter(path, "small", CFG.peft_config())
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError):
        read_global_adapter(tmp_path / "bad.safetensors")


def test_per_sample_gradients_on_cached_features_are_exact() -> None:
    """DP-SGD's fast path (the channel blocks on cached temporal features) against one backward pass per sample."""
    torch.manual_seed(0)
    model = build_model(FederatedConfig(aggregation="svd"), 3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.05)
    encoder = model.get_base_model()
    cache = FeatureCache.build(encoder, *cached_windows(_series(0), encoder.window_len, encoder.patch_len, 50))
    feat, mean, std, windows, target = cache.batch(torch.arange(6), np.random.default_rng(0), 0.5)
    net = _Mixer(encoder)
    got = per_sample_gradients(net, lambda out, *s: patch_loss(out, s[-2], s[-1]), [feat, mean, std],
                               [windows, target])
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert len(got) == len(params) >= 5
    for i in range(6):
        net.zero_grad()
        patch_loss(net(feat[i : i + 1], mean[i : i + 1], std[i : i + 1]), windows[i : i + 1],
                   target[i : i + 1]).backward()
        for name, param in params.items():
            torch.testing.assert_close(got[name][i], param.grad, rtol=1e-4, atol=1e-7)


def test_dp_noise_is_calibrated_to_the_target_epsilon() -> None:
    dp = DpSgd.for_target(epsilon=4.0, delta=1e-5, max_norm=1.0, batch_size=32, n_windows=2000, total_steps=100)
    assert 3.6 < dp.epsilon(100) <= 4.0 + 1e-6  # the whole budget, spent by the last step
    assert dp.epsilon(20) < dp.epsilon(100) and dp.epsilon(0) == 0.0
    stricter = DpSgd.for_target(epsilon=1.0, delta=1e-5, max_norm=1.0, batch_size=32, n_windows=2000,
                                total_steps=100)
    assert stricter.noise_multiplier > dp.noise_multiplier


def test_dp_local_update_reports_epsilon() -> None:
    cfg = FederatedConfig(local_steps=3, batch_size=8, rounds=2, dp_epsilon=2.0)
    result = local_update(cfg, initial_state(cfg), prepare_asset("a", _series(0)), server_round=1)
    assert result.epsilon is not None and 0 < result.epsilon < 2.0
    assert all(np.isfinite(v).all() for v in result.tensors.values())


def test_data_specs(tmp_path) -> None:
    for i in range(2):
        (tmp_path / f"asset{i}.csv").write_text("a,b\n" + "".join(f"{j},{j * i}\n" for j in range(150)))
    assert partition_count(f"csv:{tmp_path}") == 2
    name, values = load_partition(f"csv:{tmp_path}", 1)
    assert name == "asset1" and values.shape == (150, 2)
    assert load_partition("fleet:3", 2)[0] == "pump-03"
    for spec, message in [("", "no data spec"), ("synthetic:x:10", "integer"), (f"csv:{tmp_path / 'no'}", "folder"),
                          ("fleet:2", "partition 5")]:
        with pytest.raises((ConfigError, Exception), match=message):
            load_partition(spec, 5 if spec == "fleet:2" else 0)


def test_bad_settings_are_refused() -> None:
    for kwargs in [{"aggregation": "median"}, {"rounds": 0}, {"dp_epsilon": 0.0}, {"max_update_norm": -1.0},
                   {"calib_fraction": 1.0}]:
        with pytest.raises(ConfigError):
            FederatedConfig(**kwargs)
    with pytest.raises(ConfigError):
        prepare_asset("short", np.zeros((20, 2), np.float32))
