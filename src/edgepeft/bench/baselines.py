"""Classical detectors in the same API as :class:`~edgepeft.detect.detector.AnomalyDetector`.

A deep model has to beat these to earn its place (FIELD-NOTES "Simple baselines are strong"): per-asset PCA
(T-squared + Q), IsolationForest, and the two one-liners that tie many foundation models, moving-window
variance and squared first difference.

Every baseline follows the detector's recipe, so a comparison differs only in the scoring model:
1. the asset's training rows fix a :class:`ChannelScaler`;
2. the first ``1 - calib_fraction`` of the training rows fit the model;
3. the whole training series is scored (the held-out rows with their real history), a trailing mean over
   ``smoothing`` rows is applied, and the held-out rows calibrate the threshold and ``p_anomaly``.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(600, 3))
    >>> X_test = X[:200].copy(); X_test[100:150] *= 6
    >>> det = BASELINES["pca"]().fit(X)
    >>> scores = det.score(X_test)
    >>> scores.shape, bool(scores[110:150].mean() > scores[:100].mean())
    ((200,), True)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from edgepeft.core.errors import ConfigError, DataError
from edgepeft.data.csvio import validate_array
from edgepeft.data.scaler import ChannelScaler
from edgepeft.detect.scoring import trailing_mean
from edgepeft.detect.threshold import CalibratedOutputs, ScoreCalibrator, check_persistence, make_threshold

# Fewer fit rows than this and a variance, a PCA or a forest is noise, not a model of "normal".
MIN_FIT_ROWS = 20
# Fewer held-out rows than this and a tail-based threshold has no tail to fit.
MIN_CALIB_ROWS = 20


class BaselineDetector(CalibratedOutputs):
    """Shared fit / score / predict / calibration of the classical baselines.

    Subclasses implement ``_fit_model(scaled_fit_rows)`` and ``_raw_scores(scaled) -> (rows,)``, higher
    meaning more anomalous; everything else (validation, scaling, smoothing, threshold, ``p_anomaly``)
    lives here so every baseline is calibrated exactly like :class:`AnomalyDetector`.

    >>> import numpy as np
    >>> det = SquaredDiffDetector(smoothing=4).fit(np.random.default_rng(1).normal(size=(300, 2)))
    >>> sorted(det.score_all(np.zeros((5, 2))))
    ['anomaly', 'p_anomaly', 'score']
    """

    def __init__(
        self,
        *,
        target_far: float = 0.01,
        threshold: str = "pot",
        smoothing: int = 8,
        calib_fraction: float = 0.2,
        seed: int = 0,
        raise_after: int = 1,
        clear_after: int = 1,
    ) -> None:
        self.target_far = target_far
        self.threshold = threshold
        self.smoothing = smoothing
        self.calib_fraction = calib_fraction
        self.seed = seed
        self.raise_after = raise_after
        self.clear_after = clear_after

    # ------------------------------------------------------------------ hooks for subclasses
    def _check_model_params(self) -> None:
        """Validate the subclass's own settings (raise ConfigError)."""

    def _fit_model(self, scaled: np.ndarray) -> None:
        raise NotImplementedError

    def _raw_scores(self, scaled: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ validation
    def _check_params(self) -> None:
        if not 0.0 < self.target_far < 0.5:
            raise ConfigError(f"target_far must be in (0, 0.5), got {self.target_far}")
        if self.smoothing < 1:
            raise ConfigError(f"smoothing must be >= 1 row, got {self.smoothing}")
        if not 0.05 <= self.calib_fraction <= 0.5:
            raise ConfigError(f"calib_fraction must be in [0.05, 0.5], got {self.calib_fraction}")
        check_persistence(self.raise_after, self.clear_after)
        self._check_model_params()

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any = None) -> BaselineDetector:
        """Fit on normal data ``X`` (rows, channels) and calibrate the threshold. ``y`` is ignored."""
        self._check_params()
        columns = list(X.columns) if hasattr(X, "columns") else None
        values, channels = validate_array(X, channels=None)
        n_rows = values.shape[0]
        n_calib = max(int(round(n_rows * self.calib_fraction)), MIN_CALIB_ROWS)
        n_fit = n_rows - n_calib
        if n_fit < MIN_FIT_ROWS:
            raise DataError(f"training series has {n_rows} rows; at least {MIN_FIT_ROWS + MIN_CALIB_ROWS} are "
                            "needed (model rows plus held-out calibration rows); pass a longer normal recording")
        self.channels_ = channels if columns is not None else [f"ch{i}" for i in range(values.shape[1])]
        self.n_channels_ = values.shape[1]
        self.scaler_ = ChannelScaler().fit(values)
        scaled = self.scaler_.transform(values)
        self._fit_model(scaled[:n_fit])
        # The held-out rows are scored inside the whole series, so windowed scores see their real history.
        calib_scores = self._smooth(self._raw_scores(scaled))[n_fit:]
        self.threshold_model_ = make_threshold(self.threshold, self.target_far).fit(calib_scores)
        self.threshold_ = float(self.threshold_model_.threshold_)
        self.calibrator_ = ScoreCalibrator().fit(calib_scores)
        self.n_fit_rows_, self.n_calib_rows_ = n_fit, n_calib
        return self

    # ------------------------------------------------------------------ scoring
    def _smooth(self, score: np.ndarray) -> np.ndarray:
        return trailing_mean(score, self.smoothing)

    def _prepare(self, X: Any) -> np.ndarray:
        if not hasattr(self, "scaler_"):
            raise ConfigError(f"this {type(self).__name__} is not fitted yet; call fit(X_normal) first")
        channels = self.channels_ if hasattr(X, "columns") else None
        values, _ = validate_array(X, channels=channels)
        if values.shape[1] != self.n_channels_:
            raise DataError(
                f"data has {values.shape[1]} channels but the detector was trained on {self.n_channels_} "
                f"({', '.join(self.channels_)}); pass the same sensors in the same order"
            )
        return self.scaler_.transform(values)

    def score(self, X: Any) -> np.ndarray:
        """One anomaly score per row (higher = more anomalous)."""
        return self._smooth(self._raw_scores(self._prepare(X)))


    # ------------------------------------------------------------------ sklearn conventions
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class IsolationForestDetector(BaselineDetector):
    """scikit-learn's IsolationForest on each row's standardised values (no temporal context).

    >>> import numpy as np
    >>> det = IsolationForestDetector(n_estimators=20).fit(np.random.default_rng(0).normal(size=(200, 2)))
    >>> det.predict(np.array([[0.0, 0.0], [9.0, -9.0]])).tolist()
    [0, 1]
    """

    def __init__(
        self,
        n_estimators: int = 100,
        *,
        target_far: float = 0.01,
        threshold: str = "pot",
        smoothing: int = 8,
        calib_fraction: float = 0.2,
        seed: int = 0,
        raise_after: int = 1,
        clear_after: int = 1,
    ) -> None:
        super().__init__(
            target_far=target_far, threshold=threshold, smoothing=smoothing, calib_fraction=calib_fraction, seed=seed,
            raise_after=raise_after, clear_after=clear_after,
        )
        self.n_estimators = n_estimators

    def _check_model_params(self) -> None:
        if self.n_estimators < 1:
            raise ConfigError(f"n_estimators must be >= 1, got {self.n_estimators}")

    def _fit_model(self, scaled: np.ndarray) -> None:
        from sklearn.ensemble import IsolationForest

        # n_jobs=1: the edge box and the benchmark machine are small; threads would only contend.
        self.forest_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed, n_jobs=1)
        self.forest_.fit(scaled)

    def _raw_scores(self, scaled: np.ndarray) -> np.ndarray:
        # score_samples is high for normal rows; negate so higher means more anomalous.
        return -self.forest_.score_samples(scaled).astype(np.float64)


class PCADetector(BaselineDetector):
    """PCA reconstruction, Hotelling T-squared + Q (SPE), each divided by its training mean, then summed.

    T-squared catches unusual values inside the normal subspace, Q catches a broken correlation between
    sensors (the published "T-squared + Q" method, strong on SKAB). Components keep ``variance`` of the
    training variance.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> latent = rng.normal(size=(400, 1))
    >>> det = PCADetector().fit(np.c_[latent, latent] + 0.05 * rng.normal(size=(400, 2)))
    >>> det.n_components_, det.predict(np.array([[1.0, -1.0]] * 10))[-1].item()
    (1, 1)
    """

    def __init__(
        self,
        variance: float = 0.9,
        *,
        target_far: float = 0.01,
        threshold: str = "pot",
        smoothing: int = 8,
        calib_fraction: float = 0.2,
        seed: int = 0,
        raise_after: int = 1,
        clear_after: int = 1,
    ) -> None:
        super().__init__(
            target_far=target_far, threshold=threshold, smoothing=smoothing, calib_fraction=calib_fraction, seed=seed,
            raise_after=raise_after, clear_after=clear_after,
        )
        self.variance = variance

    def _check_model_params(self) -> None:
        if not 0.0 < self.variance <= 1.0:
            raise ConfigError(f"variance must be in (0, 1], got {self.variance}")

    def _fit_model(self, scaled: np.ndarray) -> None:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=None, svd_solver="full", random_state=self.seed).fit(scaled)
        cumulative = np.cumsum(pca.explained_variance_ratio_)
        n_components = int(np.searchsorted(cumulative, self.variance - 1e-12) + 1)
        self.n_components_ = min(n_components, scaled.shape[1])
        self.mean_ = pca.mean_
        self.components_ = pca.components_[: self.n_components_]  # (k, C)
        # A zero-variance direction would divide T-squared by zero; it carries no information anyway.
        self.eigenvalues_ = np.maximum(pca.explained_variance_[: self.n_components_], 1e-12)
        t2, q = self._t2_q(scaled)
        # Floors: with every component kept Q is only rounding noise, and must not be blown up to matter.
        self.t2_scale_ = max(float(t2.mean()), 1e-6)
        self.q_scale_ = max(float(q.mean()), 1e-6)

    def _t2_q(self, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = scaled.astype(np.float64) - self.mean_  # (T, C)
        projected = centred @ self.components_.T  # (T, k)
        t2 = np.sum(projected**2 / self.eigenvalues_, axis=1)  # (T,)
        residual = centred - projected @ self.components_  # (T, C)
        q = np.sum(residual**2, axis=1)  # (T,)
        return t2, q

    def _raw_scores(self, scaled: np.ndarray) -> np.ndarray:
        t2, q = self._t2_q(scaled)
        return t2 / self.t2_scale_ + q / self.q_scale_


class MovingVarianceDetector(BaselineDetector):
    """Mean over channels of the variance over the last ``window`` rows of the standardised signal (causal).

    >>> import numpy as np
    >>> det = MovingVarianceDetector(window=16).fit(np.random.default_rng(0).normal(size=(300, 2)))
    >>> X = np.random.default_rng(1).normal(size=(100, 2)); X[60:] *= 5
    >>> bool(det.score(X)[80:].min() > det.score(X)[:50].max())
    True
    """

    def __init__(
        self,
        window: int = 32,
        *,
        target_far: float = 0.01,
        threshold: str = "pot",
        smoothing: int = 8,
        calib_fraction: float = 0.2,
        seed: int = 0,
        raise_after: int = 1,
        clear_after: int = 1,
    ) -> None:
        super().__init__(
            target_far=target_far, threshold=threshold, smoothing=smoothing, calib_fraction=calib_fraction, seed=seed,
            raise_after=raise_after, clear_after=clear_after,
        )
        self.window = window

    def _check_model_params(self) -> None:
        if self.window < 2:
            raise ConfigError(f"window must be >= 2 rows (a variance needs two), got {self.window}")

    def _fit_model(self, scaled: np.ndarray) -> None:
        pass  # nothing to learn beyond the scaler: that is the point of a one-liner

    def _raw_scores(self, scaled: np.ndarray) -> np.ndarray:
        x = scaled.astype(np.float64)
        # var = E[x^2] - E[x]^2 over the trailing window; clipped because rounding can go slightly negative.
        variance = trailing_mean(x**2, self.window) - trailing_mean(x, self.window) ** 2  # (T, C)
        return np.maximum(variance, 0.0).mean(axis=1)


class SquaredDiffDetector(BaselineDetector):
    """Mean over channels of the squared first difference of the standardised signal, trailing-smoothed.

    The first row has no predecessor and scores 0.

    >>> import numpy as np
    >>> det = SquaredDiffDetector(smoothing=1).fit(np.random.default_rng(0).normal(size=(300, 1)))
    >>> det.score(np.array([[0.0], [0.0], [10.0]]))[:2].tolist()
    [0.0, 0.0]
    """

    def _fit_model(self, scaled: np.ndarray) -> None:
        pass  # nothing to learn beyond the scaler

    def _raw_scores(self, scaled: np.ndarray) -> np.ndarray:
        x = scaled.astype(np.float64)
        diff = np.diff(x, axis=0, prepend=x[:1])  # (T, C), first row 0
        return (diff**2).mean(axis=1)


BASELINES: dict[str, Callable[..., BaselineDetector]] = {
    "iforest": IsolationForestDetector,
    "pca": PCADetector,
    "movvar": MovingVarianceDetector,
    "sqdiff": SquaredDiffDetector,
}
