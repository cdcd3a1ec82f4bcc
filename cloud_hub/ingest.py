"""Writes what devices send: result records (idempotent on the record id), telemetry, status."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_hub import rollups
from cloud_hub.db import Device, HardExample, Result
from cloud_hub.errors import StoreError
from fleet.contract.protocol import HardExample as WireHardExample
from fleet.contract.protocol import ResultRecord, tensor_bytes
from fleet.contract.protocol import Telemetry as WireTelemetry
from fleet.contract.selectors import label_problems

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """`inserted`: ids stored now. `duplicates`: every received copy not stored (already there,
    or repeated within the batch). `committed`: each id of the batch once, all safe to ack."""

    inserted: list[str]
    duplicates: list[str]
    committed: list[str]


def _insert(session: Session, table: type[Result] | type[HardExample]) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise StoreError(f"ingest supports SQLite and PostgreSQL, not {name}")


def _split(ids: list[str], existing: set[str]) -> tuple[list[str], list[str], list[str]]:
    """(new ids to insert once, every duplicate copy, each id once)."""
    fresh: list[str] = []
    dup: list[str] = []
    seen: set[str] = set()
    for i in ids:
        if i in existing or i in seen:
            dup.append(i)
        else:
            fresh.append(i)
        seen.add(i)
    return fresh, dup, list(dict.fromkeys(ids))


# Columns of a stored result, in the order the bulk insert writes them.
RESULT_COLUMNS = ("id", "device", "seq", "ts", "received_at", "input_ref", "model", "backend",
                  "policy", "score", "edge_label", "edge_confidence", "offloaded", "cloud_label",
                  "cloud_model", "final_label", "source", "degraded", "latency_ms", "edge_ms",
                  "offload_bytes")
_COLS = ", ".join(RESULT_COLUMNS)
_SQLITE_IN = 500  # ids per "id IN (...)" query, under SQLite's variables cap


def _row(r: ResultRecord, now: float) -> tuple[Any, ...]:
    return (r.id, r.device, r.seq, r.ts, now, r.input_ref, r.model, r.backend, r.policy,
            r.score, r.edge_label, r.edge_confidence, r.offloaded, r.cloud_label,
            r.cloud_model, r.final_label, r.source, r.degraded, r.latency_ms, r.edge_ms,
            r.offload_bytes)


def _insert_pg(conn: Connection, rows: list[tuple[Any, ...]]) -> set[str]:
    """COPY into a temporary table, then insert-or-ignore from it: two round trips for any
    number of rows. Returns the ids inserted (RETURNING: exact under concurrent replicas)."""
    info = conn.connection.info
    dbapi = conn.connection.driver_connection
    if dbapi is None:
        raise StoreError("the database connection is closed")
    with dbapi.cursor() as cur:
        if not info.get("results_in"):
            cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS results_in ON COMMIT DELETE ROWS AS "
                        f"SELECT {_COLS} FROM results WITH NO DATA")
            info["results_in"] = True
        with cur.copy(f"COPY results_in ({_COLS}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
        cur.execute(f"INSERT INTO results ({_COLS}) SELECT {_COLS} FROM results_in "
                    "ON CONFLICT (id) DO NOTHING RETURNING id")
        inserted = {r[0] for r in cur.fetchall()}
    return inserted  # results_in empties itself at the commit


def _insert_sqlite(conn: Connection, rows: list[tuple[Any, ...]]) -> set[str]:
    """Insert-or-ignore in one executemany; the ids already there are read first (SQLite has
    one writer at a time, so what this transaction read is what it inserted against)."""
    ids = [r[0] for r in rows]
    existing: set[str] = set()
    for i in range(0, len(ids), _SQLITE_IN):
        chunk = ids[i:i + _SQLITE_IN]
        existing.update(conn.scalars(select(Result.id).where(Result.id.in_(chunk))))
    fresh = [r for r in rows if r[0] not in existing]
    if fresh:
        marks = ", ".join("?" * len(RESULT_COLUMNS))
        conn.exec_driver_sql(f"INSERT OR IGNORE INTO results ({_COLS}) VALUES ({marks})", fresh)
    return {r[0] for r in fresh}


_TOUCH = text("INSERT INTO devices (id, first_seen, last_seen, online, duplicates) "
              "VALUES (:id, :now, :now, :online, :dup) ON CONFLICT (id) DO UPDATE SET "
              "last_seen = excluded.last_seen, "
              "duplicates = devices.duplicates + excluded.duplicates")


def _touch_many(conn: Connection, devices: list[str], duplicates_of: list[str],
                now: float) -> None:
    """Every device of a batch seen now (created if new), its duplicates counted by the
    database: one statement for all devices, in id order (two replicas never deadlock)."""
    dup_counts = Counter(duplicates_of)
    conn.execute(_TOUCH, [{"id": d, "now": now, "online": True, "dup": dup_counts[d]}
                          for d in sorted(set(devices))])


def ingest_results(sessions: sessionmaker, records: list[ResultRecord],
                   replica: str = "hub-0") -> IngestOutcome:
    """Insert records whose id is new; count the others as duplicates. One transaction, of
    any number of records from any number of devices (the ingest worker stores every results
    message it holds at once).

    Insert-or-ignore on the unique id makes this safe when the same batch arrives twice, also at
    two hub replicas at once. The caller acknowledges every id after this returns: inserted and
    duplicate records are both committed. In the same transaction each device's last-seen time
    and duplicate counter move, and the inserted records are added to `replica`'s running sums
    (cloud_hub/rollups.py).
    """
    if not records:
        return IngestOutcome([], [], [])
    now = time.time()
    by_id: dict[str, ResultRecord] = {}
    for r in records:  # a batch may repeat an id: the first copy counts
        by_id.setdefault(r.id, r)
    rows = [_row(r, now) for r in by_id.values()]
    try:
        with sessions.begin() as s:
            conn = s.connection()
            name = conn.dialect.name
            if name == "postgresql":
                inserted = _insert_pg(conn, rows)
            elif name == "sqlite":
                inserted = _insert_sqlite(conn, rows)
            else:
                raise StoreError(f"ingest supports SQLite and PostgreSQL, not {name}")
            fresh, dup, committed = _split([r.id for r in records], set(by_id) - inserted)
            _touch_many(conn, [r.device for r in records], [by_id[i].device for i in dup], now)
            rollups.add(conn, replica, rollups.tally(by_id[i] for i in fresh))
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store {len(records)} results: {exc}") from None
    return IngestOutcome(fresh, dup, committed)


@dataclass(frozen=True, slots=True)
class LateAnswer:
    """A hard example with the answer the cloud model gave it on arrival."""

    example: WireHardExample
    label: int
    confidence: float
    model: str


def ingest_hard_examples(sessions: sessionmaker, device: str,
                         answers: list[LateAnswer]) -> IngestOutcome:
    """Store hard examples with their late cloud answers, idempotent on the id. One transaction."""
    return ingest_hard_examples_many(sessions, [(device, answers)])[0]


def ingest_hard_examples_many(sessions: sessionmaker,
                              messages: list[tuple[str, list[LateAnswer]]]
                              ) -> list[IngestOutcome]:
    """The hard examples of several messages (device, answers), in one transaction; an outcome
    per message. Idempotent on the id: a copy already stored, or earlier in the same call,
    is a duplicate."""
    if not any(answers for _, answers in messages):
        return [IngestOutcome([], [], []) for _ in messages]
    now = time.time()
    rows: dict[str, dict[str, Any]] = {}
    for device, answers in messages:
        for a in answers:
            rows.setdefault(a.example.id, _hard_row(a, device, now))
    try:
        with sessions.begin() as s:
            ids = list(rows)
            existing: set[str] = set()
            for i in range(0, len(ids), _SQLITE_IN):
                existing.update(s.scalars(select(HardExample.id)
                                          .where(HardExample.id.in_(ids[i:i + _SQLITE_IN]))))
            fresh_rows = [r for i, r in rows.items() if i not in existing]
            if fresh_rows:
                s.execute(_insert(s, HardExample).values(fresh_rows)
                          .on_conflict_do_nothing(index_elements=["id"]))
            outcomes, seen, devices, dup_devices = [], set(existing), [], []
            for device, answers in messages:
                fresh, dup, committed = _split([a.example.id for a in answers], seen)
                seen.update(fresh)
                outcomes.append(IngestOutcome(fresh, dup, committed))
                devices.append(device)
                dup_devices += [device] * len(dup)
            _touch_many(s.connection(), devices, dup_devices, now)
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store the hard examples of {len(messages)} messages: "
                         f"{exc}") from None
    return outcomes


def _hard_row(a: LateAnswer, device: str, now: float) -> dict[str, Any]:
    ex = a.example
    return {"id": ex.id, "device": device, "ts": ex.ts, "received_at": now, "model": ex.model,
            "reason": ex.reason, "edge_label": ex.edge_label, "edge_score": ex.edge_score,
            "cloud_label": a.label, "cloud_confidence": a.confidence, "cloud_model": a.model,
            "dtype": ex.input.dtype.name, "shape": list(ex.input.shape),
            "data": tensor_bytes(ex.input)}


def record_telemetry_many(sessions: sessionmaker,
                          items: list[tuple[str, WireTelemetry]]) -> dict[str, list[str]]:
    """Store the telemetry of many devices (the newest of each) in one transaction; returns
    per device what was wrong with its labels."""
    now = time.time()
    problems: dict[str, list[str]] = {}
    try:
        with sessions.begin() as s:
            ids = sorted({d for d, _ in items})
            held = {dev.id: dev for dev in s.scalars(select(Device).where(Device.id.in_(ids)))}
            for device, telemetry in items:
                dev = held.get(device)
                if dev is None:
                    dev = held[device] = Device(id=device, first_seen=now, last_seen=now,
                                                online=True)
                    s.add(dev)
                problems[device] = _apply_telemetry(dev, telemetry, now)
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store the telemetry of {len(items)} devices: {exc}") \
            from None
    return problems


def _apply_telemetry(dev: Device, t: WireTelemetry, now: float) -> list[str]:
    bad: list[str] = []
    # Online or not is the status channel's to say (retained, and the broker's last will):
    # telemetry stored a moment after an offline status must not bring the device back.
    dev.last_seen = now
    dev.telemetry = t.header
    dev.wire_version = t.version
    # The model and its fidelity are also in update reports, stored at once, while telemetry
    # waits up to half a second: a heartbeat older than the last report (both on the device's
    # clock) must not take the model back to the one before an install.
    current = dev.reported_at is None or t.ts is None or t.ts >= dev.reported_at
    if current and t.model:
        dev.model = t.model
    dev.backend = t.backend or dev.backend
    if current and t.fidelity is not None:
        dev.fidelity = t.fidelity
    if t.offload is not None:
        dev.offload = t.offload
    labels = t.labels
    if labels is not None and labels != (dev.reported_labels or {}):
        bad = label_problems(labels)
        if bad:
            log.warning("device %s reports labels the hub cannot select on: %s",
                        dev.id, "; ".join(bad[:3]))
        else:
            dev.reported_labels = labels
    return bad


def record_status(sessions: sessionmaker, device: str, online: bool) -> None:
    now = time.time()
    try:
        with sessions.begin() as s:
            dev = s.get(Device, device)
            if dev is None:
                s.add(Device(id=device, first_seen=now, last_seen=now, online=online))
            else:
                dev.online = online
                if online:
                    dev.last_seen = now
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store status of {device}: {exc}") from None
