"""Shared fixtures for the bundle tests: one real tiny detector, fitted once, and signing keys."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepeft.delta import pack_bundle, read_bundle
from edgepeft.delta.bundle import seal_bundle
from edgepeft.detect.detector import AnomalyDetector
from tests.conftest import sine_series

ASSET = "pump-7"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The CPUs are shared with other jobs: one torch thread is faster here than two fighting them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def series() -> np.ndarray:
    return sine_series(300, 3, seed=0)


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory: pytest.TempPathFactory, series: np.ndarray) -> Path:
    """A real detector directory: LoRA rank 4 on the tiny base, a few steps (what matters is the files)."""
    folder = tmp_path_factory.mktemp("detector") / "det"
    return AnomalyDetector(base="tiny", method="lora", rank=4, steps=5, seed=0).fit(series).save(folder)


@pytest.fixture(scope="session")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def bundle_bytes(detector_dir: Path, key: Ed25519PrivateKey) -> bytes:
    """fp32, uncompressed, release 5, expiring in 30 days."""
    return pack_bundle(detector_dir, key, asset_id=ASSET, version="1.4.0", release=5, parent_version="1.3.0",
                       expires_days=30)


@pytest.fixture(scope="session")
def resign(bundle_bytes: bytes, key: Ed25519PrivateKey) -> Callable[..., bytes]:
    """Edit the valid bundle's manifest (a function of the manifest dict) and sign it again with ``key``:
    what a buggy or malicious packer holding a trusted key could produce."""

    def make(edit: Callable[[dict[str, Any]], Any], payload: bytes | None = None,
             signing_key: Ed25519PrivateKey | None = None) -> bytes:
        bundle = read_bundle(bundle_bytes)
        manifest = copy.deepcopy(bundle.manifest)
        edit(manifest)
        return seal_bundle(manifest, bundle.payload if payload is None else payload, signing_key or key)

    return make

