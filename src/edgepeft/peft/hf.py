"""LoRA, DoRA and IA3 through Hugging Face ``peft``, saved in peft's own format.

peft works on any ``nn.Module`` for these (it matches target modules by name suffix); our attention
uses separate ``q``/``k``/``v``/``o`` Linear layers so it can. IA3 cannot target Conv1d (peft limit),
which is one reason the encoder is Linear-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from edgepeft.core.errors import ArtifactError
from edgepeft.peft.base import TAGS_FILE, PeftConfig, PeftMethod, _load_tensors, adapted_blocks, register_method


class _HFMethod(PeftMethod):
    mergeable: ClassVar[bool] = True

    def peft_config(self, cfg: PeftConfig):  # noqa: ANN201 - a peft config object
        raise NotImplementedError

    def targets(self, cfg: PeftConfig, default: list[str]) -> str:
        """A peft target regex: the chosen module suffixes inside the adapted blocks only."""
        suffixes = "|".join(cfg.target_modules or default)
        blocks = "|".join(name.replace(".", r"\.") for name in self._blocks)
        return rf"^({blocks})\.(attn|mlp)\.({suffixes})$"

    def attach(self, base: nn.Module, cfg: PeftConfig) -> nn.Module:
        from peft import get_peft_model

        self.freeze_all(base)
        self._blocks = [name for name, _ in adapted_blocks(base, cfg)]
        model = get_peft_model(base, self.peft_config(cfg))
        self.enable_channel_tags(model)
        return model

    def save(self, model: nn.Module, cfg: PeftConfig, directory: Path) -> list[Path]:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(directory))  # adapter_config.json + adapter_model.safetensors
        tags = self.encoder(model).channel_tags.detach().contiguous()
        save_file({"channel_tags": tags}, str(directory / TAGS_FILE))
        return [directory / "adapter_config.json", directory / "adapter_model.safetensors", directory / TAGS_FILE]

    def load(self, model: nn.Module, directory: Path) -> None:
        from peft import set_peft_model_state_dict

        state = _load_tensors(directory / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ArtifactError(f"adapter holds tensors this model does not have: {result.unexpected_keys[:3]}")
        tags = _load_tensors(directory / TAGS_FILE)["channel_tags"]
        encoder = self.encoder(model)
        if tags.shape != encoder.channel_tags.shape:
            raise ArtifactError(f"channel tags have shape {tuple(tags.shape)}, expected "
                                f"{tuple(encoder.channel_tags.shape)}")
        with torch.no_grad():
            encoder.channel_tags.copy_(tags)

    def merge(self, model: nn.Module) -> None:
        model.merge_adapter()

    def unmerge(self, model: nn.Module) -> None:
        model.unmerge_adapter()


@register_method
class LoRA(_HFMethod):
    """Low-rank updates ``W + (alpha/r) B A`` on attention query/value projections (LoRA paper default)."""

    name: ClassVar[str] = "lora"
    default_targets: ClassVar[list[str]] = ["q", "v"]
    use_dora: ClassVar[bool] = False

    def peft_config(self, cfg: PeftConfig):  # noqa: ANN201
        from peft import LoraConfig

        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
            lora_dropout=cfg.dropout,
            target_modules=self.targets(cfg, self.default_targets),
            use_dora=self.use_dora,
            init_lora_weights=True,
        )


@register_method
class DoRA(LoRA):
    """Weight-decomposed LoRA: a learned magnitude per output plus a LoRA direction update."""

    name: ClassVar[str] = "dora"
    use_dora: ClassVar[bool] = True


@register_method
class IA3(_HFMethod):
    """Learned rescaling vectors on keys, values and the MLP input (IA3): the smallest delta of all."""

    name: ClassVar[str] = "ia3"
    default_lr: ClassVar[float] = 1e-2

    def peft_config(self, cfg: PeftConfig):  # noqa: ANN201
        from peft import IA3Config

        targets = cfg.target_modules or ["k", "v", "fc2"]
        feedforward = [t for t in targets if t.startswith("fc")]
        return IA3Config(
            target_modules=self.targets(cfg, targets),
            feedforward_modules=self.targets(cfg, feedforward) if feedforward else [],
        )
