"""Distribution through TUF: the image repository and the per-device director, served from the database.

Routes (metadata is JSON, targets are the bundle files; every answer needs a credential):

=====  ==================================================  ====================================================
GET    /tuf/image/metadata/{name}                          ``N.root.json``, ``timestamp.json``, ``N.snapshot.json``,
                                                           ``N.targets.json``, ``N.bundles.json``, ``N.bins-xx.json``
                                                           (a device credential, or an operator token with read)
GET    /tuf/image/targets/{asset}/{sha256}.{version}.edelta  a bundle file (consistent-snapshot name)
GET    /tuf/director/{device_id}/metadata/{name}           the device's own director metadata (its credential
                                                           only: another device's id is a 403)
=====  ==================================================  ====================================================

Metadata is only read from ``tuf_metadata``, except ``timestamp.json``: when it is close to expiry (image) or the
device's assignments changed (director), the request re-signs with the online keys first, in one transaction, so
API replicas stay stateless and need no cron job. Publishing a bundle adds its image target in the publish's own
transaction (:meth:`Distribution.on_publish`); before ``edgepeft fleet tuf init`` a publish just catalogues the
bundle, and ``init`` adds every catalogued bundle. Without online keys (``serve --online-keys DIR``) every route
answers 503 with what to do, and a publish into an initialised repository is refused (it could not be signed).

Example (no online keys: the routes exist and say why they cannot serve):
    >>> import tempfile
    >>> from fastapi.testclient import TestClient
    >>> from edgepeft.fleet.app import build_app
    >>> from edgepeft.fleet.db import Database
    >>> from edgepeft.fleet.registry import Registry
    >>> from edgepeft.fleet.storage import BundleStore
    >>> root = tempfile.mkdtemp()
    >>> registry = Registry(Database.open(f"sqlite:///{root}/f.db"), BundleStore(root), [])
    >>> _, token = registry.create_token("doc", "read", actor="cli:doc", reason="example")
    >>> fleet = build_app(registry)
    >>> answer = TestClient(fleet.app).get("/tuf/image/metadata/timestamp.json",
    ...                                    headers={"Authorization": f"Bearer {token}"})
    >>> answer.status_code, answer.json()["error"]
    (503, 'DistributionUnavailable')
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from securesystemslib.signer import Signer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgepeft.core.errors import ConfigError
from edgepeft.fleet import schemas as s
from edgepeft.fleet import tuf_repo as repo
from edgepeft.fleet.auth import DEVICE_PREFIX
from edgepeft.fleet.errors import FleetError, Forbidden, NotFound, Unauthenticated
from edgepeft.fleet.models import BundleRecord, TufMetadata
from edgepeft.fleet.registry import Registry
from edgepeft.fleet.server import ApiContext
from edgepeft.fleet.tuf_repo import metadata_sizes

_METADATA_NAME = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,17})\.(?P<role>[a-z][a-z0-9-]{0,63})|timestamp)\.json$")
_TARGET_FILE = re.compile(r"^(?P<sha256>[0-9a-f]{64})\.(?P<version>[A-Za-z0-9][A-Za-z0-9._-]{0,127})\.edelta$")
# Versioned files never change (consistent snapshots): any cache may keep them. timestamp.json changes.
_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}
_PRIVATE_IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}
_NO_STORE = {"Cache-Control": "no-store"}
# Module level: FastAPI resolves annotations by name, which a local alias (with postponed annotations) defeats.
MetadataName = Annotated[str, PathParam(max_length=100, description="e.g. timestamp.json, 3.snapshot.json")]
SafeName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
TargetName = Annotated[str, PathParam(max_length=220, description="<sha256>.<version>.edelta")]


class DistributionUnavailable(FleetError):
    """TUF distribution cannot serve: no online keys, repository not initialised, or keys that the root no longer
    trusts."""

    status = 503


class Distribution:
    """The TUF routes over ``registry``'s database, signing online with the keys in ``online_keys``.

    ``periods`` overrides how long each role's metadata is valid (:data:`~edgepeft.fleet.tuf_repo.PERIODS`).
    See the module docstring for an example.
    """

    def __init__(self, registry: Registry, online_keys: Path | None, *,
                 periods: Mapping[str, timedelta] = repo.PERIODS) -> None:
        self.registry = registry
        self.online_keys = None if online_keys is None else Path(online_keys)
        self.periods = dict(periods)
        self._keys: dict[str, Signer] | None = None
        self._lock = threading.Lock()
        registry.publish_hooks.append(self.on_publish)

    # ------------------------------------------------------------------------------------------- keys
    def keys(self, *, reload: bool = False) -> dict[str, Signer]:
        """The online signers, loaded once (and again after a rotation: see :meth:`_signing`)."""
        if self.online_keys is None:
            raise DistributionUnavailable("this server has no online TUF keys, so devices cannot fetch updates; "
                                          "restart it with `edgepeft fleet serve --online-keys DIR` (the folder "
                                          "`edgepeft fleet tuf init` wrote)")
        with self._lock:
            if self._keys is None or reload:
                try:
                    self._keys = repo.load_keys(self.online_keys, repo.ONLINE_KEYS)
                except ConfigError as exc:
                    raise DistributionUnavailable(str(exc)) from None
            return self._keys

    def _signing(self, write: Callable[[Session, dict[str, Signer]], Any]) -> Any:
        """Run ``write`` in a write transaction with the online keys; after a rotation the keys on disk are newer
        than the loaded ones, so a stale key is reloaded once before giving up."""
        for attempt in (0, 1):
            keys = self.keys(reload=attempt == 1)
            try:
                with self.registry.db.write() as session:
                    return write(session, keys)
            except repo.StaleKey as exc:
                if attempt == 1:
                    raise DistributionUnavailable(str(exc)) from None
            except repo.RepositoryNotReady as exc:
                raise DistributionUnavailable(str(exc)) from None
            except IntegrityError:
                # Another replica signed the same version at the same moment: its metadata is as good as ours.
                return None
        return None

    def on_publish(self, session: Session, record: BundleRecord) -> None:
        """Add a bundle being published to the image repository, in the publish's transaction."""
        if not repo.initialised(session):
            return  # `tuf init` adds every catalogued bundle
        try:
            keys = self.keys()
            try:
                repo.add_image_targets(session, keys, [record], periods=self.periods)
            except repo.StaleKey:
                repo.add_image_targets(session, self.keys(reload=True), [record], periods=self.periods)
        except DistributionUnavailable as exc:
            raise DistributionUnavailable(f"bundle not published: the TUF repository is initialised, but its target "
                                          f"cannot be signed here ({exc})") from None
        except repo.RepositoryNotReady as exc:
            raise DistributionUnavailable(f"bundle not published: {exc}") from None

    # ------------------------------------------------------------------------------------------- reads
    def _row(self, repo_name: str, role: str, version: int | None) -> TufMetadata:
        with self.registry.db.read() as session:
            if version is None:
                row = repo.latest_row(session, repo_name, role)
            else:
                row = session.get(TufMetadata, (repo_name, role, version))
            if row is None and not repo.initialised(session):
                raise DistributionUnavailable("the TUF repositories are not initialised; run `edgepeft fleet tuf "
                                              "init --db URL --offline-keys DIR --online-keys DIR`")
        if row is None:
            raise NotFound(f"no TUF metadata {role} version {version} in the {repo_name} repository")
        return row

    def image_metadata(self, name: str) -> tuple[bytes, dict[str, str]]:
        version, role = _parse(name)
        self.keys()
        if version is None:
            row = self._row(repo.IMAGE, "timestamp", None)
            if repo.needs_resign(row.expires_at, self.periods["timestamp"], repo.now()):
                self._signing(lambda session, keys: repo.refresh_image(session, keys, periods=self.periods))
                row = self._row(repo.IMAGE, "timestamp", None)
            return row.data, _NO_STORE
        return self._row(repo.IMAGE, role, version).data, _IMMUTABLE

    def director_metadata(self, device_id: str, name: str) -> tuple[bytes, dict[str, str]]:
        version, role = _parse(name)
        keys = self.keys()
        if role == "root":
            return self._row(repo.DIRECTOR, "root", version).data, _IMMUTABLE
        if version is None:
            with self.registry.db.read() as session:
                try:
                    stale = repo.refresh_director(session, device_id, keys["director"], periods=self.periods,
                                                  check_only=True)
                except repo.RepositoryNotReady as exc:
                    raise DistributionUnavailable(str(exc)) from None
            if stale:
                self._signing(lambda session, keys: repo.refresh_director(session, device_id, keys["director"],
                                                                          periods=self.periods))
            return self._row(repo.device_repo(device_id), "timestamp", None).data, _NO_STORE
        if role not in ("targets", "snapshot"):
            raise NotFound(f"the director has no role {role!r}; it serves root, timestamp, snapshot and targets")
        return self._row(repo.device_repo(device_id), role, version).data, _PRIVATE_IMMUTABLE

    def target_file(self, asset: str, filename: str) -> bytes:
        match = _TARGET_FILE.fullmatch(filename)
        if match is None:
            raise NotFound(f"{filename!r} is not a target file name; targets are <sha256>.<version>.edelta")
        self.keys()
        with self.registry.db.read() as session:
            record = session.get(BundleRecord, match["sha256"])
        if record is None or record.asset_id != asset or record.version != match["version"]:
            raise NotFound(f"no bundle {asset}/{match['version']} with sha256 {match['sha256'][:16]}… in the "
                           "catalogue")
        return self.registry.store.get(record.sha256)

    # ------------------------------------------------------------------------------------------- routes
    def mount(self, app: FastAPI, ctx: ApiContext) -> None:
        """Add the ``/tuf`` routes."""
        registry = ctx.registry
        bearer = HTTPBearer(auto_error=False, description="A device credential (efd_...) or an operator token "
                            "(efo_...) with read.")

        def reader(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
            if credentials is None:
                raise Unauthenticated("TUF metadata needs `Authorization: Bearer <device credential or operator "
                                      "token>`")
            if credentials.credentials.startswith(DEVICE_PREFIX):
                return f"device:{registry.authenticate_device(credentials.credentials)}"
            who = registry.authenticate_operator(credentials.credentials)
            who.require("read")
            return who.actor

        errors: dict[int | str, dict[str, Any]] = {code: {"model": s.ErrorOut, "description": text} for code, text in (
            (401, "Missing or unknown credential"), (403, "Another device's metadata, or no read scope"),
            (404, "No such metadata version or target"), (422, "A malformed asset or device id"),
            (503, "No online keys, or repository not initialised"))}
        metadata = {200: {"description": "Signed TUF metadata", "content": {"application/json": {}}}, **errors}
        target = {200: {"description": "The bundle file", "content": {"application/octet-stream": {}}}, **errors}

        @app.get("/tuf/image/metadata/{name}", tags=["distribution"], summary="Image repository metadata",
                 responses=metadata, response_class=Response)
        def image_metadata(name: MetadataName, who: str = Depends(reader)) -> Response:
            data, headers = self.image_metadata(name)
            return Response(data, media_type="application/json", headers=headers)

        @app.get("/tuf/image/targets/{asset}/{filename}", tags=["distribution"], summary="A bundle file",
                 responses=target, response_class=Response)
        def image_target(asset: SafeName, filename: TargetName, who: str = Depends(reader)) -> Response:
            return Response(self.target_file(asset, filename), media_type="application/octet-stream",
                            headers=_IMMUTABLE)

        @app.get("/tuf/director/{device_id}/metadata/{name}", tags=["distribution"],
                 summary="The calling device's director metadata", responses=metadata, response_class=Response)
        def director_metadata(device_id: SafeName, name: MetadataName,
                              caller: str = Depends(ctx.device)) -> Response:
            if caller != device_id:
                raise Forbidden(f"device {caller!r} may only read its own director metadata, not {device_id!r}")
            data, headers = self.director_metadata(device_id, name)
            return Response(data, media_type="application/json", headers=headers)


def _parse(name: str) -> tuple[int | None, str]:
    match = _METADATA_NAME.fullmatch(name)
    if match is None:
        raise NotFound(f"{name!r} is not a TUF metadata file name; use timestamp.json or N.ROLE.json")
    if match["version"] is None:
        return None, "timestamp"
    if match["role"] == "timestamp":
        raise NotFound("timestamp.json is not versioned; fetch /timestamp.json")
    return int(match["version"]), match["role"]


__all__ = ["Distribution", "DistributionUnavailable", "metadata_sizes"]
