"""Running sums of results per device, model and minute (cloud_hub/rollups.py), filled from
the results already stored.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_BACKFILL_CHUNK = 50_000


def upgrade() -> None:
    op.create_table(
        "result_rollups",
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
    op.create_index("ix_result_rollups_bucket", "result_rollups", ["bucket"])
    _backfill()


def _backfill() -> None:
    """The results stored before this revision, summed in chunks under the replica name
    "migration" (a hub replica never takes that name: it adds to its own rows)."""
    from cloud_hub import rollups

    conn = op.get_bind()
    results = sa.table("results", *(sa.column(c) for c in (
        "n", "device", "model", "ts", "offloaded", "cloud_label", "edge_label", "degraded",
        "source", "latency_ms", "offload_bytes")))
    last = -1
    while True:
        rows = conn.execute(sa.select(results).where(results.c.n > last)
                            .order_by(results.c.n).limit(_BACKFILL_CHUNK)).all()
        if not rows:
            return
        last = rows[-1].n
        # Minutes only: the hour rows (revision 0010) are added up from these.
        rollups.add_span(conn, rollups.MINUTE, "migration", rollups.tally(rows))


def downgrade() -> None:
    op.drop_index("ix_result_rollups_bucket", "result_rollups")
    op.drop_table("result_rollups")
