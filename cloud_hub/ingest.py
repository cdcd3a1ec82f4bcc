"""Writes what devices send: result records (idempotent on the record id), telemetry, status."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_hub.db import Device, Result
from cloud_hub.errors import StoreError
from fleet.protocol import ResultRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """`inserted`: ids stored now. `duplicates`: every received copy not stored (already there,
    or repeated within the batch). `committed`: each id of the batch once, all safe to ack."""

    inserted: list[str]
    duplicates: list[str]
    committed: list[str]


def _insert(session: Session) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(Result)
    if name == "sqlite":
        return sqlite.insert(Result)
    raise StoreError(f"ingest supports SQLite and PostgreSQL, not {name}")


def ingest_results(sessions: sessionmaker, records: list[ResultRecord]) -> IngestOutcome:
    """Insert records whose id is new; count the others as duplicates. One transaction.

    Insert-or-ignore on the unique id makes this safe when the same batch arrives twice, also at
    two hub replicas at once. The caller acknowledges every id after this returns: inserted and
    duplicate records are both committed.
    """
    if not records:
        return IngestOutcome([], [], [])
    now = time.time()
    by_id = {r.id: r for r in records}  # a batch may repeat an id
    try:
        with sessions.begin() as s:
            existing = set(s.scalars(select(Result.id).where(Result.id.in_(list(by_id)))))
            rows = [{**r.model_dump(), "received_at": now}
                    for rid, r in by_id.items() if rid not in existing]
            if rows:
                stmt = _insert(s).values(rows).on_conflict_do_nothing(index_elements=["id"])
                s.execute(stmt)
            _touch_devices(s, {r.device for r in records}, now)
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store {len(records)} results: {exc}") from None
    # Under a race with another replica, on_conflict_do_nothing may skip a row counted here as
    # inserted; the acknowledgement is right either way (the row is committed), only the
    # inserted/duplicate split of the metrics can be off by those rows.
    inserted = [r["id"] for r in rows]
    fresh = set(inserted)
    dup: list[str] = []
    for r in records:
        if r.id in fresh:
            fresh.discard(r.id)  # the first copy was stored; later ones are duplicates
        else:
            dup.append(r.id)
    return IngestOutcome(inserted, dup, list(by_id))


def _touch_devices(s: Session, devices: set[str], now: float) -> None:
    for d in devices:
        dev = s.get(Device, d)
        if dev is None:
            s.add(Device(id=d, first_seen=now, last_seen=now, online=True))
        else:
            dev.last_seen = now


def record_telemetry(sessions: sessionmaker, device: str, telemetry: dict[str, Any]) -> None:
    now = time.time()
    try:
        with sessions.begin() as s:
            dev = s.get(Device, device)
            if dev is None:
                dev = Device(id=device, first_seen=now, last_seen=now, online=True)
                s.add(dev)
            dev.last_seen = now
            dev.online = True
            dev.telemetry = telemetry
            dev.model = str(telemetry.get("model")) if telemetry.get("model") else dev.model
            dev.backend = str(telemetry.get("backend")) if telemetry.get("backend") else dev.backend
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store telemetry of {device}: {exc}") from None


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
