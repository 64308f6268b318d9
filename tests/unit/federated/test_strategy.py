"""The server's strategy on real Flower FitRes messages: bad updates are rejected and logged, the global adapter is
never corrupted, every round is checkpointed and a restarted server resumes from the last one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from edgepeft.core.errors import ConfigError
from edgepeft.federated.app import (
    MAX_WEIGHT,
    AdapterStrategy,
    RunSettings,
    load_checkpoint,
    secagg_workflow,
)
from edgepeft.federated.task import FederatedConfig, initial_state

CFG = FederatedConfig(max_update_norm=5.0)


def _strategy(tmp_path, **run) -> AdapterStrategy:
    settings = RunSettings(**{"data": "synthetic:4:200", "out": str(tmp_path), "min_clients": 2, **run})
    return AdapterStrategy(CFG, settings, initial_state(CFG), 0, [])


def _result(name: str, arrays: list[np.ndarray], n: int = 100):
    proxy = SimpleNamespace(cid=name)  # the strategy reads only the client's id from its proxy
    return proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"asset": name, "loss": 0.5})


def _moved(strategy: AdapterStrategy, delta: float) -> list[np.ndarray]:
    return [strategy.state.tensors[n] + delta for n in strategy.state.wire]


def test_bad_updates_are_rejected_and_the_good_ones_averaged_exactly(tmp_path) -> None:
    strategy = _strategy(tmp_path)
    before = {n: v.copy() for n, v in strategy.state.tensors.items()}
    good_a, good_b = _moved(strategy, 0.01), _moved(strategy, 0.03)
    nan = _moved(strategy, 0.0)
    nan[0][0, 0] = np.nan
    huge = _moved(strategy, 1.0)  # L2 distance far above max_update_norm
    shape = [a[:, :1] for a in _moved(strategy, 0.0)]
    results = [_result("a", good_a, 100), _result("b", good_b, 300), _result("nan", nan), _result("huge", huge),
               _result("shape", shape), _result("count", good_a[:1]), _result("zero", good_a, 0)]
    parameters, metrics = strategy.aggregate_fit(1, results, [RuntimeError("client 9 dropped")])
    assert metrics == {"accepted": 2, "rejected": 6}
    got = parameters_to_ndarrays(parameters)
    for index, name in enumerate(strategy.state.wire):
        np.testing.assert_allclose(got[index], before[name] + 0.025, atol=1e-6)  # (100 * .01 + 300 * .03) / 400
    reasons = {r["client"]: r["reason"] for r in strategy.history[0]["rejected"]}
    assert "non-finite" in reasons["nan"] and "max_update_norm" in reasons["huge"]
    assert "shape" in reasons["shape"] and "tensors" in reasons["count"] and "windows" in reasons["zero"]
    assert "dropped" in reasons["?"]


def test_too_few_good_updates_keep_the_global_adapter(tmp_path) -> None:
    strategy = _strategy(tmp_path)
    before = [v.copy() for v in strategy.state.wire_tensors()]
    nan = _moved(strategy, 0.0)
    nan[1][:] = np.inf
    parameters, _ = strategy.aggregate_fit(1, [_result("a", _moved(strategy, 0.01)), _result("bad", nan)], [])
    for got, old in zip(parameters_to_ndarrays(parameters), before, strict=True):
        np.testing.assert_array_equal(got, old)
    assert "global kept" in strategy.history[0]["note"]


def test_weights_are_capped(tmp_path) -> None:
    strategy = _strategy(tmp_path)
    base = strategy.state.wire_tensors()
    parameters, _ = strategy.aggregate_fit(1, [_result("a", _moved(strategy, 0.01), MAX_WEIGHT),
                                               _result("liar", _moved(strategy, 0.03), 10**9)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], base[0] + 0.02, atol=1e-6)


def test_a_secure_aggregate_is_checked_as_a_whole(tmp_path) -> None:
    strategy = _strategy(tmp_path, secagg=True, min_clients=3)
    before = [v.copy() for v in strategy.state.wire_tensors()]
    poisoned = _moved(strategy, 0.0)
    poisoned[0][:] = 6.3e4  # what a NaN turns into under SecAgg+'s modular arithmetic
    same = [_result(name, poisoned) for name in "abc"]  # every result carries the one (masked) sum
    parameters, _ = strategy.aggregate_fit(1, same, [])
    np.testing.assert_array_equal(parameters_to_ndarrays(parameters)[0], before[0])
    assert "secure aggregate refused" in strategy.history[0]["note"]
    fine = [_result(name, _moved(strategy, 0.01)) for name in "abc"]
    parameters, _ = strategy.aggregate_fit(2, fine, [])
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], before[0] + 0.01, atol=1e-6)


def test_every_round_is_checkpointed_and_resumed(tmp_path) -> None:
    strategy = _strategy(tmp_path)
    strategy.aggregate_fit(1, [_result("a", _moved(strategy, 0.01)), _result("b", _moved(strategy, 0.01))], [])
    strategy.aggregate_fit(2, [_result("a", _moved(strategy, 0.02)), _result("b", _moved(strategy, 0.02))], [])
    state, done, history = load_checkpoint(tmp_path, initial_state(CFG))
    assert done == 2 and [h["round"] for h in history] == [1, 2]
    for name in state.wire:
        np.testing.assert_allclose(state.tensors[name], strategy.state.tensors[name])
    # A server restarted from it numbers its rounds on: the next is round 3.
    resumed = AdapterStrategy(CFG, RunSettings(data="synthetic:4:200", out=str(tmp_path)), state, done, history)
    resumed.aggregate_fit(1, [_result("a", _moved(resumed, 0.01)), _result("b", _moved(resumed, 0.01))], [])
    assert [h["round"] for h in json.loads((tmp_path / "history.json").read_text())] == [1, 2, 3]
    with pytest.raises(ConfigError, match="another base"):
        load_checkpoint(tmp_path, initial_state(FederatedConfig(aggregation="svd")))


def test_secagg_shares_are_odd_and_bounded() -> None:
    for clients, shares in [(3, 3), (4, 3), (6, 5), (50, 7)]:
        workflow = secagg_workflow(RunSettings(secagg=True, min_clients=3), clients)
        assert workflow.num_shares == shares and workflow.reconstruction_threshold == shares // 2 + 1
    with pytest.raises(ConfigError, match="at least 3"):
        RunSettings(secagg=True, min_clients=2)
