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
    assert sorted(BASELINES) == ["cnn", "iforest", "knn", "movvar", "pca", "sqdiff"]


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


# ---------------------------------------------------------------------------------------------- knn and cnn
NEW_BASELINES = ["cnn", "knn"]
SHIFT_AT = 300


@pytest.fixture(scope="module")
def shift_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return _series(rng, 1200), _series(rng, 500)


@pytest.fixture(scope="module", params=NEW_BASELINES)
def fitted_new(request: pytest.FixtureRequest, shift_data: tuple[np.ndarray, np.ndarray]) -> BaselineDetector:
    return BASELINES[request.param]().fit(shift_data[0])


def test_new_baselines_flag_a_level_shift(fitted_new: BaselineDetector, shift_data: tuple[np.ndarray, ...]) -> None:
    test = shift_data[1].copy()
    test[SHIFT_AT:, 3] += 0.5  # ~1.4 standard deviations: the load follower leaves the load
    scores = fitted_new.score(test)
    before = scores[40:SHIFT_AT]  # past the first rows, whose history is short
    assert scores[SHIFT_AT + 2:].min() > before.max()
    assert scores[SHIFT_AT:].mean() > 2.5 * before.mean()
    assert fitted_new.predict(test)[SHIFT_AT + 10:].mean() > 0.9


def test_new_baselines_flag_a_spike(fitted_new: BaselineDetector, shift_data: tuple[np.ndarray, ...]) -> None:
    test = shift_data[1].copy()
    test[SHIFT_AT, 2] += 5.0  # one row, ~3.5 standard deviations
    scores = fitted_new.score(test)
    assert scores[SHIFT_AT:SHIFT_AT + 8].max() > 1.2 * scores[40:SHIFT_AT].max()
    assert scores[SHIFT_AT:SHIFT_AT + 8].max() > fitted_new.threshold_


def test_new_baselines_are_causal(fitted_new: BaselineDetector, shift_data: tuple[np.ndarray, ...]) -> None:
    """Rewriting every row after t leaves the scores up to t as they were (raw and smoothed)."""
    test = shift_data[1]
    changed = test.copy()
    changed[201:] = np.random.default_rng(9).normal(scale=5.0, size=changed[201:].shape)
    scaled, scaled_changed = fitted_new.scaler_.transform(test), fitted_new.scaler_.transform(changed)
    np.testing.assert_allclose(fitted_new._raw_scores(scaled_changed)[:201], fitted_new._raw_scores(scaled)[:201],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fitted_new.score(changed)[:201], fitted_new.score(test)[:201], rtol=1e-9, atol=1e-12)
    assert not np.allclose(fitted_new.score(changed)[201:], fitted_new.score(test)[201:])


@pytest.mark.parametrize("name", NEW_BASELINES)
def test_new_baselines_are_deterministic(name: str, shift_data: tuple[np.ndarray, ...]) -> None:
    train, test = shift_data
    # knn: a fit subset smaller than the fit rows, so the seed picks which rows the model keeps.
    params = {"steps": 60} if name == "cnn" else {"max_fit_points": 300}
    first = BASELINES[name](**params, seed=3).fit(train).score(test)
    np.testing.assert_array_equal(BASELINES[name](**params, seed=3).fit(train).score(test), first)
    assert not np.allclose(BASELINES[name](**params, seed=4).fit(train).score(test), first)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("knn", {"n_neighbors": 0}, "n_neighbors"),
        ("knn", {"window": 1}, "window"),
        ("knn", {"method": "max"}, "method"),
        ("knn", {"max_fit_points": 5}, "max_fit_points"),
        ("knn", {"n_neighbors": 2000, "max_fit_points": 5000}, "n_neighbors"),  # more neighbours than fit rows
        ("cnn", {"history": 3}, "history"),
        ("cnn", {"steps": 0}, "steps"),
        ("cnn", {"batch_size": 0}, "batch_size"),
        ("cnn", {"lr": 0.0}, "lr"),
        ("cnn", {"filters": 0}, "filters"),
    ],
)
def test_new_baselines_bad_params_are_config_errors(
    name: str, params: dict[str, float], match: str, shift_data: tuple[np.ndarray, ...]
) -> None:
    det = BASELINES[name](**params)
    assert det.get_params()[next(iter(params))] == next(iter(params.values()))  # stored unchanged
    with pytest.raises(ConfigError, match=match):
        det.fit(shift_data[0])


def test_knn_subsamples_the_fit_rows(shift_data: tuple[np.ndarray, ...]) -> None:
    train = shift_data[0]
    det = BASELINES["knn"](max_fit_points=200).fit(train)
    assert det.n_fit_points_ == 200 < det.n_fit_rows_
    assert BASELINES["knn"]().fit(train).n_fit_points_ == det.n_fit_rows_  # 960 fit rows: all kept


def test_fitted_new_baselines_pickle(fitted_new: BaselineDetector, shift_data: tuple[np.ndarray, ...]) -> None:
    """The cost measurement pickles a fitted baseline into a fresh process: it must score the same there."""
    import pickle

    restored = pickle.loads(pickle.dumps(fitted_new))
    np.testing.assert_array_equal(restored.score(shift_data[1]), fitted_new.score(shift_data[1]))


def test_cnn_leaves_torch_threads_and_rng_alone(shift_data: tuple[np.ndarray, ...]) -> None:
    import torch

    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    det = BASELINES["cnn"](steps=5).fit(shift_data[0])
    det.score(shift_data[1])
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)
    assert all(isinstance(value, np.ndarray) for value in det.weights_.values())  # no torch state kept
