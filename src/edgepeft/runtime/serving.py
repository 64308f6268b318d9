"""What the device runtime serves, without torch: a saved detector read into memory, and an installed version.

Both engines start from a :class:`SavedDetector` (a detector folder or a verified bundle, decoded to numpy) and
return a :class:`ServingModel`. The torch engine (:mod:`edgepeft.runtime.resident`) builds an
``AnomalyDetector`` on the resident torch base; the ONNX engine (:mod:`edgepeft.runtime.ort`) an ``OrtScorer``
on one ONNX Runtime graph. Either way the scores come from the one scoring core
(:class:`~edgepeft.detect.core.ScoringCore`).

Example:
    >>> saved = SavedDetector.from_directory("adapters/pump-1")   # doctest: +SKIP
    >>> saved.base, saved.method                                   # doctest: +SKIP
    ('tiny', 'lora')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepeft.core.config import read_json
from edgepeft.core.errors import ArtifactError
from edgepeft.detect.core import ADAPTER_DIR, DETECTOR_FILE, SCHEMA_VERSIONS, ScoringCore

if TYPE_CHECKING:
    from edgepeft.delta import BundleFiles

# An adapter folder's safetensors files by file name, each {tensor name: array}.
AdapterArrays = dict[str, dict[str, np.ndarray]]


def read_state(directory: str | Path) -> dict[str, Any]:
    """The ``detector.json`` dict of a saved detector folder."""
    directory = Path(directory)
    if not (directory / DETECTOR_FILE).exists():
        raise ArtifactError(f"{directory} is not an edgepeft detector (no {DETECTOR_FILE}); reinstall the bundle")
    return read_json(directory / DETECTOR_FILE, versions=SCHEMA_VERSIONS)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path} ({exc}); reinstall the bundle") from None


@dataclass(frozen=True)
class SavedDetector:
    """One saved detector, read into memory: its ``detector.json`` and its adapter folder's files.

    Attributes:
        state: the ``detector.json`` dict (checked by the engine that builds a scorer from it).
        tensors: the adapter's safetensors files by file name, each ``{tensor name: array}``.
        texts: the adapter's text files by file name (peft's ``adapter_config.json``).
        source: where it was read from, for messages.
    """

    state: dict[str, Any]
    tensors: AdapterArrays
    texts: dict[str, str]
    source: str

    @property
    def base(self) -> str:
        return str(self.state.get("base"))

    @property
    def base_sha256(self) -> str:
        return str(self.state.get("base_sha256"))

    @property
    def method(self) -> str:
        return str((self.state.get("peft_config") or {}).get("method"))

    @classmethod
    def from_directory(cls, directory: str | Path) -> SavedDetector:
        """Read a detector folder that ``AnomalyDetector.save`` (or ``unpack_bundle``) wrote."""
        directory = Path(directory)
        state = read_state(directory)
        adapter_dir = directory / ADAPTER_DIR
        texts = {path.name: path.read_text() for path in sorted(adapter_dir.glob("*.json")) if path.is_file()}
        tensors = {path.name: _load_arrays(path) for path in sorted(adapter_dir.glob("*.safetensors"))}
        return cls(state, tensors, texts, str(directory))

    @classmethod
    def from_bundle(cls, files: BundleFiles, source: str) -> SavedDetector:
        """Use the contents of a verified bundle (:func:`edgepeft.delta.bundle_files`) without writing them out."""
        return cls(files.state, {name: dict(arrays) for name, arrays in files.tensors.items()}, dict(files.texts),
                   source)


def as_saved(source: str | Path | SavedDetector) -> SavedDetector:
    """A SavedDetector as is, or one read from a detector folder."""
    return source if isinstance(source, SavedDetector) else SavedDetector.from_directory(source)


def non_finite(saved: SavedDetector) -> str | None:
    """The first adapter tensor holding NaN/inf (``file/name``), or None. A NaN in an adapter weight need not show
    in a smoke-test score (a NaN query entry can vanish in attention over constant input), so the weights
    themselves are checked."""
    for file, arrays in saved.tensors.items():
        for name, array in arrays.items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                return f"{file}/{name}"
    return None


@dataclass(frozen=True)
class ServingModel:
    """One installed adapter version, ready to score. Immutable: a swap replaces the object, never its weights.

    A request that picked this object finishes on it even if the asset is switched to another version meanwhile.

    Attributes:
        asset_id: the asset it serves.
        version: the adapter version (as in the bundle manifest).
        release: the bundle's release counter.
        method: PEFT method name.
        engine: ``torch`` or ``onnx`` (the engine that actually runs it).
        detector: the scorer (an ``AnomalyDetector`` on the torch engine, an ``OrtScorer`` on ONNX Runtime).
        private_bytes: bytes this version adds to the process (its own tensors plus a fixed overhead).
        note: why it runs on a different engine than asked, if it does.
    """

    asset_id: str
    version: str
    release: int
    method: str
    engine: str
    detector: ScoringCore = field(repr=False, compare=False)
    private_bytes: int = 0
    note: str = ""

    @property
    def n_channels(self) -> int:
        return int(self.detector.n_channels_)

    @property
    def channels(self) -> list[str]:
        return list(self.detector.channels_)

    def score_all(self, rows: Any, explain: bool = False) -> dict[str, Any]:
        """score, p_anomaly and anomaly per row (and ``top_channels`` with ``explain``), exactly as the detector
        computes them offline."""
        return self.detector.score_all(rows, explain=explain)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "release": self.release,
            "method": self.method,
            "engine": self.engine,
            "channels": self.channels,
            "threshold": float(self.detector.threshold_),
            "private_bytes": self.private_bytes,
            **({"note": self.note} if self.note else {}),
        }


def check_base(saved: SavedDetector, name: str, sha256: str) -> None:
    """Refuse a detector trained on another base: its delta would run on weights it never saw."""
    from edgepeft.core.errors import ModelError

    if saved.base != name or saved.base_sha256 != sha256:
        raise ModelError(
            f"adapter in {saved.source} was trained on base {saved.base!r} (sha256 {saved.base_sha256[:12]}…) but "
            f"this runtime serves base {name!r} (sha256 {sha256[:12]}…); re-adapt it on this base"
        )
