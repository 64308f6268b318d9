"""Per-asset standardisation, fitted on the asset's normal data and shipped with its adapter.

Example:
    >>> import numpy as np
    >>> scaler = ChannelScaler().fit(np.array([[1.0, 10.0], [3.0, 10.0]]))
    >>> scaler.transform(np.array([[2.0, 10.0]])).round(3).tolist()
    [[0.0, 0.0]]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgepeft.core.errors import ArtifactError


class ChannelScaler:
    """Subtract each channel's normal mean, divide by its normal standard deviation.

    A channel that never moved during training gets a floor scale (0.1 % of its level, at least 1e-6)
    rather than a unit scale: if it moves in service, that is news, but it should not read as a
    million-sigma event that drowns every other channel.
    """

    def fit(self, values: np.ndarray) -> ChannelScaler:
        values = np.asarray(values, dtype=np.float64)
        self.mean_ = values.mean(axis=0)
        std = values.std(axis=0)
        floor = np.maximum(1e-3 * np.abs(self.mean_), 1e-6)
        self.scale_ = np.maximum(std, floor)
        return self

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float64) - self.mean_) / self.scale_).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean_.tolist(), "scale": self.scale_.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelScaler:
        scaler = cls()
        try:
            scaler.mean_ = np.asarray(data["mean"], dtype=np.float64)
            scaler.scale_ = np.asarray(data["scale"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"scaler state is malformed ({exc})") from exc
        if scaler.mean_.shape != scaler.scale_.shape or np.any(scaler.scale_ <= 0):
            raise ArtifactError("scaler state is inconsistent (shapes differ or a scale is not positive)")
        return scaler
