"""Devices and result records.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("online", sa.Boolean, nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("backend", sa.String(32), nullable=True),
        sa.Column("telemetry", sa.JSON, nullable=True),
    )
    op.create_table(
        "results",
        sa.Column("n", _Serial, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("input_ref", sa.String(128), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("edge_label", sa.Integer, nullable=False),
        sa.Column("edge_confidence", sa.Float, nullable=False),
        sa.Column("offloaded", sa.Boolean, nullable=False),
        sa.Column("cloud_label", sa.Integer, nullable=True),
        sa.Column("cloud_model", sa.String(128), nullable=True),
        sa.Column("final_label", sa.Integer, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("degraded", sa.Boolean, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("edge_ms", sa.Float, nullable=False),
        sa.Column("offload_bytes", sa.Integer, nullable=False),
    )
    op.create_index("ix_results_device", "results", ["device"])
    op.create_index("ix_results_ts", "results", ["ts"])
    op.create_index("ix_results_model", "results", ["model"])
    op.create_index("ix_results_offloaded", "results", ["offloaded"])


def downgrade() -> None:
    op.drop_table("results")
    op.drop_table("devices")
