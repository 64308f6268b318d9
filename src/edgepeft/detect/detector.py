"""AnomalyDetector: the scikit-learn / PyOD-style API over base + PEFT method + threshold.

How a score is made, and why:
1. The asset's normal data fixes a per-channel scaler (shipped with the adapter).
2. Two causal predictions of every patch, each from rows before the patch only, so the score at row t
   depends only on rows <= t; rows with little history are scored with what history there is (missing
   patches are hidden, never invented):
   - forecast: each sensor's next patch from the history of all sensors;
   - blind (virtual sensor): each sensor's next patch with that sensor hidden entirely, from the
     other sensors' history. A forecaster happily follows a sensor that drifted or broke away from
     the others; the blind prediction does not, which is how MSET-style methods catch relation faults.
3. Squared errors are divided per channel and per kind by their typical value on normal rows, so a
   noisy sensor does not drown a quiet one, and mixed (``blind_weight``). A slow channel (a state variable
   such as a temperature: most of its training variance is slower than the model's window, ``slow_channel_share``)
   keeps only its forecast term: its level is not a function of the other sensors, so outside the training
   range its blind error measures drift, not a fault. Channels combine as the ``max`` (or ``mean``) of
   ``log1p`` of their evidence (``channel_agg``).
4. A trailing (causal) mean over ``smoothing`` rows: real faults are collective, single-row noise is not.
5. A threshold is calibrated on held-out *normal* rows for a target false-alarm rate (quantile or
   peaks-over-threshold), and the same held-out scores calibrate ``p_anomaly``.
6. Optionally, alarm persistence (``raise_after`` / ``clear_after`` rows, default 1 / 1: off): an alarm
   starts only after that many consecutive rows over the threshold and ends after that many under it, so one
   fault raises one alert instead of a flicker (:func:`~edgepeft.detect.threshold.persist_alarms`).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t = np.arange(1200)
    >>> X = np.c_[np.sin(t / 5), np.cos(t / 5)] + 0.05 * rng.normal(size=(1200, 2))
    >>> det = AnomalyDetector(base="tiny", method="lora", rank=4, steps=20).fit(X[:800])
    >>> scores = det.score(X[800:])
    >>> scores.shape, det.predict(X[800:]).shape
    ((400,), (400,))
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepeft.core.config import read_json, write_json
from edgepeft.core.errors import ArtifactError, ConfigError, DataError, OutputError
from edgepeft.data.csvio import validate_array
from edgepeft.data.scaler import ChannelScaler
from edgepeft.detect.core import (
    ADAPTER_DIR,
    DETECTOR_FILE,
    EVIDENCE_AUTO,
    SCHEMA_VERSIONS,
    ScoringCore,
    detector_schema,
    saved_params,
)
from edgepeft.detect.evidence import DYNAMICS, Fusion, StateModel, cross_fit, inject_faults, select_weights
from edgepeft.detect.scoring import channel_evidence, evidence_weights, slow_share, trailing_mean
from edgepeft.detect.threshold import ScoreCalibrator, make_threshold
from edgepeft.models.registry import list_bases, load_base, load_card, state_sha256
from edgepeft.peft import PeftConfig, get_method, list_methods, parameter_report
from edgepeft.peft.shared import load_shared, read_global_adapter
from edgepeft.train.adapt import AdaptConfig, adapt
from edgepeft.train.quant import PRECISIONS, simulate_int8_base

# The weightings "auto" chooses among, per asset, by how well each finds faults injected into the asset's own
# normal rows (Goswami et al., ICLR 2023). Level is the most fragile kind (a short recording underestimates where
# a healthy level may wander), so it is a candidate, not a given.
FUSION_CANDIDATES: tuple[dict[str, float], ...] = (
    {"dynamics": 1.0, "level": 0.0, "scale": 1.0, "relation": 1.0},
    {"dynamics": 1.0, "level": 1.0, "scale": 1.0, "relation": 1.0},
    {"dynamics": 1.0, "level": 0.0, "scale": 0.0, "relation": 1.0},
    {"dynamics": 1.0, "level": 0.0, "scale": 1.0, "relation": 0.0},
)


class AnomalyDetector(ScoringCore):
    """One asset's detector: a frozen pretrained base, a PEFT delta trained on the asset's normal data,
    and a threshold calibrated for a target false-alarm rate.

    Constructor arguments are stored unchanged; all work happens in :meth:`fit`. Fitted state ends in ``_``.
    """

    def __init__(
        self,
        base: str = "small",
        method: str = "lora",
        rank: int = 8,
        *,
        steps: int = 150,
        batch_size: int = 32,
        lr: float | None = None,
        target_far: float = 0.01,
        threshold: str = "pot",
        smoothing: int = 8,
        blind_weight: float = 0.5,
        calib_fraction: float = 0.2,
        seed: int = 0,
        peft_options: dict[str, Any] | None = None,
        channel_agg: str = "max",
        slow_channel_share: float | None = 0.3,
        micro_batch: int | None = 8,
        raise_after: int = 1,
        clear_after: int = 1,
        evidence: str = EVIDENCE_AUTO,
        state_window: int = 16,
        base_precision: str = "fp32",
        init_adapter: str | None = None,
    ) -> None:
        self.base = base
        self.method = method
        self.rank = rank
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.target_far = target_far
        self.threshold = threshold
        self.smoothing = smoothing
        self.blind_weight = blind_weight
        self.calib_fraction = calib_fraction
        self.seed = seed
        self.peft_options = peft_options
        self.channel_agg = channel_agg
        self.slow_channel_share = slow_channel_share
        self.micro_batch = micro_batch
        self.raise_after = raise_after
        self.clear_after = clear_after
        self.evidence = evidence
        self.state_window = state_window
        self.base_precision = base_precision
        self.init_adapter = init_adapter

    # ------------------------------------------------------------------ validation
    def _check_params(self) -> None:
        if self.base not in list_bases():
            raise ConfigError(f"unknown base {self.base!r}; choose one of {', '.join(list_bases())}")
        if self.method not in list_methods():
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(list_methods())}")
        if self.base_precision not in PRECISIONS:
            raise ConfigError(f"base_precision must be one of {', '.join(PRECISIONS)}, got {self.base_precision!r}")
        if self.base_precision == "int8" and self.method != "lora":
            raise ConfigError("base_precision='int8' trains against the int8 scoring graph, which serves LoRA "
                              f"adapters only; use method='lora' (got {self.method!r})")
        self._check_scoring_params()

    def peft_config(self) -> PeftConfig:
        """The PEFT config :meth:`fit` attaches (a global adapter must have been trained with the same)."""
        # Default: adapters in the cross-channel block only. The frozen temporal blocks then run once
        # per window (cached features): much faster adaptation and far less training memory (see
        # `edgepeft bench stream`), at a small cost in AUC in our SKAB exploration;
        # peft_options={"adapt_last": None} adapts every block.
        options = {"adapt_last": None if get_method(self.method).trains_base else 1, **(self.peft_options or {})}
        return PeftConfig(method=self.method, rank=self.rank, **options)

    # ------------------------------------------------------------------ fit
    def fit(
        self, X: Any, y: Any = None, progress: Callable[[int, float], None] | None = None
    ) -> AnomalyDetector:
        """Train the adapter on normal data ``X`` (rows, channels) and calibrate the threshold. ``y`` is ignored."""
        self._check_params()
        columns = list(X.columns) if hasattr(X, "columns") else None
        values, channels = validate_array(X, channels=None)
        base_model = load_base(self.base)
        window_len, patch_len = base_model.window_len, base_model.patch_len
        n_rows = values.shape[0]
        min_rows = window_len + 2 * patch_len
        if n_rows < min_rows:
            raise DataError(f"training series has {n_rows} rows; at least {min_rows} are needed "
                            f"(one {window_len}-row window plus calibration)")
        self.channels_ = channels if columns is not None else [f"ch{i}" for i in range(values.shape[1])]
        self.n_channels_ = values.shape[1]
        self.base_sha256_ = state_sha256(base_model)
        self.base_parameters_ = sum(p.numel() for n, p in base_model.named_parameters() if n != "channel_tags")
        self.scaler_ = ChannelScaler().fit(values)
        scaled = self.scaler_.transform(values)

        n_calib = max(int(round(n_rows * self.calib_fraction)), patch_len)
        n_fit = n_rows - n_calib
        base_model.set_n_channels(self.n_channels_, seed=self.seed)
        method = get_method(self.method)
        self.peft_config_ = self.peft_config()
        torch.manual_seed(self.seed)
        model = method.attach(base_model, self.peft_config_)
        if self.init_adapter is not None:  # start from a global (e.g. federated) adapter: personalisation
            self._load_init_adapter(model)
        if self.base_precision == "int8":  # quantisation-aware: adapt and calibrate on the device's int8 arithmetic
            simulate_int8_base(model)
        lr = self.lr if self.lr is not None else method.default_lr
        # Micro-batches: the same update with a quarter of the activations held at once (see AdaptConfig).
        cfg = AdaptConfig(steps=self.steps, batch_size=self.batch_size, seed=self.seed, micro_batch=self.micro_batch)
        started = time.perf_counter()
        result = adapt(model, scaled[:n_fit], cfg, lr=lr, progress=progress)
        self.adapt_seconds_ = time.perf_counter() - started
        self.train_loss_ = float(np.mean(result.losses[-10:])) if result.losses else float("nan")
        self.model_ = model
        self.method_ = method
        self.calibrate(scaled, n_fit)
        self.report_ = {
            **parameter_report(model, self.base_parameters_),
            "adapt_seconds": self.adapt_seconds_,
            "train_loss": self.train_loss_,
            "n_fit_rows": n_fit,
            "n_calib_rows": n_calib,
        }
        return self

    def _load_init_adapter(self, model: nn.Module) -> None:
        tensors, meta = read_global_adapter(self.init_adapter, self.base, self.peft_config_)
        if meta.get("base_sha256") and meta["base_sha256"] != self.base_sha256_:
            raise ArtifactError(f"{self.init_adapter} was trained on another version of base {self.base!r} "
                                f"(sha256 {meta['base_sha256'][:12]}, this one {self.base_sha256_[:12]})")
        load_shared(model, tensors)

    def calibrate(self, scaled: np.ndarray, n_fit: int) -> np.ndarray:
        """Everything after adaptation, from the asset's normal rows (scaled) of which the first ``n_fit`` trained
        the adapter: channel weights and error normalisers, the state model, the fusion, the threshold and the
        probability calibration. The streaming loop calls it at the end of its probation, so both score alike.
        Returns the (rows, channels, 2) errors of ``scaled``."""
        window_len = self.method_.encoder(self.model_).window_len
        # Slow channels: most of their training variance lives on time scales longer than the model's window.
        slow = (slow_share(scaled[:n_fit], window_len) > self.slow_channel_share
                if self.slow_channel_share is not None else None)
        self.evidence_weights_ = evidence_weights(self.n_channels_, self.blind_weight, slow)
        # Typical per-channel error on the fitted rows sets the channel weights; the held-out rows,
        # scored with their real history, calibrate threshold and probability.
        errors = self._row_errors(scaled)
        full_context = min(window_len, n_fit // 2)  # rows with a whole window of history
        # A channel's typical error is the larger of its in-sample and held-out error: a sensor that
        # only looks predictable on the rows the adapter was fitted on (slow drift, e.g. temperature)
        # must not get a tiny normaliser that turns every later normal row into an alarm.
        self.channel_error_ = np.maximum(
            np.maximum(errors[full_context:n_fit].mean(axis=0), errors[n_fit:].mean(axis=0)), 1e-6
        ).astype(np.float64)  # float64 like after load(): saved and fitted detectors score bit-identically
        self.warmup_rows_ = window_len
        self.state_ = StateModel(self.state_window).fit(scaled)
        reference = self._reference_evidence(scaled, errors)  # cross-fitted once, for the fusion and the threshold
        self.fusion_ = self._fit_fusion(scaled, errors, n_fit, reference)
        self._calibrate_threshold(scaled, errors, n_fit, reference)
        return errors

    def recalibrate(self, scaled: np.ndarray, n_fit: int) -> None:
        """After the adapter moved (the streaming loop's online updates): the kinds' scales and the threshold
        again, on the same normal rows, with the current model. The state model and the fusion's weights stay."""
        errors = self._row_errors(scaled)
        skip = min(self.method_.encoder(self.model_).window_len, n_fit // 2)
        reference = self._reference_evidence(scaled, errors)
        fit_rows = {k: (v[n_fit:] if k == DYNAMICS else v[skip:]) for k, v in reference.items()}
        self.fusion_.fit(fit_rows, dict(self.fusion_.weights_))
        self._calibrate_threshold(scaled, errors, n_fit, reference)

    def _calibrate_threshold(self, scaled: np.ndarray, errors: np.ndarray, n_fit: int,
                             reference: dict[str, np.ndarray]) -> None:
        # Calibration rows: every training row with a full window of history. The state kinds are out-of-sample
        # there (cross-fitted); the dynamics are out-of-sample on the held-out rows and in-sample (smaller, so
        # never the maximum of a normal row for the wrong reason) before them.
        window_len = self.method_.encoder(self.model_).window_len
        calib_scores = trailing_mean(self.fusion_.raw_score(reference), self.smoothing)[min(window_len, n_fit // 2):]
        self.threshold_model_ = make_threshold(self.threshold, self.target_far).fit(calib_scores)
        self.threshold_ = float(self.threshold_model_.threshold_)
        self.calibrator_ = ScoreCalibrator().fit(calib_scores)

    def _reference_evidence(self, scaled: np.ndarray, errors: np.ndarray,
                            injected: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-kind (rows, channels) evidence on the training rows as calibration must see it: the state kinds
        cross-fitted (each block scored by a model that never saw it), ``injected`` scored instead when given."""
        kinds = self._evidence_kinds()
        out = {k: v for k, v in cross_fit(scaled, self.state_window, scored=injected).items() if k in kinds}
        if DYNAMICS in kinds:
            out[DYNAMICS] = channel_evidence(errors, self.channel_error_, self.evidence_weights_)
        return {k: out[k] for k in kinds}

    def _fit_fusion(self, scaled: np.ndarray, errors: np.ndarray, n_fit: int,
                    reference: dict[str, np.ndarray]) -> Fusion:
        """Each kind's scale from normal out-of-sample rows; with ``evidence="auto"``, the weighting that best finds
        faults injected into this asset's own training rows (no labels; the injected copy is scored like a test
        series, by the adapter and by cross-fitted state models)."""
        skip = min(self.method_.encoder(self.model_).window_len, n_fit // 2)
        # Dynamics: the held-out rows only (the fitted rows' errors are in-sample, smaller than a new row's).
        fit_rows = {k: (v[n_fit:] if k == DYNAMICS else v[skip:]) for k, v in reference.items()}
        fusion = Fusion().fit(fit_rows)
        if self.evidence != EVIDENCE_AUTO:
            return fusion
        rng = np.random.default_rng(self.seed)
        injected, mask = inject_faults(scaled, rng, n_faults=max(8, len(scaled) // 100))
        evidence = self._reference_evidence(scaled, self._row_errors(injected.astype(np.float32)), injected)
        kind_scores = {k: v[skip:] for k, v in fusion.kind_scores(evidence).items()}
        weights = select_weights(kind_scores, mask[skip:], list(FUSION_CANDIDATES), self.smoothing)
        return fusion.fit(fit_rows, weights)

    # ------------------------------------------------------------------ the model
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError("this AnomalyDetector is not fitted yet; call fit(X_normal) or AnomalyDetector.load(dir)")

    def _geometry(self) -> tuple[int, int]:
        encoder = self.method_.encoder(self.model_)
        return encoder.window_len, encoder.patch_len

    def _pass_width(self, n_channels: int, one_pass: bool | None) -> int:
        shared = hasattr(self.method_.encoder(self.model_), "blind_mix")
        return n_channels * (2 if shared else n_channels + 1)

    @torch.no_grad()
    def _predict(self, windows: np.ndarray, hidden: np.ndarray, blind: bool, one_pass: bool | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """One pass per batch of windows: the temporal features once, then the forecast and every channel's blind
        prediction (:meth:`PatchEncoder.blind_mix`, linear in the channel count). An opaque model (a wrapped
        session) has no such method and gets C copies with one channel hidden each. ``one_pass=False`` makes the
        blind predictions with C copies of the cross-channel half (the path this one replaced: the benchmark's
        and the tests' reference; same numbers)."""
        encoder = self.method_.encoder(self.model_)
        self.model_.eval()
        chunk, mask = torch.from_numpy(windows), torch.from_numpy(hidden)  # (b, L, C), (b, C, N)
        n_channels = chunk.shape[2]
        if hasattr(encoder, "blind_mix"):
            feats, mean, std = encoder.temporal_features(chunk, mask)
            forecast = encoder.mix(feats, mean, std).numpy()
            if not blind:
                return forecast, None
            # A served model may keep these constant features (the device runtime's do): they never change.
            cached = getattr(self.model_, "hidden_channel_features", None)
            blank = cached() if callable(cached) else encoder.hidden_channel_features()
            return forecast, encoder.blind_mix(feats, blank, copies=one_pass is False).numpy()
        forecast = self.model_(chunk, mask).numpy()
        if not blind:
            return forecast, None
        eye = torch.eye(n_channels, dtype=torch.bool)[:, :, None]  # (C, C, 1): copy c hides channel c
        reps = chunk.repeat_interleave(n_channels, dim=0)  # (b*C, L, C)
        blind_mask = (mask.unsqueeze(1) | eye.unsqueeze(0)).reshape(-1, n_channels, mask.shape[-1])
        recon = self.model_(reps, blind_mask).reshape(len(chunk), n_channels, -1, n_channels)
        return forecast, torch.diagonal(recon, dim1=1, dim2=3).numpy()  # (b, L, C)

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Fold the adapter into the base weights for zero inference overhead (LoRA family)."""
        self._check_fitted()
        self.method_.merge(self.model_)

    def unmerge(self) -> None:
        self._check_fitted()
        self.method_.unmerge(self.model_)

    # ------------------------------------------------------------------ persistence
    def adapter_bytes(self, directory: str | Path) -> int:
        """Bytes of the adapter tensor files on disk (what travels to a device)."""
        adapter_dir = Path(directory) / ADAPTER_DIR
        return sum(p.stat().st_size for p in adapter_dir.glob("*.safetensors"))

    def save(self, directory: str | Path) -> Path:
        """Write the detector (adapter, scaler, threshold; the base is referenced by name and hash).

        Written to a temporary folder first and swapped in at the end: a failure never leaves a
        half-written detector, and an existing one is only replaced by a complete one.
        """
        self._check_fitted()
        target = Path(directory)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as exc:
            raise OutputError(f"cannot write to {target} ({exc.strerror or exc})") from exc
        try:
            files = self.method_.save(self.model_, self.peft_config_, staging / ADAPTER_DIR)
            state = {
                "params": self.get_params(),
                "base": self.base,
                "base_sha256": self.base_sha256_,
                "base_parameters": self.base_parameters_,
                "channels": self.channels_,
                "peft_config": dataclasses.asdict(self.peft_config_),
                "scaler": self.scaler_.to_dict(),
                **self.scoring_state(),
                "report": {k: float(v) for k, v in self.report_.items()},
                "adapter_files": [f.name for f in files],
            }
            write_json(staging / DETECTOR_FILE, state, version=detector_schema(state))
            if target.exists():
                backup = target.with_name(f".{target.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                target.rename(backup)
                staging.rename(target)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                staging.rename(target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(f"cannot write detector to {target} ({exc.strerror or exc})") from exc
        return target

    @classmethod
    def load(cls, directory: str | Path) -> AnomalyDetector:
        """Load a detector written by :meth:`save`; refuses one whose base weights differ."""
        directory = Path(directory)
        if not (directory / DETECTOR_FILE).exists():
            raise ArtifactError(f"{directory} is not an edgepeft detector (no {DETECTOR_FILE}); run `edgepeft adapt`")
        state = read_json(directory / DETECTOR_FILE, versions=SCHEMA_VERSIONS)
        det = cls.from_state(state, directory / DETECTOR_FILE)
        base_model = load_base(det.base)
        if state_sha256(base_model) != det.base_sha256_:
            raise ArtifactError(
                f"detector in {directory} was trained on a different version of base {det.base!r} "
                "(weights hash differs); re-adapt it on this base"
            )
        base_model.set_n_channels(det.n_channels_)
        method = get_method(det.peft_config_.method)
        model = method.attach(base_model, det.peft_config_)
        method.load(model, directory / ADAPTER_DIR)
        if det.base_precision == "int8":
            simulate_int8_base(model)
        model.eval()
        det.model_, det.method_ = model, method
        return det

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str | Path = DETECTOR_FILE) -> AnomalyDetector:
        """A detector with every fitted number of a saved ``detector.json`` dict, but no model yet.

        :meth:`load` adds the model on a freshly loaded base; the device runtime adds one on its resident base.
        Files saved before a setting existed read with the behaviour they were fitted with.
        """
        try:
            det = cls(**saved_params(state))
            det.peft_config_ = PeftConfig(**state["peft_config"])
            det._load_fitted(state)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ArtifactError(f"{source} is malformed ({exc})") from exc
        return det

    # ------------------------------------------------------------------ sklearn conventions
    def info(self, directory: str | Path | None = None) -> dict[str, Any]:
        """What this detector is: base, method, trainable share, adapter bytes, threshold."""
        self._check_fitted()
        card = load_card(self.base)
        out: dict[str, Any] = {
            "base": self.base,
            "base_sha256": self.base_sha256_,
            "base_parameters": self.base_parameters_,
            "base_pretrain_steps": card.get("steps"),
            "method": self.peft_config_.method,
            "peft_config": dataclasses.asdict(self.peft_config_),
            "channels": self.channels_,
            "trainable_parameters": int(self.report_["trainable_parameters"]),
            "trainable_share": float(self.report_["trainable_share"]),
            "threshold": self.threshold_,
            "threshold_kind": self.threshold,
            "target_far": self.target_far,
            "raise_after": self.raise_after,
            "clear_after": self.clear_after,
            "adapt_seconds": float(self.report_["adapt_seconds"]),
        }
        if directory is not None:
            out["adapter_bytes"] = self.adapter_bytes(directory)
        return out

    def __repr__(self) -> str:
        return f"AnomalyDetector({json.dumps(self.get_params())[1:-1]})"


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters (the delta)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
