"""Conformance table: every classical baseline goes through the same checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from edgepeft.bench.baselines import BASELINES, BaselineDetector, PCADetector
from edgepeft.core.errors import ConfigError, DataError
from edgepeft.detect.scoring import trailing_mean

N_CHANNELS = 4
FAULT = slice(250, 330)


def _series(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    """Four coupled sensor-like channels: two phases of one rotation, a load follower and noise."""
    t = np.arange(n_rows)
    load = np.sin(2 * np.pi * t / 200)
    return np.c_[
        np.sin(t / 3) * (1 + 0.3 * load),
        np.cos(t / 3) * (1 + 0.3 * load),
        2.0 * load + 5.0,
        0.5 * load,
    ] + 0.05 * rng.normal(size=(n_rows, N_CHANNELS))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = _series(rng, 1200)
    test = _series(rng, 500)
    # A collective fault: broadband vibration on the rotation channels and a load channel that stops
    # following the load (a broken correlation).
    test[FAULT, :2] += 0.8 * rng.normal(size=(FAULT.stop - FAULT.start, 2))
    test[FAULT, 3] = -test[FAULT, 3] + 0.6
    labels = np.zeros(len(test), dtype=int)
    labels[FAULT] = 1
    return train, test, labels


@pytest.fixture(scope="module", params=sorted(BASELINES))
def fitted(request: pytest.FixtureRequest, data: tuple[np.ndarray, ...]) -> BaselineDetector:
    return BASELINES[request.param]().fit(data[0])


def test_registry_names() -> None:
    assert sorted(BASELINES) == ["iforest", "movvar", "pca", "sqdiff"]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_fit_returns_self_and_sets_threshold(name: str, data: tuple[np.ndarray, ...]) -> None:
    det = BASELINES[name]()
    assert det.fit(data[0]) is det
    assert np.isfinite(det.threshold_)
    assert det.n_fit_rows_ + det.n_calib_rows_ == len(data[0])


def test_score_has_one_value_per_row(fitted: BaselineDetector, data: tuple[np.ndarray, ...]) -> None:
    scores = fitted.score(data[1])
    assert scores.shape == (len(data[1]),)
    assert np.isfinite(scores).all()


def test_fault_scores_higher_than_normal(fitted: BaselineDetector, data: tuple[np.ndarray, ...]) -> None:
    _, test, labels = data
    assert roc_auc_score(labels, fitted.score(test)) > 0.8


def test_predict_is_binary_and_matches_score_all(fitted: BaselineDetector, data: tuple[np.ndarray, ...]) -> None:
    predicted = fitted.predict(data[1])
    assert set(np.unique(predicted)) <= {0, 1}
    out = fitted.score_all(data[1])
    assert sorted(out) == ["anomaly", "p_anomaly", "score"]
    np.testing.assert_array_equal(out["anomaly"], predicted)
    assert ((out["p_anomaly"] >= 0) & (out["p_anomaly"] <= 1)).all()
    # Normal rows stay mostly quiet at a 1 % target false-alarm rate.
    assert predicted[:200].mean() < 0.1


def test_scoring_is_causal(fitted: BaselineDetector, data: tuple[np.ndarray, ...]) -> None:
    """A row's score never depends on later rows: the streaming and the batch answer agree."""
    test = data[1]
    np.testing.assert_allclose(fitted.score(test[:300]), fitted.score(test)[:300], rtol=1e-6, atol=1e-9)


def test_channel_mismatch_is_a_data_error(fitted: BaselineDetector, data: tuple[np.ndarray, ...]) -> None:
    with pytest.raises(DataError, match="channels"):
        fitted.score(data[1][:, :3])


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_dataframe_columns_are_checked(name: str, data: tuple[np.ndarray, ...]) -> None:
    columns = ["a", "b", "c", "d"]
    det = BASELINES[name]().fit(pd.DataFrame(data[0], columns=columns))
    assert det.channels_ == columns
    reordered = pd.DataFrame(data[1], columns=columns)[["d", "c", "b", "a"]]
    np.testing.assert_allclose(det.score(reordered), det.score(data[1]))
    with pytest.raises(DataError, match="do not match"):
        det.score(pd.DataFrame(data[1], columns=["a", "b", "c", "x"]))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_unfitted_and_too_short(name: str) -> None:
    with pytest.raises(ConfigError, match="not fitted"):
        BASELINES[name]().score(np.zeros((10, 2)))
    with pytest.raises(DataError, match="rows"):
        BASELINES[name]().fit(np.random.default_rng(0).normal(size=(30, 2)))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_params_are_stored_unchanged(name: str) -> None:
    det = BASELINES[name](smoothing=3, target_far=0.05, raise_after=2)
    params = det.get_params()
    assert params["smoothing"] == 3 and params["target_far"] == 0.05 and params["raise_after"] == 2
    assert type(det)(**params).get_params() == params


@pytest.mark.parametrize(
    ("setting", "value"),
    [("smoothing", 0), ("target_far", 0.7), ("calib_fraction", 0.9), ("raise_after", 0), ("clear_after", -1)],
)
def test_bad_settings_are_config_errors(setting: str, value: float, data: tuple[np.ndarray, ...]) -> None:
    with pytest.raises(ConfigError, match=setting):
        BASELINES["sqdiff"](**{setting: value}).fit(data[0])


def test_pca_keeps_components_for_the_explained_variance(data: tuple[np.ndarray, ...]) -> None:
    det = PCADetector(variance=0.9).fit(data[0])
    assert 1 <= det.n_components_ < N_CHANNELS
    assert PCADetector(variance=1.0).fit(data[0]).n_components_ == N_CHANNELS


def test_trailing_mean_averages_what_exists() -> None:
    values = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(trailing_mean(values, 2), [[0, 1], [1, 2], [3, 4]])
    np.testing.assert_allclose(trailing_mean(values, 1), values)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_hold_alarms_like_our_detector(name: str, data: tuple[np.ndarray, ...]) -> None:
    from edgepeft.detect.threshold import persist_alarms

    det = BASELINES[name](raise_after=3, clear_after=2).fit(data[0])
    test = data[1]
    expected = persist_alarms(det.score(test) > det.threshold_, 3, 2).astype(np.int8)
    assert np.array_equal(det.predict(test), expected)
    assert np.array_equal(det.score_all(test)["anomaly"], expected)
