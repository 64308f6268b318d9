"""Pretraining a base encoder on generated sensor-like signals (plus any real normal data given by path).

The loop checkpoints model, optimiser, step, random state and the data pool atomically every
``checkpoint_every`` steps and resumes from the last checkpoint when rerun, so a long pretraining job
survives the 10-minute command limit and power loss alike.

Example (a few steps of a toy size, written to a temporary folder):
    >>> import tempfile, pathlib
    >>> from edgepeft.models.patch_encoder import PatchEncoderConfig
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> cfg = PretrainConfig(steps=2, batch_size=4, pool_size=4, series_len=256, checkpoint_every=1,
    ...                      checkpoint_dir=str(tmp / "ck"), out_dir=str(tmp / "w"))
    >>> result = pretrain("toy", PatchEncoderConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32), cfg)
    >>> result["steps"]
    2
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import ArtifactError, ConfigError
from edgepeft.data.csvio import read_sensor_csv
from edgepeft.data.synthetic import generate_series
from edgepeft.data.windows import training_windows
from edgepeft.models.patch_encoder import PatchEncoder, PatchEncoderConfig
from edgepeft.models.registry import save_base
from edgepeft.train.adapt import masked_mse, patch_loss
from edgepeft.train.masks import sample_hidden

CORPUS_DESCRIPTION = (
    "edgepeft.data.synthetic.generate_series: rotating-machinery vibration with harmonics and resonances, "
    "thermal drift, load regimes, on/off cycles, white/pink/brown noise and random smooth processes, with "
    "channels sharing latent drivers; each series standardised per channel; windows of 1-8 channels."
)


@dataclass
class PretrainConfig:
    """Pretraining settings.

    Attributes:
        steps: total optimiser steps (a rerun resumes up to this number).
        batch_size: windows per step.
        lr: peak AdamW learning rate (cosine decay after warm-up).
        warmup: warm-up steps.
        pool_size: generated series kept in memory; ``refresh`` of them are replaced every step.
        series_len: rows per generated series.
        max_channels: windows use 1..max_channels channels of one series.
        data: paths of CSV files with real *normal* data to mix in (standardised per file).
        real_share: share of windows drawn from ``data`` when given.
        checkpoint_dir: where resumable checkpoints live.
        checkpoint_every: steps between checkpoints.
        out_dir: where the final weights and model card go (None: the package's weights folder).
        seed: seeds everything.
    """

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    pool_size: int = 256
    refresh: int = 4
    series_len: int = 2048
    max_channels: int = 8
    data: list[str] = field(default_factory=list)
    real_share: float = 0.25
    checkpoint_dir: str = "runs/pretrain"
    checkpoint_every: int = 100
    out_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.pool_size < 1:
            raise ConfigError("steps, batch_size and pool_size must be >= 1")


def _standardise(series: np.ndarray) -> np.ndarray:
    mean = series.mean(axis=0)
    std = series.std(axis=0)
    return ((series - mean) / np.maximum(std, 1e-6)).astype(np.float32)


def _new_series(rng: np.random.Generator, cfg: PretrainConfig) -> np.ndarray:
    return _standardise(generate_series(rng, cfg.series_len, cfg.max_channels))


def _sample_batch(
    pool: np.ndarray, real: list[np.ndarray], cfg: PatchEncoderConfig, pcfg: PretrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(B, L, C) windows and their padding mask, every window from one asset, C shared by the batch."""
    n_channels = int(rng.integers(1, pcfg.max_channels + 1))
    if real:
        n_channels = min(n_channels, min(r.shape[1] for r in real))
    windows, pads = [], []
    for _ in range(pcfg.batch_size):
        if real and rng.random() < pcfg.real_share:
            source = real[int(rng.integers(len(real)))]
        else:
            source = pool[int(rng.integers(len(pool)))]
        channels = rng.choice(source.shape[1], size=n_channels, replace=False)
        window, pad = training_windows(source[:, channels], 1, cfg.window_len, cfg.patch_len, rng)
        windows.append(window[0])
        pads.append(pad[0])
    return np.stack(windows), np.stack(pads)


def _checkpoint_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def validation_loss(model: PatchEncoder, seed: int = 12345, n_windows: int = 256) -> float:
    """Forecast MSE (standardised units) on a fixed set of generated windows the model never trained on."""
    rng = np.random.default_rng(seed)
    cfg = model.cfg
    windows, pads = [], []
    for _ in range(n_windows // 8):
        series = _standardise(generate_series(rng, 512, 4))
        window, pad = training_windows(series, 8, cfg.window_len, cfg.patch_len, rng)
        windows.append(window)
        pads.append(pad)
    window_arr, pad_arr = np.concatenate(windows), np.concatenate(pads)
    hidden = pad_arr.copy()
    hidden[:, :, -1] = True
    model.eval()
    with torch.no_grad():
        loss = masked_mse(
            model, torch.from_numpy(window_arr), torch.from_numpy(hidden), torch.from_numpy(hidden & ~pad_arr)
        )
    return loss.item()


def pretrain(
    name: str,
    model_cfg: PatchEncoderConfig,
    cfg: PretrainConfig,
    progress: Callable[[int, int, float], None] | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Pretrain (or resume pretraining) base ``name``; writes weights + model card when ``cfg.steps`` is reached.

    ``max_seconds`` stops early after a checkpoint (rerun to resume). Returns a summary dict.
    """
    ckpt_dir = Path(cfg.checkpoint_dir)
    ckpt_path = ckpt_dir / "checkpoint.pt"
    model = PatchEncoder(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    step, ema_loss, seconds_before = 0, math.nan, 0.0
    real = [_standardise(read_sensor_csv(path).values) for path in cfg.data]
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
            raise ArtifactError(f"checkpoint {ckpt_path} is unreadable ({exc}); delete it to restart") from exc
        if state["model_cfg"] != dataclasses.asdict(model_cfg):
            raise ConfigError(f"checkpoint {ckpt_path} is for a different architecture; use another --checkpoint-dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        pool = state["pool"]
        step, ema_loss, seconds_before = state["step"], state["ema_loss"], state["seconds"]
    else:
        pool = np.stack([_new_series(rng, cfg) for _ in range(cfg.pool_size)])

    def lr_at(i: int) -> float:
        if i < cfg.warmup:
            return cfg.lr * (i + 1) / cfg.warmup
        progress_frac = (i - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac))))

    def save_checkpoint() -> None:
        state = {
            "model_cfg": dataclasses.asdict(model_cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "pool": pool,
            "step": step,
            "ema_loss": ema_loss,
            "seconds": seconds_before + time.perf_counter() - start,
        }
        atomic_write_bytes(ckpt_path, _checkpoint_bytes(state))

    start = time.perf_counter()
    model.train()
    while step < cfg.steps:
        for index in rng.choice(len(pool), size=min(cfg.refresh, len(pool)), replace=False):
            pool[index] = _new_series(rng, cfg)
        windows, pad = _sample_batch(pool, real, model_cfg, cfg, rng)
        hidden, target = sample_hidden(pad, rng, forecast_prob=0.4, mask_ratio=0.3)
        # Random channel tags, as an asset's adapter will later learn its own.
        tags = torch.randn(windows.shape[0], windows.shape[2], model_cfg.d_channel)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        windows_t = torch.from_numpy(windows)
        recon = model(windows_t, torch.from_numpy(hidden), channel_tags=tags)
        loss = patch_loss(recon, windows_t, torch.from_numpy(target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        ema_loss = loss.item() if math.isnan(ema_loss) else 0.98 * ema_loss + 0.02 * loss.item()
        if progress is not None:
            progress(step, cfg.steps, ema_loss)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
            if max_seconds is not None and time.perf_counter() - start > max_seconds and step < cfg.steps:
                return {"steps": step, "finished": False, "ema_loss": ema_loss}

    seconds = seconds_before + time.perf_counter() - start
    val = validation_loss(model)
    card = {
        "corpus": CORPUS_DESCRIPTION,
        "real_data": [str(p) for p in cfg.data],
        "steps": step,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "train_loss_ema": round(ema_loss, 5),
        "validation_forecast_mse": round(val, 5),
        "validation_note": "forecast MSE of the last patch on 256 held-out generated windows, standardised units",
        "pretrain_seconds": round(seconds, 1),
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    path = save_base(model, name, card, out_dir)
    return {"steps": step, "finished": True, "ema_loss": ema_loss, "validation_forecast_mse": val, "path": str(path)}
