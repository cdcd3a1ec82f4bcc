"""Aggregates over result records: per device and model version."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.db import Device, HardExample, Result, filter_results


def percentile(values: list[float], q: float) -> float | None:
    """The `q`th percentile of `values` to 3 decimals (None for none)."""
    return round(float(np.percentile(values, q)), 3) if values else None


def compute_stats(s: Session, device: str | None = None, since: float | None = None,
                  until: float | None = None) -> dict[str, Any]:
    """Count, offload rate, edge-cloud agreement on offloaded inputs, latency percentiles and
    bytes offloaded, per (device, model) and in total.

    Latency percentiles are computed here from the selected rows (portable across SQLite and
    PostgreSQL); narrow with `device`/`since` on large tables.
    """
    q = select(Result.device, Result.model, Result.offloaded, Result.cloud_label,
               Result.edge_label, Result.latency_ms, Result.offload_bytes, Result.degraded,
               Result.source)
    q = filter_results(q, device, since, until)
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    total: list[Any] = []
    for row in s.execute(q):
        groups[(row.device, row.model)].append(row)
        total.append(row)
    return {
        "groups": [{"device": d, "model": m, **_summary(rows)}
                   for (d, m), rows in sorted(groups.items())],
        "total": _summary(total),
        "late_answers": _late(s, device, since, until),
        "offload": _offload(s, device),
    }


def _offload(s: Session, device: str | None) -> dict[str, Any]:
    """Each device's offloading as its latest telemetry says (mode, target, recent rate, drift),
    and the devices whose controller reports drift: the input of retraining."""
    q = select(Device.id, Device.offload).where(Device.offload.is_not(None)).order_by(Device.id)
    if device is not None:
        q = q.where(Device.id == device)
    rows = []
    for dev_id, off in s.execute(q):
        if not isinstance(off, dict):
            continue
        rows.append({"device": dev_id, **{k: off.get(k) for k in (
            "mode", "target", "recent_rate", "threshold", "drift", "drifting")}})
    return {"devices": rows, "drifting": [r["device"] for r in rows if r["drifting"] is True]}


def _late(s: Session, device: str | None, since: float | None,
          until: float | None) -> dict[str, Any]:
    """Hard examples answered late by the cloud: how many, why late, and how often the edge's
    final (degraded) answer agreed with the cloud's."""
    q = filter_results(select(HardExample.reason, HardExample.edge_label,
                              HardExample.cloud_label), device, since, until, HardExample)
    rows = list(s.execute(q))
    reasons: dict[str, int] = defaultdict(int)
    for r in rows:
        reasons[r.reason] += 1
    agree = sum(1 for r in rows if r.edge_label == r.cloud_label)
    return {"count": len(rows), "by_reason": dict(sorted(reasons.items())),
            "edge_agreement": round(agree / len(rows), 4) if rows else None}


def _summary(rows: list[Any]) -> dict[str, Any]:
    n = len(rows)
    off = [r for r in rows if r.offloaded]
    answered = [r for r in off if r.cloud_label is not None]
    agree = sum(1 for r in answered if r.cloud_label == r.edge_label)
    local_lat = [r.latency_ms for r in rows if not r.offloaded]
    off_lat = [r.latency_ms for r in rows if r.source == "cloud"]
    all_lat = [r.latency_ms for r in rows]
    return {
        "count": n,
        "offloaded": len(off),
        "offload_rate": round(len(off) / n, 4) if n else None,
        "cloud_answered": len(answered),
        "degraded": sum(1 for r in rows if r.degraded),
        "agreement": round(agree / len(answered), 4) if answered else None,
        "latency_ms": {"p50": percentile(all_lat, 50), "p95": percentile(all_lat, 95),
                       "p99": percentile(all_lat, 99)},
        "local_latency_ms": {"p50": percentile(local_lat, 50), "p99": percentile(local_lat, 99)},
        "offload_latency_ms": {"p50": percentile(off_lat, 50), "p99": percentile(off_lat, 99)},
        "bytes_offloaded": int(sum(r.offload_bytes for r in rows)),
    }
