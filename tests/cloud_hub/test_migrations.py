"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from cloud_hub.db import Base, init_db, make_engine


def test_migrations_match_the_models(database_url: str) -> None:
    eng = make_engine(database_url)
    try:
        init_db(eng)
        init_db(eng)  # a second upgrade is a no-op
        with eng.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models and migrations differ; add a migration: {diff}"
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        assert version == "0001"
        assert {"devices", "results"} <= set(inspect(eng).get_table_names())
    finally:
        eng.dispose()
