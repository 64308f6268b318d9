"""LoRA, DoRA and IA3 through Hugging Face ``peft``, saved in peft's own format.

peft works on any ``nn.Module`` for these (it matches target modules by name suffix); our attention
uses separate ``q``/``k``/``v``/``o`` Linear layers so it can. IA3 cannot target Conv1d (peft limit),
which is one reason the encoder is Linear-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from edgepeft.core.errors import ArtifactError
from edgepeft.peft.base import (
    TAGS_FILE,
    AdapterTensors,
    DeltaLoader,
    PeftConfig,
    PeftMethod,
    _file,
    adapted_blocks,
    copy_tensors,
    register_method,
)

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


class _HFMethod(PeftMethod):
    mergeable: ClassVar[bool] = True
    tensor_files: ClassVar[tuple[str, ...]] = (PEFT_WEIGHTS_FILE, TAGS_FILE)

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

    def loader(self, model: nn.Module) -> DeltaLoader:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        # The names save_pretrained writes, each mapped to the model's own tensor (peft's state dict shares the
        # parameters' storage). Looking them up walks the whole model, so it happens here, once per model; the
        # load itself is then a copy per tensor instead of peft's set_peft_model_state_dict walk on every load.
        targets = get_peft_model_state_dict(model)
        storages = {param.data_ptr() for param in model.parameters()}
        shared = all(tensor.data_ptr() in storages for tensor in targets.values())
        encoder = self.encoder(model)

        def load(files: AdapterTensors) -> None:
            state = _file(files, PEFT_WEIGHTS_FILE)
            missing = sorted(set(targets) - set(state))
            if missing:  # peft would load the rest and leave these at their random init: refuse instead
                raise ArtifactError(f"adapter lacks tensors this model needs: {missing[:3]}")
            if shared:
                copy_tensors(state, targets)
            else:  # a peft version whose state dict copies: let peft load it, the slow way
                result = set_peft_model_state_dict(model, dict(state))
                if getattr(result, "unexpected_keys", None):
                    raise ArtifactError(f"adapter holds tensors this model does not have: "
                                        f"{result.unexpected_keys[:3]}")
            tags = _file(files, TAGS_FILE).get("channel_tags")
            if tags is None:
                raise ArtifactError(f"{TAGS_FILE} holds no channel_tags; the adapter is incomplete")
            copy_tensors({"channel_tags": tags}, {"channel_tags": encoder.channel_tags})

        return load

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
