"""Distribution and rollouts: TUF metadata, device assignments, rollouts with waves, device reports and history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tuf_metadata",
        sa.Column("repo", sa.String(144), primary_key=True),
        sa.Column("role", sa.String(64), primary_key=True),
        sa.Column("version", sa.BigInteger(), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("asset_id", sa.String(128), nullable=False),
        sa.Column("group_name", sa.String(128), sa.ForeignKey("groups.name"), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), nullable=False),
        sa.Column("bundle_b_sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), nullable=True),
        sa.Column("strategy", sa.JSON(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("waves", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_waves",
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("wave", sa.Integer(), primary_key=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("opened_at", TIME, nullable=True),
        sa.Column("healthy_at", TIME, nullable=True),
    )
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("arm", sa.String(1), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), nullable=False),
        sa.Column("previous_sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), nullable=True),
        sa.Column("previous_version", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("baseline", sa.JSON(), nullable=True),
        sa.Column("updated_at", TIME, nullable=False),
    )
    op.create_index("ix_rollout_devices_status", "rollout_devices", ["rollout_id", "status"])
    op.create_index("ix_rollout_devices_device", "rollout_devices", ["device_id"])
    op.create_table(
        "device_assignments",
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("asset_id", sa.String(128), primary_key=True),
        sa.Column("bundle_sha256", sa.String(64), sa.ForeignKey("bundles.sha256"), nullable=False),
        sa.Column("rollout_id", sa.Integer(), sa.ForeignKey("rollouts.id"), nullable=True),
        sa.Column("assigned_at", TIME, nullable=False),
    )
    op.create_index("ix_device_assignments_bundle", "device_assignments", ["bundle_sha256"])
    op.create_table(
        "device_status",
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("last_seen_at", TIME, nullable=False),
        sa.Column("installed", sa.JSON(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("reports", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "device_health",
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("asset_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("alerts", sa.BigInteger(), nullable=False),
        sa.Column("score_q50", sa.Float(), nullable=True),
        sa.Column("score_q95", sa.Float(), nullable=True),
        sa.Column("score_q99", sa.Float(), nullable=True),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("crashes", sa.BigInteger(), nullable=False),
        sa.Column("since", TIME, nullable=True),
        sa.Column("reported_at", TIME, nullable=False),
    )
    op.create_table(
        "device_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("asset_id", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_device_events_device", "device_events", ["device_id", "id"])


def downgrade() -> None:
    for table in ("device_events", "device_health", "device_status", "device_assignments", "rollout_devices",
                  "rollout_waves", "rollouts", "tuf_metadata"):
        op.drop_table(table)
