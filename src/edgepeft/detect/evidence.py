"""State evidence and label-free fusion: the part of a score that asks "is this a state this asset shows when
it is healthy?", beside the model's "was the next patch predictable?" (dynamics).

Why: a forecaster conditioned on the last window follows a sustained fault (a level shift, a drift, a frozen
sensor) once it fills the window, so only its onset stands out (FIELD-NOTES, "Forecast-error scores miss
sustained faults"); per-window normalisation removes the level as well. The evidences here compare each
row's recent state with the asset's normal set, per channel, so every alert still names its sensors:

- ``level``: the trailing mean over ``state_window`` rows, as a z-score against its normal distribution;
- ``scale``: the trailing log standard deviation, two-sided: a burst of noise, or a variance collapse (a stuck
  sensor, reported as ``stuck``);
- ``relation``: a per-asset linear relation residual of lightly smoothed rows: each channel against its best
  linear prediction from the other channels (a linear virtual sensor; the relation half that SKAB's leaders,
  MSET and T^2 + Q, and our fleet's PCA baseline get right). Unlike PCA's Q, whose residual smears a broken
  sensor over its neighbours, the leave-one-out residual points at the sensor that broke away.

Fusion (:class:`Fusion`): each kind's per-channel evidence is divided by its mean on out-of-sample normal rows,
``log1p``-ed, and its channel maximum is put on one scale by that kind's own normal distribution (median 0,
99th percentile 1). Out-of-sample matters: :func:`cross_fit` fits the state model on all but one block of the
training rows and scores that block, so a kind whose normal spread the fit rows underestimate (a short
recording, a wandering regime) is measured as noisy and weighs less, instead of raising false alarms later.
The row's raw score is the maximum over the kinds, weighted per asset (:func:`select_weights`).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t = np.arange(2000)
    >>> base = np.sin(t / 9)
    >>> X = np.c_[base, 2 * base, -base] + 0.1 * rng.normal(size=(2000, 3))
    >>> state = StateModel(state_window=16).fit(X)
    >>> faulty = X.copy(); faulty[1500:, 1] = faulty[1499, 1]          # a stuck sensor
    >>> ev = state.evidence(faulty)
    >>> bool(ev["scale"][1600:, 1].mean() > 10 * ev["scale"][100:1400, 1].mean())
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgepeft.detect.scoring import trailing_mean

DYNAMICS = "dynamics"
STATE_KINDS: tuple[str, ...] = ("level", "scale", "relation")
EVIDENCE_KINDS: tuple[str, ...] = (DYNAMICS, *STATE_KINDS)
# The std floor of the scale evidence, in asset-standardised units: a quiet but healthy channel must not turn
# its ordinary noise into "stuck" alarms.
SCALE_FLOOR = 0.05
RELATION_SMOOTHING = 4  # rows: the relation residual of a single noisy row is noise
RELATION_RIDGE = 1e-2  # added to the normal covariance (asset-standardised units) before it is inverted
ENVELOPE = (0.005, 0.995)  # quantiles of a normal feature's range: inside it, level and scale evidence is 0
# The smallest typical evidence a kind is divided by: an evidence that is 0 on almost every normal row (inside the
# envelope) must not turn a hair outside it into a large score.
MIN_TYPICAL = {"level": 0.25, "scale": 0.25}


MIN_SPREAD = float(np.log(2.0))


def _outside(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """How far each value lies outside [low, high] (0 inside)."""
    return np.maximum(low - values, 0.0) + np.maximum(values - high, 0.0)


def trailing_std(values: np.ndarray, window: int) -> np.ndarray:
    """Causal standard deviation over the last ``window`` rows (fewer at the start).

    >>> trailing_std(np.array([[0.0], [2.0], [0.0], [2.0]]), 2).ravel().tolist()
    [0.0, 1.0, 1.0, 1.0]
    """
    mean = trailing_mean(values, window)
    return np.sqrt(np.maximum(trailing_mean(values * values, window) - mean * mean, 0.0))


class StateModel:
    """Per-channel level and scale statistics and a linear relation subspace of one asset's normal rows.

    Numpy only (the device runtime carries it without torch); fitted state is a JSON dict.

    >>> import numpy as np
    >>> X = np.random.default_rng(1).normal(size=(500, 2))
    >>> sorted(StateModel().fit(X).evidence(X))
    ['level', 'relation', 'scale']
    """

    def __init__(self, state_window: int = 16) -> None:
        self.state_window = state_window

    def _features(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = np.asarray(values, dtype=np.float64)
        level = trailing_mean(values, self.state_window)
        scale = np.log(trailing_std(values, self.state_window) + SCALE_FLOOR)
        return level, scale, trailing_mean(values, RELATION_SMOOTHING)

    def fit(self, values: np.ndarray) -> StateModel:
        """Fit on normal rows (rows, channels) in asset-standardised units."""
        level, scale, smooth = self._features(values)
        skip = min(self.state_window, len(level) // 2)  # rows with a whole trailing window
        level, scale, smooth = level[skip:], scale[skip:], smooth[skip:]
        # The normal envelope of each feature, and its spread as the unit: a periodic or multi-modal channel
        # (a sine's trailing std is small at every crest) is normal anywhere inside what it showed.
        self.level_low_, self.level_high_ = np.quantile(level, ENVELOPE, axis=0)
        self.scale_low_, self.scale_high_ = np.quantile(scale, ENVELOPE, axis=0)
        self.level_std_, self.scale_std_ = level.std(0) + 1e-3, scale.std(0) + 1e-3
        self.scale_mean_ = scale.mean(0)
        self.relation_mean_ = smooth.mean(0)
        # x_c - E[x_c | the others] = (P z)_c / P_cc for a Gaussian with precision P: every channel's
        # leave-one-out regression from one C x C inverse. The ridge keeps collinear sensors well posed.
        covariance = np.atleast_2d(np.cov(smooth, rowvar=False))
        n_channels = covariance.shape[0]
        self.relation_precision_ = np.linalg.inv(covariance + RELATION_RIDGE * np.eye(n_channels))
        return self

    def evidence(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """(rows, channels) squared standardised deviations per kind; causal (row t uses rows <= t)."""
        level, scale, smooth = self._features(values)
        centred = smooth - self.relation_mean_
        precision = self.relation_precision_
        residual = (centred @ precision) / np.diag(precision) if precision.shape[0] > 1 else np.zeros_like(centred)
        return {
            "level": (_outside(level, self.level_low_, self.level_high_) / self.level_std_) ** 2,
            "scale": (_outside(scale, self.scale_low_, self.scale_high_) / self.scale_std_) ** 2,
            "relation": residual**2,
        }

    def scale_direction(self, values: np.ndarray) -> np.ndarray:
        """(rows, channels) sign of the scale deviation: -1 where the variance collapsed (stuck), +1 above."""
        return np.sign(self._features(values)[1] - self.scale_mean_)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_window": int(self.state_window),
            "level_low": self.level_low_.tolist(),
            "level_high": self.level_high_.tolist(),
            "level_std": self.level_std_.tolist(),
            "scale_low": self.scale_low_.tolist(),
            "scale_high": self.scale_high_.tolist(),
            "scale_mean": self.scale_mean_.tolist(),
            "scale_std": self.scale_std_.tolist(),
            "relation_mean": self.relation_mean_.tolist(),
            "relation_precision": self.relation_precision_.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], n_channels: int) -> StateModel:
        """Rebuild from :meth:`to_dict`; raises ValueError on shapes or values that cannot score."""
        obj = cls(state_window=int(d["state_window"]))
        if obj.state_window < 1:
            raise ValueError("state_window must be >= 1")
        for name in ("level_low", "level_high", "level_std", "scale_low", "scale_high", "scale_mean", "scale_std",
                     "relation_mean"):
            arr = np.asarray(d[name], dtype=np.float64)
            if arr.shape != (n_channels,) or not np.isfinite(arr).all():
                raise ValueError(f"state {name} must hold {n_channels} finite numbers")
            setattr(obj, f"{name}_", arr)
        if (obj.level_std_ <= 0).any() or (obj.scale_std_ <= 0).any():
            raise ValueError("state standard deviations must be positive")
        precision = np.asarray(d["relation_precision"], dtype=np.float64)
        if precision.shape != (n_channels, n_channels) or not np.isfinite(precision).all() or (
                np.diag(precision) <= 0).any():
            raise ValueError(f"state relation_precision must be a finite ({n_channels}, {n_channels}) matrix with a "
                             "positive diagonal")
        obj.relation_precision_ = precision
        return obj


def cross_fit(
    values: np.ndarray, state_window: int, folds: int = 4, scored: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Out-of-sample state evidence for every training row: block j is scored by a model fitted on the others
    (with its own history before it, so the features stay causal). What calibration should see: normal rows
    the model has not been fitted on, from every part of the recording. ``scored`` (same shape as ``values``,
    e.g. a copy with injected faults) is scored instead, by the models fitted on the clean ``values``.

    >>> import numpy as np
    >>> ev = cross_fit(np.random.default_rng(0).normal(size=(400, 2)), 16)
    >>> ev["level"].shape
    (400, 2)
    """
    n_rows = len(values)
    edges = np.linspace(0, n_rows, folds + 1).astype(int)
    out: dict[str, np.ndarray] = {kind: np.zeros(values.shape) for kind in STATE_KINDS}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        model = StateModel(state_window).fit(np.concatenate([values[:lo], values[hi:]]))
        evidence = model.evidence((values if scored is None else scored)[:hi])
        for kind in STATE_KINDS:
            out[kind][lo:hi] = evidence[kind][lo:hi]
    return out


class Fusion:
    """Puts each evidence kind on one scale from its normal (out-of-sample) rows and combines them.

    Per kind: ``typical_`` (C,) divides the per-channel evidence, ``log1p`` of it is taken, and the channel
    maximum is standardised by ``centre_`` (its median on normal rows) and ``spread_`` (99th percentile minus
    median). ``weights_`` (kind -> weight) scale the standardised kinds; the raw score is their maximum.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ref = {"a": rng.exponential(size=(500, 2)), "b": 5 * rng.exponential(size=(500, 2))}
    >>> fusion = Fusion().fit(ref)
    >>> [round(float(np.quantile(fusion.kind_scores(ref)[k], 0.99)), 2) for k in ("a", "b")]
    [1.0, 1.0]
    """

    def fit(self, reference: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> Fusion:
        """``reference``: kind -> (rows, channels) evidence on normal rows not used to fit the evidence models."""
        self.kinds_ = list(reference)
        self.typical_ = {k: np.maximum(np.asarray(v, np.float64).mean(0), MIN_TYPICAL.get(k, 1e-6))
                         for k, v in reference.items()}
        self.centre_, self.spread_ = {}, {}
        for kind, values in reference.items():
            logged = np.log1p(values / self.typical_[kind]).max(axis=1)
            centre = float(np.median(logged))
            self.centre_[kind] = centre
            # At least log(2): a kind that is quiet on every normal row is measured against doubling its typical value.
            self.spread_[kind] = max(float(np.quantile(logged, 0.99)) - centre, MIN_SPREAD)
        self.weights_ = {k: 1.0 if weights is None else float(weights[k]) for k in self.kinds_}
        return self

    def channel_scores(self, evidence: dict[str, np.ndarray]) -> np.ndarray:
        """(rows, channels, kinds) standardised, weighted evidence: what each sensor and kind contributes."""
        out = []
        for kind in self.kinds_:
            logged = np.log1p(evidence[kind] / self.typical_[kind])
            out.append(self.weights_[kind] * (logged - self.centre_[kind]) / self.spread_[kind])
        return np.stack(out, axis=-1)

    def kind_scores(self, evidence: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """kind -> (rows,) standardised channel maximum (unweighted)."""
        return {
            kind: (np.log1p(evidence[kind] / self.typical_[kind]).max(axis=1) - self.centre_[kind]) / self.spread_[kind]
            for kind in self.kinds_
        }

    def raw_score(self, evidence: dict[str, np.ndarray]) -> np.ndarray:
        """(rows,) the weighted maximum over kinds and channels (before the trailing mean)."""
        return self.channel_scores(evidence).max(axis=(1, 2))

    def to_dict(self) -> dict[str, Any]:
        return {
            kind: {"typical": self.typical_[kind].tolist(), "centre": self.centre_[kind],
                   "spread": self.spread_[kind], "weight": self.weights_[kind]}
            for kind in self.kinds_
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], n_channels: int) -> Fusion:
        obj = cls()
        obj.kinds_ = list(d)
        unknown = [k for k in obj.kinds_ if k not in EVIDENCE_KINDS]
        if unknown or not obj.kinds_:
            raise ValueError(f"fusion kinds must be among {', '.join(EVIDENCE_KINDS)}, got {obj.kinds_}")
        obj.typical_, obj.centre_, obj.spread_, obj.weights_ = {}, {}, {}, {}
        for kind, entry in d.items():
            typical = np.asarray(entry["typical"], dtype=np.float64)
            if typical.shape != (n_channels,) or not (np.isfinite(typical).all() and (typical > 0).all()):
                raise ValueError(f"fusion {kind} typical must be {n_channels} finite positive numbers")
            centre, spread, weight = float(entry["centre"]), float(entry["spread"]), float(entry["weight"])
            if not (np.isfinite(centre) and np.isfinite(spread) and spread > 0 and np.isfinite(weight) and weight >= 0):
                raise ValueError(f"fusion {kind} centre/spread/weight must be finite (spread > 0, weight >= 0)")
            obj.typical_[kind], obj.centre_[kind] = typical, centre
            obj.spread_[kind], obj.weights_[kind] = spread, weight
        return obj


# ------------------------------------------------------------------------------------------ synthetic faults


def inject_faults(values: np.ndarray, rng: np.random.Generator, n_faults: int = 12, length: int = 48
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Copy of normal ``values`` with synthetic faults in random channels, and the per-row fault mask.

    The kinds the field knows (Goswami et al., ICLR 2023; NCAD): spikes, level shifts, drifts, stuck values,
    noise bursts, a broken relation (a channel replaced by a time-shifted copy of itself) and a frequency change.
    Sizes are in asset-standardised units and mild on purpose: the point is to rank fusions, not to be found.

    >>> import numpy as np
    >>> faulty, mask = inject_faults(np.zeros((600, 3)), np.random.default_rng(0), n_faults=4)
    >>> faulty.shape, bool(mask.any())
    ((600, 3), True)
    """
    out = np.array(values, dtype=np.float64, copy=True)
    n_rows, n_channels = out.shape
    mask = np.zeros(n_rows, dtype=bool)
    length = max(4, min(length, n_rows // 4))
    kinds: list[Callable[[np.ndarray, int], np.ndarray]] = [
        lambda seg, n: seg + rng.choice([-1, 1]) * rng.uniform(3, 5) * (np.arange(n) % max(n // 3, 1) == 0),
        lambda seg, n: seg + rng.choice([-1, 1]) * rng.uniform(1.0, 2.0),
        lambda seg, n: seg + rng.choice([-1, 1]) * rng.uniform(1.5, 3.0) * np.linspace(0, 1, n),
        lambda seg, n: np.full(n, seg[0]),
        lambda seg, n: seg + rng.uniform(0.8, 1.5) * rng.standard_normal(n),
        lambda seg, n: seg[::-1].copy(),
        lambda seg, n: seg[np.minimum((np.arange(n) * 2), n - 1)],
    ]
    for index in range(n_faults):
        start = int(rng.integers(0, max(n_rows - length, 1)))
        stop = min(start + length, n_rows)
        channel = int(rng.integers(0, n_channels))
        out[start:stop, channel] = kinds[index % len(kinds)](out[start:stop, channel], stop - start)
        mask[start:stop] = True
    return out, mask


def select_weights(kind_scores: dict[str, np.ndarray], mask: np.ndarray, candidates: list[dict[str, float]],
                   smoothing: int) -> dict[str, float]:
    """The candidate weighting whose fused score best separates injected faults (``mask``) from the normal rows
    around them: average precision, no test labels. Ties keep the earlier (simpler) candidate.

    >>> import numpy as np
    >>> mask = np.r_[np.zeros(50, bool), np.ones(10, bool)]
    >>> scores = {"a": mask * 1.0, "b": np.zeros(60)}
    >>> select_weights(scores, mask, [{"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 1.0}], 1)
    {'a': 1.0, 'b': 1.0}
    """
    from sklearn.metrics import average_precision_score

    best, best_ap = candidates[0], -1.0
    for weights in candidates:
        fused = np.max([weights[k] * kind_scores[k] for k in kind_scores], axis=0)
        ap = float(average_precision_score(mask, trailing_mean(fused, smoothing)))
        if ap > best_ap + 1e-3:
            best, best_ap = weights, ap
    return dict(best)
