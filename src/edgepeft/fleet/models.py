"""The registry's tables (SQLAlchemy 2 ORM). The schema itself is created by the Alembic migrations in
``migrations/versions``; ``tests/unit/fleet/test_registry.py`` checks that they and these classes agree.

Rows, in short: an ``OperatorToken`` (hash only) authenticates a person or a pipeline with scopes; a ``Device``
(credential hash only) carries tags, belongs to ``Group`` s, monitors assets and holds bases; a ``KnownBase`` is a
base model known by its sha256; a ``BundleRecord`` is a verified ``.edelta`` in the catalogue, stored on disk
under its own sha256; an ``AuditEntry`` records every change and is never updated or deleted (database
triggers refuse it).

Example:
    >>> sorted(Model.metadata.tables)[:3]
    ['audit_log', 'bases', 'bundles']
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SHA256_CHARS = 64
NAME_CHARS = 128


class Model(DeclarativeBase):
    """Declarative base of the registry's tables (not called Base: a base here is a base model)."""


class OperatorToken(Model):
    __tablename__ = "operator_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_CHARS))
    # sha256 of the token: tokens are 256-bit random strings, so a fast hash is enough (nothing to brute-force),
    # and a unique index turns authentication into one lookup.
    token_hash: Mapped[str] = mapped_column(String(SHA256_CHARS), unique=True)
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated, sorted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(256))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Device(Model):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)
    credential_hash: Mapped[str] = mapped_column(String(SHA256_CHARS), unique=True)
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    enrolled_by: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    tags: Mapped[list[DeviceTag]] = relationship(cascade="all, delete-orphan", order_by="DeviceTag.tag")
    memberships: Mapped[list[GroupMember]] = relationship(cascade="all, delete-orphan",
                                                          order_by="GroupMember.group_name")
    assets: Mapped[list[DeviceAsset]] = relationship(cascade="all, delete-orphan", order_by="DeviceAsset.asset_id")
    bases: Mapped[list[DeviceBase]] = relationship(cascade="all, delete-orphan", order_by="DeviceBase.base_sha256")


class DeviceTag(Model):
    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)

    __table_args__ = (Index("ix_device_tags_tag", "tag"),)


class Group(Model):
    __tablename__ = "groups"

    name: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)
    description: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class GroupMember(Model):
    __tablename__ = "group_members"

    group_name: Mapped[str] = mapped_column(ForeignKey("groups.name"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)

    __table_args__ = (Index("ix_group_members_device_id", "device_id"),)


class KnownBase(Model):
    """A base model the fleet runs, named by the sha256 a bundle's manifest binds to (``state_sha256``)."""

    __tablename__ = "bases"

    sha256: Mapped[str] = mapped_column(String(SHA256_CHARS), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_CHARS))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeviceAsset(Model):
    __tablename__ = "device_assets"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)

    __table_args__ = (Index("ix_device_assets_asset_id", "asset_id"),)


class DeviceBase(Model):
    __tablename__ = "device_bases"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    base_sha256: Mapped[str] = mapped_column(ForeignKey("bases.sha256"), primary_key=True)


class BundleRecord(Model):
    """A verified bundle in the catalogue; the file is at ``STORAGE/bundles/<sha256[:2]>/<sha256>.edelta``."""

    __tablename__ = "bundles"

    sha256: Mapped[str] = mapped_column(String(SHA256_CHARS), primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(NAME_CHARS))
    version: Mapped[str] = mapped_column(String(NAME_CHARS))
    release: Mapped[int] = mapped_column(BigInteger)
    parent_version: Mapped[str | None] = mapped_column(String(NAME_CHARS), nullable=True)
    base_sha256: Mapped[str] = mapped_column(ForeignKey("bases.sha256"))
    method: Mapped[str] = mapped_column(String(64))
    signer: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    uploaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    uploaded_by: Mapped[str] = mapped_column(String(256))

    # One version name and one release counter per asset: devices order releases by the counter, and two files
    # claiming the same one would make "newer" ambiguous.
    __table_args__ = (
        UniqueConstraint("asset_id", "version", name="uq_bundles_asset_version"),
        UniqueConstraint("asset_id", "release", name="uq_bundles_asset_release"),
    )


class AuditEntry(Model):
    """One change: who (``actor``), what (``action`` on ``target``, ``details``), when (``at``), why (``reason``)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)


# ------------------------------------------------------------------------------------------------ distribution
class TufMetadata(Model):
    """One signed TUF metadata file, as served: ``repo`` is ``image`` or ``director`` (the shared director root)
    or ``director:<device id>`` (that device's targets, snapshot and timestamp); ``role`` is ``root``,
    ``targets``, ``snapshot``, ``timestamp`` or a delegated role (``bundles``, ``bins-3f``). Kept in the database,
    not on the server's disk, so that API replicas are stateless and a publish commits the bundle row and its
    metadata in one transaction. ``digest`` is what the file was built from (the director's assignment digest),
    so a replica can tell whether it is current without parsing it."""

    __tablename__ = "tuf_metadata"

    repo: Mapped[str] = mapped_column(String(NAME_CHARS + 16), primary_key=True)
    role: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    digest: Mapped[str] = mapped_column(String(SHA256_CHARS), default="")
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeviceAssignment(Model):
    """What a device should run: one bundle per asset. The director's targets for a device are exactly its
    assignments; rollouts (and nothing else) change them."""

    __tablename__ = "device_assignments"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)
    bundle_sha256: Mapped[str] = mapped_column(ForeignKey("bundles.sha256"))
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"), nullable=True)
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_device_assignments_bundle", "bundle_sha256"),)


# ------------------------------------------------------------------------------------------------ rollouts
class Rollout(Model):
    """A deployment of one bundle (or two, for an A/B test) to a group, wave by wave, behind health gates.

    ``state``: ``running``, ``paused``, ``completed``, ``halted`` (a health gate failed: the affected devices
    were rolled back), ``cancelled``. ``strategy`` and ``gates`` are the validated request fields
    (:mod:`edgepeft.fleet.rollouts`)."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_CHARS))
    asset_id: Mapped[str] = mapped_column(String(NAME_CHARS))
    group_name: Mapped[str] = mapped_column(ForeignKey("groups.name"))
    bundle_sha256: Mapped[str] = mapped_column(ForeignKey("bundles.sha256"))
    bundle_b_sha256: Mapped[str | None] = mapped_column(ForeignKey("bundles.sha256"), nullable=True)
    strategy: Mapped[dict[str, Any]] = mapped_column(JSON)
    gates: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_rollouts_state", "state"),)


class RolloutWave(Model):
    """One wave of a rollout (wave 0 is the canary): when it opened, when every device in it was healthy."""

    __tablename__ = "rollout_waves"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    healthy_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RolloutDevice(Model):
    """A device's part in a rollout: its wave and arm, what it ran before (to roll back to), where it stands.

    ``status``: ``pending`` (wave not open), ``assigned`` (the director lists the new bundle), ``installed``
    (the device reports it active), ``healthy`` / ``unhealthy`` (health gate verdict), ``rolled_back``,
    ``failed`` (the device reported an install error), ``cancelled``. ``baseline`` is the device's health on
    its previous version, the reference the gate compares against."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    arm: Mapped[str] = mapped_column(String(1), default="a")
    bundle_sha256: Mapped[str] = mapped_column(ForeignKey("bundles.sha256"))
    previous_sha256: Mapped[str | None] = mapped_column(ForeignKey("bundles.sha256"), nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(NAME_CHARS), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_rollout_devices_status", "rollout_id", "status"),
                      Index("ix_rollout_devices_device", "device_id"))


# ------------------------------------------------------------------------------------------------ device reports
class DeviceStatus(Model):
    """The latest report of a device's agent: when it was last seen and what it runs (``installed``: per asset,
    the active version and release and the installed versions), its last error."""

    __tablename__ = "device_status"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    installed: Mapped[dict[str, Any]] = mapped_column(JSON)
    last_error: Mapped[str] = mapped_column(Text, default="")
    reports: Mapped[int] = mapped_column(BigInteger, default=0)


class DeviceHealth(Model):
    """A device's latest health of one adapter version: rows scored and alerts raised since it became active,
    quantiles of score / threshold over its recent rows (1.0 is the threshold), errors and crashes."""

    __tablename__ = "device_health"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)
    version: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)
    rows: Mapped[int] = mapped_column(BigInteger)
    alerts: Mapped[int] = mapped_column(BigInteger)
    score_q50: Mapped[float | None] = mapped_column(Float, nullable=True)
    score_q95: Mapped[float | None] = mapped_column(Float, nullable=True)
    score_q99: Mapped[float | None] = mapped_column(Float, nullable=True)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    crashes: Mapped[int] = mapped_column(BigInteger, default=0)
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeviceEvent(Model):
    """A device's history, as its agent and the rollouts saw it: ``kind`` is ``installed``, ``activated``,
    ``rolled_back``, ``error``, ``assigned``, ``health`` ... (the console's device page reads it)."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(32))
    asset_id: Mapped[str] = mapped_column(String(NAME_CHARS), default="")
    version: Mapped[str] = mapped_column(String(NAME_CHARS), default="")
    rollout_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_device_events_device", "device_id", "id"),)
