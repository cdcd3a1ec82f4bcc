"""Running sums per hour beside those per minute (cloud_hub/rollups.py), filled from the
minute rows already kept.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_PAGE_ROWS = 20_000


def upgrade() -> None:
    op.create_table(
        "result_rollups_hour",
        sa.Column("device", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("replica", sa.String(64), primary_key=True),
        sa.Column("results", sa.BigInteger, nullable=False),
        sa.Column("offloaded", sa.BigInteger, nullable=False),
        sa.Column("cloud_answered", sa.BigInteger, nullable=False),
        sa.Column("agree", sa.BigInteger, nullable=False),
        sa.Column("degraded", sa.BigInteger, nullable=False),
        sa.Column("bytes_offloaded", sa.BigInteger, nullable=False),
        sa.Column("latency", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_result_rollups_hour_bucket", "result_rollups_hour", ["bucket"])
    _backfill()


def _backfill() -> None:
    """Every replica's minute rows added up into its hour rows."""
    from cloud_hub import rollups

    conn = op.get_bind()
    minutes = sa.table("result_rollups", *(sa.column(c) for c in (
        "device", "model", "bucket", "replica", *rollups.COUNT_COLUMNS, "latency")))
    order = (minutes.c.replica, minutes.c.device, minutes.c.model, minutes.c.bucket)
    last: tuple[str, str, str, int] | None = None
    while True:  # pages in key order: a long-running fleet has millions of minutes
        q = sa.select(minutes).order_by(*order).limit(_PAGE_ROWS)
        if last is not None:
            q = q.where(sa.tuple_(*order) > last)
        rows = conn.execute(q).all()
        if not rows:
            return
        last = (rows[-1].replica, rows[-1].device, rows[-1].model, rows[-1].bucket)
        by_replica: dict[str, dict[rollups.Key, rollups.Tally]] = {}
        for row in rows:
            rollups.tally_row(by_replica.setdefault(row.replica, {}), row, rollups.HOUR)
        for replica, hours in by_replica.items():
            rollups.add_span(conn, rollups.HOUR, replica, hours)


def downgrade() -> None:
    op.drop_index("ix_result_rollups_hour_bucket", "result_rollups_hour")
    op.drop_table("result_rollups_hour")
