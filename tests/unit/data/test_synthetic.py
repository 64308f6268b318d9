"""Synthetic generators: deterministic, finite, fast, and a fleet whose faults cover every kind."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from edgepeft.core.errors import ConfigError
from edgepeft.data.synthetic import FAULT_KINDS, PUMP_CHANNELS, PumpAsset, generate_series, make_pump_fleet

# --- generate_series -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_series_shape_dtype_finite(seed: int) -> None:
    series = generate_series(np.random.default_rng(seed), 2000, 6)
    assert series.shape == (2000, 6)
    assert series.dtype == np.float32
    assert np.isfinite(series).all()
    assert (series.std(axis=0) > 0).all()


def test_series_same_seed_same_array() -> None:
    first = generate_series(np.random.default_rng(3), 1500, 5)
    second = generate_series(np.random.default_rng(3), 1500, 5)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, generate_series(3, 1500, 5))


def test_series_different_seeds_differ() -> None:
    assert not np.array_equal(generate_series(1, 500, 3), generate_series(2, 500, 3))


@pytest.mark.parametrize("n_rows", [1, 2, 3, 17])
def test_series_tiny_lengths(n_rows: int) -> None:
    for seed in range(5):
        series = generate_series(seed, n_rows, 2)
        assert series.shape == (n_rows, 2) and np.isfinite(series).all()


def test_series_channels_share_drivers() -> None:
    # Shared latent drivers show up as strongly correlated channel pairs on most assets.
    strong = 0
    for seed in range(20):
        corr = np.corrcoef(generate_series(seed, 3000, 8).astype(np.float64).T)
        strong += bool((np.abs(corr[np.triu_indices(8, 1)]) > 0.5).any())
    assert strong >= 10


def test_series_is_fast() -> None:
    generate_series(0, 10_000, 8)  # warm-up
    best = min(_timed(lambda: generate_series(1, 10_000, 8)) for _ in range(3))
    # The budget is well under 50 ms; the bound is loose because CI cores are shared.
    assert best < 0.2


@pytest.mark.parametrize(("n_rows", "n_channels"), [(0, 3), (10, 0)])
def test_series_rejects_empty(n_rows: int, n_channels: int) -> None:
    with pytest.raises(ConfigError):
        generate_series(0, n_rows, n_channels)


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# --- make_pump_fleet ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet() -> list[PumpAsset]:
    return make_pump_fleet(6, seed=0)


def test_fleet_shapes_and_types(fleet: list[PumpAsset]) -> None:
    assert [pump.name for pump in fleet] == [f"pump-0{i}" for i in range(1, 7)]
    for pump in fleet:
        assert pump.channels == PUMP_CHANNELS and 6 <= len(pump.channels) <= 8
        assert pump.train.shape == (3000, len(pump.channels)) and pump.train.dtype == np.float32
        assert pump.test.shape == (3000, len(pump.channels)) and pump.test.dtype == np.float32
        assert pump.labels.shape == (3000,) and pump.labels.dtype == np.int8
        assert np.isfinite(pump.train).all() and np.isfinite(pump.test).all()
        assert all(isinstance(value, float) for value in pump.params.values())


def test_fleet_faults_match_labels(fleet: list[PumpAsset]) -> None:
    for pump in fleet:
        assert 2 <= len(pump.faults) <= 4
        expected = np.zeros(len(pump.labels), dtype=np.int8)
        previous_end = 0
        for start, end, kind in pump.faults:
            assert kind in FAULT_KINDS
            assert 100 <= end - start <= 400
            assert previous_end <= start < end <= len(pump.labels)
            previous_end = end
            expected[start:end] = 1
        np.testing.assert_array_equal(pump.labels, expected)


def test_fleet_covers_every_fault_kind(fleet: list[PumpAsset]) -> None:
    kinds = {kind for pump in fleet for _, _, kind in pump.faults}
    assert kinds == set(FAULT_KINDS)


def test_fleet_kinds_rotate_per_pump(fleet: list[PumpAsset]) -> None:
    for index, pump in enumerate(fleet):
        kinds = [kind for _, _, kind in pump.faults]
        assert len(set(kinds)) == len(kinds) >= 2
        assert kinds[0] == FAULT_KINDS[index % len(FAULT_KINDS)]


def test_fleet_pumps_differ(fleet: list[PumpAsset]) -> None:
    speeds = {pump.params["shaft_period"] for pump in fleet}
    assert len(speeds) == len(fleet)


def test_fleet_deterministic_and_independent_of_size() -> None:
    small = make_pump_fleet(2, n_train=300, n_test=600, seed=5)
    again = make_pump_fleet(3, n_train=300, n_test=600, seed=5)
    for first, second in zip(small, again[:2], strict=True):
        np.testing.assert_array_equal(first.train, second.train)
        np.testing.assert_array_equal(first.test, second.test)
        assert first.faults == second.faults
    other = make_pump_fleet(1, n_train=300, n_test=600, seed=6)[0]
    assert not np.array_equal(other.train, small[0].train)


def test_fleet_test_regimes_stay_in_training_range(fleet: list[PumpAsset]) -> None:
    # Normal test rows change operating level, but within what training showed, so level alone is no alarm.
    for pump in fleet:
        normal = pump.test[pump.labels == 0]
        low, high = np.percentile(pump.train, [0.5, 99.5], axis=0)
        margin = 0.05 * (high - low)
        inside = (normal > low - margin) & (normal < high + margin)
        assert (inside.mean(axis=0) > 0.9).all()
        flow = normal[:, PUMP_CHANNELS.index("flow")]
        assert np.ptp(flow) > 0.2 * np.ptp(pump.train[:, PUMP_CHANNELS.index("flow")])


def test_fleet_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError):
        make_pump_fleet(0)
    with pytest.raises(ConfigError):
        make_pump_fleet(1, n_train=10)
