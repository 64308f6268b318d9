"""Shared by the TUF tests: a fleet server with its TUF repositories initialised (``tuf init`` then ``serve
--online-keys``), a device helper, an attacking HTTP proxy in front of the server, and the device's trusted state."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from securesystemslib.signer import Signer
from sqlalchemy.orm import Session

from edgepeft.agent.updates import UpdateClient
from edgepeft.fleet import tuf_repo
from edgepeft.fleet.db import Database
from edgepeft.fleet.models import DeviceAssignment, TufMetadata
from tests.unit.fleet.conftest import FleetServer, fleet_cli

Rule = Callable[[str, dict[str, str]], "tuple[int, bytes] | None"]


@dataclass
class TufFleet:
    """A running fleet server with TUF, the key folders, the database (in-process, for the test's own edits)."""

    server: FleetServer
    db: Database
    offline: Path
    online: Path
    base_sha256: str
    credentials: dict[str, str] = field(default_factory=dict)
    bundles: dict[int, dict[str, Any]] = field(default_factory=dict)  # release -> published record

    def roots(self, version: int | None = None) -> tuple[bytes, bytes]:
        """The image and director roots (latest, or version ``version`` of each)."""
        with self.db.read() as session:
            rows = []
            for repo in (tuf_repo.IMAGE, tuf_repo.DIRECTOR):
                row = (tuf_repo.latest_row(session, repo, "root") if version is None
                       else session.get(TufMetadata, (repo, "root", version)))
                rows.append(row.data)
        return rows[0], rows[1]

    def enrol(self, device_id: str) -> str:
        with self.server.client() as http:
            answer = http.post("/v1/devices", json={"device_id": device_id, "assets": ["pump-1"],
                                                    "bases": [self.base_sha256], "reason": "test"})
        assert answer.status_code == 201, answer.text
        self.credentials[device_id] = answer.json()["credential"]
        return self.credentials[device_id]

    def publish(self, data: bytes) -> dict[str, Any]:
        with self.server.client() as http:
            answer = http.post("/v1/bundles", params={"reason": "test"}, content=data)
        assert answer.status_code == 201, answer.text
        return answer.json()

    def assign(self, device_id: str, asset_id: str, sha256: str) -> None:
        """What the rollout engine does: the device should run this bundle for this asset."""
        with self.db.write() as session:
            session.merge(DeviceAssignment(device_id=device_id, asset_id=asset_id, bundle_sha256=sha256,
                                           rollout_id=None, assigned_at=datetime.now(UTC)))

    def client(self, device_id: str, state: Path, *, url: str | None = None,
               roots: tuple[bytes, bytes] | None = None) -> UpdateClient:
        image_root, director_root = roots or self.roots(1)
        return UpdateClient(url or self.server.url, device_id, self.credentials[device_id], state, image_root,
                            director_root, timeout=10.0)

    def keys(self) -> dict[str, Signer]:
        """The online keys as they are on disk now."""
        return tuf_repo.load_keys(self.online, tuf_repo.ONLINE_KEYS)

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self.db.write() as session:
            yield session

    def row(self, repo: str, role: str, version: int | None = None) -> TufMetadata:
        with self.db.read() as session:
            if version is None:
                return tuf_repo.latest_row(session, repo, role)
            return session.get(TufMetadata, (repo, role, version))


@contextmanager
def tuf_fleet(db_url: str, folder: Path, trusted_key: Path, base_sha256: str, bin_bits: int = 4
              ) -> Iterator[TufFleet]:
    offline, online = folder / "keys-offline", folder / "keys-online"
    done = fleet_cli("tuf", "init", "--db", db_url, "--offline-keys", str(offline), "--online-keys", str(online),
                     "--bin-bits", str(bin_bits))
    assert done.returncode == 0, done.stderr
    with FleetServer(state_dir=folder / "fleet", db=db_url, trusted_keys=(trusted_key,), startup_s=60.0,
                     args=["--online-keys", str(online)]) as server:
        with server.client() as http:
            answer = http.post("/v1/bases", json={"name": "tiny", "sha256": base_sha256, "reason": "the base"})
            assert answer.status_code == 201, answer.text
        db = Database.open(db_url, migrate=False)
        try:
            yield TufFleet(server, db, offline, online, base_sha256)
        finally:
            db.close()


def trusted_state(state: Path) -> dict[str, str]:
    """Every file under the device's state folder (metadata and downloaded bundles): path -> sha256 or link."""
    files: dict[str, str] = {}
    for path in sorted(state.rglob("*")):
        name = str(path.relative_to(state))
        if path.is_symlink():
            files[name] = "-> " + str(path.readlink())
        elif path.is_file():
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


class Proxy:
    """A real HTTP proxy in front of the fleet server: the man in the middle (or a compromised mirror). Each
    rule sees (path, request headers) and returns (status, body) to answer itself, or None to forward."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                headers = {key: value for key, value in self.headers.items()}
                answer = None
                for rule in list(proxy.rules):
                    answer = rule(self.path, headers)
                    if answer is not None:
                        break
                if answer is None:
                    answer = proxy.forward(self.path, headers)
                status, body = answer
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def forward(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        auth = {"Authorization": headers.get("Authorization", "")}
        answer = httpx.get(self.upstream + path, headers=auth, timeout=10.0)
        return answer.status_code, answer.content

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, status: int = 200) -> None:
        """Answer ``path`` with ``body`` from now on (a replayed, forged or frozen file)."""
        self.rules.append(lambda asked, headers: (status, body) if asked == path else None)

    def rewrite(self, path: str, change: Callable[[bytes], bytes]) -> None:
        """Forward ``path`` and change the answer on its way to the device."""
        def rule(asked: str, headers: dict[str, str]) -> tuple[int, bytes] | None:
            if asked != path:
                return None
            status, body = self.forward(asked, headers)
            return status, change(body)

        self.rules.append(rule)

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
