"""Shared fixtures of the runtime tests: detectors trained for a few steps, a signing key pair, bundles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgepeft.bench.loadtest import series
from edgepeft.detect.detector import AnomalyDetector
from edgepeft.peft import list_methods

ASSET = "pump-1"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> object:
    """Tiny models gain nothing from intra-op threads, and on a shared machine their spin-waits cost seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fit(method: str, seed: int, path: Path, *, lora_scale: float = 0.0) -> Path:
    """A tiny-base detector trained for 3 steps; ``lora_scale`` > 0 makes its LoRA update large, so that a graph
    that dropped or mixed LoRA tensors would show."""
    train = series(400, seed=seed, period=25.0 + 4 * seed)
    det = AnomalyDetector(base="tiny", method=method, rank=4, steps=3, seed=seed).fit(train)
    if lora_scale:
        with torch.no_grad():
            for name, param in det.model_.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, lora_scale, generator=torch.Generator().manual_seed(seed))
    return det.save(path)


@pytest.fixture(scope="session")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three LoRA versions of one asset that score clearly differently."""
    root = tmp_path_factory.mktemp("versions")
    return [fit("lora", seed, root / f"v{seed + 1}", lora_scale=0.2) for seed in range(3)]


@pytest.fixture(scope="session")
def every_method(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One detector per registered PEFT method (and the full / scratch baselines)."""
    root = tmp_path_factory.mktemp("methods")
    return {method: fit(method, 0, root / method) for method in list_methods()}


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A trusted signing key (with its public key file) and an untrusted one."""
    from edgepeft.delta import generate_key, save_keypair

    root = tmp_path_factory.mktemp("keys")
    trusted = generate_key()
    public = save_keypair(trusted, root / "fleet")
    return {"trusted": trusted, "public": public, "untrusted": generate_key()}


def bundle(detector_dir: Path, key: object, version: str, release: int, asset_id: str = ASSET) -> bytes:
    from edgepeft.delta import pack_bundle

    return pack_bundle(detector_dir, key, asset_id=asset_id, version=version, release=release)
