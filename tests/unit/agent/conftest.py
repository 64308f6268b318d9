"""Fixtures of the agent tests: a real device runtime process, a real fleet server, signed bundles.

The loop tests drive :class:`edgepeft.agent.loop.Agent` against a real ``edgepeft serve`` and a real fleet server,
with the assignments given by :class:`Assignments` (what the TUF client returns once it has verified them); the
process tests in ``test_agent_process.py`` run the whole chain (``edgepeft agent`` + TUF) instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgepeft.agent.updates import AssignedTarget
from edgepeft.bench.loadtest import ServerProcess
from edgepeft.delta import pack_bundle, read_bundle
from tests.unit.fleet.conftest import FleetServer

ASSET = "pump-1"
RUNTIME_TOKEN = "agent-test-runtime-token-0123456789"


def target_of(data: bytes) -> AssignedTarget:
    bundle = read_bundle(data)
    return AssignedTarget(asset_id=bundle.asset_id, version=bundle.version, release=bundle.release,
                          base_sha256=bundle.base_sha256, sha256=hashlib.sha256(data).hexdigest(),
                          length=len(data), path=f"{bundle.asset_id}/{bundle.version}.edelta")


@dataclass
class Assignments:
    """Verified assignments and downloads, as the update client hands them to the loop; ``fail`` makes
    ``assigned()`` raise (the server out of reach, forged metadata), ``broken`` makes one download raise."""

    bundles: dict[str, bytes] = field(default_factory=dict)  # version -> bundle bytes
    assigned_versions: list[str] = field(default_factory=list)
    fail: Exception | None = None
    broken: dict[str, Exception] = field(default_factory=dict)
    tamper: set[str] = field(default_factory=set)
    downloads: list[str] = field(default_factory=list)
    bases: list[str | None] = field(default_factory=list)  # the base each call was made for

    def assign(self, *versions: str) -> None:
        self.assigned_versions = list(versions)

    def assigned(self, base_sha256: str | None = None) -> list[AssignedTarget]:
        self.bases.append(base_sha256)
        if self.fail is not None:
            raise self.fail
        return [target_of(self.bundles[v]) for v in self.assigned_versions]

    def download(self, target: Any) -> bytes:
        self.downloads.append(target.version)
        if target.version in self.broken:
            raise self.broken[target.version]
        data = self.bundles[target.version]
        return data[:-1] + bytes([data[-1] ^ 1]) if target.version in self.tamper else data


@pytest.fixture(scope="session")
def make_bundle(detector_dir: Path, keys: dict[str, Any]) -> Callable[..., bytes]:
    """``make_bundle(version, release, asset=ASSET, key=None)``: a signed bundle of the test detector."""
    cache: dict[tuple[str, int, str, bool], bytes] = {}

    def make(version: str, release: int, asset: str = ASSET, untrusted: bool = False) -> bytes:
        key = (version, release, asset, untrusted)
        if key not in cache:
            cache[key] = pack_bundle(detector_dir, keys["untrusted" if untrusted else "trusted"], asset_id=asset,
                                     version=version, release=release)
        return cache[key]

    return make


@pytest.fixture
def device_runtime(tmp_path: Path, keys: dict[str, Any]) -> Iterator[ServerProcess]:
    """A real ``edgepeft serve`` (graceful start, fresh state) trusting the fleet's release key."""
    with ServerProcess(tmp_path / "runtime", token=RUNTIME_TOKEN,
                       args=["--trusted-key", str(keys["public"]), "--threads", "1"]) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> Iterator[FleetServer]:
    """A real fleet server on SQLite."""
    root = tmp_path_factory.mktemp("fleet")
    with FleetServer(state_dir=root / "fleet", db=f"sqlite:///{root / 'fleet.db'}", trusted_keys=(keys["public"],),
                     startup_s=60.0) as server:
        yield server


def enrol(fleet: FleetServer, device_id: str) -> str:
    """Enrol a device on ``fleet``; its credential."""
    with fleet.client() as http:
        answer = http.post("/v1/devices", json={"device_id": device_id, "assets": [ASSET], "reason": "agent test"})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["credential"])


def mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``folder`` (a disk that can fill up); False where that needs root we lack."""
    folder.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                 str(folder)], capture_output=True).returncode == 0


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
