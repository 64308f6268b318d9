"""Aggregating adapters from many assets: plain weighted averages, and LoRA aggregation that is exact.

A LoRA update is a product, ``delta W = s * B A``. Averaging the factors separately (FedAvg of A and of B) does not
average the updates: ``avg(B) avg(A) != avg(B A)`` as soon as clients differ, so the global adapter computes an
update no client proposed. Three ways around it, all here (issue "Federated PEFT", point 2):

- :func:`aggregate_lora_stacked`: concatenate the clients' factors, ``B' = [w_1 B_1 | ... | w_n B_n]``,
  ``A' = [A_1; ...; A_n]``; then ``B' A' = sum_i w_i B_i A_i`` exactly, at rank ``sum_i r_i``;
- :func:`aggregate_lora_svd`: the same exact average, re-factorised to rank ``r`` by a truncated SVD (the best
  rank-r approximation, Eckart-Young), with the part it drops reported;
- FFA-LoRA (Sun et al., ICLR 2024): every client keeps the same frozen ``A``, so FedAvg of ``B`` alone is exact;
  :func:`fedavg` does it, and :func:`shared_a` checks that the A matrices really are shared.

Our own methods (bottleneck adapters, BitFit, IA3 vectors) enter linearly or are averaged as the literature does:
:func:`fedavg`, a weighted mean of every tensor.

Tensors are numpy arrays keyed like peft's saved adapters (``...<module>.lora_A.weight`` / ``lora_B.weight``).
Products are in the factors' own units: the aggregate keeps the clients' scaling ``alpha / r`` (a stacked adapter of
rank ``r'`` is packed with ``lora_alpha * r' / r``).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> clients = [{"m.lora_A.weight": rng.normal(size=(2, 5)), "m.lora_B.weight": rng.normal(size=(4, 2))}
    ...            for _ in range(3)]
    >>> exact = sum(c["m.lora_B.weight"] @ c["m.lora_A.weight"] for c in clients) / 3
    >>> stacked = aggregate_lora_stacked(clients, [1, 1, 1])
    >>> bool(np.allclose(stacked["m.lora_B.weight"] @ stacked["m.lora_A.weight"], exact))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgepeft.core.errors import ConfigError

Update = Mapping[str, np.ndarray]


def _weights(updates: Sequence[Update], weights: Sequence[float] | None) -> np.ndarray:
    if not updates:
        raise ConfigError("no client updates to aggregate")
    w = np.ones(len(updates)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights must be {len(updates)} finite non-negative numbers with a positive sum")
    return w / w.sum()


def _check_same_keys(updates: Sequence[Update]) -> list[str]:
    keys = sorted(updates[0])
    for index, update in enumerate(updates[1:], start=1):
        if sorted(update) != keys:
            raise ConfigError(f"client {index} sends tensors {sorted(set(update) ^ set(keys))[:3]} the others do not")
        for key in keys:
            if np.shape(update[key]) != np.shape(updates[0][key]):
                raise ConfigError(f"client {index} sends {key} with shape {np.shape(update[key])}, the first client "
                                  f"{np.shape(updates[0][key])}")
    return keys


def fedavg(updates: Sequence[Update], weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """The weighted mean of every tensor (FedAvg). Exact for tensors that enter the model linearly; for LoRA it
    averages the factors, which is exact only when every client shares one ``A`` (FFA-LoRA, :func:`shared_a`)."""
    w = _weights(updates, weights)
    keys = _check_same_keys(updates)
    return {key: sum(wi * np.asarray(u[key], dtype=np.float64) for wi, u in zip(w, updates, strict=True)
                     ).astype(np.float32) for key in keys}


def lora_pairs(keys: Sequence[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module among tensor keys: peft's saved names (``m.lora_A.weight``) or an
    attached model's (``m.lora_A.default.weight``)."""
    pairs = [(key, key.replace(".lora_A.", ".lora_B.")) for key in keys if ".lora_A." in key]
    missing = [a for a, b in pairs if b not in keys]
    if not pairs or missing:
        raise ConfigError(f"LoRA aggregation needs lora_A/lora_B pairs; missing {missing[:2] or 'every pair'}")
    return pairs


def _is_factor(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def lora_delta(updates: Sequence[Update], weights: Sequence[float] | None, a_key: str) -> np.ndarray:
    """``sum_i w_i B_i A_i`` of one module, named by its A key (weights normalised): the exact average of the
    clients' updates."""
    w = _weights(updates, weights)
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    return sum(wi * np.asarray(u[b_key], np.float64) @ np.asarray(u[a_key], np.float64)
               for wi, u in zip(w, updates, strict=True))


def aggregate_lora_stacked(updates: Sequence[Update], weights: Sequence[float] | None = None
                           ) -> dict[str, np.ndarray]:
    """Exact LoRA aggregation by stacking: rank ``sum_i r_i`` (grows with the clients). Other tensors: FedAvg."""
    w = _weights(updates, weights)
    keys = _check_same_keys(updates)
    out = {k: v for k, v in fedavg(updates, w).items() if not _is_factor(k)}
    for a_key, b_key in lora_pairs(keys):
        out[a_key] = np.concatenate([u[a_key] for u in updates], axis=0).astype(np.float32)
        out[b_key] = np.concatenate([wi * np.asarray(u[b_key]) for wi, u in zip(w, updates, strict=True)],
                                    axis=1).astype(np.float32)
    return out


def aggregate_lora_svd(updates: Sequence[Update], weights: Sequence[float] | None = None, rank: int | None = None
                       ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The exact average update of each module re-factorised to ``rank`` (default: the clients' rank) by a truncated
    SVD, split evenly between the factors (``B = U sqrt(S)``, ``A = sqrt(S) V^T``). Returns the adapter and, per
    module (its A key), the relative Frobenius norm of what the truncation dropped (0.0: exact). Other tensors:
    FedAvg."""
    w = _weights(updates, weights)
    keys = _check_same_keys(updates)
    out = {k: v for k, v in fedavg(updates, w).items() if not _is_factor(k)}
    dropped: dict[str, float] = {}
    for a_key, b_key in lora_pairs(keys):
        r = rank if rank is not None else int(np.shape(updates[0][a_key])[0])
        if r < 1:
            raise ConfigError(f"rank must be >= 1, got {r}")
        u, s, vt = np.linalg.svd(lora_delta(updates, w, a_key), full_matrices=False)
        root = np.sqrt(s[:r])
        out[b_key] = (u[:, :r] * root).astype(np.float32)
        out[a_key] = (root[:, None] * vt[:r]).astype(np.float32)
        total = float(np.sqrt((s**2).sum()))
        dropped[a_key] = float(np.sqrt((s[r:] ** 2).sum())) / total if total > 0 else 0.0
    return out, dropped


def shared_a(updates: Sequence[Update], atol: float = 0.0) -> bool:
    """True when every client's ``A`` matrices are the same (FFA-LoRA): then :func:`fedavg` of ``B`` is exact."""
    keys = _check_same_keys(updates)
    return all(np.allclose(u[k], updates[0][k], rtol=0.0, atol=atol) for u in updates[1:] for k in keys
               if ".lora_A." in k)
