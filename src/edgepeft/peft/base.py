"""The one interface every PEFT method implements, and the registry that selects them by name.

A method takes a fresh base module, freezes it, attaches its own trainable parameters and knows how to
save and load just those (the *delta*). Per-asset channel tags are trainable under every method: which
channel is which is an asset fact, and they cost ``n_channels * d_channel`` numbers.

Example:
    >>> from edgepeft.peft import get_method, list_methods
    >>> "lora" in list_methods()
    True
    >>> get_method("bitfit").name
    'bitfit'
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from edgepeft.core.errors import ArtifactError, ConfigError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TAGS_FILE = "channel_tags.safetensors"

# A saved delta in memory: the adapter folder's safetensors files by file name, each {tensor name: tensor}.
AdapterTensors = Mapping[str, Mapping[str, torch.Tensor]]
# Copies one saved delta into the model it was prepared for (see PeftMethod.loader).
DeltaLoader = Callable[[AdapterTensors], None]


@dataclass
class PeftConfig:
    """Settings of a PEFT method (each method reads the fields it needs).

    Attributes:
        method: registered method name (lora, dora, ia3, adapter, prefix, bitfit, full, scratch).
        rank: LoRA/DoRA rank.
        alpha: LoRA scaling numerator; None means ``2 * rank``.
        dropout: dropout on the adapter path during training.
        target_modules: module-name suffixes that receive adapters; None means the method's default.
        bottleneck: hidden width of bottleneck adapters.
        n_prefix: learned key/value prefix length per attention layer (prefix tuning).
        adapt_last: put adapters only in the last N blocks (temporal blocks, then channel blocks);
            None means every block. Fewer adapted blocks means the frozen blocks before them run
            without storing activations: the main lever on training memory.
    """

    method: str = "lora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | None = None
    bottleneck: int = 8
    n_prefix: int = 4
    adapt_last: int | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if self.bottleneck < 1 or self.n_prefix < 1:
            raise ConfigError("bottleneck and n_prefix must be >= 1")
        if self.adapt_last is not None and self.adapt_last < 1:
            raise ConfigError(f"adapt_last must be >= 1 (or None for every block), got {self.adapt_last}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


class PeftMethod:
    """Base class of a PEFT method. Subclasses set ``name`` and implement ``attach``.

    The default save/load writes every trainable tensor (the delta) to ``adapter_model.safetensors``;
    HF-peft methods override them to use peft's own format. Loading is split in two: :meth:`loader` does the
    work that depends only on the model's structure (finding the target tensors), the loader it returns only
    copies, so a device that prepares a model ahead of time installs a delta in microseconds.
    """

    name: ClassVar[str] = ""
    # The safetensors files of the adapter folder that loading reads.
    tensor_files: ClassVar[tuple[str, ...]] = (WEIGHTS_FILE,)
    default_lr: ClassVar[float] = 3e-3
    mergeable: ClassVar[bool] = False
    # Full fine-tuning and scratch train the base itself; everything else must leave it bit-identical.
    trains_base: ClassVar[bool] = False

    def attach(self, base: nn.Module, cfg: PeftConfig) -> nn.Module:  # pragma: no cover - interface
        """Freeze ``base``, add this method's parameters, return the module to train and run."""
        raise NotImplementedError

    # -- helpers shared by every method ---------------------------------------------------------
    @staticmethod
    def encoder(model: nn.Module) -> nn.Module:
        """The underlying base module (unwrapping a peft wrapper)."""
        get_base = getattr(model, "get_base_model", None)
        return get_base() if callable(get_base) else model

    @staticmethod
    def freeze_all(model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad_(False)

    @staticmethod
    def enable_channel_tags(model: nn.Module) -> None:
        tags = getattr(PeftMethod.encoder(model), "channel_tags", None)
        if isinstance(tags, nn.Parameter):
            tags.requires_grad_(True)

    def delta_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name: what this asset's adapter adds to the shared base."""
        return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}

    def save(self, model: nn.Module, cfg: PeftConfig, directory: Path) -> list[Path]:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_FILE
        save_file(self.delta_state(model), str(weights))
        config = directory / CONFIG_FILE
        config.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")
        return [config, weights]

    def load(self, model: nn.Module, directory: Path) -> None:
        """Load a saved delta into a model that ``attach`` prepared with the same config."""
        self.loader(model)({name: _load_tensors(directory / name) for name in self.tensor_files})

    def loader(self, model: nn.Module) -> DeltaLoader:
        """A function that loads a saved delta (``{file name: {tensor name: tensor}}``) into ``model``.

        ``model`` must come from ``attach`` with the same config; the function can be called once per model.
        """
        own = dict(model.named_parameters())

        def load(files: AdapterTensors) -> None:
            copy_tensors(_file(files, WEIGHTS_FILE), own)

        return load

    def merge(self, model: nn.Module) -> None:
        raise ConfigError(f"method {self.name!r} cannot be merged into the base")

    def unmerge(self, model: nn.Module) -> None:
        raise ConfigError(f"method {self.name!r} cannot be merged into the base")


def adapted_blocks(model: nn.Module, cfg: PeftConfig) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of the blocks that receive adapters, in forward order."""
    named = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    named += [(f"channel_blocks.{i}", b) for i, b in enumerate(getattr(model, "channel_blocks", []))]
    return named if cfg.adapt_last is None else named[-cfg.adapt_last :]


def copy_tensors(state: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
    """Copy every saved tensor into the model tensor of the same name, refusing unknown names and shapes."""
    unknown = sorted(set(state) - set(targets))
    if unknown:
        raise ArtifactError(f"adapter holds tensors this model does not have: {unknown[:3]}")
    for name, tensor in state.items():
        if targets[name].shape != tensor.shape:
            raise ArtifactError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, expected "
                                f"{tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            targets[name].copy_(tensor)


def _file(files: AdapterTensors, name: str) -> Mapping[str, torch.Tensor]:
    try:
        return files[name]
    except KeyError:
        raise ArtifactError(f"the adapter has no {name}; it is incomplete, save or pack it again") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise ArtifactError(f"{path} is missing; the adapter directory is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc})") from exc


@dataclass
class _Registry:
    methods: dict[str, type[PeftMethod]] = field(default_factory=dict)


_REGISTRY = _Registry()


def register_method(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: make a method selectable by its ``name``."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has no name")
    _REGISTRY.methods[cls.name] = cls
    return cls


def get_method(name: str) -> PeftMethod:
    """An instance of the method registered as ``name``."""
    try:
        return _REGISTRY.methods[name]()
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(list_methods())}") from None


def list_methods() -> list[str]:
    return list(_REGISTRY.methods)


def parameter_report(model: nn.Module, base_parameters: int) -> dict[str, float]:
    """Trainable parameters and their share of the base."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_parameters": trainable,
        "base_parameters": base_parameters,
        "trainable_share": trainable / max(base_parameters, 1),
    }
