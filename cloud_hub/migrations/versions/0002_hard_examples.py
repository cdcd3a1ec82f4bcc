"""Hard examples answered late by the cloud; per-device duplicate counter.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("duplicates", sa.BigInteger, nullable=False, server_default="0"))
    op.create_table(
        "hard_examples",
        sa.Column("n", _Serial, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("edge_label", sa.Integer, nullable=False),
        sa.Column("edge_score", sa.Float, nullable=False),
        sa.Column("cloud_label", sa.Integer, nullable=False),
        sa.Column("cloud_confidence", sa.Float, nullable=False),
        sa.Column("cloud_model", sa.String(128), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("shape", sa.JSON, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_hard_examples_device", "hard_examples", ["device"])
    op.create_index("ix_hard_examples_ts", "hard_examples", ["ts"])


def downgrade() -> None:
    op.drop_index("ix_hard_examples_ts", "hard_examples")
    op.drop_index("ix_hard_examples_device", "hard_examples")
    op.drop_table("hard_examples")
    with op.batch_alter_table("devices") as b:
        b.drop_column("duplicates")
