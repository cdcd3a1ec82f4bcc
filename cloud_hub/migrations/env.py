"""Alembic environment: runs on the connection `cloud_hub.db.migrate` hands it."""

from __future__ import annotations

from alembic import context

from cloud_hub.db import Base

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
