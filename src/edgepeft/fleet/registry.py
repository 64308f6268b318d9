"""The registry's operations: each is one database transaction that also appends its audit entry.

The HTTP server (:mod:`edgepeft.fleet.server`) and the CLI are thin shells over :class:`Registry`. Every change
takes an ``actor`` (who) and a ``reason`` (why) and writes one :class:`~edgepeft.fleet.models.AuditEntry` in the
same transaction as the change itself, so there is never a change without its entry or an entry without its change.
A refused change raises a :class:`~edgepeft.fleet.errors.FleetError` before anything is written.

Example (a throw-away SQLite registry):
    >>> import tempfile
    >>> from edgepeft.fleet.db import Database
    >>> from edgepeft.fleet.storage import BundleStore
    >>> root = tempfile.mkdtemp()
    >>> registry = Registry(Database.open(f"sqlite:///{root}/fleet.db"), BundleStore(root), trusted_keys=[])
    >>> _ = registry.create_group("line-1", "pumps of line 1", actor="cli:doc", reason="new line")
    >>> device, credential = registry.enrol_device("pump-7", tags=["site=berlin"], groups=["line-1"],
    ...                                            assets=["pump-7"], actor="cli:doc", reason="installed")
    >>> device["groups"], credential.startswith("efd_")
    (['line-1'], True)
    >>> registry.authenticate_device(credential)
    'pump-7'
    >>> [entry["action"] for entry in registry.audit()]
    ['group.create', 'device.enrol']
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgepeft.delta.bundle import Bundle, verify_bundle
from edgepeft.delta.manifest import as_utc
from edgepeft.fleet.auth import (
    DEVICE_PREFIX,
    MAX_SECRET_CHARS,
    OPERATOR_PREFIX,
    allows,
    hash_secret,
    new_secret,
    parse_scopes,
)
from edgepeft.fleet.db import Database
from edgepeft.fleet.errors import BundleRejected, Conflict, Forbidden, NotFound, Unauthenticated, UnknownReference
from edgepeft.fleet.models import (
    AuditEntry,
    BundleRecord,
    Device,
    DeviceAsset,
    DeviceBase,
    DeviceTag,
    Group,
    GroupMember,
    KnownBase,
    OperatorToken,
)
from edgepeft.fleet.storage import BundleStore

MAX_PAGE = 1000


@dataclass(frozen=True)
class Operator:
    """An authenticated operator token: who is acting, with which scopes."""

    token_id: int
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        """How the audit log names this operator: ``operator:NAME#ID``."""
        return f"operator:{self.name}#{self.token_id}"

    def require(self, scope: str) -> None:
        if not allows(self.scopes, scope):
            raise Forbidden(f"this token ({self.name}, scopes {','.join(sorted(self.scopes))}) lacks the "
                            f"{scope!r} scope this request needs; ask an admin for a token with it")


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    """UTC ISO 8601 with a Z (SQLite hands back naive datetimes, PostgreSQL aware ones: both read as UTC)."""
    return None if moment is None else as_utc(moment).isoformat().replace("+00:00", "Z")


class Registry:
    """Devices, groups, bases, the bundle catalogue, operator tokens and the audit log, over one database.

    ``trusted_keys`` are the Ed25519 public keys whose bundles the catalogue accepts (the same keys the devices
    trust); with none, every upload is refused.
    """

    def __init__(self, db: Database, store: BundleStore, trusted_keys: Sequence[Ed25519PublicKey]) -> None:
        self.db = db
        self.store = store
        self.trusted_keys = list(trusted_keys)
        # Called as hook(session, record) inside a publish's transaction, after the row is added: distribution adds
        # the bundle's TUF target there, so a bundle is never catalogued without it (or the reverse).
        self.publish_hooks: list[Callable[[Session, BundleRecord], None]] = []

    # ------------------------------------------------------------------------------------------- plumbing
    @contextmanager
    def _change(self, what: str) -> Iterator[Session]:
        """A write transaction; a unique-key clash from a concurrent writer becomes a 409, not a 500."""
        try:
            with self.db.write() as session:
                yield session
        except IntegrityError:
            raise Conflict(f"{what} clashes with a change made at the same moment; read the current state and "
                           "retry") from None

    @staticmethod
    def _audit(session: Session, actor: str, action: str, target: str, reason: str,
               details: dict[str, Any] | None = None) -> None:
        session.add(AuditEntry(at=now(), actor=actor, action=action, target=target, reason=reason,
                               details=details or {}))

    @staticmethod
    def _device(session: Session, device_id: str) -> Device:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r} in the registry; enrol it with POST /v1/devices")
        return device

    @staticmethod
    def _check_known(session: Session, model: type[Any], keys: Iterable[str], what: str, hint: str) -> None:
        keys = sorted(set(keys))
        if not keys:
            return
        column = model.__mapper__.primary_key[0]
        known = set(session.scalars(select(column).where(column.in_(keys))))
        missing = [key for key in keys if key not in known]
        if missing:
            shown = ", ".join(repr(key) for key in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise UnknownReference(f"{what} {shown} not in the registry; {hint}")

    # ------------------------------------------------------------------------------------------- operators
    def create_token(self, name: str, scopes: Iterable[str] | str, *, actor: str, reason: str
                     ) -> tuple[dict[str, Any], str]:
        """A new operator token: its record and the token itself (shown once; only its hash is kept)."""
        granted = parse_scopes(scopes)
        secret = new_secret(OPERATOR_PREFIX)
        with self._change("the token") as session:
            token = OperatorToken(name=name, token_hash=hash_secret(secret), scopes=",".join(sorted(granted)),
                                  created_at=now(), created_by=actor)
            session.add(token)
            session.flush()  # assigns token.id for the audit entry
            self._audit(session, actor, "token.create", f"token:{token.id}", reason,
                        {"name": name, "scopes": sorted(granted)})
            return _token_view(token), secret

    def list_tokens(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            return [_token_view(t) for t in session.scalars(select(OperatorToken).order_by(OperatorToken.id))]

    def revoke_token(self, token_id: int, *, actor: str, reason: str) -> dict[str, Any]:
        with self._change("revoking the token") as session:
            token = session.get(OperatorToken, token_id)
            if token is None:
                raise NotFound(f"no operator token {token_id}; list them with GET /v1/tokens")
            if token.revoked_at is not None:
                raise Conflict(f"operator token {token_id} ({token.name}) is already revoked")
            token.revoked_at = now()
            self._audit(session, actor, "token.revoke", f"token:{token_id}", reason, {"name": token.name})
            return _token_view(token)

    def authenticate_operator(self, secret: str) -> Operator:
        if not secret.startswith(OPERATOR_PREFIX) or len(secret) > MAX_SECRET_CHARS:
            raise Unauthenticated("this endpoint needs `Authorization: Bearer efo_...`, an operator token from "
                                  "`edgepeft fleet token` or POST /v1/tokens")
        with self.db.read() as session:
            token = session.scalar(select(OperatorToken).where(OperatorToken.token_hash == hash_secret(secret)))
            if token is None or token.revoked_at is not None:
                raise Unauthenticated("operator token not accepted (unknown or revoked); ask an admin for a new "
                                      "one")
            return Operator(token.id, token.name, parse_scopes(token.scopes))

    # ------------------------------------------------------------------------------------------- bases, groups
    def register_base(self, name: str, sha256: str, *, actor: str, reason: str) -> dict[str, Any]:
        with self._change("registering the base") as session:
            if session.get(KnownBase, sha256) is not None:
                raise Conflict(f"base {sha256[:16]}… is already registered")
            base = KnownBase(sha256=sha256, name=name, registered_at=now())
            session.add(base)
            self._audit(session, actor, "base.register", f"base:{sha256}", reason, {"name": name})
            return _base_view(base)

    def list_bases(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            return [_base_view(b) for b in session.scalars(select(KnownBase).order_by(KnownBase.name,
                                                                                      KnownBase.sha256))]

    def create_group(self, name: str, description: str, *, actor: str, reason: str) -> dict[str, Any]:
        with self._change("creating the group") as session:
            if session.get(Group, name) is not None:
                raise Conflict(f"group {name!r} already exists")
            group = Group(name=name, description=description, created_at=now())
            session.add(group)
            self._audit(session, actor, "group.create", f"group:{name}", reason, {"description": description})
            return {"name": name, "description": description, "created_at": iso(group.created_at), "devices": 0}

    def list_groups(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            counted = select(GroupMember.group_name, func.count()).group_by(GroupMember.group_name)
            sizes = {name: int(n) for name, n in session.execute(counted).all()}
            return [{"name": g.name, "description": g.description, "created_at": iso(g.created_at),
                     "devices": sizes.get(g.name, 0)}
                    for g in session.scalars(select(Group).order_by(Group.name))]

    # ------------------------------------------------------------------------------------------- devices
    def enrol_device(self, device_id: str, *, tags: Iterable[str] = (), groups: Iterable[str] = (),
                     assets: Iterable[str] = (), bases: Iterable[str] = (), actor: str, reason: str
                     ) -> tuple[dict[str, Any], str]:
        """Add a device; return its record and its credential (shown once: only the hash is kept)."""
        credential = new_secret(DEVICE_PREFIX)
        with self._change(f"enrolling {device_id!r}") as session:
            if session.get(Device, device_id) is not None:
                raise Conflict(f"device {device_id!r} is already enrolled; to issue it a new credential use "
                               f"POST /v1/devices/{device_id}/credential")
            moment = now()
            device = Device(id=device_id, credential_hash=hash_secret(credential), enrolled_at=moment,
                            enrolled_by=actor, updated_at=moment)
            session.add(device)
            self._set_links(session, device, tags=tags, groups=groups, assets=assets, bases=bases)
            view = _device_view(device)
            self._audit(session, actor, "device.enrol", f"device:{device_id}", reason,
                        {key: view[key] for key in ("tags", "groups", "assets", "bases")})
            return view, credential

    def _set_links(self, session: Session, device: Device, *, tags: Iterable[str] | None = None,
                   groups: Iterable[str] | None = None, assets: Iterable[str] | None = None,
                   bases: Iterable[str] | None = None) -> None:
        """Replace the given lists (None: leave that list as it is)."""
        if groups is not None:
            groups = sorted(set(groups))
            self._check_known(session, Group, groups, "group(s)", "create them first with POST /v1/groups")
            device.memberships = [GroupMember(group_name=name, device_id=device.id) for name in groups]
        if bases is not None:
            bases = sorted(set(bases))
            self._check_known(session, KnownBase, bases, "base(s)", "register them first with POST /v1/bases")
            device.bases = [DeviceBase(device_id=device.id, base_sha256=sha) for sha in bases]
        if tags is not None:
            device.tags = [DeviceTag(device_id=device.id, tag=tag) for tag in sorted(set(tags))]
        if assets is not None:
            device.assets = [DeviceAsset(device_id=device.id, asset_id=asset) for asset in sorted(set(assets))]

    def update_device(self, device_id: str, *, tags: Iterable[str] | None = None,
                      groups: Iterable[str] | None = None, assets: Iterable[str] | None = None,
                      bases: Iterable[str] | None = None, actor: str, reason: str,
                      action: str = "device.update") -> dict[str, Any]:
        """Replace the lists that are given; the audit entry records each list before and after. A request that
        changes nothing writes nothing."""
        wanted = {key: None if value is None else sorted(set(value))
                  for key, value in (("tags", tags), ("groups", groups), ("assets", assets), ("bases", bases))}
        with self._change(f"updating {device_id!r}") as session:
            device = self._device(session, device_id)
            before = _device_view(device)
            if all(value is None or value == before[key] for key, value in wanted.items()):
                # Nothing changes, so nothing is written: an agent reporting the same inventory every poll
                # must not grow the audit log.
                return before
            self._set_links(session, device, **wanted)
            device.updated_at = now()
            session.flush()
            after = _device_view(device)
            changed = {key: {"before": before[key], "after": after[key]}
                       for key in ("tags", "groups", "assets", "bases") if before[key] != after[key]}
            self._audit(session, actor, action, f"device:{device_id}", reason, changed)
            return after

    def rotate_credential(self, device_id: str, *, actor: str, reason: str) -> tuple[dict[str, Any], str]:
        """A new credential for the device; the old one stops working at once."""
        credential = new_secret(DEVICE_PREFIX)
        with self._change(f"rotating the credential of {device_id!r}") as session:
            device = self._device(session, device_id)
            device.credential_hash = hash_secret(credential)
            device.updated_at = now()
            self._audit(session, actor, "device.rotate_credential", f"device:{device_id}", reason)
            return _device_view(device), credential

    def authenticate_device(self, secret: str) -> str:
        """The id of the device holding ``secret``."""
        if not secret.startswith(DEVICE_PREFIX) or len(secret) > MAX_SECRET_CHARS:
            raise Unauthenticated("this endpoint needs `Authorization: Bearer efd_...`, the credential the device "
                                  "got at enrolment")
        with self.db.read() as session:
            device_id = session.scalar(select(Device.id).where(Device.credential_hash == hash_secret(secret)))
        if device_id is None:
            raise Unauthenticated("device credential not accepted (unknown, or replaced by a newer one); an "
                                  "operator can issue a new one with POST /v1/devices/{id}/credential")
        return device_id

    def get_device(self, device_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            return _device_view(self._device(session, device_id))

    def list_devices(self, *, tag: str | None = None, group: str | None = None, asset: str | None = None,
                     after: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Devices in id order, filtered; page with ``after`` (the last id of the previous page)."""
        query = select(Device).order_by(Device.id).limit(min(limit, MAX_PAGE))
        if tag is not None:
            query = query.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
        if group is not None:
            query = query.where(Device.id.in_(select(GroupMember.device_id).where(GroupMember.group_name == group)))
        if asset is not None:
            query = query.where(Device.id.in_(select(DeviceAsset.device_id).where(DeviceAsset.asset_id == asset)))
        if after is not None:
            query = query.where(Device.id > after)
        with self.db.read() as session:
            return [_device_view(d) for d in session.scalars(query)]

    # ------------------------------------------------------------------------------------------- bundles
    def publish_bundle(self, data: bytes, *, actor: str, reason: str) -> dict[str, Any]:
        """Verify ``data`` (signature by a trusted key, structure and manifest schema, payload hash, expiry; the
        delta layer's own checks) and that its base is registered, store it, add it to the catalogue."""
        bundle = verify_bundle(data, self.trusted_keys)  # BundleError (400) on anything a device would refuse
        sha256 = hashlib.sha256(data).hexdigest()
        with self._change("publishing the bundle") as session:
            existing = session.get(BundleRecord, sha256)
            if existing is not None:
                raise Conflict(f"this exact bundle is already in the catalogue ({existing.asset_id} "
                               f"{existing.version}, sha256 {sha256[:16]}…); nothing to do")
            self._refuse_duplicate(session, bundle)
            if session.get(KnownBase, bundle.base_sha256) is None:
                raise BundleRejected(f"bundle {bundle.asset_id} {bundle.version} needs base {bundle.base_name!r} "
                                     f"with sha256 {bundle.base_sha256[:16]}…, which is not registered; register "
                                     "it with POST /v1/bases (name and sha256), then upload again")
            record = BundleRecord(
                sha256=sha256, asset_id=bundle.asset_id, version=bundle.version, release=bundle.release,
                parent_version=bundle.parent_version, base_sha256=bundle.base_sha256,
                method=str(bundle.manifest["peft"]["method"]), signer=bundle.signer, size_bytes=len(data),
                created_at=bundle.created_at, expires_at=bundle.expires_at, uploaded_at=now(), uploaded_by=actor,
            )
            session.add(record)
            for hook in self.publish_hooks:
                hook(session, record)  # may refuse (e.g. the TUF target cannot be signed): nothing stored yet
            # The file is on disk (fsynced) before the row naming it commits: a crash leaves at worst an
            # unreferenced file, never a row without its file.
            self.store.put(data)
            self._audit(session, actor, "bundle.publish", f"bundle:{sha256}", reason,
                        {"asset_id": bundle.asset_id, "version": bundle.version, "release": bundle.release,
                         "base_sha256": bundle.base_sha256, "signer": bundle.signer, "size_bytes": len(data)})
            return _bundle_view(record)

    @staticmethod
    def _refuse_duplicate(session: Session, bundle: Bundle) -> None:
        for column, value, what in ((BundleRecord.version, bundle.version, "version"),
                                    (BundleRecord.release, bundle.release, "release")):
            clash = session.scalar(select(BundleRecord).where(BundleRecord.asset_id == bundle.asset_id,
                                                              column == value))
            if clash is not None:
                raise Conflict(f"asset {bundle.asset_id} already has a bundle with {what} {value} (sha256 "
                               f"{clash.sha256[:16]}…, different content); pack this one with a new version and a "
                               "higher release")

    def list_bundles(self, *, asset_id: str | None = None, offset: int = 0, limit: int = 100
                     ) -> list[dict[str, Any]]:
        """Bundles ordered by asset and release, filtered by asset; page with ``offset``."""
        query = (select(BundleRecord).order_by(BundleRecord.asset_id, BundleRecord.release)
                 .offset(offset).limit(min(limit, MAX_PAGE)))
        if asset_id is not None:
            query = query.where(BundleRecord.asset_id == asset_id)
        with self.db.read() as session:
            return [_bundle_view(b) for b in session.scalars(query)]

    def get_bundle(self, sha256: str) -> dict[str, Any]:
        with self.db.read() as session:
            return _bundle_view(self._bundle(session, sha256))

    def bundle_file(self, sha256: str) -> bytes:
        with self.db.read() as session:
            self._bundle(session, sha256)
        return self.store.get(sha256)

    @staticmethod
    def _bundle(session: Session, sha256: str) -> BundleRecord:
        record = session.get(BundleRecord, sha256)
        if record is None:
            raise NotFound(f"no bundle with sha256 {sha256[:16]}… in the catalogue; list them with GET /v1/bundles")
        return record

    # ------------------------------------------------------------------------------------------- audit, counts
    def audit(self, *, after_id: int = 0, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]:
        """Audit entries in the order they were written, after ``after_id``."""
        query = select(AuditEntry).where(AuditEntry.id > after_id).order_by(AuditEntry.id).limit(min(limit, MAX_PAGE))
        if target is not None:
            query = query.where(AuditEntry.target == target)
        with self.db.read() as session:
            return [{"id": e.id, "at": iso(e.at), "actor": e.actor, "action": e.action, "target": e.target,
                     "reason": e.reason, "details": e.details} for e in session.scalars(query)]

    def counts(self) -> dict[str, int]:
        """Rows per kind (for /metrics and /health)."""
        with self.db.read() as session:
            def count(model: type[Any]) -> int:
                return int(session.scalar(select(func.count()).select_from(model)) or 0)

            return {"devices": count(Device), "groups": count(Group), "bases": count(KnownBase),
                    "bundles": count(BundleRecord), "audit_entries": count(AuditEntry),
                    "operator_tokens": count(OperatorToken)}


def _token_view(token: OperatorToken) -> dict[str, Any]:
    return {"id": token.id, "name": token.name, "scopes": token.scopes.split(","), "created_at": iso(token.created_at),
            "created_by": token.created_by, "revoked_at": iso(token.revoked_at)}


def _base_view(base: KnownBase) -> dict[str, Any]:
    return {"name": base.name, "sha256": base.sha256, "registered_at": iso(base.registered_at)}


def _device_view(device: Device) -> dict[str, Any]:
    return {
        "device_id": device.id, "enrolled_at": iso(device.enrolled_at), "enrolled_by": device.enrolled_by,
        "updated_at": iso(device.updated_at), "tags": [t.tag for t in device.tags],
        "groups": [m.group_name for m in device.memberships], "assets": [a.asset_id for a in device.assets],
        "bases": [b.base_sha256 for b in device.bases],
    }


def _bundle_view(record: BundleRecord) -> dict[str, Any]:
    return {
        "sha256": record.sha256, "asset_id": record.asset_id, "version": record.version, "release": record.release,
        "parent_version": record.parent_version, "base_sha256": record.base_sha256, "method": record.method,
        "signer": record.signer, "size_bytes": record.size_bytes, "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at), "uploaded_at": iso(record.uploaded_at),
        "uploaded_by": record.uploaded_by,
    }


__all__ = ["Operator", "Registry", "iso", "now"]
