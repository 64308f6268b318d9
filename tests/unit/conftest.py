"""Fixtures shared by the fleet and agent tests: the release key that signs bundles, and one fitted test detector.

(Other folders that need a differently built key or detector define their own fixture of the same name, which
takes precedence there.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgepeft.bench.loadtest import series
from edgepeft.delta import generate_key, save_keypair


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trusted signing key (and its .pub file) and an untrusted one."""
    trusted = generate_key()
    public = save_keypair(trusted, tmp_path_factory.mktemp("keys") / "release")
    return {"trusted": trusted, "public": public, "untrusted": generate_key()}


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA detector fitted for a few steps on synthetic rows (what the bundles in these tests carry)."""
    import torch

    from edgepeft.detect.detector import AnomalyDetector

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("detector") / "det"
    return AnomalyDetector(base="tiny", method="lora", rank=4, steps=3, seed=0).fit(series(300)).save(folder)
