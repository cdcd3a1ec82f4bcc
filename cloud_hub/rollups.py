"""Running sums of results per device, model and minute (table `result_rollups`), and per
hour (`result_rollups_hour`).

Ingest adds every newly stored result to its minute's row and its hour's row in the same
transaction as the row itself, so the sums are exactly the stored results. /v1/stats and the
rollout gates read these sums, a few rows per device and minute, instead of every result: their
cost grows with devices and minutes, not with inputs. Time filters work at the resolution of a
minute (`BUCKET_S`): a window [since, until) takes every minute that starts before `until` and
ends after `since`. The hours the window covers whole are read from the hour rows and only its
ragged ends from the minute rows: the whole history of a fleet of 1,000 devices over its last
20 minutes is 1,000-2,000 rows instead of 21,000 (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, TextClause, select, text, tuple_
from sqlalchemy.orm import Session

from cloud_hub import latency_sketch as sketch
from cloud_hub.db import ResultRollup, ResultRollupHour

BUCKET_S = 60
HOUR_S = 3600
# Bucket bounds handed to the database stay within BIGINT.
_BOUND = 1 << 62
_KEYS_PER_SELECT = 300  # (device, model, bucket) triples per query: under SQLite's variables cap


@dataclass(slots=True)
class Tally:
    results: int = 0
    offloaded: int = 0
    cloud_answered: int = 0
    agree: int = 0
    degraded: int = 0
    bytes_offloaded: int = 0
    latency: dict[int, int] = field(default_factory=dict)

    def add(self, *, offloaded: bool, cloud_label: int | None, edge_label: int,
            degraded: bool, source: str, latency_ms: float, offload_bytes: int) -> None:
        self.results += 1
        if offloaded:
            self.offloaded += 1
            if cloud_label is not None:
                self.cloud_answered += 1
                self.agree += cloud_label == edge_label
        self.degraded += bool(degraded)
        self.bytes_offloaded += offload_bytes
        k = sketch.key_of(source, latency_ms)
        self.latency[k] = self.latency.get(k, 0) + 1

    def merge(self, other: Tally) -> None:
        for c in COUNT_COLUMNS:
            setattr(self, c, getattr(self, c) + getattr(other, c))
        for k, n in other.latency.items():
            self.latency[k] = self.latency.get(k, 0) + n


Key = tuple[str, str, int]  # device, model, bucket


def bucket_of(ts: float) -> int:
    return math.floor(ts / BUCKET_S) * BUCKET_S if math.isfinite(ts) else 0


def tally(rows: Iterable[Any]) -> dict[Key, Tally]:
    """Sums of result rows (anything with the record's attributes) per device, model, minute."""
    out: dict[Key, Tally] = {}
    for r in rows:
        _slot(out, r.device, r.model, bucket_of(r.ts), MINUTE).add(
            offloaded=r.offloaded, cloud_label=r.cloud_label, edge_label=r.edge_label,
            degraded=r.degraded, source=r.source, latency_ms=r.latency_ms,
            offload_bytes=r.offload_bytes)
    return out


COUNT_COLUMNS = ("results", "offloaded", "cloud_answered", "agree", "degraded",
                 "bytes_offloaded")
_KEY_COLUMNS = ("device", "model", "bucket", "replica")


def _upsert(table: str) -> TextClause:
    """Counters added by the database; the histogram as merged by `add_span`."""
    return text(
        f"INSERT INTO {table} ({', '.join((*_KEY_COLUMNS, *COUNT_COLUMNS, 'latency'))}) "
        f"VALUES ({', '.join(f':{c}' for c in (*_KEY_COLUMNS, *COUNT_COLUMNS, 'latency'))}) "
        f"ON CONFLICT ({', '.join(_KEY_COLUMNS)}) DO UPDATE SET "
        + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in COUNT_COLUMNS)
        + ", latency = excluded.latency")


@dataclass(frozen=True, slots=True)
class Span:
    """One resolution of the sums: its bucket length and its table."""

    seconds: int
    table: type[ResultRollup] | type[ResultRollupHour]
    upsert: TextClause


MINUTE = Span(BUCKET_S, ResultRollup, _upsert("result_rollups"))
HOUR = Span(HOUR_S, ResultRollupHour, _upsert("result_rollups_hour"))


def _slot(tallies: dict[Key, Tally], device: str, model: str, bucket: int,
          span: Span) -> Tally:
    """The tally of the `span` bucket holding `bucket`, made empty if new."""
    key = (device, model, bucket - bucket % span.seconds)
    t = tallies.get(key)
    if t is None:
        t = tallies[key] = Tally()
    return t


def coarsen(tallies: dict[Key, Tally], span: Span) -> dict[Key, Tally]:
    """Minute tallies added up per `span` bucket."""
    out: dict[Key, Tally] = {}
    for (device, model, bucket), t in tallies.items():
        _slot(out, device, model, bucket, span).merge(t)
    return out


def tally_row(tallies: dict[Key, Tally], row: Any, span: Span) -> None:
    """Add a rollup row (device, model, bucket, the counters, latency) to `tallies` at its
    `span` bucket."""
    _slot(tallies, row.device, row.model, int(row.bucket), span).merge(Tally(
        **{c: int(getattr(row, c)) for c in COUNT_COLUMNS}, latency=sketch.decode(row.latency)))


def add(conn: Connection, replica: str, tallies: dict[Key, Tally]) -> None:
    """Add minute tallies to this replica's minute and hour rows, in the caller's
    transaction."""
    if tallies:
        add_span(conn, MINUTE, replica, tallies)
        add_span(conn, HOUR, replica, coarsen(tallies, HOUR))


def add_span(conn: Connection, span: Span, replica: str, tallies: dict[Key, Tally]) -> None:
    """Add tallies (keyed by `span` buckets) to this replica's rows of one span. The counters
    are added by the database; the histogram is merged here from the row as read (only this
    replica's ingest writer writes its rows)."""
    if not tallies:
        return
    table = span.table
    keys = sorted(tallies)
    held: dict[Key, bytes] = {}
    for i in range(0, len(keys), _KEYS_PER_SELECT):
        chunk = keys[i:i + _KEYS_PER_SELECT]
        q = select(table.device, table.model, table.bucket, table.latency).where(
            table.replica == replica,
            tuple_(table.device, table.model, table.bucket).in_(chunk))
        for d, m, b, lat in conn.execute(q):
            held[(d, m, int(b))] = lat
    params = []
    for key in keys:
        t = tallies[key]
        merged = dict(t.latency)
        if key in held:
            sketch.merge_into(merged, held[key])
        params.append({"device": key[0], "model": key[1], "bucket": key[2], "replica": replica,
                       **{c: getattr(t, c) for c in COUNT_COLUMNS},
                       "latency": sketch.encode(merged)})
    conn.execute(span.upsert, params)


@dataclass(frozen=True, slots=True)
class Sums:
    """Rollup rows added up per group; `hist` holds the bins from `lo` on."""

    groups: list[tuple[str, str]]
    counts: np.ndarray  # [group, 6]: results, offloaded, cloud_answered, agree, degraded, bytes
    hist: np.ndarray    # [group, kind, bin - lo]
    lo: int = 0


def plan(since: float | None, until: float | None
         ) -> list[tuple[Span, int | None, int | None]]:
    """Where the window [since, until) is read from: (span, first bucket, end bucket) parts,
    None for no bound. The window is the minutes from the one holding `since` to the last one
    that starts before `until`; the hours inside it come from the hour rows, the rest from
    the minute rows."""
    lo = None if since is None else _clamp(bucket_of(since) if math.isfinite(since)
                                           else (-_BOUND if since < 0 else _BOUND))
    hi = None if until is None else _clamp(
        math.ceil(until / BUCKET_S) * BUCKET_S if math.isfinite(until)
        else (_BOUND if until > 0 else -_BOUND))
    h0 = None if lo is None else -(-lo // HOUR_S) * HOUR_S  # the first whole hour
    h1 = None if hi is None else hi // HOUR_S * HOUR_S  # the end of the last whole hour
    if h0 is not None and h1 is not None and h1 <= h0:
        return [(MINUTE, lo, hi)]
    parts: list[tuple[Span, int | None, int | None]] = [(HOUR, h0, h1)]
    if lo is not None and h0 is not None and lo < h0:
        parts.append((MINUTE, lo, h0))
    if hi is not None and h1 is not None and h1 < hi:
        parts.append((MINUTE, h1, hi))
    return parts


def _clamp(b: int) -> int:
    return max(-_BOUND, min(_BOUND, b))


def read(s: Session, *, device: str | None = None, devices: Sequence[str] | None = None,
         models: Sequence[str] | None = None, since: float | None = None,
         until: float | None = None, by_group: bool = True) -> Sums:
    """The sums of the rows that match, per (device, model) or (with `by_group` False) in
    one group ("", "")."""
    rows: list[Any] = []
    for span, lo, hi in plan(since, until):
        table = span.table
        q = select(table.device, table.model, *(getattr(table, c) for c in COUNT_COLUMNS),
                   table.latency)
        if device:
            q = q.where(table.device == device)
        if devices is not None:
            q = q.where(table.device.in_(list(devices)))
        if models is not None:
            q = q.where(table.model.in_(list(models)))
        if lo is not None:
            q = q.where(table.bucket >= lo)
        if hi is not None:
            q = q.where(table.bucket < hi)
        rows.extend(s.connection().execute(q).all())
    index: dict[tuple[str, str], int] = {}
    if not rows:
        return Sums([], np.zeros((0, len(COUNT_COLUMNS)), np.int64),
                   np.zeros((0, len(sketch.KINDS), 0), np.int64))
    # One pass in C (strict=True checks 21,000 row iterators one by one: 10x slower).
    columns = list(zip(*rows, strict=False))
    if by_group:
        gidx = [index.setdefault(k, len(index)) for k in zip(columns[0], columns[1],
                                                             strict=True)]
    else:
        index[("", "")] = 0
        gidx = [0] * len(rows)
    n = len(index)
    owner = np.asarray(gidx, np.int64)
    counts = np.array(columns[2:8], np.int64)  # [column, row]
    total = np.stack([np.bincount(owner, weights=c, minlength=n) for c in counts],
                     axis=1).astype(np.int64)
    blobs = columns[8]
    hist, lo = sketch.dense(blobs, gidx, n)
    return Sums(list(index), total, hist, lo)
