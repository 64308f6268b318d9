"""Thresholds and score calibration fitted on NORMAL scores only, for a target false-alarm rate.

No labels are needed: a quantile of the normal scores, or an extreme-value (peaks-over-threshold) fit of
their tail (SPOT, Siffer et al., KDD 2017) that extrapolates past the largest score seen. A row is flagged
when ``score > threshold_``, the convention shared with ``edgepeft.detect.metrics``.
Fitted state is JSON-serialisable (``to_dict`` / ``from_dict``) so it can ship with an adapter bundle.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any

import numpy as np

from edgepeft.core.errors import ArtifactError, ConfigError, DataError, ModelError
from edgepeft.detect.metrics import check_scores

MIN_NORMAL_SCORES = 10  # below this a quantile, let alone a tail fit, is noise
MIN_PEAKS_MLE = 10  # fewer excesses than this: method of moments instead of maximum likelihood
_GAMMA_ZERO = 1e-8  # |gamma| below this uses the exponential limit of the GPD formulas


def _normal_scores(values: Any) -> np.ndarray:
    scores = check_scores(values, "normal_scores")
    if len(scores) < MIN_NORMAL_SCORES:
        raise DataError(
            f"calibration needs more normal data: got {len(scores)} normal score(s), need at least "
            f"{MIN_NORMAL_SCORES}; score more normal rows (a longer normal recording) before fitting"
        )
    return scores


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _require(d: dict[str, Any], kind: str, keys: tuple[str, ...]) -> None:
    if not isinstance(d, dict) or d.get("kind") != kind:
        found = d.get("kind") if isinstance(d, dict) else type(d).__name__
        raise ArtifactError(f"expected a saved '{kind}' state, found kind {found!r}; the file is not this object")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ArtifactError(f"saved '{kind}' state lacks {missing}; it is corrupt or from another version")


def fit_gpd(excesses: np.ndarray) -> tuple[float, float]:
    """Shape ``gamma`` and scale ``sigma`` of a Generalised Pareto fitted to positive excesses.

    Maximum likelihood (scipy, location fixed at 0) when there are enough excesses and it converges to a
    usable solution (gamma > -1, where the likelihood is bounded); otherwise the method of moments; the
    exponential (gamma = 0, sigma = mean) when the moments are degenerate, or when fewer than
    ``MIN_PEAKS_MLE`` excesses suggest a negative shape. Excesses are scaled to mean 1 first so the
    optimiser sees the same problem whatever the units of the score.

    >>> gamma, sigma = fit_gpd(np.random.default_rng(0).exponential(2.0, 2000))
    >>> abs(gamma) < 0.1, abs(sigma - 2.0) < 0.2
    (True, True)
    """
    y = np.asarray(excesses, dtype=np.float64)
    mean = float(y.mean()) if len(y) else 0.0
    if len(y) == 0 or mean <= 0:
        return 0.0, 0.0
    z = y / mean
    if len(z) >= MIN_PEAKS_MLE:
        from scipy.stats import genpareto

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            try:
                gamma, _, scale = genpareto.fit(z, floc=0)
            except (ValueError, RuntimeError, FloatingPointError):
                gamma, scale = math.nan, math.nan
        if math.isfinite(gamma) and math.isfinite(scale) and scale > 0 and gamma > -1:
            return float(gamma), float(scale * mean)
    var = float(z.var(ddof=1)) if len(z) > 1 else 0.0
    if var > 0:
        # Moments of the GPD: mean = s/(1-g), var = s^2/((1-g)^2 (1-2g)); valid for g < 1/2.
        ratio = 1.0 / var  # mean(z)^2 / var(z), with mean(z) = 1
        gamma = 0.5 * (1 - ratio)
        scale = 0.5 * (ratio + 1)
        # A handful of points cannot tell a bounded tail from a light one; a negative shape there would
        # lower the threshold (more false alarms), so few excesses fall back to the exponential instead.
        if gamma > -1 and (gamma >= 0 or len(z) >= MIN_PEAKS_MLE):
            return float(gamma), float(scale * mean)
    return 0.0, mean


def gpd_quantile(t: float, gamma: float, sigma: float, risk: float, peak_share: float) -> float:
    """Score exceeded with probability ``risk``: t + sigma/gamma ((risk / peak_share)^-gamma - 1).

    ``peak_share`` is N_t / n, the share of scores above ``t``; gamma -> 0 gives t - sigma log(risk / share).

    >>> round(gpd_quantile(1.0, 0.0, 1.0, 0.01, 0.1), 4)  # exponential tail: 1 + ln(10)
    3.3026
    """
    r = risk / peak_share
    if abs(gamma) < _GAMMA_ZERO:
        return float(t - sigma * math.log(r))
    return float(t + sigma / gamma * (r ** (-gamma) - 1))


class QuantileThreshold:
    """Threshold at the ``1 - target_far`` quantile of normal scores: about ``target_far`` of them exceed it.

    >>> normal = np.random.default_rng(0).normal(size=1000)
    >>> th = QuantileThreshold(target_far=0.05).fit(normal)
    >>> round(float(np.mean(normal > th.threshold_)), 2)
    0.05
    """

    kind = "quantile"

    def __init__(self, target_far: float = 0.01) -> None:
        self.target_far = target_far

    def fit(self, normal_scores: Any) -> QuantileThreshold:
        """Set ``threshold_`` from normal scores only; constant scores give that constant."""
        far = _check_fraction(self.target_far, "target_far")
        scores = _normal_scores(normal_scores)
        self.threshold_ = float(np.quantile(scores, 1 - far))
        self.n_normal_ = len(scores)
        return self

    def predict(self, scores: Any) -> np.ndarray:
        """1 where ``score > threshold_``, else 0."""
        return (check_scores(scores) > _fitted(self).threshold_).astype(np.int8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, including ``kind``."""
        fitted = _fitted(self)
        return {
            "kind": self.kind,
            "target_far": float(self.target_far),
            "threshold": fitted.threshold_,
            "n_normal": fitted.n_normal_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantileThreshold:
        """Rebuild a fitted threshold from :meth:`to_dict` output."""
        _require(d, cls.kind, ("target_far", "threshold", "n_normal"))
        obj = cls(target_far=float(d["target_far"]))
        obj.threshold_ = float(d["threshold"])
        obj.n_normal_ = int(d["n_normal"])
        return obj


class POTThreshold:
    """Peaks-over-threshold (SPOT): fit a Generalised Pareto to the tail of normal scores, extrapolate.

    The initial threshold ``t`` is the ``level`` quantile; the excesses above it get a GPD (gamma, sigma);
    ``threshold_ = t + sigma/gamma ((q n / N_t)^-gamma - 1)`` for risk ``q = target_far``. When the risk
    is not below the share of peaks (``target_far >= 1 - level``) there is nothing to extrapolate and the
    empirical ``1 - target_far`` quantile is used instead. Constant scores give that constant.

    >>> normal = np.random.default_rng(0).exponential(size=20_000)
    >>> th = POTThreshold(target_far=0.001).fit(normal)
    >>> bool(abs(th.threshold_ - np.log(1000)) < 0.5)  # exact exponential answer: ln(1/q)
    True
    """

    kind = "pot"

    def __init__(self, target_far: float = 0.01, level: float = 0.98) -> None:
        self.target_far = target_far
        self.level = level

    def fit(self, normal_scores: Any) -> POTThreshold:
        """Set ``threshold_`` (and ``init_threshold_``, ``gamma_``, ``sigma_``, ``n_peaks_``)."""
        far = _check_fraction(self.target_far, "target_far")
        level = _check_fraction(self.level, "level")
        scores = _normal_scores(normal_scores)
        t = float(np.quantile(scores, level))
        excesses = scores[scores > t] - t
        self.init_threshold_ = t
        self.n_normal_ = len(scores)
        self.n_peaks_ = len(excesses)
        self.gamma_, self.sigma_ = fit_gpd(excesses)
        peak_share = self.n_peaks_ / self.n_normal_
        if self.n_peaks_ == 0 or self.sigma_ <= 0:
            self.threshold_ = t  # constant (or nearly) scores: nothing above t to model
        elif far >= peak_share:
            self.threshold_ = float(np.quantile(scores, 1 - far))  # inside the data: no extrapolation
        else:
            self.threshold_ = gpd_quantile(t, self.gamma_, self.sigma_, far, peak_share)
        return self

    def predict(self, scores: Any) -> np.ndarray:
        """1 where ``score > threshold_``, else 0."""
        return (check_scores(scores) > _fitted(self).threshold_).astype(np.int8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, including ``kind`` and the tail fit."""
        fitted = _fitted(self)
        return {
            "kind": self.kind,
            "target_far": float(self.target_far),
            "level": float(self.level),
            "threshold": fitted.threshold_,
            "init_threshold": fitted.init_threshold_,
            "gamma": fitted.gamma_,
            "sigma": fitted.sigma_,
            "n_peaks": fitted.n_peaks_,
            "n_normal": fitted.n_normal_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> POTThreshold:
        """Rebuild a fitted threshold from :meth:`to_dict` output."""
        keys = ("target_far", "level", "threshold", "init_threshold", "gamma", "sigma", "n_peaks", "n_normal")
        _require(d, cls.kind, keys)
        obj = cls(target_far=float(d["target_far"]), level=float(d["level"]))
        obj.threshold_ = float(d["threshold"])
        obj.init_threshold_ = float(d["init_threshold"])
        obj.gamma_, obj.sigma_ = float(d["gamma"]), float(d["sigma"])
        obj.n_peaks_, obj.n_normal_ = int(d["n_peaks"]), int(d["n_normal"])
        return obj


def _fitted(obj: Any) -> Any:
    if not hasattr(obj, "threshold_"):
        raise ModelError(f"{type(obj).__name__} is not fitted; call fit(normal_scores) first")
    return obj


THRESHOLD_KINDS: dict[str, type[QuantileThreshold] | type[POTThreshold]] = {
    QuantileThreshold.kind: QuantileThreshold,
    POTThreshold.kind: POTThreshold,
}


def make_threshold(kind: str, target_far: float) -> QuantileThreshold | POTThreshold:
    """A new, unfitted threshold of ``kind`` ("quantile" or "pot").

    >>> make_threshold("pot", 0.01).level
    0.98
    """
    if kind not in THRESHOLD_KINDS:
        raise ConfigError(f"unknown threshold kind {kind!r}; choose one of {sorted(THRESHOLD_KINDS)}")
    _check_fraction(target_far, "target_far")
    return THRESHOLD_KINDS[kind](target_far=target_far)


def threshold_from_dict(d: dict[str, Any]) -> QuantileThreshold | POTThreshold:
    """Rebuild whichever threshold ``d["kind"]`` names, from its ``to_dict`` output.

    >>> threshold_from_dict(QuantileThreshold(0.1).fit(np.arange(20.0)).to_dict()).threshold_
    17.1
    """
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in THRESHOLD_KINDS:
        raise ArtifactError(f"saved threshold has unknown kind {kind!r}; expected one of {sorted(THRESHOLD_KINDS)}")
    return THRESHOLD_KINDS[kind].from_dict(d)


class ScoreCalibrator:
    """Raw scores -> p_anomaly in [0, 1], monotone, from normal scores only.

    The empirical CDF of the normal scores, interpolated on a grid of ``n_quantiles`` quantiles, up to the
    ``tail_level`` quantile u; above u a Generalised Pareto tail, p = 1 - (1 - F(u)) S(score - u), so scores
    beyond the largest normal one keep rising towards 1 instead of saturating at exactly 1. The tail shape
    is clipped at gamma >= 0 for the same reason (a negative shape has a finite end point). Only the grid
    and four tail numbers are stored.

    >>> normal = np.random.default_rng(0).normal(size=5000)
    >>> cal = ScoreCalibrator().fit(normal)
    >>> p = cal.transform([np.median(normal), normal.max(), normal.max() + 1])
    >>> round(float(p[0]), 2), bool(p[1] < p[2] < 1)
    (0.5, True)
    """

    kind = "ecdf_gpd"

    def __init__(self, tail_level: float = 0.95, n_quantiles: int = 201) -> None:
        self.tail_level = tail_level
        self.n_quantiles = n_quantiles

    def fit(self, normal_scores: Any) -> ScoreCalibrator:
        """Store the quantile grid and fit the upper tail."""
        level = _check_fraction(self.tail_level, "tail_level")
        if isinstance(self.n_quantiles, bool) or not isinstance(self.n_quantiles, int) or self.n_quantiles < 3:
            raise ConfigError(f"n_quantiles must be an int >= 3, got {self.n_quantiles!r}")
        scores = _normal_scores(normal_scores)
        self.quantiles_ = np.quantile(scores, np.linspace(0, 1, self.n_quantiles))
        u = float(np.quantile(scores, level))
        gamma, sigma = fit_gpd(scores[scores > u] - u)
        if sigma <= 0:
            # No spread above u (e.g. constant scores): borrow the scale of the bulk, or a tiny one, so
            # anything above the normal range maps close to 1 while staying monotone.
            spread = float(self.quantiles_[-1] - self.quantiles_[0])
            sigma = spread if spread > 0 else 1e-6 * max(1.0, abs(u))
        self.tail_start_ = u
        self.gamma_ = max(gamma, 0.0)
        self.sigma_ = sigma
        return self

    def transform(self, scores: Any) -> np.ndarray:
        """p_anomaly for each score: 0 below every normal score, F(u) at u, -> 1 far above."""
        if not hasattr(self, "quantiles_"):
            raise ModelError("ScoreCalibrator is not fitted; call fit(normal_scores) first")
        s = check_scores(np.atleast_1d(scores), "scores")
        xp, fp = self._grid()
        p = np.interp(s, xp, fp, left=0.0)
        u = self.tail_start_
        p_u = float(np.interp(u, xp, fp))
        above = s > u
        excess = s[above] - u
        if self.gamma_ < _GAMMA_ZERO:
            survival = np.exp(-excess / self.sigma_)
        else:
            survival = (1 + self.gamma_ * excess / self.sigma_) ** (-1 / self.gamma_)
        p[above] = 1 - (1 - p_u) * survival
        return p

    def log_survival(self, scores: Any) -> np.ndarray:
        """log P(normal score > s) for each score: the ECDF below ``tail_start_``, the fitted GPD tail above it,
        computed in logs so that far-out scores keep their order instead of all rounding to probability 0."""
        if not hasattr(self, "quantiles_"):
            raise ModelError("ScoreCalibrator is not fitted; call fit(normal_scores) first")
        s = check_scores(np.atleast_1d(scores), "scores")
        xp, fp = self._grid()
        u = self.tail_start_
        p_u = float(np.interp(u, xp, fp))
        with np.errstate(divide="ignore"):
            out = np.log(np.maximum(1.0 - np.interp(s, xp, fp, left=0.0), 1e-300))
        above = s > u
        excess = s[above] - u
        log_tail = math.log(max(1.0 - p_u, 1e-300))
        if self.gamma_ < _GAMMA_ZERO:
            out[above] = log_tail - excess / self.sigma_
        else:
            out[above] = log_tail - np.log1p(self.gamma_ * excess / self.sigma_) / self.gamma_
        return out

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        # Tied quantiles (repeated scores) collapse to one point at their mean probability, so the
        # interpolation is well defined and the median of a constant sample maps to 0.5.
        probs = np.linspace(0, 1, len(self.quantiles_))
        xp, inverse = np.unique(self.quantiles_, return_inverse=True)
        fp = np.bincount(inverse, probs) / np.bincount(inverse)
        return xp, fp

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the quantile grid and the tail parameters."""
        if not hasattr(self, "quantiles_"):
            raise ModelError("ScoreCalibrator is not fitted; call fit(normal_scores) first")
        return {
            "kind": self.kind,
            "tail_level": float(self.tail_level),
            "quantiles": [float(q) for q in self.quantiles_],
            "tail_start": self.tail_start_,
            "gamma": self.gamma_,
            "sigma": self.sigma_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreCalibrator:
        """Rebuild a fitted calibrator from :meth:`to_dict` output."""
        _require(d, cls.kind, ("tail_level", "quantiles", "tail_start", "gamma", "sigma"))
        quantiles = np.asarray(d["quantiles"], dtype=np.float64)
        if quantiles.ndim != 1 or len(quantiles) < 3 or np.any(np.diff(quantiles) < 0):
            raise ArtifactError("saved calibrator quantiles must be a non-decreasing list of >= 3 numbers")
        obj = cls(tail_level=float(d["tail_level"]), n_quantiles=len(quantiles))
        obj.quantiles_ = quantiles
        obj.tail_start_ = float(d["tail_start"])
        obj.gamma_, obj.sigma_ = float(d["gamma"]), float(d["sigma"])
        if obj.sigma_ <= 0 or obj.gamma_ < 0:
            raise ArtifactError("saved calibrator tail must have sigma > 0 and gamma >= 0")
        return obj


def check_persistence(raise_after: Any, clear_after: Any) -> None:
    """Raise ConfigError unless both alarm-persistence settings are whole numbers of rows >= 1."""
    for name, value in (("raise_after", raise_after), ("clear_after", clear_after)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"{name} must be a whole number of rows >= 1, got {value!r}")


def persist_alarms(above: Any, raise_after: int = 1, clear_after: int = 1) -> np.ndarray:
    """Alarm state per row from "score over threshold" flags: an alarm starts at the ``raise_after``-th
    consecutive row over the threshold and ends at the ``clear_after``-th consecutive row under it.

    Causal (a row's state depends on it and earlier rows only), like an alerting rule's "for" duration. Its
    purpose: a flickering alarm raises and clears many times during one fault, and each edge is a false
    changepoint to whoever watches it (see ``studies/scoring-2026-11``). 1 and 1 (the defaults) return the
    flags unchanged. Only the rows passed together are seen, as with the score's smoothing.

    >>> persist_alarms([1, 0, 1, 1, 1, 0, 1, 0, 0, 0], raise_after=2, clear_after=2).astype(int).tolist()
    [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    """
    check_persistence(raise_after, clear_after)
    flags = np.asarray(above, dtype=bool).ravel()
    if raise_after == 1 and clear_after == 1:
        return flags.copy()
    out = np.zeros(len(flags), dtype=bool)
    if len(flags) == 0:
        return out
    # Walk the runs of equal flags, not the rows: the state only changes inside a long enough run.
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(flags)]])
    on = False
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        if flags[start]:
            if on:
                out[start:stop] = True
            elif stop - start >= raise_after:
                out[start + raise_after - 1 : stop] = True
                on = True
        elif on:
            keep = min(stop - start, clear_after - 1)  # rows still alarmed before the clear_after-th normal row
            out[start : start + keep] = True
            on = stop - start < clear_after
    return out


def persist_step(on: bool, run: int, above: bool, raise_after: int = 1, clear_after: int = 1) -> tuple[bool, int]:
    """:func:`persist_alarms` one row at a time: the alarm state and run after one more row over (or under) the
    threshold. ``run`` counts the current run, positive over the threshold and negative under it.

    >>> state = (False, 0)
    >>> [(state := persist_step(*state, above, raise_after=2, clear_after=2))[0]
    ...  for above in [1, 0, 1, 1, 1, 0, 1, 0, 0, 0]] == persist_alarms([1, 0, 1, 1, 1, 0, 1, 0, 0, 0], 2, 2).tolist()
    True
    """
    run = (run + 1 if run > 0 else 1) if above else (run - 1 if run < 0 else -1)
    if above and not on and run >= raise_after:
        on = True
    elif not above and on and -run >= clear_after:
        on = False
    return on, run


class CalibratedOutputs:
    """The one base of our detector and the classical baselines: ``get_params`` (read from the constructor's
    signature, scikit-learn's convention) and ``predict_proba`` / ``predict`` / ``score_all`` from a detector's
    ``score``, ``calibrator_`` and ``threshold_``, so they all answer alike.

    >>> class Toy(CalibratedOutputs):
    ...     threshold_, calibrator_ = 0.5, ScoreCalibrator().fit(np.linspace(0, 1, 50))
    ...     def score(self, X): return np.asarray(X, dtype=float)
    >>> Toy().predict([0.2, 0.9]).tolist()
    [0, 1]
    """

    threshold_: float
    calibrator_: ScoreCalibrator
    raise_after: int = 1
    clear_after: int = 1
    # Rows at the start of a scored series whose alarms are held: they lack the history the score needs.
    warmup_rows_: int = 0

    def score(self, X: Any) -> np.ndarray:  # pragma: no cover - every user defines it
        raise NotImplementedError

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments as stored (copies), named by its signature."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n not in ("self", "args", "kwargs")]
        return {name: copy.deepcopy(getattr(self, name)) for name in names}

    def predict_proba(self, X: Any) -> np.ndarray:
        """p_anomaly per row in [0, 1]; see :func:`p_anomaly`."""
        return self._p_anomaly(self.score(X))

    def predict(self, X: Any) -> np.ndarray:
        """0/1 per row: 1 where the score exceeds the calibrated threshold (held for ``raise_after`` /
        ``clear_after`` rows when those are set, see :func:`persist_alarms`), never in the first
        ``warmup_rows_`` rows of the series."""
        return self._alarms(self.score(X))

    def _alarms(self, score: np.ndarray) -> np.ndarray:
        alarms = persist_alarms(score > self.threshold_, self.raise_after, self.clear_after)
        alarms[: self.warmup_rows_] = False
        return alarms.astype(np.int8)

    def _p_anomaly(self, score: np.ndarray) -> np.ndarray:
        p = p_anomaly(self.calibrator_, score, self.threshold_)
        # Held rows raise no alarm, so their probability stays under the alarm line.
        p[: self.warmup_rows_] = np.minimum(p[: self.warmup_rows_], np.nextafter(0.5, 0.0))
        return p

    def score_all(self, X: Any) -> dict[str, np.ndarray]:
        """score, p_anomaly and anomaly in one pass."""
        score = self.score(X)
        return {
            "score": score,
            "p_anomaly": self._p_anomaly(score),
            "anomaly": self._alarms(score),
        }


def p_anomaly(calibrator: ScoreCalibrator, scores: Any, threshold: float) -> np.ndarray:
    """The alarm odds of each score, from S, the calibrated survival of normal scores (the chance that a normal row
    scores higher), and r = S(score) / S(threshold):

    - under the threshold (r >= 1): ``p = 1 / (1 + r)``, so about ``target_far`` at an ordinary (median) normal row
      and 0.5 at the threshold;
    - over it (r < 1): ``p = 1 - 0.5 / (1 + ln(1 / r))``, which keeps rising with the score without reaching 1.0
      in floating point (a burst pipe still ranks above a mild excursion: no plateau).

    So ``p >= 0.5`` exactly where a row is flagged (``score > threshold``), and on normal rows the share with
    ``p > v`` is the calibrated tail probability ``S_t = S(threshold)`` (about ``target_far``) times
    ``(1 - v) / v`` for v <= 0.5 and times ``exp(1 - 0.5 / (1 - v))`` above: ``S_t`` at 0.5, ``0.02 S_t`` at 0.9.

    >>> cal = ScoreCalibrator().fit(np.random.default_rng(0).normal(size=5000))
    >>> p = p_anomaly(cal, [0.0, 2.33, 5.0, 50.0, 500.0], threshold=2.33)
    >>> [round(float(v), 3) for v in p[:2]], bool(p[2] < p[3] < p[4] < 1.0)
    ([0.025, 0.5], True)
    """
    log_ratio = calibrator.log_survival(scores) - float(calibrator.log_survival([threshold])[0])  # ln r
    with np.errstate(over="ignore"):
        under = 1.0 / (1.0 + np.exp(np.maximum(log_ratio, 0.0)))
    over = 1.0 - 0.5 / (1.0 - np.minimum(log_ratio, 0.0))
    return np.where(log_ratio >= 0.0, under, over)
