"""The part of an adapter that many assets share, and the file that carries it (a *global adapter*).

A federated adapter is learned across assets, but which channel is which stays an asset fact: the channel tags are
the asset-local part (FedSA-style: shared part global, asset part local) and never leave the asset. The rest of the
trainable tensors is the *shared* part, named as in the attached model (``model.named_parameters()``), so a global
adapter loads into any model that the same method, config and base prepared, whatever its channel count.

The file is a safetensors file whose metadata names the base (and its sha256) and the PEFT config it was trained
with; :func:`load_shared` refuses a file for another base or config.

Example:
    >>> import tempfile, torch
    >>> from edgepeft.models.registry import load_base
    >>> from edgepeft.peft import PeftConfig, get_method
    >>> base = load_base("tiny"); base.set_n_channels(3)
    >>> cfg = PeftConfig(method="lora", rank=2, adapt_last=1)
    >>> model = get_method("lora").attach(base, cfg)
    >>> path = save_global_adapter(tempfile.mkdtemp() + "/global.safetensors", shared_state(model), "tiny", cfg)
    >>> other = load_base("tiny"); other.set_n_channels(5)
    >>> other = get_method("lora").attach(other, cfg)
    >>> load_shared(other, read_global_adapter(path, "tiny", cfg)[0])
    4
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepeft.core.errors import ArtifactError
from edgepeft.peft.base import PeftConfig, copy_tensors

LOCAL_NAMES = ("channel_tags",)  # asset-local tensors: never shared, never aggregated
META_KEY = "edgepeft.global_adapter"


def is_local(name: str) -> bool:
    """Whether a trainable tensor belongs to the asset alone (see :data:`LOCAL_NAMES`)."""
    return name.rsplit(".", 1)[-1] in LOCAL_NAMES


def shared_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The shared trainable tensors of ``model`` as float32 numpy arrays, by parameter name, in a stable order."""
    return {name: p.detach().cpu().numpy().astype(np.float32, copy=True)
            for name, p in sorted(model.named_parameters()) if p.requires_grad and not is_local(name)}


def load_shared(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> int:
    """Copy shared tensors into ``model`` (same names and shapes, or a clear error); returns how many."""
    own = {name: p for name, p in model.named_parameters() if not is_local(name)}
    copy_tensors({name: torch.as_tensor(np.asarray(value, dtype=np.float32)) for name, value in tensors.items()}, own)
    return len(tensors)


def _meta(base: str, cfg: PeftConfig) -> dict[str, Any]:
    return {"base": base, "peft": dataclasses.asdict(cfg)}


def save_global_adapter(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], base: str,
                        cfg: PeftConfig, base_sha256: str = "", extra: Mapping[str, Any] | None = None) -> Path:
    """Write shared tensors with what they were trained on; atomic (a crash leaves the old file or the new)."""
    from safetensors.numpy import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {**_meta(base, cfg), "base_sha256": base_sha256, **(extra or {})}
    temporary = target.with_name(target.name + ".tmp")
    save_file({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()},
              str(temporary), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(temporary, target)
    return target


def read_global_adapter(path: str | os.PathLike[str], base: str | None = None, cfg: PeftConfig | None = None
                        ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A global adapter's tensors and metadata; with ``base``/``cfg``, refuse one trained for something else."""
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    if not source.is_file():
        raise ArtifactError(f"global adapter {source} does not exist")
    try:
        with safe_open(str(source), framework="numpy") as handle:
            meta_text = (handle.metadata() or {}).get(META_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{source} is not a readable safetensors file ({exc})") from exc
    if meta_text is None:
        raise ArtifactError(f"{source} is not a global adapter (no {META_KEY} metadata); write it with "
                            "`edgepeft federate`")
    meta = json.loads(meta_text)
    if base is not None and meta.get("base") != base:
        raise ArtifactError(f"{source} was trained on base {meta.get('base')!r}, not {base!r}")
    if cfg is not None:
        wanted = dataclasses.asdict(cfg)
        differ = sorted(k for k in wanted if meta.get("peft", {}).get(k) != wanted[k])
        if differ:
            raise ArtifactError(f"{source} was trained with another PEFT config ({', '.join(differ)} differ: "
                                f"{ {k: meta['peft'].get(k) for k in differ} })")
    return tensors, meta
