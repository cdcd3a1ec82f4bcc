"""Database tables and sessions (SQLAlchemy 2; SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    LargeBinary,
    Select,
    String,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from cloud_hub.errors import HubConfigError, StoreError

# Integer autoincrement works on SQLite only for INTEGER PRIMARY KEY; BigInteger elsewhere.
_Serial = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    backend: Mapped[str | None] = mapped_column(String(32), nullable=True)
    telemetry: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Every copy of a result or hard example this device sent again after the hub had stored it
    # (resends after a lost acknowledgement): counted, never stored twice.
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The device's own report of its model updates (retained `reported` messages).
    update_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    update_target: Mapped[str | None] = mapped_column(String(128), nullable=True)
    update_error: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    update_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Labels select devices for rollouts: those the device reports (its settings' `labels`,
    # via telemetry) overlaid with those an operator set through the API.
    reported_labels: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    labels: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    # The fidelity check of the model the device runs, on its serving backend (reported state
    # and telemetry), and its offload controller's state (telemetry): mode, target, threshold,
    # drift.
    fidelity: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    offload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The protocol version the device's telemetry last came in: its assignments are written in
    # it (fleet/contract/protocol.py). None: not heard yet, version 1.
    wire_version: Mapped[int | None] = mapped_column(Integer, nullable=True)

    def effective_labels(self) -> dict[str, str]:
        return {**(self.reported_labels or {}), **(self.labels or {})}


class Result(Base):
    __tablename__ = "results"

    n: Mapped[int] = mapped_column(_Serial, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    device: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float, index=True)
    received_at: Mapped[float] = mapped_column(Float)
    input_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    backend: Mapped[str] = mapped_column(String(32))
    policy: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    edge_label: Mapped[int] = mapped_column(Integer)
    edge_confidence: Mapped[float] = mapped_column(Float)
    offloaded: Mapped[bool] = mapped_column(Boolean, index=True)
    cloud_label: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cloud_model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    final_label: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))
    degraded: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float] = mapped_column(Float)
    edge_ms: Mapped[float] = mapped_column(Float)
    offload_bytes: Mapped[int] = mapped_column(Integer)


class _RollupColumns:
    """The columns of a rollup row (see ResultRollup)."""

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, index=True)
    replica: Mapped[str] = mapped_column(String(64), primary_key=True)
    results: Mapped[int] = mapped_column(BigInteger)
    offloaded: Mapped[int] = mapped_column(BigInteger)
    cloud_answered: Mapped[int] = mapped_column(BigInteger)
    agree: Mapped[int] = mapped_column(BigInteger)
    degraded: Mapped[int] = mapped_column(BigInteger)
    bytes_offloaded: Mapped[int] = mapped_column(BigInteger)
    latency: Mapped[bytes] = mapped_column(LargeBinary)


class ResultRollup(_RollupColumns, Base):
    """Running sums of the results of one device on one model in one minute, as one hub
    replica stored them: what /v1/stats and the rollout gates read instead of result rows.

    Each replica adds to its own rows only (`replica` is in the key), so replicas never write
    the same row; readers add the replicas up. `latency` is a sparse histogram
    (cloud_hub/latency_sketch.py) of every result's latency by source."""

    __tablename__ = "result_rollups"


class ResultRollupHour(_RollupColumns, Base):
    """The same sums per hour, kept beside the minutes in the same transaction: a window of
    whole hours, or no window, reads 60 times fewer rows (cloud_hub/rollups.py)."""

    __tablename__ = "result_rollups_hour"


class HardExample(Base):
    """A hard input the device answered without the cloud (offline, past its deadline, hub busy
    or failing), answered late by the cloud model: for statistics and retraining."""

    __tablename__ = "hard_examples"

    n: Mapped[int] = mapped_column(_Serial, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    device: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    received_at: Mapped[float] = mapped_column(Float)
    model: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(16))
    edge_label: Mapped[int] = mapped_column(Integer)
    edge_score: Mapped[float] = mapped_column(Float)
    cloud_label: Mapped[int] = mapped_column(Integer)
    cloud_confidence: Mapped[float] = mapped_column(Float)
    cloud_model: Mapped[str] = mapped_column(String(128))
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ModelVersion(Base):
    """A signed bundle in the registry; its files live in the artifact store."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    n: Mapped[int] = mapped_column(_Serial, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    keyid: Mapped[str] = mapped_column(String(32))
    uploaded_at: Mapped[float] = mapped_column(Float)


class RollbackDirective(Base):
    """A signed permission to move devices from one version of a bundle to an older one."""

    __tablename__ = "rollback_directives"
    __table_args__ = (UniqueConstraint("name", "from_version", "to_version"),)

    n: Mapped[int] = mapped_column(_Serial, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    from_version: Mapped[int] = mapped_column(BigInteger)
    to_version: Mapped[int] = mapped_column(BigInteger)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)


class DesiredModel(Base):
    """The newest assignment of each device, as published (retained) on its `desired` topic."""

    __tablename__ = "desired_models"

    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[float] = mapped_column(Float)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    # False until the broker took the message; the bridge publishes it again on reconnect.
    published: Mapped[bool] = mapped_column(Boolean, default=False)
    # The offload setting the assignment carries (fleet.contract.assignment.OffloadTarget),
    # kept across the assignments of rollouts; None: the device's own settings.
    offload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Rollout(Base):
    """A bundle version rolled out to the devices a label selector picks, stage by stage."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(_Serial, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    selector: Mapped[str] = mapped_column(String(512))
    # [{"percent": 5} | {"count": 10}, ...], cumulative.
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # Gate thresholds, bake time, rate: see cloud_hub/rollout_gates.py.
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[int] = mapped_column(Integer, default=0)
    stage_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    bake_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    # The last evaluation of the current stage's gates, for `show`.
    gates: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RolloutDevice(Base):
    """One device in a rollout: its stage, the model it ran before, and how its install went."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[int] = mapped_column(Integer)
    previous_model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # assigned, installed, failed, reverting, reverted, revert_failed
    state: Mapped[str] = mapped_column(String(16))
    assigned_at: Mapped[float] = mapped_column(Float, index=True)
    installed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(String(1024), nullable=True)


class Lease(Base):
    """Who runs a singleton job (the rollout controller) among the hub's replicas, until when."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)


class ArtifactFile(Base):
    """A file of a stored bundle (the database artifact store)."""

    __tablename__ = "artifact_files"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    path: Mapped[str] = mapped_column(String(256), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)


class ArtifactChunk(Base):
    """One chunk (1 MiB) of a stored bundle file, in order."""

    __tablename__ = "artifact_chunks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    path: Mapped[str] = mapped_column(String(256), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class AuditEntry(Base):
    """A change made through the API, or a refused attempt at one: who, what, the outcome."""

    __tablename__ = "audit_log"

    n: Mapped[int] = mapped_column(_Serial, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    subject: Mapped[str] = mapped_column(String(128))
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    via: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    status: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)


_Q = TypeVar("_Q", bound=Select)


def filter_results(q: _Q, device: str | None = None, since: float | None = None,
                   until: float | None = None,
                   table: type[Result] | type[HardExample] = Result) -> _Q:
    """Narrow a query over results (or hard examples) to a device and a time window
    [since, until)."""
    if device:
        q = q.where(table.device == device)
    if since is not None:
        q = q.where(table.ts >= since)
    if until is not None:
        q = q.where(table.ts < until)
    return q


RESULT_FIELDS = tuple(c.name for c in Result.__table__.columns if c.name not in ("n",
                                                                                  "received_at"))


def make_engine(url: str) -> Engine:
    try:
        if url.startswith("sqlite"):
            eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(eng, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
                cur = dbapi_conn.cursor()
                # WAL: readers (the API) do not block the ingest writer.
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            return eng
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except (ArgumentError, ImportError) as exc:
        raise HubConfigError(f"cannot use database URL {url!r}: {exc}") from None


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def init_db(engine: Engine) -> None:
    """Bring the database schema to the newest migration (Alembic)."""
    from alembic import command

    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate the hub's database: {exc}") from None


def check_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not the newest this hub knows (for replicas that do
    not migrate at start: a migration Job runs `cloud-hub migrate` once per release)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            head = ScriptDirectory.from_config(alembic_config(conn)).get_current_head()
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot read the hub's database schema: {exc}") from None
    if current != head:
        raise HubConfigError(f"the database schema is at {current or 'nothing'}, this hub needs "
                             f"{head}: run `cloud-hub migrate` (the migration Job), or set "
                             "EHI_HUB_MIGRATE_ON_START=true")


def ping(engine: Engine) -> bool:
    try:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        return True
    except SQLAlchemyError:
        return False


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
