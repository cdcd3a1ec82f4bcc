"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from cloud_hub.db import Base, ResultRollupHour, init_db, make_engine


def test_migrations_match_the_models(database_url: str) -> None:
    eng = make_engine(database_url)
    try:
        init_db(eng)
        init_db(eng)  # a second upgrade is a no-op
        with eng.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"models and migrations differ; add a migration: {diff}"
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        assert version == "0010"
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


def test_upgrade_to_0008_sums_the_results_already_stored(database_url: str) -> None:
    """Results stored before the running sums existed are summed by the migration: /v1/stats
    reads the same counts before and after an upgrade."""
    from alembic import command

    from cloud_hub.db import alembic_config, session_factory
    from cloud_hub.rollups import read

    eng = make_engine(database_url)
    try:
        with eng.begin() as conn:
            command.upgrade(alembic_config(conn), "0007")
            for i in range(30):
                off = i % 3 == 0
                conn.exec_driver_sql(
                    "INSERT INTO results (id, device, seq, ts, received_at, model, backend, "
                    "policy, score, edge_label, edge_confidence, offloaded, cloud_label, "
                    "final_label, source, degraded, latency_ms, edge_ms, offload_bytes) VALUES "
                    f"('r{i}', 'd{i % 2}', {i}, {1000 + i * 10}, 0, 'm@1', 'ort', 'p', 0.1, 1, "
                    f"0.9, {'true' if off else 'false'}, {2 if off else 'NULL'}, 1, "
                    f"'{'cloud' if off else 'edge'}', false, {i + 1}.0, 0.1, "
                    f"{300 if off else 0})")
        init_db(eng)
        with session_factory(eng)() as s:
            sums = read(s, by_group=False)
        assert sums.counts.tolist() == [[30, 10, 10, 0, 0, 3000]]
        assert int(sums.hist.sum()) == 30
    finally:
        eng.dispose()


def test_upgrade_to_0010_adds_up_the_minutes_into_hours(database_url: str) -> None:
    """The hour rows are added up from every replica's minute rows: a read with no window,
    now from the hours, gives what the minutes held."""
    from alembic import command

    from cloud_hub import rollups
    from cloud_hub.db import alembic_config, session_factory
    from tests.cloud_hub.test_hub import record

    recs = [record(i, device=f"d{i % 3}", ts=500.0 + i * 211.0) for i in range(90)]
    eng = make_engine(database_url)
    try:
        with eng.begin() as conn:
            command.upgrade(alembic_config(conn), "0009")
            rollups.add_span(conn, rollups.MINUTE, "hub-a", rollups.tally(recs[:40]))
            rollups.add_span(conn, rollups.MINUTE, "hub-b", rollups.tally(recs[40:]))
        init_db(eng)
        with session_factory(eng)() as s:
            assert rollups.plan(None, None) == [(rollups.HOUR, None, None)]
            sums = rollups.read(s)
            hours = s.execute(select(ResultRollupHour.bucket, ResultRollupHour.replica)).all()
        assert len({b for b, _ in hours}) == 6 and {r for _, r in hours} == {"hub-a", "hub-b"}
        by_device = {g[0]: c for g, c in zip(sums.groups, sums.counts.tolist(), strict=True)}
        for d in ("d0", "d1", "d2"):
            mine = [r for r in recs if r.device == d]
            assert by_device[d][:2] == [len(mine), sum(r.offloaded for r in mine)]
        assert int(sums.hist.sum()) == 90
    finally:
        eng.dispose()


def test_a_replica_that_does_not_migrate_refuses_an_old_schema(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from cloud_hub.core.config import HubSettings
    from cloud_hub.errors import HubConfigError
    from cloud_hub.main import create_app
    from models import CLOUD_BUNDLE

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    settings = HubSettings(cloud_bundle=CLOUD_BUNDLE, database_url=url, migrate_on_start=False,
                           artifacts_dir=tmp_path / "a", assignment_key=tmp_path / "hub.key")
    with (pytest.raises(HubConfigError, match="cloud-hub migrate"),
          TestClient(create_app(settings, with_bridge=False))):
        pass
    eng = make_engine(url)
    init_db(eng)  # what the migration Job does
    eng.dispose()
    with TestClient(create_app(settings, with_bridge=False)) as c:
        assert c.get("/readyz").status_code == 200
