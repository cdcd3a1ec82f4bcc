"""Rollouts, their devices, leases; device labels.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("reported_labels", sa.JSON, nullable=True))
        b.add_column(sa.Column("labels", sa.JSON, nullable=True))
    op.create_table(
        "rollouts",
        sa.Column("id", _Serial, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("selector", sa.String(512), nullable=False),
        sa.Column("stages", sa.JSON, nullable=False),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("stage_started_at", sa.Float, nullable=True),
        sa.Column("bake_started_at", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("reason", sa.String(1024), nullable=True),
        sa.Column("gates", sa.JSON, nullable=True),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.BigInteger, primary_key=True),
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("previous_model", sa.String(128), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("assigned_at", sa.Float, nullable=False),
        sa.Column("installed_at", sa.Float, nullable=True),
        sa.Column("error", sa.String(1024), nullable=True),
    )
    op.create_index("ix_rollout_devices_assigned_at", "rollout_devices", ["assigned_at"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_index("ix_rollout_devices_assigned_at", "rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index("ix_rollouts_state", "rollouts")
    op.drop_table("rollouts")
    with op.batch_alter_table("devices") as b:
        b.drop_column("labels")
        b.drop_column("reported_labels")
