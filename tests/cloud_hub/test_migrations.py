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
        assert version == "0006"
        assert {"devices", "results", "hard_examples", "models", "rollback_directives",
                "desired_models"} <= set(inspect(eng).get_table_names())
    finally:
        eng.dispose()


def test_upgrade_from_0001_keeps_devices(database_url: str) -> None:
    """A hub upgraded in place: rows written under 0001 survive, the new counter starts at 0."""
    from alembic import command

    from cloud_hub.db import alembic_config

    eng = make_engine(database_url)
    try:
        with eng.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
            conn.exec_driver_sql("INSERT INTO devices (id, first_seen, last_seen, online) "
                                 "VALUES ('old-1', 1.0, 2.0, false)")
        init_db(eng)
        with eng.connect() as conn:
            row = conn.exec_driver_sql("SELECT id, duplicates, update_state FROM devices").one()
        assert tuple(row) == ("old-1", 0, None)
    finally:
        eng.dispose()
