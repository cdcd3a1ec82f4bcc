"""The protocol version each device speaks, for the assignments written to it.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("wire_version", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("devices", "wire_version")
