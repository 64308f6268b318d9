"""StreamingDetector: the river-style edge loop. Score each reading as it arrives, then learn from it.

After probation, the score of a row IS :class:`~edgepeft.detect.detector.AnomalyDetector`'s: the same scoring core
(``AnomalyDetector.calibrate`` at the end of probation, ``AnomalyDetector.score_errors`` per row on the last
``stream_context()`` rows and their memoised patch errors), so the dynamics, state evidence, fusion, slow-channel
rule, held warm-up rows, ``p_anomaly`` and alarm persistence are the batch detector's, and a stream with online
updates off scores a file as ``AnomalyDetector.score`` does (:meth:`StreamingDetector.from_detector`). During
probation, before anything is calibrated, rows get a provisional score (mean normalised error) and never alert:
- ``score_one(x)`` scores the next reading without changing anything; ``learn_one(x)`` consumes it: it joins
  the rolling buffer and, every ``update_every`` rows, the adapter takes one optimizer step on windows drawn
  from rows judged normal. ``learn_many`` / ``score_many`` / ``process_many`` do the same for chunks.
- Causal by construction: a patch's prediction is made when its first row arrives, from earlier rows only,
  and every row goes through one code path whatever the chunking, so the score of row t is bit-identical
  however the stream is cut, and whether or not later rows exist.
- Probation: the first ``warmup`` rows are scored (with running statistics) but never alerted. The first
  ``1 - calib_fraction`` of them are learned; at the end the adapter trains ``warmup_steps`` more steps on
  them, the scaler is frozen, and the held-out rest calibrates the threshold and ``p_anomaly``.
- Faults are not learned: an alert marks the rows before it (``quarantine``) unlearnable, and a row may be
  learned only once ``quarantine`` rows have passed without an alert. ``learn_one(x, normal=True)`` is an
  operator's confirmation; ``start_regime()`` announces a new normal regime: a re-probation that learns
  every row, does not alert, and recalibrates the threshold at its end.
- Memory: ``budget_mb`` makes a planner choose batch size, adapted blocks, feature caching and activation
  checkpointing so that training fits; ``memory_report()`` gives what was measured.
- ``state_dict()`` / ``from_state()`` carry everything (adapter, optimizer, buffer, threshold, position,
  random state): a restored detector continues bit-identically. ``stream_files.stream_array`` adds checkpoint files.

Example:
    >>> import numpy as np
    >>> t = np.arange(900)
    >>> X = np.c_[np.sin(t / 5), np.cos(t / 5)] + 0.05 * np.random.default_rng(0).normal(size=(900, 2))
    >>> det = StreamingDetector(base="tiny", method="bitfit", warmup=300, warmup_steps=10, update_every=32)
    >>> out = det.process_many(X[:600])          # score each row, then learn it
    >>> s = det.score_one(X[600])                 # the next reading, nothing learned
    >>> _ = det.learn_one(X[600])
    >>> out["score"].shape, int(out["anomaly"][:300].sum()), det.n_seen_
    ((600,), 0, 601)
"""

from __future__ import annotations

import collections
import copy
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgepeft.core.errors import ArtifactError, ConfigError, DataError
from edgepeft.data.csvio import validate_array
from edgepeft.data.scaler import ChannelScaler
from edgepeft.detect.core import EVIDENCE_AUTO
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.detect.threshold import check_persistence, p_anomaly, persist_step
from edgepeft.models.registry import list_bases, load_base
from edgepeft.peft import PeftConfig, get_method, list_methods
from edgepeft.peft.base import adapted_blocks
from edgepeft.train.budget import (
    MB,
    PlanCandidate,
    TrainingPlan,
    fixed_plan,
    measure_peak,
    plan_training,
    process_rss,
)
from edgepeft.train.continual import ContinualConfig
from edgepeft.train.optim import default_lr, state_bytes
from edgepeft.train.stream import (
    OnlineTrainer,
    RowBuffer,
    StreamEncoder,
    StreamTrainConfig,
    scale_windows,
)

# Online steps run at a constant rate: a third of the rate tuned for batch adaptation's decaying one-cycle
# schedule. At the full rate the adapter random-walks and normal scores creep up over thousands of rows
# (measured: LoRA on tiny, 3000 rows of coupled sines, false alarms from 1 % to 10 %).
ONLINE_LR_SCALE = 1 / 3
CALIBRATION_POOL = 4096
# Planned steps use at most 90 % of the budget: the probe's synthetic batch and a real one (another mix of
# masking patterns) differ by a few per cent.
BUDGET_HEADROOM = 0.1
# Frozen features are cached for the most recent rows only (per patch they cost N+1 tokens x d_model per
# channel, far more than the raw rows): training on cached features draws its windows from these rows.
FEATURE_CACHE_ROWS = 256  # normal scores kept to refit the threshold when a regime is announced
_STATE_VERSION = 2  # 2: the batch detector's scoring state (Detector v2)


class RunningScaler:
    """Per-channel mean and standard deviation of the rows seen so far (Welford), used during probation.

    ``to_scaler()`` freezes it into the :class:`ChannelScaler` the adapter is shipped with (same floor rule).

    >>> scaler = RunningScaler(1)
    >>> for v in (1.0, 3.0):
    ...     scaler.update(np.array([v]))
    >>> scaler.to_scaler().transform(np.array([[2.0]])).tolist()
    [[0.0]]
    """

    def __init__(self, n_channels: int) -> None:
        self.count = 0
        self.mean = np.zeros(n_channels)
        self.m2 = np.zeros(n_channels)

    def update(self, row: np.ndarray) -> None:
        self.count += 1
        delta = row.astype(np.float64) - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (row - self.mean)

    def to_scaler(self) -> ChannelScaler:
        std = np.sqrt(self.m2 / max(self.count, 1))
        floor = np.maximum(1e-3 * np.abs(self.mean), 1e-6)  # ChannelScaler's rule for flat channels
        return ChannelScaler.from_dict({"mean": self.mean.tolist(), "scale": np.maximum(std, floor).tolist()})


@dataclass
class RowScore:
    """One row's outcome. ``errors`` are its squared errors (C, 2) in asset units: forecast, blind."""

    raw: float
    score: float
    p_anomaly: float
    anomaly: int
    probation: int
    errors: np.ndarray
    live: tuple[bool, int, np.ndarray] | None = None  # alarm state, run length, scaled row (live scoring only)


class StreamingDetector:
    """A streaming anomaly detector that keeps adapting its PEFT adapter on the device.

    Constructor arguments are stored unchanged; the model is built when the first row arrives (the number of
    channels is known then). Online state ends in ``_``.

    Args:
        base, method, rank, peft_options: the frozen base and the PEFT method, as for ``AnomalyDetector``.
        warmup: probation rows (scored, never alerted; learned, and the threshold is calibrated on them).
        calib_fraction: share of the probation rows held out to calibrate the threshold.
        warmup_steps: extra updates on the probation's fit rows at the end of probation.
        update_every: rows between online updates (None: no updates after probation).
        batch_size: windows per update.
        micro_batch: windows through the model at once, gradients accumulated (None: the whole batch; a budget
            plan chooses it itself).
        optimizer, lr: sgd, adamw or adafactor; lr None means the method's default for that optimizer.
        adapt_last: adapters only in the last N blocks (None: every block; a budget plan may lower it).
        budget_mb: training memory budget in MiB (activations, gradients, optimizer and other training state);
            None trains with the settings as given.
        cache_features, checkpoint_blocks: frozen-feature caching and activation checkpointing (a budget plan
            chooses them itself).
        continual: ``none``, ``replay``, ``ewc`` or ``replay+ewc``; replay_windows, ewc_strength tune them.
        quarantine: rows a row waits, without an alert, before it may be learned.
        buffer_rows: raw rows kept (at least ``warmup``).
        target_far, threshold, smoothing, blind_weight, evidence, state_window, raise_after, clear_after: as for
            ``AnomalyDetector``.
        recalibrate_every: rows between recalibrations while the adapter keeps learning: the kinds' scales and the
            threshold are fitted again on the probation rows with the current model, so calibration follows the
            adapter (None: never; the online updates then drift away from the calibration). On the issue's clean
            sine (4,032 rows, period 288, warm-up 600, base small) 64 / 128 / 256 flagged 1.6 / 1.2 / 2.1 % of the
            rows after warm-up, never 3.5 % (without it) or 1.4 % (no online updates); a recalibration scores the
            probation rows once (about one probation's worth of scoring every ``recalibrate_every`` rows).
        seed: seeds everything random; same data, seed and settings give bit-identical adapters.
    """

    def __init__(
        self,
        base: str = "small",
        method: str = "lora",
        rank: int = 8,
        *,
        warmup: int = 400,
        calib_fraction: float = 0.2,
        warmup_steps: int = 100,
        update_every: int | None = 16,
        batch_size: int = 16,
        micro_batch: int | None = None,
        optimizer: str = "adamw",
        lr: float | None = None,
        adapt_last: int | None = None,
        budget_mb: float | None = None,
        cache_features: bool = False,
        checkpoint_blocks: bool = False,
        continual: str = "none",
        replay_windows: int = 256,
        ewc_strength: float = 100.0,
        quarantine: int = 32,
        buffer_rows: int = 1024,
        target_far: float = 0.01,
        threshold: str = "pot",
        smoothing: int = 8,
        blind_weight: float = 0.5,
        measure_every: int = 100,
        seed: int = 0,
        peft_options: dict[str, Any] | None = None,
        evidence: str = EVIDENCE_AUTO,
        state_window: int = 16,
        raise_after: int = 1,
        clear_after: int = 1,
        recalibrate_every: int | None = 128,
    ) -> None:
        self.base = base
        self.method = method
        self.rank = rank
        self.warmup = warmup
        self.calib_fraction = calib_fraction
        self.warmup_steps = warmup_steps
        self.update_every = update_every
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self.optimizer = optimizer
        self.lr = lr
        self.adapt_last = adapt_last
        self.budget_mb = budget_mb
        self.cache_features = cache_features
        self.checkpoint_blocks = checkpoint_blocks
        self.continual = continual
        self.replay_windows = replay_windows
        self.ewc_strength = ewc_strength
        self.quarantine = quarantine
        self.buffer_rows = buffer_rows
        self.target_far = target_far
        self.threshold = threshold
        self.smoothing = smoothing
        self.blind_weight = blind_weight
        self.measure_every = measure_every
        self.seed = seed
        self.peft_options = peft_options
        self.evidence = evidence
        self.state_window = state_window
        self.raise_after = raise_after
        self.clear_after = clear_after
        self.recalibrate_every = recalibrate_every

    # ------------------------------------------------------------------ parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments, read from its signature (scikit-learn's convention)."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {name: copy.deepcopy(getattr(self, name)) for name in names}

    def _make_core(self) -> AnomalyDetector:
        """The batch detector that scores for this stream: its settings, this stream's model and scaler."""
        core = AnomalyDetector(
            base=self.base, method=self.method, rank=self.rank, target_far=self.target_far, threshold=self.threshold,
            smoothing=self.smoothing, blind_weight=self.blind_weight, calib_fraction=self.calib_fraction,
            seed=self.seed, evidence=self.evidence, state_window=self.state_window, raise_after=self.raise_after,
            clear_after=self.clear_after,
        )
        core.channels_, core.n_channels_ = list(self.channels_), self.n_channels_
        core.model_, core.method_ = self.model_, self.method_
        core.scaler_ = self.scaler_
        return core

    def _train_config(self, batch_size: int) -> StreamTrainConfig:
        continual = ContinualConfig(strategy=self.continual, reservoir_windows=self.replay_windows,
                                    ewc_strength=self.ewc_strength)
        return StreamTrainConfig(
            batch_size=batch_size, update_every=self.update_every, warmup_steps=self.warmup_steps,
            optimizer=self.optimizer, lr=self.lr, quarantine=self.quarantine, buffer_rows=self._buffer_rows(),
            measure_every=self.measure_every, seed=self.seed, continual=continual,
        )

    def _buffer_rows(self) -> int:
        return max(self.buffer_rows, self.warmup)

    def _check_params(self) -> None:
        if self.base not in list_bases():
            raise ConfigError(f"unknown base {self.base!r}; choose one of {', '.join(list_bases())}")
        if self.method not in list_methods():
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(list_methods())}")
        if not 0.05 <= self.calib_fraction <= 0.5:
            raise ConfigError(f"calib_fraction must be in [0.05, 0.5], got {self.calib_fraction}")
        if not 0.0 < self.target_far < 0.5:
            raise ConfigError(f"target_far must be in (0, 0.5), got {self.target_far}")
        if self.smoothing < 1 or not 0.0 <= self.blind_weight <= 1.0:
            raise ConfigError("smoothing must be >= 1 row and blind_weight in [0, 1]")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise ConfigError(f"budget_mb must be > 0, got {self.budget_mb}")
        self._train_config(self.batch_size)  # validates the training settings
        check_persistence(self.raise_after, self.clear_after)
        AnomalyDetector(evidence=self.evidence, state_window=self.state_window)._check_scoring_params()
        if self.recalibrate_every is not None and (isinstance(self.recalibrate_every, bool)
                                                   or self.recalibrate_every < 1):
            raise ConfigError(f"recalibrate_every must be >= 1 row (or None), got {self.recalibrate_every!r}")

    # ------------------------------------------------------------------ set-up
    def _build(self, adapt_last: int | None, n_channels: int) -> tuple[torch.nn.Module, Any]:
        base_model = load_base(self.base)
        base_model.set_n_channels(n_channels, seed=self.seed)
        method = get_method(self.method)
        torch.manual_seed(self.seed)  # the same initial adapter weights every run
        config = PeftConfig(method=self.method, rank=self.rank, **{**(self.peft_options or {}),
                                                                    "adapt_last": adapt_last})
        return method.attach(base_model, config), method

    def _candidates(self, n_blocks: int) -> list[PlanCandidate]:
        method = get_method(self.method)
        if method.trains_base:
            return [PlanCandidate(None, False, False), PlanCandidate(None, False, True)]
        top = n_blocks if self.adapt_last is None else min(self.adapt_last, n_blocks)
        out = []
        for adapt_last in range(top, 0, -1):
            value = None if adapt_last == n_blocks else adapt_last
            for ckpt in (False, True):
                out += [PlanCandidate(value, True, ckpt), PlanCandidate(value, False, ckpt)]
        return out

    def _cache_slots(self, patch_len: int) -> int:
        return min(self._buffer_rows(), FEATURE_CACHE_ROWS) // patch_len + 1

    def _cache_bytes(self, stages: StreamEncoder, n_channels: int) -> int:
        return self._cache_slots(stages.patch_len) * int(np.prod(stages.feature_shape(n_channels))) * 4

    def _plan(self, n_channels: int) -> TrainingPlan:
        if self.budget_mb is None:
            return fixed_plan(PlanCandidate(self.adapt_last, self.cache_features, self.checkpoint_blocks),
                              self.batch_size, self.micro_batch)
        probe_base = load_base(self.base)
        n_blocks = len(adapted_blocks(probe_base, PeftConfig()))
        built: dict[int | None, Any] = {}

        def probe(candidate: PlanCandidate, batch_size: int) -> int:
            if candidate.adapt_last not in built:
                built[candidate.adapt_last] = self._build(candidate.adapt_last, n_channels)
            model, method = built[candidate.adapt_last]
            stages = StreamEncoder(model, method.encoder(model))
            if candidate.cache_features and stages.prefix_len == 0:
                return 1 << 62  # nothing frozen to cache
            stages.encoder.checkpoint_blocks = candidate.checkpoint_blocks
            trainer = OnlineTrainer(stages, self._train_config(batch_size), 1e-9, batch_size,
                                    candidate.cache_features, n_channels)
            if not trainer.cache_features:
                return trainer.probe(batch_size).peak_bytes
            # Probation trains before any feature is cached: both kinds of step must fit.
            extra = self._cache_bytes(stages, n_channels)
            return max(trainer.probe(batch_size, extra, cached=True).peak_bytes,
                       trainer.probe(batch_size, extra).peak_bytes)

        return plan_training(probe, int(self.budget_mb * MB), self._candidates(n_blocks), max_batch=self.batch_size,
                             headroom=BUDGET_HEADROOM)

    def _setup(self, n_channels: int, channels: list[str], plan: TrainingPlan | None = None) -> None:
        self._check_params()
        encoder_cfg = load_base(self.base)
        window_len, patch_len = encoder_cfg.window_len, encoder_cfg.patch_len
        min_warmup = window_len + 2 * patch_len
        if self.warmup < min_warmup or round(self.warmup * self.calib_fraction) < 10:
            raise ConfigError(f"warmup must be at least {max(min_warmup, int(np.ceil(10 / self.calib_fraction)))} "
                              f"rows for base {self.base!r} (a window of history plus calibration rows), "
                              f"got {self.warmup}")
        self.channels_ = list(channels)
        self.n_channels_ = n_channels
        self.plan_ = plan if plan is not None else self._plan(n_channels)
        self.model_, self.method_ = self._build(self.plan_.adapt_last, n_channels)
        self.stages_ = StreamEncoder(self.model_, self.method_.encoder(self.model_))
        self.stages_.encoder.checkpoint_blocks = self.plan_.checkpoint_blocks
        lr = self.lr if self.lr is not None else default_lr(self.optimizer, self.method_.default_lr) * ONLINE_LR_SCALE
        cfg = self._train_config(self.plan_.batch_size)
        self.trainer_ = OnlineTrainer(self.stages_, cfg, lr, self.plan_.batch_size, self.plan_.cache_features,
                                      n_channels, self.plan_.micro)
        feature_shape = self.stages_.feature_shape(n_channels) if self.trainer_.cache_features else None
        self.buffer_ = RowBuffer(self._buffer_rows(), n_channels, feature_shape, self._cache_slots(patch_len))
        self.n_fit_ = self.warmup - max(int(round(self.warmup * self.calib_fraction)), patch_len)
        self.n_seen_ = 0
        self.live_ = False
        self.running_ = RunningScaler(n_channels)
        # Probation's error normaliser: the mean of the last window's errors. A running mean over all rows would
        # be dominated for ever by the first rows, scored while the running scaler is still immature.
        self.recent_errors_: collections.deque[np.ndarray] = collections.deque(maxlen=window_len)
        self.scaler_: ChannelScaler | None = None
        self.channel_error_: np.ndarray | None = None
        self.tail_: collections.deque[float] = collections.deque(maxlen=self.smoothing - 1)
        self.pending_patch_ = -1
        self.pending_pred_ = np.zeros((patch_len, n_channels, 2), np.float32)
        self.pending_mean_ = np.zeros(n_channels)
        self.pending_scale_ = np.ones(n_channels)
        self.regime_until_ = -1
        self.regime_scores_: list[float] = []
        self.scoring_peak_bytes_: int | None = None
        self.frozen_ = False  # a fork made by score_many: observes rows, learns nothing
        # Live scoring: the batch detector's core, and the last rows (scaled) and errors its score reads.
        self.core_: AnomalyDetector | None = None
        self.context_rows_: collections.deque[np.ndarray] = collections.deque()
        self.context_errors_: collections.deque[np.ndarray] = collections.deque()
        self.alarm_on_, self.run_ = False, 0  # alarm persistence: current state, length of the current run
        self.calib_rows_ = np.zeros((0, n_channels), np.float32)
        self.updates_since_calibration_ = 0

    def _one(self, x: Any) -> np.ndarray:
        """One reading (a sequence of C values, a {sensor: value} dict, or a number) as a (C,) row."""
        if isinstance(x, dict):  # river passes a reading as {sensor: value}
            import pandas as pd

            return self._many(pd.DataFrame([x]))[0]
        return self._many(np.asarray(x, dtype=np.float64).reshape(1, -1))[0]

    def _many(self, X: Any) -> np.ndarray:
        """Rows (n, C) from an array or DataFrame (a 1-D array is one channel); sets up on the first call."""
        fitted = hasattr(self, "channels_")
        named = hasattr(X, "columns")
        values, names = validate_array(X, channels=self.channels_ if fitted and named else None)
        if not fitted:
            self._setup(values.shape[1], names)
        elif values.shape[1] != self.n_channels_:
            raise DataError(f"data has {values.shape[1]} channels but the stream has {self.n_channels_} "
                            f"({', '.join(self.channels_)})")
        return values

    # ------------------------------------------------------------------ scaling and prediction
    def _transform(self, raw: np.ndarray) -> np.ndarray:
        if self.scaler_ is not None:
            return self.scaler_.transform(raw)
        return self.running_.to_scaler().transform(raw)

    def _scale_now(self) -> tuple[np.ndarray, np.ndarray]:
        scaler = self.scaler_ if self.scaler_ is not None else self.running_.to_scaler()
        return scaler.mean_, scaler.scale_

    def _predict_patch(self, patch: int) -> None:
        """Predict patch ``patch`` (rows patch*P ..) from the rows before it; memoised until the next patch."""
        stages = self.stages_
        window_len, patch_len = stages.window_len, stages.patch_len
        # Rows of the patch itself have not arrived: whatever the ring holds there is hidden and zeroed.
        raw, pad = self.buffer_.windows(np.array([(patch + 1) * patch_len]), window_len, patch_len)
        pad[:, :, -1] = True
        mean, scale = self._scale_now()
        windows = scale_windows(raw, pad, lambda v: ((v - mean) / scale).astype(np.float32))
        record = stages.prefix_len if self.trainer_.cache_features and self.live_ and not self.frozen_ else None
        blind = self.n_channels_ > 1 and self.blind_weight > 0

        def run() -> tuple[np.ndarray, np.ndarray | None]:
            return stages.predict(windows, pad, blind, record)

        if self.live_ and self.scoring_peak_bytes_ is None and not self.frozen_:
            result: list[Any] = []
            self.scoring_peak_bytes_ = measure_peak(lambda: result.append(run()))
            pred, features = result[0]
        else:
            pred, features = run()
        if features is not None:
            self.buffer_.put_features(patch, features[0])
        self.pending_patch_ = patch
        self.pending_pred_ = pred[0]
        self.pending_mean_, self.pending_scale_ = mean.copy(), scale.copy()

    def _normaliser(self, errors: np.ndarray) -> np.ndarray:
        if self.channel_error_ is not None:
            return self.channel_error_
        recent = np.stack([*self.recent_errors_, errors])  # includes this row: the first row scores 1
        return np.maximum(recent.mean(axis=0), 1e-6)

    def _score_row(self, row: np.ndarray) -> RowScore:
        """The score of ``row`` as the next reading; changes nothing but the prediction memo."""
        patch_len = self.stages_.patch_len
        t = self.n_seen_
        if self.pending_patch_ != t // patch_len:
            self._predict_patch(t // patch_len)
        if self.core_ is not None:
            return self._score_live(row, t)
        scaled = (row.astype(np.float64) - self.pending_mean_) / self.pending_scale_  # (C,)
        errors = (self.pending_pred_[t % patch_len].astype(np.float64) - scaled[:, None]) ** 2  # (C, 2)
        normalised = errors / self._normaliser(errors)
        mixed = (1 - self.blind_weight) * normalised[:, 0] + self.blind_weight * normalised[:, 1]
        raw = float(mixed.mean())
        score = float(np.mean([*self.tail_, raw]))
        # Probation: nothing is calibrated yet, so no probability and no alarm.
        return RowScore(raw, score, 0.0, 0, 1, errors)

    def _score_live(self, row: np.ndarray, t: int) -> RowScore:
        """The batch detector's score of row ``t``: its errors (the memoised patch prediction, made by the same
        one-pass model arithmetic), then ``score_errors`` on the last ``stream_context()`` rows."""
        core = self.core_
        scaled = self.scaler_.transform(row[None, :])[0]  # (C,) float32, as the batch path scales
        errors = (self.pending_pred_[t % self.stages_.patch_len] - scaled[:, None]) ** 2  # (C, 2)
        rows = np.stack([*self.context_rows_, scaled])
        scores = core.score_errors(rows, np.stack([*self.context_errors_, errors]))
        score = float(scores[-1])
        probation = int(t < self.regime_until_)
        on, run = self._persist(score > core.threshold_)
        anomaly = int(on and t >= core.warmup_rows_ and not probation)
        p = float(p_anomaly(core.calibrator_, [score], core.threshold_)[0])
        if t < core.warmup_rows_:
            p = min(p, float(np.nextafter(0.5, 0.0)))
        return RowScore(score, score, p, anomaly, probation, errors, (on, run, scaled))

    def _persist(self, above: bool) -> tuple[bool, int]:
        """The alarm state after one more row over (or under) the threshold (:func:`persist_step`)."""
        return persist_step(self.alarm_on_, self.run_, above, self.raise_after, self.clear_after)

    # ------------------------------------------------------------------ learning
    def _learn_row(self, row: np.ndarray, rs: RowScore, normal: bool | None) -> None:
        t = self.n_seen_
        if normal is not None:
            learnable = bool(normal)
        elif not self.live_:
            learnable = t < self.n_fit_  # the calibration rows are held out until calibrated
        else:
            learnable = not rs.anomaly
        self.buffer_.append(row, learnable and not self.frozen_)
        if rs.anomaly and normal is not True:
            # The fault began before it was flagged: the rows leading up to the alert are not learned either.
            self.buffer_.set_flags(t - self.quarantine, t + 1, False)
        self.tail_.append(rs.raw)
        if rs.live is not None:
            self.alarm_on_, self.run_, scaled = rs.live
            self.context_rows_.append(scaled)
            self.context_errors_.append(rs.errors)
        if not self.live_:
            self.running_.update(row)
            self.recent_errors_.append(rs.errors)
        if rs.probation and self.live_:
            self.regime_scores_.append(rs.score)
        self.n_seen_ += 1
        if self.frozen_:
            return
        if not self.live_ and self.n_seen_ == self.warmup:
            self._finish_probation()
        elif self.n_seen_ == self.regime_until_:
            self._finish_regime()
        every = self.update_every
        if every and self.n_seen_ % every == 0 and (self.live_ or self.n_seen_ <= self.n_fit_):
            upto = self.n_seen_ - self.quarantine if self.live_ else self.n_seen_
            self._update(upto)
        if self.live_:
            self._maybe_recalibrate()
        consolidate = self.trainer_.cfg.continual.consolidate_every
        if self.live_ and consolidate and self.n_seen_ % consolidate == 0:
            self.trainer_.fisher(self.buffer_, self.n_seen_ - self.quarantine, self._transform)

    def _update(self, upto: int) -> float | None:
        extra = self.buffer_.nbytes - self.buffer_.values.nbytes - self.buffer_.flags.nbytes  # the feature cache
        loss = self.trainer_.update(self.buffer_, upto, self._transform, extra)
        if self.core_ is not None and loss is not None:
            self.updates_since_calibration_ += 1
        return loss

    def _maybe_recalibrate(self) -> None:
        """Every ``recalibrate_every`` rows, if the adapter learned since: calibration follows the adapter."""
        every = self.recalibrate_every
        if (every and self.core_ is not None and self.updates_since_calibration_ and len(self.calib_rows_)
                and self.n_seen_ % every == 0):
            self.core_.recalibrate(self.calib_rows_, self.n_fit_)
            self.stages_.set_training(False)
            self.threshold_model_, self.threshold_ = self.core_.threshold_model_, self.core_.threshold_
            self.calibrator_ = self.core_.calibrator_
            self.updates_since_calibration_ = 0

    def _finish_probation(self) -> None:
        self.scaler_ = self.running_.to_scaler()
        upto = self.n_fit_
        for _ in range(self.warmup_steps):
            self.trainer_.update(self.buffer_, upto, self._transform)
        core = self._make_core()
        scaled = self._transform(self.buffer_.rows(0, self.warmup))
        errors = core.calibrate(scaled, self.n_fit_)  # the batch detector's calibration, on the probation rows
        self.calib_rows_ = scaled  # kept: recalibration after online updates scores them again
        self.stages_.set_training(False)
        self._go_live(core, scaled, errors)
        self.buffer_.set_flags(self.n_fit_, self.warmup, True)  # calibration done: the held-out rows are normal
        self.trainer_.fisher(self.buffer_, self.n_fit_, self._transform)

    def _go_live(self, core: AnomalyDetector, scaled: np.ndarray, errors: np.ndarray) -> None:
        """Score from now on with ``core``; ``scaled`` / ``errors`` are the rows seen so far (their tail is the
        context of the next rows)."""
        self.core_ = core
        self.channel_error_ = core.channel_error_
        self.threshold_model_, self.threshold_, self.calibrator_ = (core.threshold_model_, core.threshold_,
                                                                     core.calibrator_)
        keep = core.stream_context()
        self.context_rows_ = collections.deque(list(scaled[-keep:]) if len(scaled) else [], maxlen=keep)
        self.context_errors_ = collections.deque(list(errors[-keep:]) if len(errors) else [], maxlen=keep)
        self.pending_patch_ = -1  # the next patch is predicted by the adapted model and the frozen scaler
        self.live_ = True

    @classmethod
    def from_detector(cls, detector: AnomalyDetector, **params: Any) -> StreamingDetector:
        """Stream with a fitted batch detector (no probation): its adapter, scaler and calibration from the first
        row. With ``update_every=None`` (the default here) nothing is learned and every row scores exactly as
        ``detector.score`` scores the whole series; otherwise the adapter keeps learning as the stream goes.

        >>> import numpy as np
        >>> t = np.arange(900)
        >>> X = np.c_[np.sin(t / 5), np.cos(t / 5)] + 0.05 * np.random.default_rng(0).normal(size=(900, 2))
        >>> det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=10).fit(X[:600])
        >>> stream = StreamingDetector.from_detector(det)
        >>> bool(np.allclose(stream.process_many(X)["score"], det.score(X), atol=1e-6))
        True
        """
        detector._check_fitted()
        settings = {"update_every": None, "warmup_steps": 0, **params}
        stream = cls(base=detector.base, method=detector.peft_config_.method, rank=detector.rank,
                     target_far=detector.target_far, threshold=detector.threshold, smoothing=detector.smoothing,
                     blind_weight=detector.blind_weight, seed=detector.seed, evidence=detector.evidence,
                     state_window=detector.state_window, raise_after=detector.raise_after,
                     clear_after=detector.clear_after, **settings)
        stream._setup(detector.n_channels_, detector.channels_)
        stream.model_.load_state_dict(detector.model_.state_dict(), strict=False)
        stream.scaler_ = detector.scaler_
        core = stream._make_core()
        core._load_scoring(detector.scoring_state())
        stream.n_fit_ = 0
        stream._go_live(core, np.zeros((0, detector.n_channels_), np.float32), np.zeros((0, detector.n_channels_, 2)))
        return stream

    def _finish_regime(self) -> None:
        """The announced regime is normal too: the batch calibration again, on the earlier calibration rows followed
        by the regime's rows (its second half held out), so state model, fusion and threshold know both."""
        start = max(self.n_seen_ - len(self.regime_scores_), self.buffer_.oldest)
        regime = self._transform(self.buffer_.rows(start, self.n_seen_))
        rows = np.concatenate([self.calib_rows_[-CALIBRATION_POOL:], regime])
        if self.core_ is not None and len(regime) >= 2 * self.smoothing:
            n_fit = len(rows) - len(regime) // 2
            self.core_.calibrate(rows, n_fit)
            self.stages_.set_training(False)
            self.calib_rows_, self.n_fit_ = rows, n_fit
            self._go_live(self.core_, np.asarray(list(self.context_rows_)), np.asarray(list(self.context_errors_)))
            self.updates_since_calibration_ = 0
        self.regime_scores_ = []
        self.regime_until_ = -1
        self.trainer_.fisher(self.buffer_, self.n_seen_ - self.quarantine, self._transform)

    # ------------------------------------------------------------------ river-style API
    def score_one(self, x: Any) -> float:
        """Anomaly score of reading ``x`` as the next row (higher = more anomalous); learns nothing."""
        return self._score_row(self._one(x)).score

    def learn_one(self, x: Any, normal: bool | None = None) -> StreamingDetector:
        """Consume reading ``x``. ``normal=True``: an operator confirms it normal (learned even if flagged);
        ``normal=False``: a known fault, never learned; None: the detector's own judgement decides."""
        row = self._one(x)
        self._learn_row(row, self._score_row(row), normal)
        return self

    def process_one(self, x: Any, normal: bool | None = None) -> RowScore:
        """Score reading ``x``, then learn it (the edge loop's step)."""
        row = self._one(x)
        rs = self._score_row(row)
        self._learn_row(row, rs, normal)
        return rs

    def process_many(self, X: Any, normal: Any = None) -> dict[str, np.ndarray]:
        """Score each row of ``X`` then learn it, in order: score, p_anomaly, anomaly, probation per row.

        Bit-identical to calling ``score_one`` then ``learn_one`` row by row.
        """
        values = self._many(X)
        n_rows = len(values)
        flags = [None] * n_rows if normal is None else [bool(v) for v in np.asarray(normal).reshape(-1)]
        if len(flags) != n_rows:
            raise DataError(f"normal has {len(flags)} entries for {n_rows} rows")
        out = {"score": np.zeros(n_rows), "p_anomaly": np.zeros(n_rows), "anomaly": np.zeros(n_rows, np.int8),
               "probation": np.zeros(n_rows, np.int8)}
        for i, row in enumerate(values):
            rs = self._score_row(row)
            self._learn_row(row, rs, flags[i])
            out["score"][i], out["p_anomaly"][i] = rs.score, rs.p_anomaly
            out["anomaly"][i], out["probation"][i] = rs.anomaly, rs.probation
        return out

    def learn_many(self, X: Any, normal: Any = None) -> StreamingDetector:
        """Consume the rows of ``X`` in order (scored internally: alerts gate what is learned)."""
        self.process_many(X, normal)
        return self

    def score_many(self, X: Any) -> np.ndarray:
        """Scores of the rows of ``X`` as the stream's continuation, each seeing the earlier rows of ``X`` as
        history; nothing is learned and the detector is left unchanged. Probation does not end inside it."""
        values = self._many(X)
        fork = self._fork()
        scores = np.zeros(len(values))
        for i, row in enumerate(values):
            rs = fork._score_row(row)
            fork._learn_row(row, rs, None)
            scores[i] = rs.score
        return scores

    def _fork(self) -> StreamingDetector:
        fork = copy.copy(self)
        fork.frozen_ = True
        buffer = copy.copy(self.buffer_)
        buffer.values, buffer.flags = self.buffer_.values.copy(), self.buffer_.flags.copy()
        fork.buffer_ = buffer
        fork.running_ = copy.deepcopy(self.running_)
        fork.recent_errors_ = copy.copy(self.recent_errors_)
        fork.tail_ = copy.copy(self.tail_)
        fork.context_rows_, fork.context_errors_ = copy.copy(self.context_rows_), copy.copy(self.context_errors_)
        fork.regime_scores_ = []
        return fork

    def start_regime(self, rows: int | None = None) -> None:
        """Announce a new normal regime: the next ``rows`` rows (default ``warmup``) are learned, not alerted,
        and recalibrate the threshold at their end."""
        if not getattr(self, "live_", False):
            raise ConfigError("start_regime() needs a detector past its probation; feed it `warmup` rows first")
        rows = self.warmup if rows is None else rows
        if rows < 20:
            raise ConfigError(f"a regime probation needs at least 20 rows, got {rows}")
        self.regime_until_ = self.n_seen_ + rows
        self.regime_scores_ = []

    # ------------------------------------------------------------------ reports
    def adapter_bytes(self) -> bytes:
        """The adapter (every trained tensor) as safetensors bytes: what a device would ship."""
        from safetensors.torch import save

        self._check_setup()
        return save(self.method_.delta_state(self.model_))

    def update_latencies(self) -> np.ndarray:
        """Seconds per online update so far (this process only)."""
        return np.asarray(self.trainer_.latencies)

    def memory_report(self) -> dict[str, Any]:
        """What was measured: training step peak (and its parts), scoring peak, training state, process RSS."""
        self._check_setup()
        step = self.trainer_.memory
        optimizer = state_bytes(self.trainer_.optimizer)
        training = None if step is None else step.to_dict()
        return {
            "plan": self.plan_.to_dict(),
            "training_peak_bytes": None if step is None else step.peak_bytes,
            "training_step": training,
            "optimizer_state_bytes": optimizer,
            "replay_and_ewc_bytes": self.trainer_.state_nbytes(),
            "feature_cache_bytes": self.buffer_.nbytes - self.buffer_.values.nbytes - self.buffer_.flags.nbytes,
            "scoring_peak_bytes": self.scoring_peak_bytes_,
            "trainable_parameters": sum(p.numel() for p in self.trainer_.params),
            **process_rss(),
        }

    def _check_setup(self) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError("this StreamingDetector has seen no data yet; feed it rows first")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (tensors and plain values only)."""
        self._check_setup()
        core = None
        if self.core_ is not None:
            core = self.core_.scoring_state()
        return {
            "version": _STATE_VERSION,
            "params": self.get_params(),
            "channels": self.channels_,
            "plan": self.plan_.to_dict(),
            "trainer": self.trainer_.state_dict(),
            "buffer": self.buffer_.state_dict(),
            "n_seen": self.n_seen_,
            "live": self.live_,
            "running": {"count": self.running_.count, "mean": torch.from_numpy(self.running_.mean.copy()),
                        "m2": torch.from_numpy(self.running_.m2.copy())},
            # One zero row more than held, so that an empty history still stacks; dropped again on load.
            "recent_errors": torch.from_numpy(np.stack([*self.recent_errors_, np.zeros((self.n_channels_, 2))])),
            "scaler": None if self.scaler_ is None else self.scaler_.to_dict(),
            "channel_error": None if self.channel_error_ is None else torch.from_numpy(self.channel_error_.copy()),
            "core": core,
            "context_rows": torch.from_numpy(np.stack([*self.context_rows_, np.zeros(self.n_channels_, np.float32)])),
            "context_errors": torch.from_numpy(np.stack([*self.context_errors_,
                                                         np.zeros((self.n_channels_, 2), np.float32)])),
            "alarm": [bool(self.alarm_on_), int(self.run_)],
            "calib_rows": torch.from_numpy(np.asarray(self.calib_rows_, np.float32).copy()),
            "updates_since_calibration": int(self.updates_since_calibration_),
            "tail": list(self.tail_),
            "pending_patch": self.pending_patch_,
            "pending_pred": torch.from_numpy(self.pending_pred_.copy()),
            "pending_mean": torch.from_numpy(self.pending_mean_.copy()),
            "pending_scale": torch.from_numpy(self.pending_scale_.copy()),
            "regime_until": self.regime_until_,
            "regime_scores": list(self.regime_scores_),
            "scoring_peak_bytes": self.scoring_peak_bytes_,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamingDetector:
        """Rebuild a detector from :meth:`state_dict` (refuses another format or another base's weights)."""
        if state.get("version") != _STATE_VERSION:
            raise ArtifactError(f"stream state has version {state.get('version')!r}; this edgepeft reads "
                                f"{_STATE_VERSION}")
        try:
            det = cls(**state["params"])
            channels = list(state["channels"])
            det._setup(len(channels), channels, TrainingPlan(**state["plan"]))
            det.trainer_.load_state_dict(state["trainer"])
            det.buffer_.load_state_dict(state["buffer"])
            det.n_seen_, det.live_ = int(state["n_seen"]), bool(state["live"])
            running = state["running"]
            det.running_.count = int(running["count"])
            det.running_.mean, det.running_.m2 = running["mean"].numpy().copy(), running["m2"].numpy().copy()
            det.recent_errors_.extend(state["recent_errors"].numpy()[:-1].copy())
            det.scaler_ = None if state["scaler"] is None else ChannelScaler.from_dict(state["scaler"])
            det.channel_error_ = None if state["channel_error"] is None else state["channel_error"].numpy().copy()
            if state["core"] is not None:
                core = det._make_core()
                core._load_scoring(state["core"])
                det._go_live(core, state["context_rows"].numpy()[:-1].copy(),
                             state["context_errors"].numpy()[:-1].copy())
            det.alarm_on_, det.run_ = bool(state["alarm"][0]), int(state["alarm"][1])
            det.calib_rows_ = state["calib_rows"].numpy().copy()
            det.updates_since_calibration_ = int(state["updates_since_calibration"])
            det.tail_.extend(float(v) for v in state["tail"])
            det.pending_patch_ = int(state["pending_patch"])
            det.pending_pred_ = state["pending_pred"].numpy().copy()
            det.pending_mean_ = state["pending_mean"].numpy().copy()
            det.pending_scale_ = state["pending_scale"].numpy().copy()
            det.regime_until_ = int(state["regime_until"])
            det.regime_scores_ = [float(v) for v in state["regime_scores"]]
            det.scoring_peak_bytes_ = state["scoring_peak_bytes"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"stream state is malformed ({exc})") from exc
        return det

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"StreamingDetector({shown})"
