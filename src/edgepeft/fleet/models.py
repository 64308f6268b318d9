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

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
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
