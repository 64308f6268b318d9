"""Thresholds and calibration from normal scores: false-alarm control, degenerate inputs, round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgepeft.core.errors import ArtifactError, ConfigError, DataError, ModelError
from edgepeft.detect.threshold import (
    POTThreshold,
    QuantileThreshold,
    ScoreCalibrator,
    fit_gpd,
    gpd_quantile,
    make_threshold,
    persist_alarms,
    threshold_from_dict,
)


def _json_round_trip(d: dict) -> dict:
    return json.loads(json.dumps(d))


# ------------------------------------------------------------------------------------------------ quantile


def test_quantile_threshold_hand_case():
    # Scores 0..99, target 5 %: the 0.95 quantile (linear) is 0.95 * 99 = 94.05; rows 95..99 exceed it.
    th = QuantileThreshold(target_far=0.05).fit(np.arange(100.0))
    assert th.threshold_ == pytest.approx(94.05)
    assert th.predict(np.arange(100.0)).sum() == 5


def test_quantile_threshold_round_trip():
    th = QuantileThreshold(0.02).fit(np.random.default_rng(0).normal(size=500))
    again = threshold_from_dict(_json_round_trip(th.to_dict()))
    assert isinstance(again, QuantileThreshold)
    assert again.threshold_ == th.threshold_
    assert again.target_far == 0.02


# ------------------------------------------------------------------------------------------------ POT


@pytest.mark.parametrize(
    ("name", "sample"),
    [
        ("exponential", lambda rng, n: rng.exponential(1.0, n)),
        ("pareto", lambda rng, n: rng.pareto(3.0, n) + 1.0),  # tail index 3: gamma = 1/3
    ],
)
def test_pot_exceedance_rate_close_to_target(name, sample):
    rng = np.random.default_rng(42)
    th = POTThreshold(target_far=0.01, level=0.98).fit(sample(rng, 20_000))
    fresh = sample(rng, 400_000)
    rate = float(np.mean(fresh > th.threshold_))
    assert 0.005 < rate < 0.02, f"{name}: exceedance {rate}"
    if name == "pareto":
        assert th.gamma_ == pytest.approx(1 / 3, abs=0.15)
    else:
        assert abs(th.gamma_) < 0.15


def test_pot_extrapolates_beyond_the_data():
    # Risk 1e-4 with 20k samples: about two samples beyond; exact exponential answer ln(1e4) = 9.21.
    rng = np.random.default_rng(1)
    th = POTThreshold(target_far=1e-4).fit(rng.exponential(size=20_000))
    assert th.threshold_ == pytest.approx(np.log(1e4), rel=0.15)
    assert th.threshold_ > th.init_threshold_


def test_pot_formula_hand_case():
    # t = 2, gamma = 0.5, sigma = 1, risk 0.001 with 2 % peaks: r = 0.05, z = 2 + 2 (0.05^-0.5 - 1).
    assert gpd_quantile(2.0, 0.5, 1.0, 0.001, 0.02) == pytest.approx(2 + 2 * (0.05**-0.5 - 1))
    assert gpd_quantile(2.0, 0.0, 1.0, 0.001, 0.02) == pytest.approx(2 - np.log(0.05))


def test_pot_falls_back_to_quantile_when_risk_is_not_in_the_tail():
    scores = np.random.default_rng(2).normal(size=1000)
    pot = POTThreshold(target_far=0.05, level=0.98).fit(scores)
    assert pot.threshold_ == pytest.approx(QuantileThreshold(0.05).fit(scores).threshold_)


def test_pot_with_few_peaks_stays_conservative():
    # Level 0.98 of 200 scores: 4 peaks. Their moments suggest a bounded tail (gamma < 0), which 4 points
    # cannot support, so the exponential is used instead.
    scores = np.random.default_rng(3).exponential(size=200)
    th = POTThreshold(target_far=0.001).fit(scores)
    assert th.n_peaks_ == 4
    assert th.gamma_ == 0.0
    assert th.threshold_ > th.init_threshold_
    # With enough excesses a bounded tail keeps its negative shape: GPD(gamma=-0.3) by inverse CDF.
    u = np.random.default_rng(9).uniform(size=2000)
    assert fit_gpd(((1 - u) ** 0.3 - 1) / -0.3)[0] == pytest.approx(-0.3, abs=0.1)


def test_pot_round_trip():
    th = POTThreshold(0.001, level=0.95).fit(np.random.default_rng(4).gamma(2.0, size=3000))
    d = th.to_dict()
    assert d["kind"] == "pot"
    again = threshold_from_dict(_json_round_trip(d))
    assert isinstance(again, POTThreshold)
    assert again.to_dict() == d


def test_fit_gpd_paths():
    rng = np.random.default_rng(5)
    gamma, sigma = fit_gpd(rng.pareto(2.0, 5000))  # Lomax(2): gamma 0.5, sigma 0.5
    assert gamma == pytest.approx(0.5, abs=0.1)
    assert sigma == pytest.approx(0.5, rel=0.15)
    assert fit_gpd(np.array([1.0, 1.2, 9.0]))[0] > 0  # moments on 3 excesses: a heavy-looking tail
    assert fit_gpd(np.array([0.5, 1.0, 1.5])) == (0.0, 1.0)  # 3 excesses, bounded-looking: exponential
    assert fit_gpd(np.full(20, 2.0)) == (0.0, 2.0)  # no spread: the exponential with that mean
    assert fit_gpd(np.array([])) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------ degenerate


@pytest.mark.parametrize("cls", [QuantileThreshold, POTThreshold, ScoreCalibrator])
def test_too_few_or_bad_normal_scores(cls):
    with pytest.raises(DataError, match="needs more normal data"):
        cls().fit(np.arange(9.0))
    with pytest.raises(DataError, match="NaN/inf"):
        cls().fit(np.append(np.arange(20.0), np.nan))
    with pytest.raises(DataError, match="1-D"):
        cls().fit(np.zeros((5, 5)))


@pytest.mark.parametrize("cls", [QuantileThreshold, POTThreshold])
def test_constant_scores_threshold_at_the_constant(cls):
    th = cls(target_far=0.001).fit(np.full(100, 3.0))
    assert th.threshold_ == 3.0
    assert th.predict([3.0, 3.0001, 2.0]).tolist() == [0, 1, 0]


@pytest.mark.parametrize("cls", [QuantileThreshold, POTThreshold])
def test_bad_settings_and_unfitted(cls):
    with pytest.raises(ConfigError, match="target_far"):
        cls(target_far=1.5).fit(np.arange(20.0))
    with pytest.raises(ModelError, match="not fitted"):
        cls().to_dict()
    with pytest.raises(ModelError, match="not fitted"):
        cls().predict([1.0])


def test_make_threshold_and_from_dict_errors():
    assert isinstance(make_threshold("quantile", 0.01), QuantileThreshold)
    assert make_threshold("pot", 0.02).target_far == 0.02
    with pytest.raises(ConfigError, match="unknown threshold kind"):
        make_threshold("spot", 0.01)
    with pytest.raises(ConfigError, match="target_far"):
        make_threshold("pot", 0.0)
    with pytest.raises(ArtifactError, match="unknown kind"):
        threshold_from_dict({"kind": "median"})
    with pytest.raises(ArtifactError, match="expected a saved 'pot'"):
        POTThreshold.from_dict(QuantileThreshold().fit(np.arange(20.0)).to_dict())
    with pytest.raises(ArtifactError, match="lacks"):
        QuantileThreshold.from_dict({"kind": "quantile", "target_far": 0.1})


# ------------------------------------------------------------------------------------------------ calibrator


@pytest.fixture(scope="module")
def normal_scores() -> np.ndarray:
    return np.random.default_rng(6).gamma(2.0, size=10_000)


def test_calibrator_monotone_bounded_and_centred(normal_scores):
    cal = ScoreCalibrator().fit(normal_scores)
    grid = np.linspace(normal_scores.min() - 1, normal_scores.max() * 3, 5000)
    p = cal.transform(grid)
    assert np.all(np.diff(p) >= 0)
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert cal.transform([np.median(normal_scores)])[0] == pytest.approx(0.5, abs=0.01)
    assert cal.transform([normal_scores.min() - 1])[0] == 0.0
    # About 1 % of normal scores lie above their 0.99 quantile.
    assert cal.transform([np.quantile(normal_scores, 0.99)])[0] == pytest.approx(0.99, abs=0.003)


def test_calibrator_tail_keeps_rising_beyond_the_normal_range(normal_scores):
    cal = ScoreCalibrator().fit(normal_scores)
    top = normal_scores.max()
    p = cal.transform([top, top + 1, top + 3])
    assert p[0] < p[1] < p[2] < 1.0
    assert p[0] > 0.999


def test_calibrator_round_trip_is_compact_and_exact(normal_scores):
    cal = ScoreCalibrator().fit(normal_scores)
    d = _json_round_trip(cal.to_dict())
    assert len(d["quantiles"]) == 201
    again = ScoreCalibrator.from_dict(d)
    probe = np.linspace(-1, normal_scores.max() * 2, 301)
    np.testing.assert_array_equal(again.transform(probe), cal.transform(probe))


def test_calibrator_constant_scores():
    cal = ScoreCalibrator().fit(np.full(50, 2.0))
    p = cal.transform([1.0, 2.0, 2.0 + 1e-6, 3.0])
    assert p.tolist()[:2] == [0.0, 0.5]
    assert 0.5 < p[2] < p[3] <= 1.0
    assert np.all(np.diff(p) >= 0)


def test_calibrator_heavy_and_bounded_tails_stay_monotone():
    rng = np.random.default_rng(8)
    for sample in (rng.pareto(1.5, 3000), rng.uniform(size=3000)):
        cal = ScoreCalibrator().fit(sample)
        assert cal.gamma_ >= 0.0
        p = cal.transform(np.linspace(-0.5, sample.max() * 4, 2000))
        assert np.all(np.diff(p) >= 0) and p.max() <= 1.0


def test_calibrator_errors():
    with pytest.raises(ModelError, match="not fitted"):
        ScoreCalibrator().transform([1.0])
    cal = ScoreCalibrator().fit(np.arange(30.0))
    with pytest.raises(DataError, match="NaN/inf"):
        cal.transform([np.nan])
    with pytest.raises(ArtifactError, match="ecdf_gpd"):
        ScoreCalibrator.from_dict({"kind": "quantile"})
    broken = cal.to_dict() | {"quantiles": [3.0, 2.0, 1.0]}
    with pytest.raises(ArtifactError, match="non-decreasing"):
        ScoreCalibrator.from_dict(broken)
    with pytest.raises(ConfigError, match="n_quantiles"):
        ScoreCalibrator(n_quantiles=2).fit(np.arange(30.0))


# ------------------------------------------------------------------------------------------------ persistence


def _reference_persistence(flags: list[bool], raise_after: int, clear_after: int) -> list[bool]:
    """The rule row by row, as an alerting engine states it (an independent implementation)."""
    out, on, over, under = [], False, 0, 0
    for flag in flags:
        over, under = (over + 1, 0) if flag else (0, under + 1)
        if not on and over >= raise_after:
            on = True
        elif on and under >= clear_after:
            on = False
        out.append(on)
    return out


@settings(max_examples=300, deadline=None)
@given(
    flags=st.lists(st.booleans(), max_size=80),
    raise_after=st.integers(1, 6),
    clear_after=st.integers(1, 6),
)
def test_persistence_matches_the_row_by_row_rule(flags, raise_after, clear_after):
    got = persist_alarms(np.array(flags, dtype=bool), raise_after, clear_after)
    assert got.tolist() == _reference_persistence(flags, raise_after, clear_after)


def test_persistence_hand_cases():
    flags = np.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    assert persist_alarms(flags).tolist() == flags.tolist()  # 1 / 1: unchanged
    # A two-row blip stays quiet; the three-row run raises at its third row.
    assert persist_alarms(flags, 3, 1).astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    # Held through gaps shorter than three normal rows; cleared at the third.
    assert persist_alarms(flags, 1, 3).astype(int).tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert persist_alarms(np.zeros(0, dtype=bool), 4, 4).shape == (0,)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_persistence_settings_are_validated(bad):
    with pytest.raises(ConfigError, match="whole number of rows"):
        persist_alarms(np.ones(5, dtype=bool), raise_after=bad)
    with pytest.raises(ConfigError, match="clear_after"):
        persist_alarms(np.ones(5, dtype=bool), clear_after=bad)
