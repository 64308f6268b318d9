"""Fixtures of the fleet tests: real fleet servers over HTTP, on SQLite and on a real PostgreSQL server.

``backend`` runs each test that asks for a server twice, once per database. PostgreSQL is Debian's ``postgresql``
package (``initdb`` + ``pg_ctl``), started once per session in a temporary folder on a free port with
``fsync=off`` (a test cluster; nothing to keep); it is skipped, with the reason, only when its programs are not
installed or it cannot start. Bundles are packed from one real tiny detector, fitted once, and varied by editing
their manifest and signing again (what a packer holding a trusted key could produce).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepeft.bench.loadtest import ServerProcess
from edgepeft.bench.postgres import PostgresServer, postgres_bindir
from edgepeft.delta import pack_bundle, read_bundle
from edgepeft.delta.bundle import seal_bundle
from edgepeft.delta.keys import key_id

BACKENDS = ("sqlite", "postgresql")
ASSET = "pump-1"


# ---------------------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) are not installed: apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'edgepeft[fleet]'")
    root = Path(tempfile.mkdtemp(prefix="edgepeft-pg-"))
    server = PostgresServer(bindir, root)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired, LookupError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not start here: {exc}")
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty registry database: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("postgres").create_database()


# ---------------------------------------------------------------------------------------------- keys, bundles
@pytest.fixture(scope="session")
def base_bundle(detector_dir: Path, keys: dict[str, Any]) -> bytes:
    return pack_bundle(detector_dir, keys["trusted"], asset_id=ASSET, version="1.0.0", release=1)


@pytest.fixture(scope="session")
def make_bundle(base_bundle: bytes, keys: dict[str, Any]) -> Callable[..., bytes]:
    """``make_bundle(asset, version, release, edit=None, key=None, payload=None)``: a signed variant of the packed
    bundle (``edit`` changes the manifest dict in place before signing)."""

    def make(asset: str = ASSET, version: str = "1.0.0", release: int = 1,
             edit: Callable[[dict[str, Any]], Any] | None = None, key: Ed25519PrivateKey | None = None,
             payload: bytes | None = None) -> bytes:
        bundle = read_bundle(base_bundle)
        manifest = copy.deepcopy(bundle.manifest)
        manifest.update(asset_id=asset, adapter_version=version, release=release)
        signer = key or keys["trusted"]
        manifest["signer"] = key_id(signer.public_key())
        if edit is not None:
            edit(manifest)
        return seal_bundle(manifest, bundle.payload if payload is None else payload, signer)

    return make


@pytest.fixture(scope="session")
def base_sha256(base_bundle: bytes) -> str:
    return read_bundle(base_bundle).base_sha256


def expired(manifest: dict[str, Any]) -> None:
    """Edit a manifest so that the bundle expired yesterday."""
    created = datetime.now(UTC) - timedelta(days=3)
    manifest["created_at"] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest["expires_at"] = (created + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------- servers
def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m edgepeft.fleet ARGS`` (the commands `edgepeft fleet` mounts)."""
    return subprocess.run([sys.executable, "-m", "edgepeft.fleet", *args], capture_output=True, text=True,
                          timeout=120)


@dataclass
class FleetServer(ServerProcess):
    """``python -m edgepeft.fleet serve`` in a subprocess on a free port, with an admin token bootstrapped by the
    ``token`` command before it starts (``self.token``)."""

    db: str = ""
    trusted_keys: tuple[Path, ...] = ()

    def command(self) -> list[str]:
        done = fleet_cli("token", "--db", self.db, "--scopes", "admin", "--name", "test-admin")
        if done.returncode != 0:
            raise RuntimeError(f"fleet token failed: {done.stderr}")
        self.token = done.stdout.strip()
        keys = [arg for path in self.trusted_keys for arg in ("--trusted-key", str(path))]
        return [self.python, "-m", "edgepeft.fleet", "serve", "--db", self.db, "--storage", str(self.storage),
                "--port", str(self.port), *keys, *self.args]

    @property
    def storage(self) -> Path:
        return self.state_dir / "storage"

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTP client; with the admin token unless another (or "" for none) is given."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)


@pytest.fixture
def server(db_url: str, tmp_path: Path, keys: dict[str, Any]) -> Iterator[FleetServer]:
    """A fresh fleet server on a fresh database (SQLite and PostgreSQL: see ``db_url``)."""
    with FleetServer(state_dir=tmp_path / "fleet", db=db_url, trusted_keys=(keys["public"],), startup_s=60.0
                     ) as fleet:
        yield fleet


def snapshot(fleet: FleetServer) -> dict[str, Any]:
    """Everything the registry holds, through the API, plus the files in its storage: compared before and after
    a refused request to show that nothing was written."""
    with fleet.client() as http:
        state = {path: http.get(path, params={"limit": 1000}).json()
                 for path in ("/v1/audit", "/v1/devices", "/v1/bundles", "/v1/groups", "/v1/bases", "/v1/tokens")}
    state["files"] = sorted(str(p.relative_to(fleet.storage)) for p in fleet.storage.rglob("*") if p.is_file())
    return state


def assert_refused(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """A 4xx with the given status and one-line JSON ``{"error", "detail"}`` whose detail contains ``words``."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert "\n" not in body["detail"] and body["detail"], body
    for word in words:
        assert word.lower() in body["detail"].lower(), (word, body["detail"])
    return body
