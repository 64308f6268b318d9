"""Base models: the built-in pretrained encoders shipped in the package, and user-registered ones.

Loading never touches the network: built-in weights are safetensors files inside the package, checked
against the sha256 in their model card before use.

Example:
    >>> from edgepeft.models.registry import list_bases, base_config
    >>> "tiny" in list_bases()
    True
    >>> base_config("tiny").d_model
    64
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from edgepeft.core.errors import ArtifactError, ConfigError, ModelError
from edgepeft.models.patch_encoder import PatchEncoder, PatchEncoderConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"

# The shipped sizes. tiny: gateway/MCU class (<= 150k parameters); small: about 1M. small is wide
# rather than deep because LoRA on q/v costs 32*d per block against ~11*d^2 block weights: width is
# what keeps the rank-8 adapter under 2 % of the base.
BUILTIN_CONFIGS: dict[str, PatchEncoderConfig] = {
    "tiny": PatchEncoderConfig(d_model=64, n_heads=4, n_layers=3, n_channel_layers=1, d_ff=128),
    "small": PatchEncoderConfig(d_model=192, n_heads=6, n_layers=2, n_channel_layers=1, d_ff=512),
}


@dataclass
class BaseEntry:
    """How to build a base: a factory and an optional model card."""

    factory: Callable[[], nn.Module]
    card: dict[str, Any] = field(default_factory=dict)


_USER_BASES: dict[str, BaseEntry] = {}


def register_base(name: str, factory: Callable[[], nn.Module], card: dict[str, Any] | None = None) -> None:
    """Register your own ``nn.Module`` as a base under ``name``.

    The module must behave like :class:`PatchEncoder`: ``forward(x (B, L, C), hidden (B, C, N))`` returns
    a (B, L, C) reconstruction and it exposes ``window_len``, ``patch_len``, ``set_n_channels`` and
    ``forecast_mask``. The simplest way is to subclass or configure PatchEncoder.
    """
    if name in BUILTIN_CONFIGS:
        raise ConfigError(f"{name!r} is a built-in base; register yours under another name")
    _USER_BASES[name] = BaseEntry(factory=factory, card=dict(card or {}))


def list_bases() -> list[str]:
    """Names of every base that can be loaded."""
    return sorted(set(BUILTIN_CONFIGS) | set(_USER_BASES))


def base_config(name: str) -> PatchEncoderConfig:
    """The config of a built-in base."""
    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"unknown base {name!r}; built-in bases are {sorted(BUILTIN_CONFIGS)}")
    return BUILTIN_CONFIGS[name]


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def card_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.card.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """A content hash of a model's weights, independent of how they were stored.

    Adapters are bound to this hash: a delta trained on one base must never run on another.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if key == "channel_tags":  # per-asset, not part of the base
            continue
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_card(name: str) -> dict[str, Any]:
    """The model card of a base (empty for user bases registered without one)."""
    if name in _USER_BASES:
        return dict(_USER_BASES[name].card)
    base_config(name)
    path = card_path(name)
    if not path.exists():
        raise ModelError(f"base {name!r} has no pretrained weights in this install; run `edgepeft pretrain {name}`")
    return json.loads(path.read_text())


def load_base(name: str, *, pretrained: bool = True) -> nn.Module:
    """A fresh, frozen-ready instance of base ``name`` (each call returns a new module).

    ``pretrained=False`` gives the same architecture with random weights (the from-scratch baseline).
    """
    if name in _USER_BASES:
        model = _USER_BASES[name].factory()
        if not isinstance(model, nn.Module):
            raise ModelError(f"the factory registered for base {name!r} did not return an nn.Module")
        return model
    model = PatchEncoder(base_config(name))
    if not pretrained:
        return model
    from safetensors.torch import load_file

    card = load_card(name)
    path = weights_path(name)
    if not path.exists():
        raise ModelError(f"weights for base {name!r} are missing from {path}; reinstall edgepeft")
    sha = file_sha256(path)
    if card.get("sha256") != sha:
        raise ArtifactError(f"weights of base {name!r} do not match the sha256 in its model card; reinstall edgepeft")
    state = load_file(str(path))
    if dataclasses.asdict(model.cfg) != card.get("config"):
        raise ArtifactError(f"model card of base {name!r} describes a different architecture than this edgepeft")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if key != "channel_tags"]:
        raise ArtifactError(f"weights of base {name!r} do not fit its architecture ({missing[:3]}, {unexpected[:3]})")
    return model


def save_base(model: PatchEncoder, name: str, card: dict[str, Any], directory: Path | None = None) -> Path:
    """Write a base's weights and model card (used by pretraining)."""
    from safetensors.torch import save_file

    directory = directory or WEIGHTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "channel_tags"}
    path = directory / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    full_card = {
        **card,
        "name": name,
        "config": dataclasses.asdict(model.cfg),
        "parameters": sum(t.numel() for t in state.values()),
        "sha256": file_sha256(path),
        "state_sha256": state_sha256(model),
    }
    (directory / f"{name}.card.json").write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n")
    return path


__all__ = [
    "BUILTIN_CONFIGS",
    "base_config",
    "list_bases",
    "load_base",
    "load_card",
    "register_base",
    "save_base",
    "state_sha256",
]
