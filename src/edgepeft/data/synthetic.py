"""Synthetic sensor data: a pretraining corpus of varied "assets" and a simulated pump fleet with faults.

numpy only and fully deterministic: every function takes a ``np.random.Generator`` or a seed. Filters run in
the frequency domain (one rfft/irfft pair each) so a 10k-row asset costs milliseconds, not a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgepeft.core.errors import ConfigError

FAULT_KINDS = ("bearing_wear", "imbalance", "cavitation", "sensor_drift", "stuck_sensor")

PUMP_CHANNELS = [
    "vib_x",
    "vib_y",
    "vib_rms",
    "motor_current",
    "discharge_pressure",
    "flow",
    "bearing_temp",
    "motor_temp",
]

# Per-channel family weights of the pretraining corpus: most families follow the asset's shared drivers
# (load, on/off gate, speed, ambient), so there is cross-channel structure to learn.
_FAMILIES = ("vibration", "vibration_rms", "load_follower", "thermal", "duty", "smooth", "periodic", "noise")
_FAMILY_WEIGHTS = np.array([0.18, 0.07, 0.28, 0.14, 0.06, 0.1, 0.12, 0.05])

# Channels a sensor fault may hit: slow process signals, where a frozen or drifting value is plausible.
_DRIFT_CHANNELS = ("discharge_pressure", "flow", "bearing_temp", "motor_current")
_STUCK_CHANNELS = ("flow", "discharge_pressure", "motor_current", "bearing_temp", "motor_temp", "vib_rms")


def generate_series(rng: np.random.Generator | int, n_rows: int, n_channels: int) -> np.ndarray:
    """One synthetic asset of sensor-like channels sharing latent drivers, as float32 ``(n_rows, n_channels)``.

    Families (vibration with harmonics and resonances, load followers, thermal lags, duty cycles, smooth and
    periodic processes, coloured noise) are mixed at random, with periods from about 3 to 500 samples.

    >>> series = generate_series(np.random.default_rng(0), 1000, 4)
    >>> series.shape, series.dtype, bool(np.isfinite(series).all())
    ((1000, 4), dtype('float32'), True)
    >>> bool((generate_series(7, 200, 3) == generate_series(7, 200, 3)).all())
    True
    """
    if n_rows < 1 or n_channels < 1:
        raise ConfigError(f"n_rows and n_channels must be >= 1, got {n_rows} and {n_channels}")
    rng = np.random.default_rng(rng)
    drivers = _Drivers.sample(rng, n_rows)
    families = rng.choice(len(_FAMILIES), size=n_channels, p=_FAMILY_WEIGHTS / _FAMILY_WEIGHTS.sum())
    out = np.empty((n_rows, n_channels), dtype=np.float32)
    for col, family in enumerate(families):
        signal = _FAMILY_BUILDERS[_FAMILIES[family]](rng, drivers)
        signal = signal + _measurement_noise(rng, n_rows)
        scale = _log_uniform(rng, 0.01, 100.0)
        offset = rng.normal(0.0, 3.0) * scale
        out[:, col] = offset + scale * signal
    return out


@dataclass
class PumpAsset:
    """One simulated pump: normal training data, a test part with injected faults, and its labels.

    >>> pump = make_pump_fleet(1, n_train=500, n_test=1000, seed=0)[0]
    >>> pump.name, pump.train.shape, pump.test.shape, int(pump.labels.max())
    ('pump-01', (500, 8), (1000, 8), 1)
    """

    name: str
    channels: list[str]
    train: np.ndarray  # (n_train, n_channels) float32, normal operation only
    test: np.ndarray  # (n_test, n_channels) float32, with faults
    labels: np.ndarray  # (n_test,) int8, 1 inside a fault span
    faults: list[tuple[int, int, str]]  # (start_row, end_row_exclusive, kind), test coordinates
    params: dict[str, float] = field(default_factory=dict)  # incl. fault_<j>_channel for sensor faults


def make_pump_fleet(n_pumps: int = 6, *, n_train: int = 3000, n_test: int = 3000, seed: int = 0) -> list[PumpAsset]:
    """A fleet of simulated centrifugal pumps, each with its own speed, resonances, noise and load pattern.

    Pump ``i`` gets 2 to 4 faults whose kinds follow :data:`FAULT_KINDS` rotated by ``i``, so a fleet of five
    or more pumps covers every kind. Pump ``i`` depends only on ``seed`` and ``i``.

    >>> fleet = make_pump_fleet(2, n_train=400, n_test=800, seed=1)
    >>> [pump.name for pump in fleet], fleet[0].channels[:2]
    (['pump-01', 'pump-02'], ['vib_x', 'vib_y'])
    """
    if n_pumps < 1:
        raise ConfigError(f"n_pumps must be >= 1, got {n_pumps}")
    if n_train < 100 or n_test < 200:
        raise ConfigError(f"n_train must be >= 100 and n_test >= 200, got {n_train} and {n_test}")
    fleet = []
    for index, child in enumerate(np.random.SeedSequence(seed).spawn(n_pumps)):
        rng = np.random.default_rng(child)
        spec = _pump_spec(rng)
        kinds = FAULT_KINDS[index % len(FAULT_KINDS) :] + FAULT_KINDS[: index % len(FAULT_KINDS)]
        faults = _place_faults(rng, n_test, kinds[: int(rng.integers(2, 5))])
        values = _simulate_pump(rng, spec, n_train, n_test, faults)
        labels = np.zeros(n_test, dtype=np.int8)
        for start, end, _ in faults:
            labels[start:end] = 1
        fleet.append(
            PumpAsset(
                name=f"pump-{index + 1:02d}",
                channels=list(PUMP_CHANNELS),
                train=values[:n_train],
                test=values[n_train:],
                labels=labels,
                faults=faults,
                params=spec,
            )
        )
    return fleet


# ---------------------------------------------------------------------------------------------------------
# Signal primitives (all numpy, frequencies in cycles per sample)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _unit(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation (a constant stays zero instead of dividing by zero)."""
    x = x - x.mean()
    std = x.std()
    return x / std if std > 1e-12 else x


def _spectral_noise(rng: np.random.Generator, n_rows: int, gain: np.ndarray | None = None) -> np.ndarray:
    """Gaussian noise shaped by ``gain`` over ``np.fft.rfftfreq(n_rows)``, unit variance."""
    n_freqs = n_rows // 2 + 1
    spectrum = rng.standard_normal(n_freqs) + 1j * rng.standard_normal(n_freqs)
    if gain is not None:
        spectrum = spectrum * gain
    spectrum[0] = 0.0
    return _unit(np.fft.irfft(spectrum, n_rows))


def _lowpass_noise(rng: np.random.Generator, n_rows: int, period: float) -> np.ndarray:
    """Smooth random process whose fastest wiggles last about ``period`` samples."""
    freqs = np.fft.rfftfreq(n_rows)
    return _spectral_noise(rng, n_rows, 1.0 / (1.0 + (freqs * period) ** 2))


def _bandpass_noise(rng: np.random.Generator, n_rows: int, centre: float, width: float) -> np.ndarray:
    """Narrowband noise around ``centre``: a lightly damped resonance excited by broadband forcing."""
    freqs = np.fft.rfftfreq(n_rows)
    return _spectral_noise(rng, n_rows, np.exp(-0.5 * ((freqs - centre) / max(width, 1e-4)) ** 2))


def _coloured_noise(rng: np.random.Generator, n_rows: int, exponent: float) -> np.ndarray:
    """1/f**exponent noise: 0 white, 1 pink, 2 brown."""
    freqs = np.fft.rfftfreq(n_rows)
    freqs[0] = 1.0  # DC is zeroed anyway; this only avoids 0 ** -x
    return _spectral_noise(rng, n_rows, freqs ** (-exponent / 2.0))


def _lag(x: np.ndarray, tau: float) -> np.ndarray:
    """First-order lag (RC low-pass) with time constant ``tau`` samples, starting at steady state."""
    if tau < 0.5 or x.size < 2:
        return x.copy()
    kernel_len = int(min(6.0 * tau, x.size)) + 1
    kernel = np.exp(-np.arange(kernel_len) / tau)
    kernel /= kernel.sum()  # unit DC gain even though the tail is cut
    n_fft = 1 << int(x.size + kernel_len - 1).bit_length()
    # Subtracting x[0] makes the zero padding before t=0 equal "steady state at x[0]".
    response = np.fft.irfft(np.fft.rfft(x - x[0], n_fft) * np.fft.rfft(kernel, n_fft), n_fft)
    return response[: x.size] + x[0]


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average, edges padded with the edge value: turns steps into smooth ramps."""
    if width < 2 or x.size < 2:
        return x.copy()
    half = width // 2
    padded = np.concatenate((np.full(half, x[0]), x, np.full(width - half - 1, x[-1])))
    csum = np.concatenate(([0.0], np.cumsum(padded)))
    return (csum[width:] - csum[:-width]) / width


def _segments(rng: np.random.Generator, n_rows: int, mean_duration: float) -> np.ndarray:
    """Segment lengths (each >= 1) summing to at least ``n_rows``, roughly exponential around the mean."""
    count = int(n_rows / max(mean_duration, 1.0) * 2) + 4
    lengths = np.maximum(1, np.round(rng.exponential(mean_duration, count) * 0.5 + mean_duration * 0.5))
    while lengths.sum() < n_rows:
        lengths = np.concatenate((lengths, lengths))
    return lengths.astype(int)


def _regimes(
    rng: np.random.Generator,
    n_rows: int,
    levels: np.ndarray,
    mean_duration: float,
    transition: int,
    first: np.ndarray | None = None,
    first_length: int | None = None,
) -> np.ndarray:
    """Piecewise-constant operating levels with smooth transitions.

    ``first`` fixes the opening sequence of levels and ``first_length`` the length of each of those segments.
    """
    lengths = _segments(rng, n_rows, mean_duration)
    if first is not None and first_length is not None:
        lengths = np.concatenate((np.full(first.size, max(1, first_length)), lengths))
    if len(levels) > 1:
        # Steps of 1..len-1 modulo len: each next level is uniform over the others, never a "change" to the
        # same level.
        jumps = rng.integers(1, len(levels), size=lengths.size)
        jumps[0] = rng.integers(0, len(levels))
        picks = np.cumsum(jumps) % len(levels)
    else:
        picks = np.zeros(lengths.size, dtype=int)
    sequence = levels[picks]
    if first is not None:
        sequence[: first.size] = first[: sequence.size]
    steps = np.repeat(sequence, lengths)[:n_rows]
    return _moving_average(steps, transition)


def _alternating(rng: np.random.Generator, n_rows: int, on_mean: float, off_mean: float) -> np.ndarray:
    """On/off duty cycle (1/0) with jittered on and off durations, starting in a random phase."""
    count = int(n_rows / max(on_mean + off_mean, 2.0) * 2) + 4
    on = np.maximum(1, np.round(on_mean * rng.lognormal(0.0, 0.3, count)))
    off = np.maximum(1, np.round(off_mean * rng.lognormal(0.0, 0.3, count)))
    lengths = np.stack((on, off), axis=1).ravel().astype(int)
    states = np.tile([1.0, 0.0], count)
    wave = np.repeat(states, lengths)
    while wave.size < 2 * n_rows:
        wave = np.concatenate((wave, wave))
    shift = int(rng.integers(0, n_rows))
    return wave[shift : shift + n_rows]


def _random_fourier(rng: np.random.Generator, n_rows: int, n_terms: int, low: float, high: float) -> np.ndarray:
    """Sum of sinusoids with log-uniform periods in ``[low, high]``, slower ones stronger (1/f-like)."""
    periods = np.exp(rng.uniform(np.log(low), np.log(high), n_terms))
    amplitudes = np.sqrt(periods / periods.max()) * rng.uniform(0.3, 1.0, n_terms)
    phases = rng.uniform(0.0, 2 * np.pi, n_terms)
    t = np.arange(n_rows)[:, None]  # (n_rows, 1)
    return _unit(np.sin(2 * np.pi * t / periods + phases) @ amplitudes)


# ---------------------------------------------------------------------------------------------------------
# Pretraining corpus: latent drivers shared by the channels of one asset, and the channel families


@dataclass
class _Drivers:
    """Latent signals shared by every channel of one synthetic asset."""

    load: np.ndarray  # operating level, about [0, 1.2], already multiplied by the gate
    gate: np.ndarray  # 1 when the machine runs, 0 when off
    speed: np.ndarray  # relative shaft speed, 0 when off
    ambient: np.ndarray  # slow environmental drift, unit variance
    time_scale: float  # multiplies every period of the asset: fast and slow assets

    @classmethod
    def sample(cls, rng: np.random.Generator, n_rows: int) -> _Drivers:
        time_scale = _log_uniform(rng, 0.25, 4.0)
        if rng.random() < 0.8:
            mean_duration = min(time_scale * _log_uniform(rng, 20.0, 600.0), 5.0 * n_rows)
            levels = rng.uniform(0.0, 1.0, int(rng.integers(2, 7)))
            transition = int(_log_uniform(rng, 1.0, max(2.0, 0.3 * mean_duration)))
            load = _regimes(rng, n_rows, levels, mean_duration, transition)
            load = load + rng.uniform(0.0, 0.1) * _lowpass_noise(rng, n_rows, time_scale * 50.0)
        else:
            smooth = _lowpass_noise(rng, n_rows, time_scale * _log_uniform(rng, 20.0, 500.0))
            load = (smooth - smooth.min()) / max(np.ptp(smooth), 1e-12)
        load = np.clip(load, 0.0, 1.2)
        if rng.random() < 0.3:
            on_mean = time_scale * _log_uniform(rng, 20.0, 800.0)
            gate = _moving_average(
                _alternating(rng, n_rows, on_mean, on_mean * rng.uniform(0.2, 2.0)),
                int(rng.integers(1, 8)),
            )
        else:
            gate = np.ones(n_rows)
        load = load * gate
        variable_speed = rng.random() < 0.5
        speed = _lag(0.6 + 0.4 * load, rng.uniform(1.0, 20.0)) * gate if variable_speed else gate.copy()
        ambient = _lowpass_noise(rng, n_rows, _log_uniform(rng, 200.0, 5000.0))
        return cls(load, gate, speed, ambient, time_scale)


def _vibration(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    """Shaft harmonics plus a resonance, amplitude growing with speed and modulated slowly."""
    n_rows = drivers.load.size
    shaft_period = float(np.clip(drivers.time_scale * _log_uniform(rng, 3.0, 60.0), 3.0, 200.0))
    phase = 2 * np.pi * np.cumsum(drivers.speed / shaft_period)
    signal = np.zeros(n_rows)
    amplitude = 1.0
    for harmonic in range(1, 6):
        if harmonic / shaft_period > 0.45:
            break
        signal += amplitude * np.sin(harmonic * phase + rng.uniform(0, 2 * np.pi))
        amplitude *= rng.uniform(0.1, 0.7)
    centre = rng.uniform(0.02, 0.45)
    resonance = _bandpass_noise(rng, n_rows, centre, centre * rng.uniform(0.01, 0.1))
    signal += rng.uniform(0.1, 1.0) * resonance * (0.3 + drivers.load)
    envelope = drivers.speed**2
    if rng.random() < 0.5:
        mod_period = drivers.time_scale * _log_uniform(rng, 10.0, 500.0)
        envelope = envelope * (1 + rng.uniform(0.1, 0.6) * np.sin(2 * np.pi * np.arange(n_rows) / mod_period))
    return signal * envelope


def _vibration_rms(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    level = drivers.speed ** rng.uniform(1.5, 2.5) * (1 + rng.uniform(0.0, 0.5) * drivers.load)
    return _lag(level, rng.uniform(0.5, 10.0))


def _load_follower(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    """Current, flow, pressure-like: a lagged nonlinear function of load, sometimes inverted."""
    lagged = _lag(drivers.load, drivers.time_scale * _log_uniform(rng, 0.5, 50.0))
    kind = rng.integers(0, 3)
    if kind == 0:
        shaped = np.abs(lagged) ** rng.uniform(0.5, 3.0)
    elif kind == 1:
        gain = rng.uniform(0.5, 4.0)
        shaped = np.tanh(gain * lagged) / np.tanh(gain)
    else:
        shaped = lagged
    sign = -1.0 if rng.random() < 0.25 else 1.0
    return sign * shaped + rng.uniform(0.0, 0.3) * drivers.gate


def _thermal(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    heat = np.abs(drivers.load) ** rng.uniform(1.0, 2.0)
    tau = drivers.time_scale * _log_uniform(rng, 10.0, 500.0)
    return _lag(heat, tau) + rng.uniform(0.0, 0.3) * drivers.ambient


def _duty(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    n_rows = drivers.load.size
    if drivers.gate.min() < 0.5 and rng.random() < 0.7:
        return drivers.gate * (1 + rng.uniform(0.0, 0.5) * drivers.load)
    on_mean = drivers.time_scale * _log_uniform(rng, 5.0, 300.0)
    return _alternating(rng, n_rows, on_mean, on_mean * rng.uniform(0.2, 3.0))


def _smooth(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    n_rows = drivers.load.size
    period = float(np.clip(drivers.time_scale * _log_uniform(rng, 3.0, 500.0), 3.0, 2000.0))
    if rng.random() < 0.5:
        process = _lowpass_noise(rng, n_rows, period)
    else:
        process = _random_fourier(rng, n_rows, int(rng.integers(3, 13)), period, period * 20.0)
    return process + rng.uniform(0.0, 2.0) * drivers.load


def _periodic(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    """A seasonal pattern: a base period with a few harmonics, optionally scaled by load."""
    n_rows = drivers.load.size
    period = float(np.clip(drivers.time_scale * _log_uniform(rng, 3.0, 500.0), 3.0, 500.0))
    t = np.arange(n_rows)
    signal = np.zeros(n_rows)
    for harmonic in range(1, int(rng.integers(1, 5)) + 1):
        if harmonic / period > 0.45:
            break
        signal += rng.uniform(0.1, 1.0) / harmonic * np.sin(2 * np.pi * harmonic * t / period + rng.uniform(0, 6.3))
    if rng.random() < 0.5:
        signal = signal * (0.5 + drivers.load)
    return signal


def _noise(rng: np.random.Generator, drivers: _Drivers) -> np.ndarray:
    return _coloured_noise(rng, drivers.load.size, float(rng.choice([0.0, 1.0, 2.0])))


_FAMILY_BUILDERS = {
    "vibration": _vibration,
    "vibration_rms": _vibration_rms,
    "load_follower": _load_follower,
    "thermal": _thermal,
    "duty": _duty,
    "smooth": _smooth,
    "periodic": _periodic,
    "noise": _noise,
}


def _measurement_noise(rng: np.random.Generator, n_rows: int) -> np.ndarray:
    exponent = float(rng.choice([0.0, 1.0, 2.0], p=[0.6, 0.28, 0.12]))
    # Brown noise wanders far at equal variance; keep it a small share of the signal.
    level = _log_uniform(rng, 0.005, 0.3) * (0.3 if exponent == 2.0 else 1.0)
    return level * _coloured_noise(rng, n_rows, exponent)


# ---------------------------------------------------------------------------------------------------------
# Pump fleet


def _pump_spec(rng: np.random.Generator) -> dict[str, float]:
    """Physical parameters of one pump (reported with the benchmark, so plain floats)."""
    n_levels = int(rng.integers(3, 6))
    spec = {
        "shaft_period": rng.uniform(5.0, 10.0),  # samples per revolution at rated speed
        "resonance_1": rng.uniform(0.22, 0.32),  # cycles per sample
        "resonance_2": rng.uniform(0.03, 0.07),
        "bearing_defect_freq": rng.uniform(0.36, 0.46),
        "noise_level": rng.uniform(0.02, 0.05),
        "vib_gain": rng.uniform(0.8, 1.5),
        "rated_flow": rng.uniform(40.0, 120.0),  # m3/h
        "rated_pressure": rng.uniform(3.0, 8.0),  # bar
        "rated_current": rng.uniform(20.0, 60.0),  # A
        "tau_bearing": rng.uniform(60.0, 150.0),  # samples
        "tau_motor": rng.uniform(100.0, 250.0),
        "ambient": rng.uniform(18.0, 30.0),  # degC
        "day_period": rng.uniform(700.0, 1500.0),  # samples; shorter than the training part so it is seen
        "regime_mean": rng.uniform(150.0, 400.0),  # samples
        "transition": rng.uniform(10.0, 40.0),
        "n_levels": float(n_levels),
    }
    # Evenly spread operating points, jittered: clustered levels would make regime changes invisible.
    low, high = rng.uniform(0.3, 0.5), rng.uniform(0.85, 1.0)
    levels = np.linspace(low, high, n_levels) + rng.uniform(-0.03, 0.03, n_levels)
    for i, level in enumerate(levels):
        spec[f"load_level_{i}"] = float(level)
    return {name: float(value) for name, value in spec.items()}


def _place_faults(rng: np.random.Generator, n_test: int, kinds: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """One fault per equal slot of the test part, 100-400 rows long (shorter if the slot is small)."""
    slot = n_test // len(kinds)
    faults = []
    for i, kind in enumerate(kinds):
        length = int(min(rng.integers(100, 401), max(10, slot * 0.6)))
        # A margin keeps every fault clear of its neighbours and of the train/test boundary.
        margin = min(50, (slot - length) // 2)
        start = i * slot + int(rng.integers(margin, max(margin + 1, slot - length - margin + 1)))
        faults.append((start, start + length, kind))
    return faults


def _simulate_pump(
    rng: np.random.Generator,
    spec: dict[str, float],
    n_train: int,
    n_test: int,
    faults: list[tuple[int, int, str]],
) -> np.ndarray:
    """Train and test rows of one pump as float32 ``(n_train + n_test, len(PUMP_CHANNELS))``.

    Records in ``spec`` which channel each sensor fault hit (``fault_<j>_channel``, an index into
    ``PUMP_CHANNELS``).
    """
    n_rows = n_train + n_test
    levels = np.array([spec[f"load_level_{i}"] for i in range(int(spec["n_levels"]))])
    # The opening regimes visit every operating level long enough for the temperatures to settle, so the
    # training part covers every normal state that the test part will show again in another order.
    opening = int(min(0.8 * n_train / levels.size, max(spec["regime_mean"], 4.0 * spec["tau_motor"])))
    demand = _regimes(
        rng,
        n_rows,
        levels,
        spec["regime_mean"],
        int(spec["transition"]),
        first=rng.permutation(levels),
        first_length=opening,
    )
    fault_effects = _FaultEffects.build(rng, spec, n_train, n_rows, faults)

    speed_rel = 0.6 + 0.4 * demand  # affinity laws: flow ~ speed, pressure ~ speed**2, power ~ speed**3
    # Slow system-curve wander; a sum of sinusoids stays in the same band in train and test.
    valve = 1.0 + 0.03 * _random_fourier(rng, n_rows, 6, 100.0, 600.0)
    healthy_flow = speed_rel * valve  # per unit of rated flow
    healthy_pressure = speed_rel**2 / np.sqrt(valve)  # per unit of rated pressure
    flow = spec["rated_flow"] * healthy_flow * (1.0 - fault_effects.flow_drop)
    pressure = spec["rated_pressure"] * healthy_pressure * (1.0 - 0.6 * fault_effects.flow_drop)
    hydraulic = (flow / spec["rated_flow"]) * (pressure / spec["rated_pressure"])
    load_current = 0.25 + 0.75 * _lag(hydraulic, 3.0)  # per unit of rated current
    healthy_current = 0.25 + 0.75 * _lag(healthy_flow * healthy_pressure, 3.0)
    current = spec["rated_current"] * load_current * fault_effects.current_gain

    day = np.sin(2 * np.pi * np.arange(n_rows) / spec["day_period"] + rng.uniform(0, 2 * np.pi))
    ambient = spec["ambient"] + 0.6 * day + 0.1 * _lowpass_noise(rng, n_rows, 200.0)
    bearing_heat = 0.6 * speed_rel + 0.4 * speed_rel * demand
    tau_bearing, tau_motor = spec["tau_bearing"], spec["tau_motor"]
    # A repair at the end of a fault also resets the slow thermal states; otherwise a fault would leave an
    # unlabelled hot tail that is counted as a false alarm.
    active = fault_effects.active
    bearing_rise = np.where(
        active, _lag(bearing_heat + fault_effects.bearing_heat, tau_bearing), _lag(bearing_heat, tau_bearing)
    )
    motor_rise = np.where(
        active, _lag((load_current * fault_effects.current_gain) ** 2, tau_motor), _lag(healthy_current**2, tau_motor)
    )
    bearing_temp = ambient + 25.0 * bearing_rise
    motor_temp = ambient + 35.0 * motor_rise

    phase = 2 * np.pi * np.cumsum(speed_rel / spec["shaft_period"])
    gain, noise = spec["vib_gain"], spec["noise_level"]
    one_x = gain * speed_rel**2 * fault_effects.imbalance
    resonance_1 = _bandpass_noise(rng, n_rows, spec["resonance_1"], 0.01)
    resonance_2 = _bandpass_noise(rng, n_rows, spec["resonance_2"], 0.005)
    defect = _bandpass_noise(rng, n_rows, spec["bearing_defect_freq"], 0.01) * fault_effects.bearing_hf
    vibration = []
    for axis, phase_shift in enumerate((0.0, np.pi / 2)):
        axis_gain = rng.uniform(0.7, 1.3, 5)
        wave = (
            one_x * axis_gain[0] * np.sin(phase + phase_shift)
            + gain * speed_rel**2 * axis_gain[1] * rng.uniform(0.2, 0.5) * np.sin(2 * phase + 0.7 * axis)
            + gain * axis_gain[2] * rng.uniform(0.05, 0.2) * np.sin(3 * phase + 1.3 * axis)
            + gain * speed_rel * axis_gain[3] * 0.3 * resonance_1
            + gain * demand * axis_gain[4] * 0.2 * resonance_2  # flow-induced
            + gain * defect
            + gain * (noise + fault_effects.broadband) * rng.standard_normal(n_rows)
        )
        vibration.append(wave)

    # What a condition-monitoring box reports next to the raw waveform: RMS over about two revolutions.
    rms_window = int(round(2 * spec["shaft_period"]))
    vib_rms = np.sqrt(_moving_average((vibration[0] ** 2 + vibration[1] ** 2) / 2, rms_window))
    channels = {
        "vib_x": vibration[0],
        "vib_y": vibration[1],
        "vib_rms": vib_rms * (1 + 0.3 * noise * rng.standard_normal(n_rows)),
        "motor_current": current + noise * spec["rated_current"] * 0.3 * rng.standard_normal(n_rows),
        "discharge_pressure": pressure
        + noise * spec["rated_pressure"] * (0.3 * rng.standard_normal(n_rows) + fault_effects.pressure_noise),
        "flow": flow + noise * spec["rated_flow"] * 0.3 * rng.standard_normal(n_rows),
        "bearing_temp": bearing_temp + 0.1 * rng.standard_normal(n_rows),
        "motor_temp": motor_temp + 0.1 * rng.standard_normal(n_rows),
    }
    values = np.column_stack([channels[name] for name in PUMP_CHANNELS])  # (n_rows, n_channels)
    # Sensor faults corrupt the measurement, not the process, so they come after the physics.
    for number, (start, end, kind) in enumerate(faults):
        first, last = n_train + start, n_train + end
        if kind == "sensor_drift":
            col = PUMP_CHANNELS.index(str(rng.choice(_DRIFT_CHANNELS)))
            spec[f"fault_{number}_channel"] = float(col)
            spread = values[:n_train, col].std()
            sign = rng.choice([-1.0, 1.0])
            values[first:last, col] += sign * rng.uniform(2.5, 4.0) * spread * np.linspace(0, 1, last - first)
        elif kind == "stuck_sensor":
            col = PUMP_CHANNELS.index(str(rng.choice(_STUCK_CHANNELS)))
            spec[f"fault_{number}_channel"] = float(col)
            values[first:last, col] = values[first - 1, col]
    return values.astype(np.float32)


@dataclass
class _FaultEffects:
    """Per-row modifiers of the pump physics (1 or 0 where healthy), in whole-series coordinates."""

    imbalance: np.ndarray  # multiplies the 1x vibration amplitude
    bearing_hf: np.ndarray  # amplitude of the bearing defect frequency
    bearing_heat: np.ndarray  # extra friction heat
    broadband: np.ndarray  # extra broadband vibration (cavitation)
    pressure_noise: np.ndarray  # extra pressure fluctuation (cavitation), as a random signal
    flow_drop: np.ndarray  # relative flow loss (cavitation)
    current_gain: np.ndarray  # multiplies motor current
    active: np.ndarray  # True inside any fault span

    @classmethod
    def build(
        cls,
        rng: np.random.Generator,
        spec: dict[str, float],
        n_train: int,
        n_rows: int,
        faults: list[tuple[int, int, str]],
    ) -> _FaultEffects:
        effects = cls(
            imbalance=np.ones(n_rows),
            bearing_hf=np.zeros(n_rows),
            bearing_heat=np.zeros(n_rows),
            broadband=np.zeros(n_rows),
            pressure_noise=np.zeros(n_rows),
            flow_drop=np.zeros(n_rows),
            current_gain=np.ones(n_rows),
            active=np.zeros(n_rows, dtype=bool),
        )
        for start, end, kind in faults:
            first, last = n_train + start, n_train + end
            span = slice(first, last)
            effects.active[span] = True
            progress = np.linspace(0.0, 1.0, last - first)  # gradual faults grow over their span
            onset = np.clip(np.arange(last - first) / 20.0, 0.0, 1.0)  # sudden faults settle in 20 rows
            if kind == "bearing_wear":
                growth = np.minimum(1.0, progress / 0.6) ** rng.uniform(1.0, 2.0)  # full severity at 60 %
                effects.bearing_hf[span] += rng.uniform(1.0, 2.0) * growth
                effects.bearing_heat[span] += rng.uniform(0.3, 0.5) * growth
            elif kind == "imbalance":
                effects.imbalance[span] *= 1.0 + rng.uniform(0.8, 1.4) * onset
                effects.current_gain[span] *= 1.0 + 0.02 * onset
            elif kind == "cavitation":
                # Cavitation comes and goes with the bubbles: a slowly varying intensity, never quite zero.
                intensity = onset * (0.6 + 0.4 * np.abs(_lowpass_noise(rng, last - first, 30.0)).clip(0, 1))
                effects.broadband[span] += rng.uniform(0.4, 0.8) * intensity
                effects.pressure_noise[span] += rng.uniform(3.0, 6.0) * intensity * rng.standard_normal(last - first)
                effects.flow_drop[span] += rng.uniform(0.1, 0.2) * intensity
        return effects
