"""Model registry, rollback directives, desired models, devices' reported update state.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_DEVICE_COLUMNS = (
    ("update_state", sa.String(16)), ("update_target", sa.String(128)),
    ("update_error", sa.String(1024)), ("update_code", sa.String(32)), ("reported_at", sa.Float),
)


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        for name, typ in _DEVICE_COLUMNS:
            b.add_column(sa.Column(name, typ, nullable=True))
    op.create_table(
        "models",
        sa.Column("n", _Serial, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("manifest", sa.JSON, nullable=False),
        sa.Column("total_bytes", sa.BigInteger, nullable=False),
        sa.Column("keyid", sa.String(32), nullable=False),
        sa.Column("uploaded_at", sa.Float, nullable=False),
        sa.UniqueConstraint("name", "version"),
    )
    op.create_index("ix_models_name", "models", ["name"])
    op.create_table(
        "rollback_directives",
        sa.Column("n", _Serial, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("from_version", sa.BigInteger, nullable=False),
        sa.Column("to_version", sa.BigInteger, nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.UniqueConstraint("name", "from_version", "to_version"),
    )
    op.create_table(
        "desired_models",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("published", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("desired_models")
    op.drop_table("rollback_directives")
    op.drop_index("ix_models_name", "models")
    op.drop_table("models")
    with op.batch_alter_table("devices") as b:
        for name, _typ in reversed(_DEVICE_COLUMNS):
            b.drop_column(name)
