"""edgepeft: adapt a frozen pretrained sensor encoder to each machine with a tiny adapter, detect anomalies.

The heavy parts (torch, peft) are imported lazily so that ``import edgepeft`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from edgepeft.detect.detector import AnomalyDetector


def __getattr__(name: str) -> Any:
    if name == "AnomalyDetector":
        from edgepeft.detect.detector import AnomalyDetector

        return AnomalyDetector
    raise AttributeError(name)


__all__ = ["AnomalyDetector", "__version__"]
