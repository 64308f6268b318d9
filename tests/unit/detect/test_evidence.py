"""Detector v2's state evidence, fusion, synthetic faults and label-free weight selection (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from edgepeft.detect.evidence import (
    STATE_KINDS,
    Fusion,
    StateModel,
    cross_fit,
    inject_faults,
    select_weights,
    trailing_std,
)


def _asset(n_rows: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    driver = np.sin(np.arange(n_rows) / 15)
    return np.c_[driver, 2 * driver + 0.1, -driver] + 0.1 * rng.normal(size=(n_rows, 3))


def test_trailing_std_is_causal_and_matches_numpy() -> None:
    x = np.random.default_rng(0).normal(size=(50, 2))
    std = trailing_std(x, 8)
    np.testing.assert_allclose(std[20], x[13:21].std(axis=0), atol=1e-12)
    changed = x.copy()
    changed[30:] += 100
    np.testing.assert_array_equal(trailing_std(changed, 8)[:30], std[:30])


def test_state_evidence_finds_level_shift_stuck_sensor_and_broken_relation() -> None:
    train, test = _asset()[:1500], _asset(seed=1)[:600].copy()
    state = StateModel(state_window=16).fit(train)
    quiet = state.evidence(test)
    for kind in STATE_KINDS:
        assert quiet[kind][16:].mean() < 0.5, kind  # normal rows: (mostly) inside the normal envelope
    shifted, stuck, broken = test.copy(), test.copy(), test.copy()
    shifted[300:, 0] += 3.0
    stuck[300:, 1] = stuck[299, 1]
    broken[300:, 2] = -broken[300:, 2]  # same range, wrong sign against the others
    assert state.evidence(shifted)["level"][330:, 0].mean() > 20 * max(quiet["level"][:, 0].mean(), 1e-3)
    assert state.evidence(stuck)["scale"][330:, 1].mean() > 20 * max(quiet["scale"][:, 1].mean(), 1e-3)
    assert (state.scale_direction(stuck)[330:, 1] < 0).all()  # a collapse, reported as stuck
    assert state.evidence(broken)["relation"][330:, 2].mean() > 20 * quiet["relation"][:, 2].mean()


def test_state_model_round_trips_and_refuses_damage() -> None:
    train = _asset()
    state = StateModel().fit(train)
    again = StateModel.from_dict(state.to_dict(), 3)
    for kind, values in state.evidence(train).items():
        np.testing.assert_array_equal(again.evidence(train)[kind], values)
    bad = state.to_dict()
    bad["level_std"][0] = -1.0
    with pytest.raises(ValueError, match="positive"):
        StateModel.from_dict(bad, 3)
    with pytest.raises(ValueError, match="3 finite"):
        StateModel.from_dict({**state.to_dict(), "scale_mean": [0.0, float("nan"), 0.0]}, 3)


def test_cross_fit_scores_each_block_with_a_model_that_never_saw_it() -> None:
    values = _asset(800)
    values[600:] += 5.0  # the last block is unlike the others: only out-of-sample evidence can say so
    oof = cross_fit(values, 16, folds=4)
    in_sample = StateModel(16).fit(values).evidence(values)
    assert oof["level"][650:].mean() > 5 * in_sample["level"][650:].mean()


def test_fusion_puts_kinds_on_one_scale_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    reference = {"dynamics": rng.exponential(size=(3000, 3)), "relation": 100 * rng.exponential(size=(3000, 3))}
    fusion = Fusion().fit(reference)
    scores = fusion.kind_scores(reference)
    for kind in reference:
        assert np.quantile(scores[kind], 0.99) == pytest.approx(1.0)
        assert np.median(scores[kind]) == pytest.approx(0.0)
    again = Fusion.from_dict(fusion.to_dict(), 3)
    np.testing.assert_array_equal(again.raw_score(reference), fusion.raw_score(reference))
    assert fusion.channel_scores(reference).shape == (3000, 3, 2)
    with pytest.raises(ValueError, match="kinds"):
        Fusion.from_dict({"telepathy": fusion.to_dict()["dynamics"]}, 3)
    weighted = Fusion().fit(reference, {"dynamics": 0.0, "relation": 1.0})
    np.testing.assert_array_equal(weighted.raw_score(reference),
                                  np.maximum(0.0, weighted.channel_scores(reference)[..., 1].max(axis=1)))


def test_injected_faults_and_label_free_selection() -> None:
    values = _asset(2000)
    faulty, mask = inject_faults(values, np.random.default_rng(0), n_faults=14)
    assert 0.05 < mask.mean() < 0.6
    assert not np.array_equal(faulty[mask], values[mask]) and np.array_equal(faulty[~mask], values[~mask])
    # A kind that sees the injected rows wins over one that does not.
    useful = np.abs(faulty - values).max(axis=1)
    useless = np.random.default_rng(1).normal(size=len(values))
    scores = {"dynamics": useless, "relation": useful}
    chosen = select_weights(scores, mask, [{"dynamics": 1.0, "relation": 0.0}, {"dynamics": 0.0, "relation": 1.0}], 1)
    assert chosen == {"dynamics": 0.0, "relation": 1.0}
