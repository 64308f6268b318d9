"""StreamingDetector: causality (bit for bit), determinism, resume, faults not learned, regimes, memory budget."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from edgepeft.core.errors import ConfigError, DataError
from edgepeft.detect.stream_files import stream_array
from edgepeft.detect.streaming import StreamingDetector
from edgepeft.models.registry import register_base
from tests.conftest import make_tiny_base, sine_series

BASE = "stream-test"  # the suite's tiny seeded architecture (window 32, patch 8), random weights
register_base(BASE, make_tiny_base)
SETTINGS = {"base": BASE, "method": "adapter", "warmup": 100, "warmup_steps": 5, "update_every": 8,
            "batch_size": 4, "quarantine": 8, "buffer_rows": 256, "seed": 3}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: on a shared machine intra-op threads only spin against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _series(n_rows: int = 400, n_channels: int = 3, seed: int = 0) -> np.ndarray:
    return sine_series(n_rows, n_channels, seed=seed)


def _with_fault() -> tuple[np.ndarray, slice]:
    series = _series(500)
    fault = slice(300, 360)
    series[fault, 1] = series[fault, 1] * -0.5 + 3.0  # a sensor leaves its relation to the others
    return series, fault


def _det(**changes: object) -> StreamingDetector:
    return StreamingDetector(**{**SETTINGS, **changes})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- causality


def test_prefix_scores_are_bit_identical_with_or_without_later_rows() -> None:
    series, _ = _with_fault()
    full = _det().process_many(series)
    for stop in (37, 100, 250):  # mid-patch, the end of probation, live
        prefix = _det().process_many(series[:stop])
        for key in ("score", "p_anomaly", "anomaly", "probation"):
            assert np.array_equal(prefix[key], full[key][:stop]), (key, stop)


def test_a_file_prefix_streams_to_the_same_outputs_with_or_without_checkpoints(tmp_path) -> None:
    series, _ = _with_fault()
    full = stream_array(series, SETTINGS)
    prefix = stream_array(series[:301], SETTINGS, checkpoint_dir=tmp_path, checkpoint_every=64)
    for key in ("score", "p_anomaly", "anomaly", "probation"):
        assert np.array_equal(getattr(prefix, key), getattr(full, key)[:301]), key
    # The file grew: the rerun resumes at row 301 and the whole output equals the uninterrupted run's.
    grown = stream_array(series, SETTINGS, checkpoint_dir=tmp_path, checkpoint_every=64)
    assert grown.resumed_from == 301
    assert np.array_equal(grown.score, full.score)


def test_row_by_row_equals_chunks_equals_one_call() -> None:
    series, _ = _with_fault()
    whole = _det().process_many(series)["score"]
    det = _det()
    one_by_one = []
    for row in series:
        one_by_one.append(det.score_one(row))
        det.learn_one(row)
    assert np.array_equal(np.array(one_by_one), whole)
    det = _det()
    chunks = [det.process_many(series[i : i + 23])["score"] for i in range(0, len(series), 23)]
    assert np.array_equal(np.concatenate(chunks), whole)


def test_score_many_without_updates_matches_the_loop_and_changes_nothing() -> None:
    series = _series(300)
    det = _det(update_every=None)
    det.process_many(series[:150])
    before = det.state_dict()
    scores = det.score_many(series[150:])
    assert det.n_seen_ == 150
    after = det.state_dict()
    assert torch.equal(after["buffer"]["values"], before["buffer"]["values"])
    loop = _det(update_every=None)
    loop.process_many(series[:150])
    expected = [loop.process_one(row).score for row in series[150:]]
    assert np.array_equal(scores, np.array(expected))


def test_score_one_is_pure() -> None:
    det = _det()
    det.process_many(_series(150))
    row = _series(151)[150]
    assert det.score_one(row) == det.score_one(row)
    assert det.n_seen_ == 150


# ---------------------------------------------------------------------------------------------- determinism, resume


def test_same_data_seed_and_settings_give_bit_identical_adapters() -> None:
    series, _ = _with_fault()
    adapters = []
    for _ in range(2):
        det = _det(continual="replay+ewc")
        det.process_many(series)
        adapters.append(det.adapter_bytes())
    assert adapters[0] == adapters[1]
    other = _det(continual="replay+ewc", seed=4)
    other.process_many(series)
    assert other.adapter_bytes() != adapters[0]


def test_lora_adapter_is_deterministic_too() -> None:
    series = _series(200)
    adapters = []
    for _ in range(2):
        det = _det(method="lora", rank=2)
        det.process_many(series)
        adapters.append(det.adapter_bytes())
    assert adapters[0] == adapters[1] and len(adapters[0]) > 0


@pytest.mark.parametrize("changes", [{}, {"continual": "replay+ewc", "cache_features": True, "adapt_last": 1}])
def test_restored_state_continues_bit_identically(changes: dict[str, object]) -> None:
    series, _ = _with_fault()
    uninterrupted = _det(**changes)
    expected = uninterrupted.process_many(series)["score"]
    first = _det(**changes)
    head = first.process_many(series[:213])["score"]  # mid-patch, past probation
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    state = torch.load(io.BytesIO(blob.getvalue()), weights_only=True)
    resumed = StreamingDetector.from_state(state)
    tail = resumed.process_many(series[213:])["score"]
    assert np.array_equal(np.concatenate([head, tail]), expected)
    assert resumed.adapter_bytes() == uninterrupted.adapter_bytes()


# ---------------------------------------------------------------------------------------------- behaviour


def test_probation_is_not_alerted_and_the_fault_is_flagged_but_not_learned() -> None:
    series, fault = _with_fault()
    det = _det()
    out = det.process_many(series)
    assert out["probation"][:100].all() and not out["probation"][100:].any()
    assert out["anomaly"][:100].sum() == 0
    assert ((out["p_anomaly"] >= 0) & (out["p_anomaly"] <= 1)).all()
    assert out["anomaly"][fault].mean() > 0.5
    assert out["anomaly"][110:290].mean() < 0.1
    flags = det.buffer_.flag_range(fault.start + 16, fault.stop)
    assert not flags.any()  # alerted rows (and the quarantine before alerts) are never learned
    # An operator's "this is normal" overrides the detector's judgement.
    det.learn_one(series[-1] + 10.0, normal=True)
    assert det.buffer_.flag_range(det.n_seen_ - 1, det.n_seen_).tolist() == [1]


def test_an_announced_regime_is_learned_without_alerts_and_recalibrates() -> None:
    series = _series(300)
    det = _det()
    det.process_many(series[:200])
    threshold = det.threshold_
    shifted = _series(200, seed=5)[:, ::-1] * 2.0  # another operating mode
    det.start_regime(60)
    out = det.process_many(shifted[:60])
    assert out["anomaly"].sum() == 0 and out["probation"].all()
    assert det.buffer_.flag_range(det.n_seen_ - 60, det.n_seen_).all()
    assert det.regime_until_ == -1 and det.threshold_ != threshold
    with pytest.raises(ConfigError, match="probation"):
        _det().start_regime()


def test_readings_as_dicts_frames_and_single_channel() -> None:
    series = _series(160, n_channels=2)
    det = _det()
    for row in series[:120]:
        det.learn_one({"a": row[0], "b": row[1]})
    assert det.channels_ == ["a", "b"]
    frame = pd.DataFrame(series[120:], columns=["b", "a"])[["a", "b"]]
    assert det.process_many(frame)["score"].shape == (40,)
    single = _det()
    out = single.process_many(_series(150, n_channels=1)[:, 0])  # a 1-D array is one channel
    assert single.n_channels_ == 1 and np.isfinite(out["score"]).all()
    assert np.isfinite(single.score_one(0.5))


def test_bad_input_and_settings_raise_clear_errors() -> None:
    det = _det()
    det.process_many(_series(20))
    with pytest.raises(DataError, match="channels"):
        det.process_many(_series(20, n_channels=2))
    with pytest.raises(ConfigError, match="warmup must be at least"):
        _det(warmup=20).process_many(_series(20))
    with pytest.raises(ConfigError, match="unknown method"):
        _det(method="magic").process_many(_series(20))
    with pytest.raises(ConfigError, match="update_every"):
        _det(update_every=0).process_many(_series(20))
    with pytest.raises(ConfigError, match="no data yet"):
        _det().memory_report()


# ---------------------------------------------------------------------------------------------- memory


def test_budget_plan_fits_and_too_small_a_budget_says_what_would() -> None:
    series = _series(200)
    roomy = _det(measure_every=1)
    roomy.process_many(series)
    unplanned = roomy.memory_report()["training_peak_bytes"]
    budget_mb = 0.75 * unplanned / 2**20
    det = _det(budget_mb=budget_mb, measure_every=1)
    det.process_many(series)
    report = det.memory_report()
    assert report["plan"]["budget_bytes"] == int(budget_mb * 2**20)
    assert report["training_peak_bytes"] <= budget_mb * 2**20  # every measured step, probation included
    assert report["scoring_peak_bytes"] > 0 and report["peak_rss_bytes"] > 0
    with pytest.raises(ConfigError, match="--budget-mb"):
        _det(budget_mb=0.001).process_many(series[:5])


def test_cached_frozen_features_feed_training_after_probation() -> None:
    det = _det(cache_features=True, adapt_last=1)
    series = _series(200)
    det.process_many(series[:100])
    det.process_many(series[100:], normal=np.ones(100, bool))  # confirmed normal: every row learnable
    assert det.trainer_.cache_features
    group = det.trainer_._recent(det.buffer_, det.n_seen_ - det.quarantine, 4, det._transform)
    assert group is not None and group.features is not None and group.features.shape == (4, 3, 5, 32)


def test_training_only_the_last_block_needs_far_less_than_full_fine_tuning() -> None:
    series = _series(140)
    peaks = {}
    for name, changes in {"full": {"method": "full"},
                          "adapter": {"adapt_last": 1, "checkpoint_blocks": True}}.items():
        det = _det(measure_every=1, batch_size=8, **changes)
        det.process_many(series)
        peaks[name] = det.memory_report()["training_peak_bytes"]
    assert peaks["adapter"] < 0.5 * peaks["full"]


# ---------------------------------------------------------------------------------------------- one scoring core


def _fitted_batch(train: np.ndarray, **changes: object):
    from edgepeft.detect.detector import AnomalyDetector

    return AnomalyDetector(base="tiny", method="lora", rank=4, steps=20, seed=0, **changes).fit(train)


def test_a_stream_without_updates_scores_exactly_as_the_batch_detector() -> None:
    series = sine_series(1500, 3, seed=2)
    series[1100:1180, 1] += 2.0  # a fault, so alarms and explanations are compared too
    det = _fitted_batch(series[:800], raise_after=3, clear_after=2)
    batch = det.score_all(series)
    stream = StreamingDetector.from_detector(det)
    out = stream.process_many(series)
    np.testing.assert_allclose(out["score"], batch["score"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["p_anomaly"], batch["p_anomaly"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["anomaly"], batch["anomaly"])
    assert batch["anomaly"][1100:1180].any() and not out["anomaly"][: det.warmup_rows_].any()
    # Row by row, chunked, and through a checkpoint: the same core, the same numbers.
    again = StreamingDetector.from_detector(det)
    first = again.process_many(series[:700])["score"]
    restored = StreamingDetector.from_state(again.state_dict())
    rest = np.array([restored.process_one(row).score for row in series[700:]])
    np.testing.assert_allclose(np.r_[first, rest], batch["score"], rtol=0, atol=1e-6)


SKAB_OTHER_9 = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "skab" / "other" / "9.csv"


@pytest.mark.skipif(not SKAB_OTHER_9.exists(),
                    reason="real data: ../shared/datasets/skab beside the repository (CI has it; a bare clone may not)")
def test_skab_file_batch_and_stream_agree() -> None:
    from edgepeft.data.csvio import read_sensor_csv

    values = read_sensor_csv(SKAB_OTHER_9, drop=["anomaly", "changepoint"]).values
    det = _fitted_batch(values[:400])
    out = StreamingDetector.from_detector(det).process_many(values)
    np.testing.assert_allclose(out["score"], det.score(values), rtol=0, atol=1e-6)


def test_stream_alarm_persistence_matches_the_batch_rule() -> None:
    from edgepeft.detect.threshold import persist_alarms

    rng = np.random.default_rng(0)
    for raise_after, clear_after in ((1, 1), (2, 2), (4, 3), (1, 5)):
        flags = rng.random(400) < 0.3
        flags[100:160] = True
        det = StreamingDetector(raise_after=raise_after, clear_after=clear_after)
        det.alarm_on_, det.run_ = False, 0
        states = []
        for flag in flags:
            det.alarm_on_, det.run_ = det._persist(bool(flag))
            states.append(det.alarm_on_)
        np.testing.assert_array_equal(states, persist_alarms(flags, raise_after, clear_after))


def test_live_stream_scores_with_the_batch_calibration() -> None:
    """After probation the stream's threshold, fusion and state model come from AnomalyDetector.calibrate."""
    values = sine_series(900, 2, seed=3)
    det = StreamingDetector(base="tiny", method="lora", rank=4, warmup=400, warmup_steps=5, update_every=None)
    det.process_many(values[:500])
    assert det.core_ is not None and det.core_.fusion_ is not None and det.core_.state_ is not None
    assert det.threshold_ == det.core_.threshold_
    out = det.process_many(values[500:])
    assert (out["p_anomaly"] < 1.0).all() and out["anomaly"].mean() < 0.1


def test_stream_scoring_settings_are_validated() -> None:
    values = sine_series(500, 2, seed=1)
    for bad, match in (({"recalibrate_every": 0}, "recalibrate_every"), ({"evidence": "vibes"}, "evidence"),
                       ({"raise_after": 0}, "raise_after")):
        with pytest.raises(ConfigError, match=match):
            StreamingDetector(base="tiny", warmup=300, **bad).process_many(values)
