"""The registry: operator tokens, devices (tags, groups, assets, bases), bases, bundles, the audit log.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)

# The audit log is append-only in the database itself, not just in our code: a bug, a stray script or a
# console session that tries UPDATE or DELETE fails.
SQLITE_TRIGGERS = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
)
POSTGRESQL_TRIGGERS = (
    "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$",
    "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
)


def upgrade() -> None:
    op.create_table(
        "operator_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("revoked_at", TIME, nullable=True),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("credential_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("enrolled_at", TIME, nullable=False),
        sa.Column("enrolled_by", sa.String(256), nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
    )
    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String(128), primary_key=True),
    )
    op.create_index("ix_device_tags_tag", "device_tags", ["tag"])
    op.create_table(
        "groups",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_table(
        "group_members",
        sa.Column("group_name", sa.String(128), sa.ForeignKey("groups.name"), primary_key=True),
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_index("ix_group_members_device_id", "group_members", ["device_id"])
    op.create_table(
        "bases",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("registered_at", TIME, nullable=False),
    )
    op.create_table(
        "device_assets",
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("asset_id", sa.String(128), primary_key=True),
    )
    op.create_index("ix_device_assets_asset_id", "device_assets", ["asset_id"])
    op.create_table(
        "device_bases",
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("base_sha256", sa.String(64), sa.ForeignKey("bases.sha256"), primary_key=True),
    )
    op.create_table(
        "bundles",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("asset_id", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("release", sa.BigInteger(), nullable=False),
        sa.Column("parent_version", sa.String(128), nullable=True),
        sa.Column("base_sha256", sa.String(64), sa.ForeignKey("bases.sha256"), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("signer", sa.String(16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=True),
        sa.Column("uploaded_at", TIME, nullable=False),
        sa.Column("uploaded_by", sa.String(256), nullable=False),
        sa.UniqueConstraint("asset_id", "version", name="uq_bundles_asset_version"),
        sa.UniqueConstraint("asset_id", "release", name="uq_bundles_asset_release"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", TIME, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    dialect = op.get_bind().dialect.name
    for statement in {"sqlite": SQLITE_TRIGGERS, "postgresql": POSTGRESQL_TRIGGERS}.get(dialect, ()):
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    for table in ("audit_log", "bundles", "device_bases", "device_assets", "bases", "group_members", "groups",
                  "device_tags", "devices", "operator_tokens"):
        op.drop_table(table)
