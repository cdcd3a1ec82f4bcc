"""Writes what devices send: result records (idempotent on the record id), telemetry, status."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud_hub.db import Device, HardExample, Result
from cloud_hub.errors import StoreError
from fleet.contract.protocol import HardExample as WireHardExample
from fleet.contract.protocol import ResultRecord, tensor_bytes
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


def _insert_new(s: Session, table: type[Result] | type[HardExample], ids: list[str],
                row: Callable[[str], dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """Insert a row for each id the table does not hold yet (insert-or-ignore on the unique
    id); returns what `_split` does."""
    existing = set(s.scalars(select(table.id).where(table.id.in_(list(dict.fromkeys(ids))))))
    fresh, dup, committed = _split(ids, existing)
    if fresh:
        s.execute(_insert(s, table).values([row(i) for i in fresh])
                  .on_conflict_do_nothing(index_elements=["id"]))
    return fresh, dup, committed


def ingest_results(sessions: sessionmaker, records: list[ResultRecord]) -> IngestOutcome:
    """Insert records whose id is new; count the others as duplicates. One transaction.

    Insert-or-ignore on the unique id makes this safe when the same batch arrives twice, also at
    two hub replicas at once. The caller acknowledges every id after this returns: inserted and
    duplicate records are both committed. Each device's duplicate counter grows in the same
    transaction.
    """
    if not records:
        return IngestOutcome([], [], [])
    now = time.time()
    by_id = {r.id: r for r in records}  # a batch may repeat an id
    try:
        with sessions.begin() as s:
            fresh, dup, committed = _insert_new(
                s, Result, [r.id for r in records],
                lambda i: {**by_id[i].model_dump(), "received_at": now})
            _touch_devices(s, [r.device for r in records],
                           [by_id[i].device for i in dup], now)
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store {len(records)} results: {exc}") from None
    # Under a race with another replica, on_conflict_do_nothing may skip a row counted here as
    # inserted; the acknowledgement is right either way (the row is committed), only the
    # inserted/duplicate split of the metrics can be off by those rows.
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
    if not answers:
        return IngestOutcome([], [], [])
    now = time.time()
    by_id = {a.example.id: a for a in answers}
    try:
        with sessions.begin() as s:
            fresh, dup, committed = _insert_new(
                s, HardExample, [a.example.id for a in answers],
                lambda i: _hard_row(by_id[i], device, now))
            _touch_devices(s, [device], [device] * len(dup), now)
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store {len(answers)} hard examples: {exc}") from None
    return IngestOutcome(fresh, dup, committed)


def _hard_row(a: LateAnswer, device: str, now: float) -> dict[str, Any]:
    ex = a.example
    return {"id": ex.id, "device": device, "ts": ex.ts, "received_at": now, "model": ex.model,
            "reason": ex.reason, "edge_label": ex.edge_label, "edge_score": ex.edge_score,
            "cloud_label": a.label, "cloud_confidence": a.confidence, "cloud_model": a.model,
            "dtype": ex.input.dtype.name, "shape": list(ex.input.shape),
            "data": tensor_bytes(ex.input)}


def _touch_devices(s: Session, devices: list[str], duplicates_of: list[str], now: float) -> None:
    dup_counts = Counter(duplicates_of)
    for d in dict.fromkeys(devices):
        n = dup_counts[d]
        dev = s.get(Device, d)
        if dev is None:
            s.add(Device(id=d, first_seen=now, last_seen=now, online=True, duplicates=n))
            continue
        dev.last_seen = now
        if n:
            # Computed by the database: two hub replicas counting at once lose no update.
            dev.duplicates = Device.duplicates + n


def record_telemetry(sessions: sessionmaker, device: str, telemetry: dict[str, Any]
                     ) -> list[str]:
    """Store a device's telemetry; returns what was wrong with its labels (kept as they were
    then: a selector could not name them anyway), empty if nothing."""
    now = time.time()
    bad: list[str] = []
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
            if isinstance(telemetry.get("fidelity"), dict):
                dev.fidelity = telemetry["fidelity"]
            if isinstance(telemetry.get("offload"), dict):
                dev.offload = telemetry["offload"]
            labels = telemetry.get("labels")
            if isinstance(labels, dict) and labels != (dev.reported_labels or {}):
                labels = {str(k): str(v) for k, v in labels.items()}
                bad = label_problems(labels)
                if bad:
                    log.warning("device %s reports labels the hub cannot select on: %s",
                                device, "; ".join(bad[:3]))
                else:
                    dev.reported_labels = labels
    except SQLAlchemyError as exc:
        raise StoreError(f"could not store telemetry of {device}: {exc}") from None
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
