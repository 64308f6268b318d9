"""AnomalyDetector on seeded synthetic data: API conventions, quality floor, persistence, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from edgepeft.core.errors import ArtifactError, ConfigError, DataError
from edgepeft.detect.detector import AnomalyDetector
from tests.conftest import sine_series


def _with_fault(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal training rows, and test rows where channel 1 breaks its relation to the others for a while."""
    series = sine_series(1800, 3, seed=seed)
    train, test = series[:1000], series[1000:].copy()
    labels = np.zeros(len(test), dtype=int)
    labels[400:520] = 1
    test[400:520, 1] = test[400:520, 1] * -0.5 + 0.8  # inverted, shifted: plausible range, wrong relation
    return train, test, labels


@pytest.fixture(scope="module")
def fitted() -> AnomalyDetector:
    train, _, _ = _with_fault()
    return AnomalyDetector(base="tiny", method="lora", rank=4, seed=0).fit(train)


def test_fit_returns_self_and_sets_fitted_state(fitted: AnomalyDetector) -> None:
    for attr in ("scaler_", "threshold_", "calibrator_", "channel_error_", "model_", "channels_"):
        assert hasattr(fitted, attr)
    assert fitted.get_params()["method"] == "lora"
    fresh = AnomalyDetector(base="tiny")
    assert not hasattr(fresh, "threshold_")  # no work in __init__


def test_scores_separate_the_fault(fitted: AnomalyDetector) -> None:
    _, test, labels = _with_fault()
    scores = fitted.score(test)
    assert scores.shape == (len(test),)
    assert np.isfinite(scores).all()
    assert roc_auc_score(labels, scores) > 0.9
    pred = fitted.predict(test)
    assert set(np.unique(pred)) <= {0, 1}
    assert pred[labels == 1].mean() > pred[labels == 0].mean()


def test_probabilities_are_calibrated_into_unit_interval(fitted: AnomalyDetector) -> None:
    _, test, _ = _with_fault()
    proba = fitted.predict_proba(test)
    assert ((proba >= 0) & (proba <= 1)).all()
    out = fitted.score_all(test)
    assert np.array_equal(out["anomaly"], fitted.predict(test))


def test_prefix_scores_do_not_depend_on_later_rows(fitted: AnomalyDetector) -> None:
    _, test, _ = _with_fault()
    full = fitted.score(test)
    prefix = fitted.score(test[:333])
    np.testing.assert_allclose(prefix, full[:333], rtol=1e-5, atol=1e-6)


def test_short_input_is_scored_row_by_row(fitted: AnomalyDetector) -> None:
    _, test, _ = _with_fault()
    assert fitted.score(test[:5]).shape == (5,)


def test_dataframe_input_and_column_order(fitted: AnomalyDetector) -> None:
    train, test, _ = _with_fault()
    cols = ["a", "b", "c"]
    det = AnomalyDetector(base="tiny", method="bitfit", steps=5).fit(pd.DataFrame(train, columns=cols))
    frame = pd.DataFrame(test, columns=cols)
    np.testing.assert_allclose(det.score(frame[["c", "a", "b"]]), det.score(frame), rtol=1e-6)
    with pytest.raises(DataError, match="channel"):
        det.score(pd.DataFrame(test, columns=["a", "b", "x"]))


def test_save_load_round_trip(fitted: AnomalyDetector, tmp_path) -> None:
    _, test, _ = _with_fault()
    fitted.save(tmp_path / "det")
    loaded = AnomalyDetector.load(tmp_path / "det")
    assert np.array_equal(loaded.score(test), fitted.score(test))
    assert loaded.threshold_ == fitted.threshold_
    assert fitted.adapter_bytes(tmp_path / "det") > 0


def test_lora_merge_keeps_scores(tmp_path) -> None:
    train, test, _ = _with_fault()
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=10).fit(train)
    before = det.score(test)
    det.merge()
    np.testing.assert_allclose(det.score(test), before, rtol=1e-4, atol=1e-5)
    det.unmerge()
    np.testing.assert_allclose(det.score(test), before, rtol=1e-4, atol=1e-5)


def test_bad_input_raises_clear_errors(fitted: AnomalyDetector, tmp_path) -> None:
    train, test, _ = _with_fault()
    with pytest.raises(DataError, match="channels"):
        fitted.score(test[:, :2])
    with pytest.raises(DataError, match="rows"):
        AnomalyDetector(base="tiny", steps=1).fit(train[:20])
    bad = train.copy()
    bad[100:200, 0] = np.nan
    with pytest.raises(DataError):
        AnomalyDetector(base="tiny", steps=1).fit(bad)
    with pytest.raises(ConfigError, match="unknown method"):
        AnomalyDetector(base="tiny", method="magic").fit(train)
    with pytest.raises(ConfigError, match="unknown base"):
        AnomalyDetector(base="huge").fit(train)
    with pytest.raises(ConfigError, match="not fitted"):
        AnomalyDetector().score(test)
    with pytest.raises(ArtifactError):
        AnomalyDetector.load(tmp_path / "nothing-here")


def test_tampered_detector_file_is_refused(fitted: AnomalyDetector, tmp_path) -> None:
    fitted.save(tmp_path / "det")
    (tmp_path / "det" / "detector.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        AnomalyDetector.load(tmp_path / "det")
    fitted.save(tmp_path / "det2")
    (tmp_path / "det2" / "adapter" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="safetensors"):
        AnomalyDetector.load(tmp_path / "det2")


def test_cached_scoring_equals_full_forward(fitted: AnomalyDetector, monkeypatch) -> None:
    # Default PEFT detectors adapt only the channel block, so temporal features are computed once.
    _, test, _ = _with_fault()
    encoder = fitted.method_.encoder(fitted.model_)
    assert encoder.cacheable
    scaled = fitted._prepare(test)
    cached = fitted._row_errors(scaled)
    monkeypatch.setattr(type(encoder), "cacheable", property(lambda self: False))
    full = fitted._row_errors(scaled)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cacheable", [True, False])
def test_scores_do_not_depend_on_how_many_windows_go_through_at_once(
    fitted: AnomalyDetector, monkeypatch, cacheable: bool
) -> None:
    """The channel budget only sets the size of each forward pass (memory), never the numbers."""
    _, test, _ = _with_fault()
    scaled = fitted._prepare(test)
    if not cacheable:
        encoder = fitted.method_.encoder(fitted.model_)
        monkeypatch.setattr(type(encoder), "cacheable", property(lambda self: False))
    one_window = fitted._row_errors(scaled, channel_budget=1)
    many = fitted._row_errors(scaled, channel_budget=1 << 16)
    np.testing.assert_allclose(fitted._row_errors(scaled), many, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_window, many, rtol=1e-5, atol=1e-6)


def test_every_block_can_be_adapted() -> None:
    train, test, labels = _with_fault()
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=20, peft_options={"adapt_last": None}).fit(train)
    assert not det.method_.encoder(det.model_).cacheable
    assert det.report_["trainable_share"] > AnomalyDetector(base="tiny", steps=1).fit(train).report_["trainable_share"]


def _drifting_asset(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three coupled sines plus a temperature-like channel that wanders slowly and, in the test part, keeps
    drifting past its training range (as a pump body warms up after a fault) while the sines stay normal."""
    rng = np.random.default_rng(seed)
    sines = sine_series(1600, 3, seed=seed)
    warm = np.cumsum(rng.normal(0.0, 0.05, size=1600))
    warm[1000:] += np.linspace(0.0, 6.0 * warm[:1000].std(), 600)
    series = np.c_[sines, warm].astype(np.float32)
    return series[:1000], series[1000:]


def test_a_slow_channel_drifting_past_its_training_range_raises_fewer_false_alarms() -> None:
    """The slow-channel rule is what keeps a drifting temperature from alarming through its blind error.

    Measured on the dynamics alone: with the state evidence on, a temperature six spreads past anything the asset
    showed in training is a new state, flagged on purpose (and explained as ``level``)."""
    train, test = _drifting_asset()
    kw = {"base": "tiny", "method": "lora", "rank": 4, "steps": 60, "seed": 0, "evidence": "dynamics"}
    with_rule = AnomalyDetector(**kw).fit(train)
    without = AnomalyDetector(**kw, slow_channel_share=None).fit(train)
    assert with_rule.evidence_weights_[3, 1] == 0.0, "the wandering channel is found slow"
    assert (with_rule.evidence_weights_[:3, 1] > 0).all(), "the sines (cycles shorter than the window) are not"
    far_with, far_without = with_rule.predict(test).mean(), without.predict(test).mean()
    assert far_with < far_without, (far_with, far_without)
    assert far_with < 0.2


def test_detectors_saved_before_the_new_scoring_keep_their_scoring(fitted: AnomalyDetector, tmp_path) -> None:
    """A detector.json without channel_agg / evidence_weights reads as what it was fitted with: mean, full blind."""
    import json

    from edgepeft.detect.scoring import combine_errors

    path = fitted.save(tmp_path / "old")
    state = json.loads((path / "detector.json").read_text())
    del state["evidence_weights"], state["params"]["channel_agg"], state["params"]["slow_channel_share"]
    # ... and before Detector v2 (schema 1: no state evidence, no fusion, no held warm-up rows)
    for key in ("state", "fusion", "warmup_rows"):
        del state[key]
    del state["params"]["evidence"], state["params"]["state_window"]
    state["schema_version"] = 1
    (path / "detector.json").write_text(json.dumps(state))
    old = AnomalyDetector.load(path)
    assert old.channel_agg == "mean" and old.slow_channel_share is None
    np.testing.assert_array_equal(old.evidence_weights_, [[0.5, 0.5]] * 3)
    _, test, _ = _with_fault()
    errors = fitted._row_errors(fitted._prepare(test))
    expected = combine_errors(errors, fitted.channel_error_, np.array([[0.5, 0.5]] * 3), fitted.smoothing, "mean")
    np.testing.assert_allclose(old.score(test), expected, rtol=1e-6)


def test_channel_aggregation_is_validated_and_saved(tmp_path) -> None:
    with pytest.raises(ConfigError, match="channel_agg"):
        AnomalyDetector(base="tiny", channel_agg="median").fit(sine_series(400, 2))
    with pytest.raises(ConfigError, match="slow_channel_share"):
        AnomalyDetector(base="tiny", slow_channel_share=1.5).fit(sine_series(400, 2))
    X = sine_series(300, 2, seed=1)
    for agg in ("mean", "pooled"):
        det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=5, channel_agg=agg).fit(sine_series(400, 2))
        loaded = AnomalyDetector.load(det.save(tmp_path / agg))
        assert loaded.channel_agg == agg
        np.testing.assert_array_equal(loaded.score(X), det.score(X))


def test_channel_aggregations_combine_evidence_as_documented() -> None:
    from edgepeft.detect.scoring import combine_errors

    errors = np.array([[[9.0, 9.0], [0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]])  # (T=2, C=3, 2)
    channel_error, weights = np.ones((3, 2)), np.full((3, 2), 0.5)  # evidence per row: [9, 0, 0] and [2, 2, 2]
    got = {agg: combine_errors(errors, channel_error, weights, 1, agg) for agg in ("max", "mean", "pooled")}
    np.testing.assert_allclose(got["max"], np.log1p([9.0, 2.0]))
    np.testing.assert_allclose(got["mean"], [np.log1p(9.0) / 3, np.log1p(2.0)])
    np.testing.assert_allclose(got["pooled"], np.log1p([3.0, 2.0]))
    # Where the aggregations disagree: one strong channel ranks first under max and pooled, not under mean.
    assert got["max"][0] > got["max"][1] and got["pooled"][0] > got["pooled"][1] and got["mean"][0] < got["mean"][1]


@pytest.mark.parametrize("weights", [[[0.5, 0.5]] * 2, [[-1.0, 0.5]] * 3, [[0.5, None]] * 3])
def test_bad_evidence_weights_in_a_saved_detector_are_refused(fitted: AnomalyDetector, tmp_path, weights) -> None:
    import json

    path = fitted.save(tmp_path / "det")
    state = json.loads((path / "detector.json").read_text())
    state["evidence_weights"] = weights
    (path / "detector.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="malformed"):
        AnomalyDetector.load(path)


@pytest.mark.parametrize(("field", "edit"), [
    ("channel_error", lambda s: s["channel_error"][0].__setitem__(0, 0.0)),
    ("channel_error", lambda s: s["channel_error"].pop()),
    ("channel_error", lambda s: s["channel_error"][1].__setitem__(1, float("nan"))),
    ("scaler", lambda s: s["scaler"]["mean"].__setitem__(0, float("inf"))),
    ("scaler", lambda s: s["scaler"].update(mean=s["scaler"]["mean"][:-1], scale=s["scaler"]["scale"][:-1])),
    ("threshold", lambda s: s["threshold"].update(threshold=float("nan"))),
])
def test_numbers_scores_depend_on_are_checked_when_a_detector_is_read(
    fitted: AnomalyDetector, tmp_path, field: str, edit
) -> None:
    """A hand-edited or corrupted detector.json must not load into a detector that scores NaN or inf."""
    import json

    path = fitted.save(tmp_path / "det")
    state = json.loads((path / "detector.json").read_text())
    edit(state)
    (path / "detector.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match=f"malformed.*{field}"):
        AnomalyDetector.load(path)


def test_alarm_persistence_is_applied_saved_and_validated(tmp_path) -> None:
    from edgepeft.detect.threshold import persist_alarms

    train, test, _ = _with_fault()
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=5, raise_after=4, clear_after=3).fit(train)
    scores = det.score(test)
    expected = persist_alarms(scores > det.threshold_, 4, 3).astype(np.int8)
    expected[: det.warmup_rows_] = 0  # rows without a whole window of history never alarm
    assert det.warmup_rows_ == 64
    assert np.array_equal(det.predict(test), expected)
    assert np.array_equal(det.score_all(test)["anomaly"], expected)
    # The persistence changed something here, so the comparison above is not vacuous.
    assert not np.array_equal(expected, (scores > det.threshold_).astype(np.int8))
    loaded = AnomalyDetector.load(det.save(tmp_path / "persist"))
    assert (loaded.raise_after, loaded.clear_after) == (4, 3)
    assert np.array_equal(loaded.predict(test), expected)
    assert det.info()["raise_after"] == 4
    for bad in ({"raise_after": 0}, {"clear_after": 2.5}):
        with pytest.raises(ConfigError, match="whole number of rows"):
            AnomalyDetector(base="tiny", steps=5, **bad).fit(train)


def test_detectors_saved_before_alarm_persistence_flag_every_row_over_the_threshold(
    fitted: AnomalyDetector, tmp_path
) -> None:
    import json

    path = fitted.save(tmp_path / "old")
    state = json.loads((path / "detector.json").read_text())
    del state["params"]["raise_after"], state["params"]["clear_after"]
    (path / "detector.json").write_text(json.dumps(state))
    old = AnomalyDetector.load(path)
    _, test, _ = _with_fault()
    assert (old.raise_after, old.clear_after) == (1, 1)
    expected = (old.score(test) > old.threshold_).astype(np.int8)
    expected[: old.warmup_rows_] = 0
    assert np.array_equal(old.predict(test), expected)
    state["params"]["raise_after"] = -2  # a damaged file: refused when read, never half-applied
    (path / "detector.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="raise_after"):
        AnomalyDetector.load(path)


def test_settings_given_as_numpy_scalars_save_as_plain_numbers(tmp_path) -> None:
    """A setting read from an array (a grid search) is an np.int64: the save must not fail on it."""
    det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=np.int64(3), raise_after=np.int64(2))
    det.fit(sine_series(400, 2))
    loaded = AnomalyDetector.load(det.save(tmp_path / "np"))
    assert (loaded.steps, loaded.raise_after) == (3, 2)
    assert type(loaded.raise_after) is int


# ---------------------------------------------------------------------------------------------- Detector v2


def test_one_pass_blind_predictions_equal_the_c_copies(fitted: AnomalyDetector) -> None:
    _, test, _ = _with_fault()
    scaled = fitted._prepare(test)
    np.testing.assert_allclose(fitted._row_errors(scaled), fitted._row_errors(scaled, one_pass=False),
                               rtol=1e-4, atol=1e-6)


def test_v2_state_survives_save_and_load_and_schema_is_2(fitted: AnomalyDetector, tmp_path) -> None:
    import json

    path = fitted.save(tmp_path / "v2")
    state = json.loads((path / "detector.json").read_text())
    assert state["schema_version"] == 2 and state["fusion"] and state["state"]
    loaded = AnomalyDetector.load(path)
    _, test, _ = _with_fault()
    np.testing.assert_array_equal(loaded.score(test), fitted.score(test))
    state["fusion"]["dynamics"]["spread"] = -1.0  # damaged: refused when read, never scores NaN
    (path / "detector.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="malformed"):
        AnomalyDetector.load(path)


def test_p_anomaly_reads_as_promised(fitted: AnomalyDetector) -> None:
    train, test, _ = _with_fault()
    out = fitted.score_all(test)
    p, flagged = out["p_anomaly"], out["anomaly"].astype(bool)
    assert (p[flagged] >= 0.5).all() and (p[fitted.warmup_rows_:][~flagged[fitted.warmup_rows_:]] <= 0.5).all()
    live = slice(fitted.warmup_rows_, None)  # held warm-up rows are capped under 0.5 on purpose
    order = np.argsort(out["score"][live])
    assert (np.diff(p[live][order]) >= -1e-12).all()  # monotone in the score
    assert (p < 1.0).all()  # no plateau at 1: a mild excursion and a burst still rank apart
    normal = fitted.score_all(sine_series(3000, 3, seed=5))["p_anomaly"][fitted.warmup_rows_:]
    assert np.median(normal) < 0.1  # near 0 on normal rows
    assert (normal > 0.5).mean() < 5 * fitted.target_far


def test_rows_without_history_never_alarm_and_the_cli_says_so(fitted: AnomalyDetector) -> None:
    _, test, _ = _with_fault()
    out = fitted.score_all(test[:200] * 3.0)  # wild rows from the very first row
    assert not out["anomaly"][: fitted.warmup_rows_].any()
    assert (out["p_anomaly"][: fitted.warmup_rows_] < 0.5).all()
    assert out["anomaly"][fitted.warmup_rows_:].any()


def test_explanations_name_channels_and_evidence_kinds(fitted: AnomalyDetector) -> None:
    _, test, labels = _with_fault()
    out = fitted.score_all(test, explain=True)
    np.testing.assert_array_equal(out["score"], fitted.score(test))
    np.testing.assert_array_equal(out["anomaly"], fitted.predict(test))
    flagged = np.flatnonzero(out["anomaly"])
    assert len(flagged) and all(out["top_channels"][i] for i in flagged)
    assert all(out["top_channels"][i] == "" for i in np.flatnonzero(out["anomaly"] == 0))
    kinds = {"dynamics", "level", "scale", "stuck", "relation"}
    first = [out["top_channels"][i].split(";")[0] for i in flagged if labels[i]]
    for label in first:
        channel, kind = label.split(":")
        assert channel in fitted.channels_ and kind in kinds
    # The fault is in channel 1: it leads the explanations of the rows inside the fault more often than any other.
    leaders = [label.split(":")[0] for label in first]
    assert max(set(leaders), key=leaders.count) == fitted.channels_[1]
    assert fitted.explain(test[:100], top=2)[99].count(";") == 1


def test_evidence_setting_is_validated_and_a_fixed_set_is_used() -> None:
    train, test, _ = _with_fault()
    with pytest.raises(ConfigError, match="evidence"):
        AnomalyDetector(base="tiny", steps=5, evidence="dynamics,telepathy").fit(train)
    with pytest.raises(ConfigError, match="state_window"):
        AnomalyDetector(base="tiny", steps=5, state_window=1).fit(train)
    det = AnomalyDetector(base="tiny", steps=5, evidence="relation,dynamics").fit(train)
    assert det.fusion_.kinds_ == ["relation", "dynamics"]
    assert np.isfinite(det.score(test)).all()


def test_get_params_follows_the_constructor_signature() -> None:
    import inspect

    det = AnomalyDetector(base="tiny", state_window=24)
    names = [n for n in inspect.signature(AnomalyDetector.__init__).parameters if n != "self"]
    assert list(det.get_params()) == names and det.get_params()["state_window"] == 24
