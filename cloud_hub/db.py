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


def ping(engine: Engine) -> bool:
    try:
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
        return True
    except SQLAlchemyError:
        return False


def session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
