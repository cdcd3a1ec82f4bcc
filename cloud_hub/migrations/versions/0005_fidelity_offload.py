"""Devices' fidelity figures and offload state; the offload setting of assignments.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("fidelity", sa.JSON, nullable=True))
        b.add_column(sa.Column("offload", sa.JSON, nullable=True))
    with op.batch_alter_table("desired_models") as b:
        b.add_column(sa.Column("offload", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("desired_models") as b:
        b.drop_column("offload")
    with op.batch_alter_table("devices") as b:
        b.drop_column("offload")
        b.drop_column("fidelity")
