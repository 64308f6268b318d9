"""The base encoder: any channel count, hidden patches never leak, registry integrity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgepeft.core.errors import ArtifactError, ConfigError, ModelError
from edgepeft.models import registry
from edgepeft.models.patch_encoder import PatchEncoder, PatchEncoderConfig
from tests.conftest import TINY_CFG, make_tiny_base


@pytest.mark.parametrize("n_channels", [1, 2, 8, 64])
def test_any_channel_count(n_channels: int) -> None:
    model = make_tiny_base().eval()
    x = torch.randn(2, TINY_CFG.window_len, n_channels)
    out = model(x, model.forecast_mask(2, n_channels))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_hidden_patches_do_not_leak() -> None:
    model = make_tiny_base().eval()
    x = torch.randn(3, TINY_CFG.window_len, 4)
    hidden = model.forecast_mask(3, 4)
    changed = x.clone()
    changed[:, -TINY_CFG.patch_len :, :] += 100.0  # the hidden (future) patch
    with torch.no_grad():
        assert torch.equal(model(x, hidden), model(changed, hidden))


def test_visible_patches_matter() -> None:
    model = make_tiny_base().eval()
    x = torch.randn(1, TINY_CFG.window_len, 2)
    changed = x.clone()
    changed[:, :TINY_CFG.patch_len, 0] += 5.0
    hidden = model.forecast_mask(1, 2)
    with torch.no_grad():
        assert not torch.equal(model(x, hidden), model(changed, hidden))


def test_level_shift_is_not_normalised_away() -> None:
    # The stats token carries what instance normalisation removed, and outputs are de-normalised.
    model = make_tiny_base().eval()
    x = torch.randn(1, TINY_CFG.window_len, 1)
    hidden = model.forecast_mask(1, 1)
    with torch.no_grad():
        shifted = model(x + 3.0, hidden)
        base = model(x, hidden)
    assert torch.allclose(shifted[:, -8:] - base[:, -8:], torch.full_like(base[:, -8:], 3.0), atol=0.5)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        PatchEncoderConfig(window_len=30, patch_len=8)
    with pytest.raises(ConfigError, match="divide"):
        PatchEncoderConfig(d_model=30, n_heads=4)
    with pytest.raises(ModelError, match="expects"):
        make_tiny_base()(torch.randn(1, 10, 2))


def test_channel_tags_must_match() -> None:
    model = make_tiny_base()
    model.set_n_channels(3)
    with pytest.raises(ModelError, match="trained on 3"):
        model(torch.randn(1, TINY_CFG.window_len, 4))


def test_builtin_sizes() -> None:
    tiny = PatchEncoder(registry.base_config("tiny"))
    small = PatchEncoder(registry.base_config("small"))
    n_tiny = sum(p.numel() for p in tiny.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_tiny <= 150_000
    assert 0.7e6 <= n_small <= 1.5e6


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shipped_weights_load_with_card(name: str) -> None:
    card = registry.load_card(name)
    for key in ("config", "corpus", "steps", "sha256", "validation_forecast_mse", "parameters"):
        assert key in card
    model = registry.load_base(name)
    assert registry.state_sha256(model) == card["state_sha256"]
    assert registry.load_base(name) is not model  # a fresh instance per call


def test_tampered_weights_are_refused(tmp_path, monkeypatch) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(registry.WEIGHTS_DIR, weights)
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights)
    blob = bytearray((weights / "tiny.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (weights / "tiny.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="sha256"):
        registry.load_base("tiny")
    card = json.loads((weights / "tiny.card.json").read_text())
    assert card["name"] == "tiny"


def test_register_your_own_base() -> None:
    registry.register_base("unit-test-base", lambda: PatchEncoder(TINY_CFG), card={"note": "test"})
    try:
        assert "unit-test-base" in registry.list_bases()
        assert isinstance(registry.load_base("unit-test-base"), PatchEncoder)
        assert registry.load_card("unit-test-base") == {"note": "test"}
        with pytest.raises(ConfigError):
            registry.register_base("tiny", lambda: PatchEncoder(TINY_CFG))
    finally:
        registry._USER_BASES.pop("unit-test-base", None)
