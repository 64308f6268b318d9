"""LoRA aggregation: averaging the factors is not averaging the updates; stacking and SVD re-factorisation are."""

from __future__ import annotations

import numpy as np
import pytest

from edgepeft.core.errors import ConfigError
from edgepeft.federated.aggregate import (
    aggregate_lora_stacked,
    aggregate_lora_svd,
    fedavg,
    lora_delta,
    shared_a,
)

MODULES = ("q", "v")


def _clients(n: int = 4, rank: int = 2, shared: bool = False, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    common = {m: rng.normal(size=(rank, 6)) for m in MODULES}
    out = []
    for _ in range(n):
        update = {"bias": rng.normal(size=3)}
        for m in MODULES:
            update[f"{m}.lora_A.weight"] = common[m] if shared else rng.normal(size=(rank, 6))
            update[f"{m}.lora_B.weight"] = rng.normal(size=(5, rank))
        out.append(update)
    return out


def _product(update: dict[str, np.ndarray], module: str) -> np.ndarray:
    return update[f"{module}.lora_B.weight"].astype(np.float64) @ update[f"{module}.lora_A.weight"]


def test_fedavg_of_factors_is_not_the_average_update_and_exact_schemes_are() -> None:
    clients, weights = _clients(), [1.0, 2.0, 3.0, 4.0]
    naive, stacked = fedavg(clients, weights), aggregate_lora_stacked(clients, weights)
    svd, dropped = aggregate_lora_svd(clients, weights, rank=8)  # rank >= the sum of the clients' ranks: exact
    for module in MODULES:
        exact = lora_delta(clients, weights, f"{module}.lora_A.weight")
        assert np.linalg.norm(_product(naive, module) - exact) > 0.1 * np.linalg.norm(exact)
        np.testing.assert_allclose(_product(stacked, module), exact, atol=1e-5)
        np.testing.assert_allclose(_product(svd, module), exact, atol=1e-5)
        assert dropped[f"{module}.lora_A.weight"] < 1e-6
        assert stacked[f"{module}.lora_A.weight"].shape == (8, 6)  # rank 4 x 2
    expected_bias = sum(w * c["bias"] for w, c in zip(weights, clients, strict=True)) / 10
    np.testing.assert_allclose(stacked["bias"], expected_bias, atol=1e-6)


def test_svd_at_the_clients_rank_is_the_best_rank_r_approximation() -> None:
    clients = _clients(rank=2)
    svd, dropped = aggregate_lora_svd(clients)
    for module in MODULES:
        exact = lora_delta(clients, None, f"{module}.lora_A.weight")
        s = np.linalg.svd(exact, compute_uv=False)
        error = np.linalg.norm(_product(svd, module) - exact)
        assert error == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-4)
        assert dropped[f"{module}.lora_A.weight"] == pytest.approx(error / np.linalg.norm(exact), rel=1e-4)
        assert svd[f"{module}.lora_A.weight"].shape == (2, 6)


def test_with_a_shared_frozen_a_fedavg_is_exact() -> None:
    clients = _clients(shared=True)
    assert shared_a(clients) and not shared_a(_clients())
    averaged = fedavg(clients, [3, 1, 1, 1])
    for module in MODULES:
        exact = lora_delta(clients, [3, 1, 1, 1], f"{module}.lora_A.weight")
        np.testing.assert_allclose(_product(averaged, module), exact, atol=1e-5)


def test_bad_input_is_refused() -> None:
    clients = _clients()
    with pytest.raises(ConfigError, match="no client updates"):
        fedavg([])
    with pytest.raises(ConfigError, match="weights"):
        fedavg(clients, [1, -1, 1, 1])
    broken = [dict(c) for c in clients]
    broken[2]["q.lora_B.weight"] = np.zeros((5, 3))
    with pytest.raises(ConfigError, match="client 2 sends q.lora_B.weight with shape"):
        aggregate_lora_stacked(broken)
    with pytest.raises(ConfigError, match="lora_A/lora_B pairs"):
        aggregate_lora_svd([{"bias": np.zeros(3)}])
