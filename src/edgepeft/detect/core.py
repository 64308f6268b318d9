"""The scoring core: how a model's patch predictions become scores, alarms, probabilities and explanations.

Numpy only, on purpose: the device runtime scores with ONNX Runtime and no torch (``edgepeft serve`` in a
device install), and it must compute exactly what the training side computes. :class:`ScoringCore` holds every
fitted number of ``detector.json`` that turns predictions into scores (scaler, error normalisers, state model,
fusion, threshold, calibrator) and one abstract step, :meth:`ScoringCore._predict`: a batch of windows in, the
forecast and blind predictions of each window out. :class:`~edgepeft.detect.detector.AnomalyDetector` makes
them with torch; the runtime's ONNX engine with one ONNX Runtime session. Everything else is shared, so one
adapter gives the same score for the same rows on every path.

Example:
    >>> import numpy as np
    >>> class Mean(ScoringCore):          # a toy model: every patch predicted as 0 (the asset mean)
    ...     def _geometry(self): return 16, 4
    ...     def _predict(self, windows, hidden, blind, one_pass):
    ...         zeros = np.zeros_like(windows)
    ...         return zeros, (zeros if blind else None)
    >>> core = Mean.from_dict(toy_state(n_channels=2))
    >>> core.score(np.zeros((40, 2))).shape
    (40,)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgepeft.core.errors import ArtifactError, ConfigError, DataError
from edgepeft.data.csvio import validate_array
from edgepeft.data.scaler import ChannelScaler
from edgepeft.data.windows import scoring_windows
from edgepeft.detect.evidence import DYNAMICS, EVIDENCE_KINDS, RELATION_SMOOTHING, Fusion, StateModel
from edgepeft.detect.scoring import CHANNEL_AGGS, channel_evidence, combine_errors, evidence_weights, trailing_mean
from edgepeft.detect.threshold import (
    CalibratedOutputs,
    ScoreCalibrator,
    check_persistence,
    p_anomaly,
    persist_step,
    threshold_from_dict,
)

DETECTOR_FILE = "detector.json"
ADAPTER_DIR = "adapter"
# 1: dynamics (forecast + blind) only, no schema_version field; 2: state evidence and fusion (Detector v2).
SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, SCHEMA_VERSION)
EVIDENCE_AUTO = "auto"
# The scoring settings a saved detector carries in its "params", with the value a file saved before a setting
# existed was fitted with (schema 1 files predate the evidence kinds: dynamics only).
SCORING_DEFAULTS: dict[str, Any] = {
    "target_far": 0.01, "threshold": "pot", "smoothing": 8, "blind_weight": 0.5, "calib_fraction": 0.2,
    "channel_agg": "mean", "slow_channel_share": None, "raise_after": 1, "clear_after": 1,
    "evidence": EVIDENCE_AUTO, "state_window": 16,
}


class ScoringCore(CalibratedOutputs):
    """Scores, alarms, ``p_anomaly`` and explanations from a model's predictions: the one implementation that the
    batch detector, the streaming loop and the device runtime (torch and ONNX Runtime) share.

    Subclasses give the model: :meth:`_geometry` (window and patch length) and :meth:`_predict`.
    """

    # ------------------------------------------------------------------ the model (subclasses)
    def _geometry(self) -> tuple[int, int]:
        """(window_len, patch_len) of the model."""
        raise NotImplementedError

    def _predict(self, windows: np.ndarray, hidden: np.ndarray, blind: bool, one_pass: bool | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Forecast (b, L, C) of each window (b, L, C) with its hidden patches (b, C, N), and, when ``blind``,
        every channel's blind prediction (b, L, C) with that channel hidden. ``one_pass=False`` asks for the
        C-copies reference where a model has both."""
        raise NotImplementedError

    def _pass_width(self, n_channels: int, one_pass: bool | None) -> int:
        """Channel-sequences one window costs in a pass (batches are sized from it)."""
        return n_channels * 2

    # ------------------------------------------------------------------ validation
    def _check_scoring_params(self) -> None:
        """The settings that scoring uses (also checked when a saved detector is read, e.g. on a device)."""
        if not 0.0 < self.target_far < 0.5:
            raise ConfigError(f"target_far must be in (0, 0.5), got {self.target_far}")
        if self.smoothing < 1:
            raise ConfigError(f"smoothing must be >= 1 row, got {self.smoothing}")
        if not 0.0 <= self.blind_weight <= 1.0:
            raise ConfigError(f"blind_weight must be in [0, 1], got {self.blind_weight}")
        if not 0.05 <= self.calib_fraction <= 0.5:
            raise ConfigError(f"calib_fraction must be in [0.05, 0.5], got {self.calib_fraction}")
        if self.channel_agg not in CHANNEL_AGGS:
            raise ConfigError(f"channel_agg must be one of {', '.join(CHANNEL_AGGS)}, got {self.channel_agg!r}")
        if self.slow_channel_share is not None and not 0.0 <= self.slow_channel_share <= 1.0:
            raise ConfigError(f"slow_channel_share must be in [0, 1] or None, got {self.slow_channel_share}")
        check_persistence(self.raise_after, self.clear_after)
        self._evidence_kinds()
        if isinstance(self.state_window, bool) or not isinstance(self.state_window, int) or self.state_window < 2:
            raise ConfigError(f"state_window must be a whole number of rows >= 2, got {self.state_window!r}")

    def _evidence_kinds(self) -> list[str]:
        """The kinds ``evidence`` names ("auto": all, weighted per asset)."""
        if self.evidence == EVIDENCE_AUTO:
            return list(EVIDENCE_KINDS)
        kinds = [k.strip() for k in str(self.evidence).split(",") if k.strip()]
        unknown = [k for k in kinds if k not in EVIDENCE_KINDS]
        if unknown or not kinds:
            raise ConfigError(f"evidence must be 'auto' or a comma list of {', '.join(EVIDENCE_KINDS)}, "
                              f"got {self.evidence!r}")
        return list(dict.fromkeys(kinds))

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_model_"):
            raise ConfigError(f"this {type(self).__name__} is not fitted yet")

    # ------------------------------------------------------------------ errors
    def _row_errors(self, scaled: np.ndarray, channel_budget: int = 256, one_pass: bool | None = None) -> np.ndarray:
        """(T, C, 2) squared errors in asset-standardised units: [..., 0] forecast, [..., 1] blind.

        Each row is predicted causally, from rows before its patch only (:func:`scoring_windows`).
        ``channel_budget`` bounds the channel-sequences per pass (inference memory, whatever the channel count):
        256 holds ONNX Runtime's activations at 5 MB instead of 9.5 MB at 512 for 3 % of its speed, and torch's
        speed is the same (measured on the tiny base, 8 channels). Both engines batch alike, which the int8 path
        needs: its activations are quantised per batch.
        """
        window_len, patch_len = self._geometry()
        windows, hidden = scoring_windows(scaled, window_len, patch_len)
        n_windows, _, n_channels = windows.shape
        blind = n_channels > 1 and self.blind_weight > 0
        out = np.zeros((n_windows, patch_len, n_channels, 2), dtype=np.float32)
        batch_windows = max(1, channel_budget // self._pass_width(n_channels, one_pass))
        for start in range(0, n_windows, batch_windows):
            stop = min(start + batch_windows, n_windows)
            forecast, blind_pred = self._predict(windows[start:stop], hidden[start:stop], blind, one_pass)
            out[start:stop, :, :, 0] = forecast[:, -patch_len:, :]
            if blind_pred is not None:
                out[start:stop, :, :, 1] = blind_pred[:, -patch_len:, :]
        predicted = out.reshape(-1, n_channels, 2)[: scaled.shape[0]]  # (T, C, 2)
        errors = (predicted - scaled[:, :, None]) ** 2
        if not blind:
            errors[..., 1] = errors[..., 0]
        return errors

    # ------------------------------------------------------------------ scoring
    def _evidence(self, scaled: np.ndarray) -> dict[str, np.ndarray]:
        """kind -> (rows, channels) evidence of a scaled series."""
        return self._evidence_from_errors(scaled, self._row_errors(scaled))

    def _evidence_from_errors(self, scaled: np.ndarray, errors: np.ndarray) -> dict[str, np.ndarray]:
        if self.fusion_ is None:  # a schema 1 detector: dynamics only
            return {DYNAMICS: channel_evidence(errors, self.channel_error_, self.evidence_weights_)}
        out = self.state_.evidence(scaled) if any(k != DYNAMICS for k in self.fusion_.kinds_) else {}
        out[DYNAMICS] = channel_evidence(errors, self.channel_error_, self.evidence_weights_)
        return {k: out[k] for k in self.fusion_.kinds_}

    def _score_scaled(self, scaled: np.ndarray) -> np.ndarray:
        return self.score_errors(scaled, self._row_errors(scaled))

    def score_errors(self, scaled: np.ndarray, errors: np.ndarray) -> np.ndarray:
        """Scores of consecutive rows (scaled) from the model's (rows, C, 2) errors: the scoring core every path
        calls once its engine (torch, ONNX Runtime, the streaming loop's memoised patches) made the errors."""
        if self.fusion_ is None:
            return combine_errors(errors, self.channel_error_, self.evidence_weights_, self.smoothing,
                                  self.channel_agg)
        return trailing_mean(self.fusion_.raw_score(self._evidence_from_errors(scaled, errors)), self.smoothing)

    def stream_context(self) -> int:
        """Rows before a row that its score reads besides its patch prediction (state windows, smoothing): the
        streaming loop keeps this many rows and errors to score a row exactly as a batch would."""
        return self.smoothing + self.state_window + RELATION_SMOOTHING

    def _prepare(self, X: Any) -> np.ndarray:
        self._check_fitted()
        channels = self.channels_ if hasattr(X, "columns") else None
        values, _ = validate_array(X, channels=channels)
        if values.shape[1] != self.n_channels_:
            raise DataError(f"data has {values.shape[1]} channels but the detector was trained on "
                            f"{self.n_channels_} ({', '.join(self.channels_)})")
        return self.scaler_.transform(values)

    def score(self, X: Any) -> np.ndarray:
        """One anomaly score per row (higher = more anomalous)."""
        return self._score_scaled(self._prepare(X))

    def score_all(self, X: Any, explain: bool = False) -> dict[str, Any]:
        """score, p_anomaly and anomaly per row in one pass; ``explain=True`` adds ``top_channels``: for each
        flagged row, its three strongest sensors with their kind of evidence (``""`` on unflagged rows)."""
        if not explain:
            return super().score_all(X)
        scaled = self._prepare(X)
        contributions, kinds = self._contributions(scaled, self._evidence(scaled))
        score = trailing_mean(contributions.max(axis=(1, 2)), self.smoothing) if self.fusion_ is not None \
            else self._score_scaled(scaled)
        out: dict[str, Any] = {"score": score, "p_anomaly": self._p_anomaly(score), "anomaly": self._alarms(score)}
        flagged = np.flatnonzero(out["anomaly"])
        labels = [""] * len(score)
        for row, label in zip(flagged, self._top_labels(scaled, contributions[flagged], kinds, flagged), strict=True):
            labels[row] = label
        out["top_channels"] = labels
        return out

    def channel_scores(self, X: Any) -> np.ndarray:
        """(rows, channels) evidence before smoothing, on the score's scale: which sensor drives an alert."""
        scaled = self._prepare(X)
        return self._contributions(scaled, self._evidence(scaled))[0].max(axis=2)

    def explain(self, X: Any, top: int = 3) -> list[str]:
        """Per row, the ``top`` channels that drive its score with their kind of evidence, strongest first, e.g.
        ``"flow:relation;vib_rms:scale"``. Kinds: dynamics (the forecast or virtual sensor missed), level, scale
        (variance up), stuck (variance collapsed), relation (left the asset's normal sensor relations)."""
        scaled = self._prepare(X)
        contributions, kinds = self._contributions(scaled, self._evidence(scaled))
        return self._top_labels(scaled, contributions, kinds, np.arange(len(scaled)), top)

    def _contributions(self, scaled: np.ndarray, evidence: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
        if self.fusion_ is None:
            return np.log1p(evidence[DYNAMICS])[..., None], [DYNAMICS]
        return self.fusion_.channel_scores(evidence), list(self.fusion_.kinds_)

    def _top_labels(self, scaled: np.ndarray, contributions: np.ndarray, kinds: list[str], rows: np.ndarray,
                    top: int = 3) -> list[str]:
        if len(rows) == 0:
            return []
        stuck = self.state_.scale_direction(scaled)[rows] < 0 if "scale" in kinds else None
        best_kind = contributions.argmax(axis=2)  # (rows, channels)
        order = np.argsort(-contributions.max(axis=2), axis=1, kind="stable")[:, :top]
        labels = []
        for i, channels in enumerate(order):
            parts = []
            for c in channels:
                kind = kinds[best_kind[i, c]]
                if kind == "scale" and stuck is not None and stuck[i, c]:
                    kind = "stuck"
                parts.append(f"{self.channels_[c]}:{kind}")
            labels.append(";".join(parts))
        return labels

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_dict(cls, state: dict[str, Any], source: str = DETECTOR_FILE) -> Any:
        """A scorer with every fitted number of a ``detector.json`` dict (the model is the subclass's business).
        Raises ArtifactError, naming ``source``, on anything that could not score."""
        try:
            obj = cls.__new__(cls)
            params = {**SCORING_DEFAULTS, **saved_params(state)}
            for name in SCORING_DEFAULTS:
                setattr(obj, name, params[name])
            obj.params_ = params
            obj._load_fitted(state)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ArtifactError(f"{source} is malformed ({exc})") from exc
        return obj

    def scoring_state(self) -> dict[str, Any]:
        """The fitted numbers that turn a model's errors into scores, alarms and probabilities (JSON-ready)."""
        return {
            "channel_error": self.channel_error_.tolist(),
            "evidence_weights": self.evidence_weights_.tolist(),
            "threshold": self.threshold_model_.to_dict(),
            "calibrator": self.calibrator_.to_dict(),
            "warmup_rows": self.warmup_rows_,
            "state": None if self.fusion_ is None else self.state_.to_dict(),
            "fusion": None if self.fusion_ is None else self.fusion_.to_dict(),
        }

    def _load_fitted(self, state: dict[str, Any]) -> None:
        """Every fitted number of a ``detector.json`` dict that scoring reads (the model aside); raises
        KeyError / TypeError / ValueError / ConfigError on anything that could not score."""
        self.base = state["base"]
        self.channels_ = list(state["channels"])
        self.n_channels_ = len(self.channels_)
        self.base_sha256_ = state["base_sha256"]
        self.base_parameters_ = int(state["base_parameters"])
        self.scaler_ = ChannelScaler.from_dict(state["scaler"])
        n = self.n_channels_
        if self.scaler_.mean_.shape != (n,) or not (np.isfinite(self.scaler_.mean_).all()
                                                    and np.isfinite(self.scaler_.scale_).all()):
            raise ValueError(f"the scaler must hold {n} finite means and scales")
        self._load_scoring(state)
        self.report_ = dict(state["report"])
        self._check_scoring_params()

    def _load_scoring(self, state: dict[str, Any]) -> None:
        """Set and check what :meth:`scoring_state` wrote (or a schema 1 file's subset); raises ValueError/KeyError.
        Scores are computed from these numbers: checked here, so a loaded detector cannot score NaN/inf."""
        n = self.n_channels_
        self.channel_error_ = np.asarray(state["channel_error"], dtype=np.float64)
        if self.channel_error_.shape not in ((n,), (n, 2)) or not (np.isfinite(self.channel_error_).all()
                                                                  and (self.channel_error_ > 0).all()):
            raise ValueError(f"channel_error must be finite positive numbers for each of the {n} channels")
        weights = state.get("evidence_weights")
        self.evidence_weights_ = (evidence_weights(n, self.blind_weight) if weights is None
                                  else np.asarray(weights, dtype=np.float64))
        if self.evidence_weights_.shape != (n, 2):
            raise ValueError(f"evidence_weights has shape {self.evidence_weights_.shape}, expected ({n}, 2)")
        if not (np.isfinite(self.evidence_weights_).all() and (self.evidence_weights_ >= 0).all()):
            raise ValueError("evidence_weights must be finite and non-negative")
        self.threshold_model_ = threshold_from_dict(state["threshold"])
        self.threshold_ = float(self.threshold_model_.threshold_)
        if not np.isfinite(self.threshold_):
            raise ValueError("the threshold is not a finite number")
        self.calibrator_ = ScoreCalibrator.from_dict(state["calibrator"])
        self.warmup_rows_ = int(state.get("warmup_rows", 0))  # schema 1: alarms were never held
        if self.warmup_rows_ < 0:
            raise ValueError("warmup_rows must be >= 0")
        if state.get("fusion") is None:  # schema 1: dynamics only
            self.state_, self.fusion_ = None, None
        else:
            self.state_ = StateModel.from_dict(state["state"], n)
            self.fusion_ = Fusion.from_dict(state["fusion"], n)


class StreamScorer:
    """Score a stream one row at a time, exactly as :meth:`ScoringCore.score_all` scores the whole series, with any
    scorer, torch-free ones included (river's ``score_one``; no learning: that is the training side's
    ``StreamingDetector``). Each patch is predicted once, when its first row arrives, from the rows before it; a
    row's score is the scoring core's on the last ``stream_context()`` rows; alarms keep their persistence state.

    >>> import numpy as np
    >>> class Mean(ScoringCore):
    ...     def _geometry(self): return 16, 4
    ...     def _predict(self, windows, hidden, blind, one_pass):
    ...         return np.zeros_like(windows), (np.zeros_like(windows) if blind else None)
    >>> core, rows = Mean.from_dict(toy_state(2)), np.random.default_rng(0).normal(size=(30, 2))
    >>> stream = StreamScorer(core)
    >>> streamed = [stream.score_one(row)["score"] for row in rows]
    >>> bool(np.allclose(streamed, core.score(rows)))
    True
    """

    def __init__(self, core: ScoringCore) -> None:
        from collections import deque

        core._check_fitted()
        self.core = core
        self.window_len_, self.patch_len_ = core._geometry()
        self.history_: deque[np.ndarray] = deque(maxlen=self.window_len_ - self.patch_len_)
        self.context_rows_: deque[np.ndarray] = deque(maxlen=core.stream_context())
        self.context_errors_: deque[np.ndarray] = deque(maxlen=core.stream_context())
        self.n_seen_ = 0
        self.alarm_on_, self.run_ = False, 0
        self.pending_: tuple[np.ndarray, np.ndarray | None] | None = None

    def _predict_patch(self) -> None:
        window, patch = self.window_len_, self.patch_len_
        n_channels = self.core.n_channels_
        windows = np.zeros((1, window, n_channels), dtype=np.float32)
        have = len(self.history_)
        if have:
            windows[0, window - patch - have : window - patch] = np.stack(self.history_)
        hidden = np.zeros((1, n_channels, window // patch), dtype=bool)
        hidden[:, :, : (window - patch - have) // patch] = True  # patches before the stream began
        hidden[:, :, -1] = True  # the patch to predict
        blind = n_channels > 1 and self.core.blind_weight > 0
        forecast, blind_pred = self.core._predict(windows, hidden, blind, None)
        self.pending_ = (forecast[0, -patch:], None if blind_pred is None else blind_pred[0, -patch:])

    def score_one(self, x: Any, explain: bool = False) -> dict[str, Any]:
        """``score``, ``p_anomaly``, ``anomaly`` and ``warming_up`` of the next row (raw sensor values, channels in
        the trained order), and ``top_channels`` with ``explain`` (``""`` unless the row is flagged)."""
        core = self.core
        values, _ = validate_array(np.asarray(x, dtype=np.float64).reshape(1, -1))
        if values.shape[1] != core.n_channels_:
            raise DataError(f"row has {values.shape[1]} values but the detector was trained on {core.n_channels_} "
                            f"channels ({', '.join(core.channels_)})")
        scaled = core.scaler_.transform(values)[0]
        t = self.n_seen_
        if t % self.patch_len_ == 0 or self.pending_ is None:
            self._predict_patch()
        assert self.pending_ is not None
        forecast, blind = self.pending_
        errors = np.empty((core.n_channels_, 2), dtype=np.float32)
        errors[:, 0] = (forecast[t % self.patch_len_] - scaled) ** 2
        errors[:, 1] = errors[:, 0] if blind is None else (blind[t % self.patch_len_] - scaled) ** 2
        rows = np.stack([*self.context_rows_, scaled])
        errs = np.stack([*self.context_errors_, errors])
        score = float(core.score_errors(rows, errs)[-1])
        self.alarm_on_, self.run_ = persist_step(self.alarm_on_, self.run_, score > core.threshold_,
                                                 core.raise_after, core.clear_after)
        warming = t < core.warmup_rows_
        p = float(p_anomaly(core.calibrator_, [score], core.threshold_)[0])
        if warming:  # held rows stay under the alarm line, as in the batch path
            p = min(p, float(np.nextafter(0.5, 0.0)))
        out: dict[str, Any] = {"score": score, "p_anomaly": p, "anomaly": int(self.alarm_on_ and not warming),
                               "warming_up": int(warming)}
        if explain:
            label = ""
            if out["anomaly"]:
                contributions, kinds = core._contributions(rows, core._evidence_from_errors(rows, errs))
                last = np.array([len(rows) - 1])
                label = core._top_labels(rows, contributions[last], kinds, last)[0]
            out["top_channels"] = label
        self.history_.append(scaled)
        self.context_rows_.append(scaled)
        self.context_errors_.append(errors)
        self.n_seen_ += 1
        return out


def saved_params(state: dict[str, Any]) -> dict[str, Any]:
    """The constructor settings of a saved ``detector.json`` dict, with the value each setting a file predates
    was fitted with."""
    params = dict(state["params"])
    params.setdefault("channel_agg", "mean")  # saved before max became the default
    params.setdefault("evidence", DYNAMICS if detector_schema(state) == 1 else EVIDENCE_AUTO)
    params.setdefault("slow_channel_share", None)
    params.setdefault("micro_batch", None)  # fitted in one pass per step
    return params


def detector_schema(state: dict[str, Any]) -> int:
    """The schema a detector.json dict is written with: 2 when it carries the state evidence and fusion."""
    return SCHEMA_VERSION if state.get("fusion") is not None else 1


def toy_state(n_channels: int = 2) -> dict[str, Any]:
    """A minimal valid schema 1 ``detector.json`` dict (examples and tests of scoring code)."""
    return {
        "params": {}, "base": "toy", "base_sha256": "0" * 64, "base_parameters": 0,
        "channels": [f"ch{i}" for i in range(n_channels)],
        "scaler": {"mean": [0.0] * n_channels, "scale": [1.0] * n_channels},
        "channel_error": [1.0] * n_channels,
        "threshold": {"kind": "quantile", "target_far": 0.01, "threshold": 1.0, "n_normal": 200},
        "calibrator": ScoreCalibrator().fit(np.linspace(0.0, 2.0, 200)).to_dict(),
        "report": {},
    }
