"""A whole file through the streaming edge loop, crash-safe: ``stream_array`` (what ``edgepeft stream`` runs).

Checkpoints of the detector (``StreamingDetector.state_dict``) and segments of per-row outputs are written as the
stream goes; a rerun with the same data and settings resumes from the newest checkpoint that verifies and reads the
finished rows back instead of recomputing them, so a killed run and an uninterrupted one give bit-identical outputs.
Split from :mod:`edgepeft.detect.streaming` (the detector itself): this module is the file and checkpoint job.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.core.config import atomic_write_bytes
from edgepeft.core.errors import ArtifactError, ConfigError
from edgepeft.data.csvio import validate_array
from edgepeft.detect.streaming import StreamingDetector
from edgepeft.train.stream import latest_checkpoint, write_checkpoint


@dataclass
class StreamRun:
    """Per-row outputs of a whole stream, and how the run went."""

    score: np.ndarray
    p_anomaly: np.ndarray
    anomaly: np.ndarray
    probation: np.ndarray
    resumed_from: int  # the row the run started at (0 unless it resumed from a checkpoint)
    seconds: float
    memory: dict[str, Any]
    detector: StreamingDetector


SEGMENT_DIR = "scores"


def _segment_path(directory: Path, start: int, stop: int) -> Path:
    return directory / SEGMENT_DIR / f"rows-{start:012d}-{stop:012d}.npz"


def _write_segment(directory: Path, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v[start:stop] for k, v in arrays.items()})
    atomic_write_bytes(_segment_path(directory, start, stop), buffer.getvalue())


def _read_segments(directory: Path, position: int, arrays: dict[str, np.ndarray]) -> None:
    """Fill rows 0..position of ``arrays`` from the segment files, which must chain without a gap."""
    segments: dict[int, list[int]] = {}
    folder = directory / SEGMENT_DIR
    for path in folder.glob("rows-*-*.npz") if folder.is_dir() else []:
        start, stop = (int(part) for part in path.stem.split("-")[1:3])
        segments.setdefault(start, []).append(stop)
    at = 0
    while at < position:
        stops = [s for s in segments.get(at, []) if s <= position]
        if not stops:
            raise ArtifactError(f"scores of rows {at}.. are missing from {folder}; remove {directory} to start over")
        stop = max(stops)
        try:
            with np.load(_segment_path(directory, at, stop)) as saved:
                for key, array in arrays.items():
                    array[at:stop] = saved[key]
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"score segment {at}..{stop} in {folder} is unreadable ({exc})") from exc
        at = stop


RUNS_LOG = "runs.log"


def _log_start(directory: Path, position: int) -> None:
    """Append "start <row>" to the run log: where every (re)start of this stream began, for the operator."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / RUNS_LOG, "a") as handle:
        handle.write(f"start {position}\n")
        handle.flush()
        os.fsync(handle.fileno())


def _prefix_digest(values: np.ndarray) -> hashlib._Hash:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    return digest


def stream_array(
    values: np.ndarray,
    params: dict[str, Any],
    *,
    channels: list[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 256,
    on_resume: Callable[[int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StreamRun:
    """Run a StreamingDetector over ``values`` (rows, channels), checkpointing every ``checkpoint_every`` rows.

    With ``checkpoint_dir``, a run resumes from the newest intact checkpoint there (refusing one written for
    other data or other settings) and the per-row outputs already produced are read back, so a run killed at
    any moment and restarted produces the same outputs, bit for bit, as one that was never interrupted.
    """
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1 row, got {checkpoint_every}")
    values, _ = validate_array(values)  # finite float32 (short gaps filled, with a warning)
    values = np.ascontiguousarray(values)
    n_rows, n_channels = values.shape
    names = list(channels) if channels is not None else [f"ch{i}" for i in range(n_channels)]
    arrays = {"score": np.zeros(n_rows), "p_anomaly": np.zeros(n_rows), "anomaly": np.zeros(n_rows, np.int8),
              "probation": np.zeros(n_rows, np.int8)}
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    det: StreamingDetector | None = None
    position = 0
    if directory is not None:
        found = latest_checkpoint(directory)
        if found is not None:
            path, state = found
            det, position = _resume(path, state, values, names, params)
            _read_segments(directory, position, arrays)
            for stale in (directory / SEGMENT_DIR).glob("rows-*-*.npz"):
                if int(stale.stem.split("-")[1]) >= position:  # written after the checkpoint: redone below
                    stale.unlink(missing_ok=True)
    if det is None:
        det = StreamingDetector(**params)
        det._setup(n_channels, names)
    if directory is not None:
        _log_start(directory, position)
    if on_resume is not None:
        on_resume(position)
    digest = _prefix_digest(values[:position])
    started = time.perf_counter()
    resumed_from = position
    while position < n_rows:
        stop = min(n_rows, (position // checkpoint_every + 1) * checkpoint_every)
        out = det.process_many(values[position:stop])
        for key, array in arrays.items():
            array[position:stop] = out[key]
        digest.update(values[position:stop].tobytes())
        if directory is not None:
            segment_start = (stop - 1) // checkpoint_every * checkpoint_every
            _write_segment(directory, segment_start, stop, arrays)
            write_checkpoint(directory, stop, {"detector": det.state_dict(), "data_sha256": digest.hexdigest(),
                                               "channels": names, "params": dict(params)})
        position = stop
        if progress is not None:
            progress(position, n_rows)
    return StreamRun(arrays["score"], arrays["p_anomaly"], arrays["anomaly"], arrays["probation"], resumed_from,
                     time.perf_counter() - started, det.memory_report(), det)


def _resume(path: Path, state: dict[str, Any], values: np.ndarray, names: list[str],
            params: dict[str, Any]) -> tuple[StreamingDetector, int]:
    try:
        saved_params, channels, digest = state["params"], state["channels"], state["data_sha256"]
        position = int(state["detector"]["n_seen"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a stream checkpoint ({exc})") from exc
    if saved_params != params:
        changed = sorted(k for k in set(saved_params) | set(params) if saved_params.get(k) != params.get(k))
        raise ConfigError(f"the checkpoint in {path.parent} was written with other settings ({', '.join(changed)}); "
                          "use the same options or another --checkpoint-dir")
    if channels != names or position > len(values):
        raise ConfigError(f"the checkpoint in {path.parent} belongs to other data (channels or length differ); "
                          "use another --checkpoint-dir")
    if _prefix_digest(values[:position]).hexdigest() != digest:
        raise ConfigError(f"the checkpoint in {path.parent} belongs to other data (its first {position} rows "
                          "differ); use another --checkpoint-dir")
    det = StreamingDetector.from_state(state["detector"])
    return det, position
